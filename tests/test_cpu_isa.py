"""The CPU kernels' instruction-set paths: the best one is taken, EMBEDFAST_CPU_ISA forces a lower one, and one
the CPU cannot run (or an unknown name) is an error naming the variable. (`make test` runs the extension's tests
again under each lower path the machine can run.)"""

import os
import subprocess
import sys

import pytest
import torch

import embedfast
from embedfast.spec import CpuIsa

pytestmark = pytest.mark.skipif(embedfast.cpu_info() is None, reason="the C++ extension is not built")


def _run(isa: str, code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, EMBEDFAST_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", f"import torch, embedfast\n{code}"], env=env, capture_output=True,
                          text=True, timeout=120)


def test_cpu_info_names_the_paths_of_spec():
    info = embedfast.cpu_info()
    names = [isa.name.lower() for isa in CpuIsa]
    assert info.runnable[0] == "portable" and info.runnable == [n for n in names if n in info.runnable]
    assert info.isa in info.runnable
    if "EMBEDFAST_CPU_ISA" not in os.environ:
        assert info.isa == info.runnable[-1]
    assert len(info.cache_bytes) == 3 and all(size > 0 for size in info.cache_bytes)


@pytest.mark.parametrize("isa", [isa.name.lower() for isa in CpuIsa])
def test_environment_variable_forces_a_path(isa):
    result = _run(isa, "print(embedfast.cpu_info().isa)")
    if isa in embedfast.cpu_info().runnable:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == isa
    else:
        assert result.returncode != 0
        assert f"EMBEDFAST_CPU_ISA={isa}, but this CPU can run only: {', '.join(embedfast.cpu_info().runnable)}" in result.stderr


def test_unknown_path_is_an_error_at_the_first_call():
    result = _run("sse9", "embedfast.FusedInputEmbedding(10, 8, backend='extension')(torch.tensor([1]))")
    assert result.returncode != 0
    assert "ValueError: EMBEDFAST_CPU_ISA must be auto or one of portable" in result.stderr and "got sse9" in result.stderr


@pytest.mark.parametrize("isa", [isa.name.lower() for isa in CpuIsa])
def test_every_path_agrees_with_the_reference(isa):
    """A quick cross-check per path in one process each (the whole matrix runs under each path in `make test`)."""
    if isa not in embedfast.cpu_info().runnable:
        pytest.skip(f"this CPU cannot run the {isa} path")
    code = """
from embedfast.spec import TOLERANCE
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for dim in (8, 16, 40, 77, 96):
        kwargs = dict(num_segments=2, position="learned", max_positions=16, dtype=dtype)
        fast = embedfast.FusedInputEmbedding(50, dim, backend="extension", **kwargs)
        ref = embedfast.FusedInputEmbedding(50, dim, backend="reference", **kwargs)
        ref.load_state_dict(fast.state_dict())
        ids, types = torch.randint(0, 50, (3, 16)), torch.randint(0, 2, (3, 16))
        out, expected = fast(ids, types), ref(ids, types)
        grad = torch.randn_like(out)
        out.backward(grad), expected.backward(grad)
        for a, b in [(out, expected)] + [(p.grad, q.grad) for p, q in zip(fast.parameters(), ref.parameters())]:
            a, b = a.to_dense().double(), b.to_dense().double()
            assert (a - b).abs().max() <= TOLERANCE[dtype] * b.abs().max() * 4, (dtype, dim)
print("ok")
"""
    result = _run(isa, code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
