"""The norm and dropout after the sum (norm=, dropout=): every backend against autograd through the float64
reference with F.layer_norm / F.rms_norm, the dropout's statistics and seeding, compile, and the errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import embedfast
from cases import NORM_GRAD_REQUESTS, Case, assert_case_matches_truth, assert_close, dense_grad, truth
from embedfast.dropout import keep_mask
from embedfast.spec import TABLE_DTYPES, ForwardInputs, GradientOptions, NormInputs, NormMode, PositionMode, dropout_threshold

CASES = {
    "layernorm-bert": Case(shape=(2, 6), dim=768, vocab=300, position="learned", max_positions=8, segments=2,
                           padding_idx=0, ids_dtype=torch.int32, norm="layernorm", norm_eps=1e-12),
    "layernorm-odd-dim-sinusoid": Case(shape=(3, 5), dim=7, segments=2, norm="layernorm"),
    "layernorm-dense": Case(shape=(4, 8), dim=64, position="learned", max_positions=8, segments=2, padding_idx=1,
                            sparse=False, norm="layernorm"),
    # tiny rows: a large eps keeps the derivative away from zero (with eps -> 0 it vanishes there)
    "layernorm-dim-2": Case(shape=(2, 3), dim=2, position="none", norm="layernorm", norm_eps=1.0),
    "rmsnorm-dim-1": Case(shape=(2, 3), dim=1, position="none", norm="rmsnorm", norm_eps=1.0),
    "rmsnorm-odd-dim": Case(shape=(2, 5), dim=9, position="learned", max_positions=8, norm="rmsnorm", sparse=False),
    "rmsnorm-no-position": Case(shape=(3, 4), dim=64, position="none", scale=None, segments=3, norm="rmsnorm"),
    "layernorm-empty": Case(shape=(0,), segments=2, norm="layernorm"),
}


@pytest.mark.parametrize("dtype", TABLE_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_norm_forward_and_five_gradients_match_truth(case, dtype, backend, device):
    """Output and the gradients of weight, position_weight, segment_weight, norm_weight and norm_bias."""
    generator = torch.Generator().manual_seed(hash((case.dim, case.norm, str(dtype))) % 2**31)
    assert_case_matches_truth(case, dtype, backend, device, generator)


def _fraction_bounds(p: float, count: int) -> tuple[float, float]:
    """Where a fraction of `count` elements, each in with probability p, lies but with probability ~1e-9 (6 standard
    deviations)."""
    spread = 6 * math.sqrt(p * (1 - p) / count)
    return p - spread, p + spread


def test_mask_pairs_are_kept_together_as_often_as_independent_draws():
    """The mask's definition (dropout.keep_mask, which every backend matches bitwise): the pairs a row key and a
    per-column round could make alike (neighbouring columns, the same column of neighbouring rows, the same element
    under seeds one bit apart, low or high) are both kept (1 - p)^2 of the time, within 6 standard deviations."""
    p, rows, dim = 0.3, 512, 768
    threshold = dropout_threshold(p)
    mask = keep_mask(torch.tensor([12345]), rows, dim, threshold)
    pairs = {"columns": (mask[:, 1:], mask[:, :-1]), "rows": (mask[1:], mask[:-1]),
             "low-seed-bit": (mask, keep_mask(torch.tensor([12344]), rows, dim, threshold)),
             "high-seed-bit": (mask, keep_mask(torch.tensor([12345 + 2**32]), rows, dim, threshold))}
    both = (1 - p) ** 2
    for name, (a, b) in pairs.items():
        low, high = _fraction_bounds(both, a.numel())
        assert low < (a & b).double().mean().item() < high, name


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dropout_statistics_scale_and_backward(norm, dtype, backend, device):
    """The fraction dropped is binomial, the kept values are the eval output times exactly 1 / (1 - p) (one
    rounding), and the gradients are those of the truth with the forward's own mask."""
    p = 0.3
    case = Case(shape=(8, 24), dim=40, position="learned", max_positions=24, segments=2, norm=norm, sparse=False)
    module = case.module(dtype, device, backend, dropout=p)
    inputs = case.inputs(device, torch.Generator().manual_seed(5))
    out = module(**inputs)
    dropped = out == 0
    low, high = _fraction_bounds(p, out.numel())
    assert low < dropped.double().mean().item() < high

    module.eval()
    expected, tables = truth(module, inputs)
    module.train()
    keep_scale = torch.tensor(1 / (1 - p), dtype=torch.float32).double()  # the kernels' float32 factor
    assert_close(out[~dropped], (expected * keep_scale)[~dropped], dtype, "kept values")
    if dtype == torch.float32:  # the kept values are the normalised values times 1 / (1 - p), one rounding apart
        eval_out = expected.detach().float()
        torch.testing.assert_close(out[~dropped], (eval_out * (1 / (1 - p)))[~dropped], rtol=4e-6, atol=1e-6)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    out.backward(grad_out)
    (expected * keep_scale * (~dropped)).backward(grad_out.double())
    for name, table in tables.items():
        assert_close(dense_grad(getattr(module, name).grad), table.grad, dtype, f"{name}.grad")


def test_same_seed_same_mask_new_call_new_mask(backend, device):
    case = Case(shape=(4, 16), dim=32, segments=2, norm="layernorm")
    module = case.module(torch.float32, device, backend, dropout=0.5)
    inputs = case.inputs(device, torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    first = module(**inputs)
    second = module(**inputs)
    torch.manual_seed(123)
    again = module(**inputs)
    assert torch.equal(first, again)
    assert not torch.equal(first == 0, second == 0)


def test_every_backend_draws_the_same_mask(device):
    """The mask is a function of the seed only: each backend drops the same elements (spec.py's bits)."""
    case = Case(shape=(3, 16), dim=24, segments=2, norm="rmsnorm")
    masks = {}
    for backend in embedfast.available_backends(device):
        module = case.module(torch.float32, device, backend, dropout=0.25)
        torch.manual_seed(7)
        masks[backend] = module(**case.inputs(device, torch.Generator().manual_seed(2))) == 0
    reference = masks.pop("reference")
    for backend, mask in masks.items():
        assert torch.equal(mask, reference), backend


def test_eval_mode_and_zero_dropout_are_deterministic(backend, device):
    case = Case(shape=(2, 8), dim=16, norm="layernorm")
    module = case.module(torch.float32, device, backend, dropout=0.9)
    inputs = case.inputs(device, torch.Generator().manual_seed(3))
    module.eval()
    assert torch.equal(module(**inputs), module(**inputs))
    assert (module(**inputs) != 0).all()


def test_functional_form_matches_f_layer_norm_and_dropout_zeros(backend, device):
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(30, 12, generator=generator).to(device)
    norm_weight, norm_bias = (torch.randn(12, generator=generator).to(device) for _ in range(2))
    ids = torch.randint(0, 30, (5, 7), generator=generator).to(device)
    out = embedfast.fused_input_embedding(ids, weight, norm="layernorm", norm_weight=norm_weight, norm_bias=norm_bias,
                                          backend=backend)
    plain = embedfast.fused_input_embedding(ids, weight, backend=backend)
    torch.testing.assert_close(out, F.layer_norm(plain, (12,), norm_weight, norm_bias, 1e-5), rtol=1e-5, atol=1e-5)
    no_affine = embedfast.fused_input_embedding(ids, weight, norm="rmsnorm", norm_eps=1e-3, backend=backend)
    torch.testing.assert_close(no_affine, F.rms_norm(plain, (12,), eps=1e-3), rtol=1e-5, atol=1e-5)
    dropped = embedfast.fused_input_embedding(ids, weight, dropout_p=0.5, backend=backend) == 0
    low, high = _fraction_bounds(0.5, dropped.numel())
    assert low < dropped.double().mean().item() < high


def test_compile_fullgraph_matches_eager(backend, device):
    case = Case(shape=(2, 8), dim=16, position="learned", max_positions=8, segments=2, norm="layernorm")
    module = case.module(torch.float32, device, backend, dropout=0.1).eval()
    inputs = case.inputs(device, torch.Generator().manual_seed(8))
    eager = module(**inputs)
    eager.square().sum().backward()
    eager_grads = {name: dense_grad(p.grad) for name, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(**inputs)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(dense_grad(parameter.grad), eager_grads[name], msg=name)
    module.train()  # training mode: dropout inside the compiled graph; the mask is whatever its seed draws
    dropped = compiled(**inputs) == 0
    assert 0 < dropped.sum() < dropped.numel()


def test_forward_mode_and_double_backward_raise(device):
    case = Case(shape=(2, 4), dim=8, norm="layernorm", sparse=False)
    module = case.module(torch.float64, device, "reference")
    inputs = case.inputs(device, torch.Generator().manual_seed(9))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(module.weight.detach(), torch.ones_like(module.weight))
        with pytest.raises(NotImplementedError, match="reverse mode only"):
            embedfast.fused_input_embedding(inputs["input_ids"], dual, norm="layernorm", backend="reference")
    grads = torch.autograd.grad(module(**inputs).square().sum(), module.weight, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grads[0].sum().backward()


@pytest.mark.parametrize("kwargs, error, match", [
    ({"norm": "batchnorm"}, ValueError, "norm must be one of"),
    ({"norm": "layernorm", "norm_eps": -1.0}, ValueError, "norm_eps must be a float >= 0"),
    ({"dropout_p": 1.0}, ValueError, r"dropout_p must be a float in \[0, 1\), got 1.0"),
    ({"dropout_p": -0.1}, ValueError, "dropout_p must be a float in"),
    ({"norm_weight": torch.ones(8)}, ValueError, "norm_weight was given, but norm=None"),
    ({"norm": "rmsnorm", "norm_bias": torch.zeros(8)}, ValueError, "norm='rmsnorm' has no bias"),
    ({"norm": "layernorm", "norm_weight": torch.ones(9)}, ValueError, r"norm_weight must be a contiguous \(8,\) vector"),
    ({"norm": "layernorm", "norm_bias": torch.zeros(8, dtype=torch.float64)}, TypeError, "norm_bias has dtype float64"),
])
def test_bad_norm_arguments_raise_naming_them(kwargs, error, match, backend, device):
    weight = torch.randn(10, 8, device=device, requires_grad=True)
    before = weight.detach().clone()
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    with pytest.raises(error, match=match):
        embedfast.fused_input_embedding(torch.tensor([1, 2], device=device), weight, backend=backend, **kwargs)
    assert torch.equal(weight.detach(), before)


def test_module_contract(device):
    layer = embedfast.FusedInputEmbedding(10, 6, norm="layernorm", dropout=0.1, device=device)
    assert torch.equal(layer.norm_weight, torch.ones(6, device=device))
    assert torch.equal(layer.norm_bias, torch.zeros(6, device=device))
    rms = embedfast.FusedInputEmbedding(10, 6, norm="rmsnorm", device=device)
    assert rms.norm_bias is None and rms.norm_weight.shape == (6,)
    plain = embedfast.FusedInputEmbedding(10, 6, device=device)
    assert plain.norm_weight is None and plain.norm_bias is None
    assert "norm='layernorm'" in repr(layer) and "dropout=0.1" in repr(layer)
    with pytest.raises(ValueError, match="dropout must be a float in"):
        embedfast.FusedInputEmbedding(10, 6, dropout=1.5)


def _norm_samples(device, requires_grad):
    """Norm operator inputs over the forward's variants (positions, packed documents, a vocabulary shard with a
    sequence chunk) and each norm mode, with and without dropout."""
    generator = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 9, (6,), generator=generator).to(device)
    types = torch.randint(0, 2, (6,), generator=generator).to(device)

    def table(*shape):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_(requires_grad)

    weight, positions, segments, norm_weight, norm_bias = table(9, 5), table(8, 5), table(2, 5), table(5), table(5)
    seed = torch.tensor([12345], device=device)
    forwards = [
        ForwardInputs(ids, weight, position_weight=positions, token_type_ids=types, segment_weight=segments, scale=2.0,
                      position_mode=PositionMode.LEARNED, max_positions=8, position_offset=1, seq_len=3),
        ForwardInputs(ids.int(), weight, position_mode=PositionMode.INTERLEAVED, position_offset=3, seq_len=2),
        ForwardInputs(ids, weight, position_weight=positions, cu_seqlens=torch.tensor([0, 2, 2, 6], device=device),
                      position_mode=PositionMode.LEARNED, position_offset=1),
        ForwardInputs(ids, table(4, 5), position_weight=positions, token_type_ids=types, segment_weight=segments,
                      position_mode=PositionMode.LEARNED, seq_len=3, vocab_start=3, vocab_size=9, chunk_start=1, chunk_end=2),
    ]
    norms = [NormInputs(norm_weight, norm_bias, NormMode.LAYERNORM, 1e-5), NormInputs(None, None, NormMode.LAYERNORM, 0.1),
             NormInputs(norm_weight, None, NormMode.RMSNORM, 1e-6, 0.4, seed), NormInputs(dropout_p=0.5, dropout_seed=seed)]
    for i, forward in enumerate(forwards):
        yield forward, norms[i % len(norms)]
        yield forward, norms[(i + 1) % len(norms)]


def test_opcheck_of_the_norm_operators(backend, device):
    for forward, norm in _norm_samples(device, requires_grad=False):
        torch.library.opcheck(getattr(torch.ops.embedfast, f"norm_forward_{backend}"), (*forward, *norm))
        out, stats = getattr(torch.ops.embedfast, f"norm_forward_{backend}")(*forward, *norm)
        grad_out = torch.randn_like(out)
        for norm_grads in (False, True):
            for _, *table_grads in NORM_GRAD_REQUESTS.values():
                torch.library.opcheck(getattr(torch.ops.embedfast, f"norm_backward_{backend}"),
                                      (grad_out, stats, *forward, *norm, norm_grads, *table_grads))
    differentiable = getattr(torch.ops.embedfast, f"differentiable_norm_forward_{backend}")
    for forward, norm in _norm_samples(device, requires_grad=True):
        torch.library.opcheck(differentiable, (*forward, *norm, *GradientOptions(2, False)))


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_gradcheck_float64(norm, backend, device):
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 9, (2, 3), generator=generator).to(device)
    types = torch.randint(0, 2, (2, 3), generator=generator).to(device)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device).requires_grad_()

    tables = [leaf(9, 5), leaf(2, 5), leaf(6, 5), leaf(5)] + ([leaf(5)] if norm == "layernorm" else [])

    def f(weight, segments, positions, norm_weight, norm_bias=None):
        return embedfast.fused_input_embedding(
            ids, weight, token_type_ids=types, segment_weight=segments, position="learned", position_weight=positions,
            norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, sparse=False, scale=1.7, backend=backend)

    assert torch.autograd.gradcheck(f, tables)


def test_cuda_graph_capture_draws_a_new_mask_each_replay(backend, device):
    if device != "cuda":
        pytest.skip("CUDA-graph capture needs a CUDA device")
    case = Case(shape=(4, 32), dim=64, segments=2, norm="layernorm")
    module = case.module(torch.float32, "cuda", backend, dropout=0.5)
    module.check_bounds = False  # no host synchronization inside the capture
    inputs = case.inputs("cuda", torch.Generator().manual_seed(12))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        module(**inputs)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        out = module(**inputs)
    masks = []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        masks.append(out == 0)
    assert not torch.equal(masks[0], masks[1])
    low, high = _fraction_bounds(0.5, out.numel())
    assert low < masks[1].double().mean().item() < high
    module.eval()
    expected, _ = truth(module, inputs)
    assert_close(out[~masks[1]], (expected * 2.0)[~masks[1]], torch.float32, "kept values")
