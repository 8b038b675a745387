"""The public API contract: names, defaults, parameters, state_dict, backend selection."""

import math
import subprocess
import sys

import pytest
import torch

import embedfast
from embedfast import FusedInputEmbedding, available_backends, fused_input_embedding


def test_public_names():
    assert set(embedfast.__all__) == {"FusedInputEmbedding", "fused_input_embedding", "available_backends",
                                      "sinusoidal_positions", "from_modules", "patch_model", "PatchReport", "cpu_info",
                                      "CpuInfo"}


def test_parameters_and_initialisation_follow_nn_embedding():
    torch.manual_seed(0)
    module = FusedInputEmbedding(1000, 32, padding_idx=3, num_segments=2, position="learned", max_positions=64)
    assert module.weight.shape == (1000, 32) and module.segment_weight.shape == (2, 32)
    assert module.position_weight.shape == (64, 32)
    assert torch.count_nonzero(module.weight[3]) == 0
    assert abs(float(module.weight.detach().std()) - 1.0) < 0.05  # nn.Embedding: N(0, 1)
    assert module.embed_scale == pytest.approx(math.sqrt(32))
    plain = FusedInputEmbedding(10, 4, position="none", scale=None)
    assert plain.segment_weight is None and plain.position_weight is None and plain.embed_scale == 1.0


def test_state_dict_keys_and_nn_embedding_load():
    module = FusedInputEmbedding(20, 8, num_segments=2, position="learned", max_positions=10)
    assert set(module.state_dict()) == {"weight", "segment_weight", "position_weight"}
    embedding = torch.nn.Embedding(20, 8)
    sinusoidal = FusedInputEmbedding(20, 8)
    sinusoidal.load_state_dict(embedding.state_dict())
    assert torch.equal(sinusoidal.weight, embedding.weight)


def test_module_matches_functional_form():
    module = FusedInputEmbedding(20, 8, num_segments=2, padding_idx=0)
    ids, types = torch.randint(0, 20, (2, 5)), torch.randint(0, 2, (2, 5))
    functional = fused_input_embedding(ids, module.weight, token_type_ids=types, segment_weight=module.segment_weight,
                                       padding_idx=0)
    assert torch.equal(module(ids, types), functional)


def test_extra_repr_shows_configuration():
    text = repr(FusedInputEmbedding(20, 8, padding_idx=0, num_segments=2, sinusoid_layout="concat", scale=2.0))
    for part in ("20, 8", "padding_idx=0", "num_segments=2", "position='sinusoidal'", "sinusoid_layout='concat'",
                 "scale=2.0", "sparse=True", "backend='auto'"):
        assert part in text


def test_available_backends_on_cpu_never_prefer_the_triton_interpreter():
    names = available_backends("cpu")
    assert "reference" in names
    assert names == [name for name in ("extension", "reference", "triton") if name in names]


def test_unavailable_backend_fails_with_reason(monkeypatch):
    monkeypatch.setattr(embedfast.backends, "unavailable_reason", lambda backend, device: "not built here")
    with pytest.raises(RuntimeError, match="'extension' is not available on cpu: not built here"):
        FusedInputEmbedding(10, 4, backend="extension")(torch.tensor([1]))


def test_environment_variable_overrides_auto(monkeypatch):
    calls = []
    monkeypatch.setenv("EMBEDFAST_BACKEND", "reference")
    monkeypatch.setattr(embedfast.functional, "call_forward",
                        lambda backend, *inputs: calls.append(backend) or embedfast.ops.call_forward(backend, *inputs))
    FusedInputEmbedding(10, 4)(torch.tensor([1, 2]))
    assert calls == ["reference"]
    monkeypatch.setenv("EMBEDFAST_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="'nonsense'"):
        FusedInputEmbedding(10, 4)(torch.tensor([1, 2]))


def test_past_length_shifts_default_positions(backend, device):
    module = FusedInputEmbedding(30, 16, backend=backend, device=device)
    ids = torch.randint(0, 30, (2, 6), device=device)
    full = module(ids)
    assert torch.equal(module(ids[:, 4:], past_length=4), full[:, 4:])


def test_explicit_position_ids_equal_default(backend, device):
    module = FusedInputEmbedding(30, 16, num_segments=2, backend=backend, device=device)
    ids = torch.randint(0, 30, (2, 6), device=device)
    assert torch.equal(module(ids, position_ids=torch.arange(6, device=device)), module(ids))


def test_scalar_input_id(backend, device):
    module = FusedInputEmbedding(30, 16, backend=backend, device=device)
    out = module(torch.tensor(5, device=device))
    assert out.shape == (16,)
    assert torch.equal(out, module(torch.tensor([5], device=device))[0])


BROKEN_EXTENSION = '''
import importlib.abc, importlib.machinery, sys, warnings

class BrokenExtension(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An embedfast._C that exists but cannot load, as one built against another torch."""
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "embedfast._C" else None
    def create_module(self, spec):
        raise ImportError("undefined symbol: _ZN3c104cuda19CUDAErrorLogCaptureC1Ev")
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, BrokenExtension())
import torch, embedfast
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = embedfast.FusedInputEmbedding(10, 4)
    module(torch.tensor([1, 2])), module(torch.tensor([3]))
messages = [str(w.message) for w in caught if "embedfast" in str(w.message)]
print(len(messages))
print(messages[0] if messages else "")
print(embedfast.available_backends())
'''


def test_auto_warns_once_when_the_extension_is_built_but_does_not_load():
    result = subprocess.run([sys.executable, "-c", BROKEN_EXTENSION], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    count, message, backends = result.stdout.strip().splitlines()
    assert count == "1"
    assert "falls back from the extension" in message and "undefined symbol" in message
    assert "pip install --no-build-isolation" in message
    assert "extension" not in backends and "reference" in backends
