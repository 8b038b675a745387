"""The C++ norm operators (norm_forward_extension, norm_backward_extension) against the reference, element by element:
every norm mode, with and without norm_weight / norm_bias, with and without dropout (the mask bitwise), odd and even
dims, every table dtype, every position source, segments, shards and chunks, int32 / int64 ids, no tokens, bad
inputs (the same exception and message as the reference) and gradients that do not depend on the thread count."""

from __future__ import annotations

import pytest
import torch

from embedfast.backends import unavailable_reason
from embedfast.dropout import draw_seed, dropout_bits, keep_mask
from embedfast.reference import reference_norm_backward, reference_norm_forward
from embedfast.spec import (TOLERANCE, ForwardInputs, NormInputs, NormMode, PositionMode, TokenGrad, compute_dtype,
                            dropout_threshold)

from cases import ALL_NORM_GRADS, GPU_DIM_1_NORM, NORM_GRAD_REQUESTS

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(unavailable_reason("extension", CPU) is not None,
                                reason=str(unavailable_reason("extension", CPU)))

DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DIMS = (1, 7, 64, 768, 1000)


def _forward_inputs(dtype, dim, *, batch=3, seq_len=8, vocab=50, position="learned", segments=2, ids_dtype=torch.int64,
                    packed=False, explicit_positions=False, shard=False, chunk=False, scale=1.5):
    tokens = batch * seq_len
    ids = torch.randint(0, vocab, (tokens,), dtype=ids_dtype)
    weight = torch.randn(vocab if not shard else vocab // 2, dim, dtype=dtype)
    kwargs = dict(scale=scale, seq_len=seq_len)
    if shard:
        kwargs.update(vocab_start=vocab // 4, vocab_size=vocab)
    if chunk:
        kwargs.update(chunk_start=2, chunk_end=seq_len - 1)
    if segments:
        kwargs.update(segment_weight=torch.randn(segments, dim, dtype=dtype),
                      token_type_ids=torch.randint(0, segments, (tokens,), dtype=ids_dtype))
    if position != "none":
        mode = {"learned": PositionMode.LEARNED, "interleaved": PositionMode.INTERLEAVED,
                "concat": PositionMode.CONCAT}[position]
        kwargs["position_mode"] = mode
        if mode == PositionMode.LEARNED:
            kwargs["position_weight"] = torch.randn(max(40, seq_len), dim, dtype=dtype)
        if explicit_positions:
            kwargs["position_ids"] = torch.randint(0, 40, (tokens,), dtype=ids_dtype)
        elif packed:
            kwargs["cu_seqlens"] = torch.tensor([0, 5, 5, tokens - 3, tokens], dtype=ids_dtype)
    return ForwardInputs(ids, weight, **kwargs)


def _norm_inputs(forward, mode, affine, p, eps=1e-5):
    dim, dtype = forward.weight.shape[1], forward.weight.dtype
    weight = bias = None
    if affine and mode != NormMode.NONE:
        weight = torch.randn(dim, dtype=dtype)
        bias = torch.randn(dim, dtype=dtype) if mode == NormMode.LAYERNORM else None
    return NormInputs(weight, bias, mode, eps, p, draw_seed(CPU) if p > 0 else None)


def _assert_close(actual, expected, dtype, scale=None, factor=4.0):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape,
                                                                               actual.dtype, expected.dtype)
    if expected.numel() == 0:
        return
    tolerance = TOLERANCE[dtype] * factor
    scale = float(expected.double().abs().max()) if scale is None else scale
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance * max(scale, 1.0))


def _assert_same_mask(actual, expected, norm):
    """The dropped elements (dropout.keep_mask) are zeros in both; a kept one is zero only where the reference's
    value is zero up to rounding (a sum can cancel), so no kept element was dropped however small it is."""
    keep = keep_mask(norm.dropout_seed, actual.shape[0], actual.shape[1], dropout_threshold(norm.dropout_p)).to(actual.device)
    assert not actual[~keep].any() and not expected[~keep].any()
    zero_but_kept = expected[keep & (actual == 0)].double().abs()
    assert (zero_but_kept <= TOLERANCE[actual.dtype]).all(), zero_but_kept.max()


def _check(forward, norm, norm_grads=True):
    dtype = forward.weight.dtype
    out, stats = torch.ops.embedfast.norm_forward_extension(*forward, *norm)
    ref_out, ref_stats = reference_norm_forward(*forward, *norm)
    assert stats.dtype == compute_dtype(dtype)
    _assert_close(stats, ref_stats, compute_dtype(dtype) if dtype == torch.float64 else torch.float32)
    _assert_close(out, ref_out, dtype)
    if norm.dropout_p > 0:
        _assert_same_mask(out, ref_out, norm)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(out.device)
    tokens = max(forward.input_ids.numel(), 1)
    results = {}
    for request, (_, token_grad, padding_idx, position_grad, segment_grad) in NORM_GRAD_REQUESTS.items():
        inputs = (grad_out, ref_stats, *forward, *norm, norm_grads, token_grad, padding_idx, position_grad, segment_grad)
        grads = results[request] = torch.ops.embedfast.norm_backward_extension(*inputs)
        ref_grads = reference_norm_backward(*inputs)
        if token_grad == TokenGrad.SPARSE:  # per token: grad_sum * scale
            _assert_close(grads[0], ref_grads[0], dtype)
            if norm.dropout_p > 0 and norm.norm_mode == NormMode.NONE:  # grad_sum is the masked grad_out
                _assert_same_mask(grads[0], ref_grads[0], norm)
        for grad, ref in zip(grads[token_grad == TokenGrad.SPARSE:], ref_grads[token_grad == TokenGrad.SPARSE:]):
            _assert_close(grad, ref, dtype, scale=float(ref.double().abs().max()) if ref.numel() else 0.0,
                          factor=4.0 * tokens ** 0.5)  # sums over the tokens
    return out, results["sparse"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_matches_the_reference(dtype, dim, mode, affine, p):
    forward = _forward_inputs(dtype, dim)
    # one column: x_hat is +-1 up to eps, so a small eps leaves the gradient a cancellation of nearly equal terms
    _check(forward, _norm_inputs(forward, mode, affine, p, eps=1.0 if dim == 1 else 1e-5))


POSITIONS = {
    "none": dict(position="none"),
    "learned": dict(position="learned"),
    "interleaved": dict(position="interleaved"),
    "concat": dict(position="concat"),
    "learned-explicit": dict(position="learned", explicit_positions=True),
    "interleaved-explicit": dict(position="interleaved", explicit_positions=True),
    "learned-packed": dict(position="learned", packed=True),
    "concat-packed": dict(position="concat", packed=True),
    "no-segments": dict(segments=0),
    "int32": dict(ids_dtype=torch.int32, position="interleaved", explicit_positions=True),
    "shard": dict(shard=True),
    "chunk": dict(chunk=True, position="concat"),
    "long-sequence": dict(batch=2, seq_len=300, position="interleaved"),
    # CUDA: default positions in tiles of two positions (more than 1024 of them) and of one with a chunk (periods of
    # 256 and more; shorter ones, above, are summed by key), segment sums by key
    "learned-long-sequence": dict(batch=2, seq_len=1100, position="learned"),
    "learned-chunk": dict(batch=2, seq_len=300, chunk=True, position="learned"),
    "many-segments": dict(segments=17),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", [7, 64])
@pytest.mark.parametrize("case", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
def test_every_position_source(dtype, dim, case, mode):
    forward = _forward_inputs(dtype, dim, **case)
    _check(forward, _norm_inputs(forward, mode, True, 0.3))


@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
def test_no_tokens(mode):
    forward = _forward_inputs(torch.float32, 16, batch=0)
    out, grads = _check(forward, _norm_inputs(forward, mode, True, 0.3))
    assert out.shape == (0, 16)
    if mode == NormMode.LAYERNORM:
        assert [g.shape for g in grads] == [(0, 16), (40, 16), (2, 16), (16,), (16,)]
        assert not any(g.any() for g in grads[1:])


def test_dropout_rate_and_scale():
    forward = _forward_inputs(torch.float32, 1000, batch=4, seq_len=64, position="none", segments=0)
    norm = NormInputs(None, None, NormMode.NONE, 1e-5, 0.3, draw_seed(CPU))
    out, _ = torch.ops.embedfast.norm_forward_extension(*forward, *norm)
    x = reference_norm_forward(*forward, *norm._replace(dropout_p=0.0, dropout_seed=None))[0]
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(out[kept], x[kept] * torch.tensor(1 / 0.7, dtype=torch.float32), rtol=0, atol=0)


THREAD_CASES = {"interleaved": dict(batch=8, seq_len=100, position="interleaved"), "learned": dict(batch=20, seq_len=40),
                "learned-explicit": dict(batch=20, seq_len=40, explicit_positions=True)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [NormMode.LAYERNORM, NormMode.RMSNORM], ids=lambda m: m.name.lower())
@pytest.mark.parametrize("case", THREAD_CASES.values(), ids=THREAD_CASES.keys())
def test_gradients_do_not_depend_on_the_thread_count(dtype, mode, case):
    forward = _forward_inputs(dtype, 96, **case)
    norm = _norm_inputs(forward, mode, True, 0.1)
    _, stats = torch.ops.embedfast.norm_forward_extension(*forward, *norm)
    grad_out = torch.randn(forward.input_ids.numel(), 96).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append([torch.ops.embedfast.norm_backward_extension(grad_out, stats, *forward, *norm, *requested)
                            for requested in NORM_GRAD_REQUESTS.values()])
    finally:
        torch.set_num_threads(threads)
    for result in results[1:]:
        for grads, first in zip(result, results[0]):
            for a, b in zip(grads, first):
                assert torch.equal(a, b)


def _good():
    forward = _forward_inputs(torch.float32, 4, batch=2, seq_len=3)
    norm = NormInputs(torch.randn(4), torch.randn(4), NormMode.LAYERNORM, 1e-5, 0.2, draw_seed(CPU))
    return forward, norm


BAD_NORM = {
    "norm-mode": lambda f, n: (f, n._replace(norm_mode=5)),
    "affine-without-norm": lambda f, n: (f, n._replace(norm_mode=NormMode.NONE)),
    "bias-with-rmsnorm": lambda f, n: (f, n._replace(norm_mode=NormMode.RMSNORM)),
    "weight-shape": lambda f, n: (f, n._replace(norm_weight=torch.randn(5))),
    "bias-2d": lambda f, n: (f, n._replace(norm_bias=torch.randn(1, 4))),
    "weight-dtype": lambda f, n: (f, n._replace(norm_weight=torch.randn(4, dtype=torch.float64))),
    "eps-negative": lambda f, n: (f, n._replace(norm_eps=-1.0)),
    "eps-tiny-negative": lambda f, n: (f, n._replace(norm_eps=-1.25e-7)),
    "p-one": lambda f, n: (f, n._replace(dropout_p=1.0)),
    "p-large": lambda f, n: (f, n._replace(dropout_p=12345678.5)),
    "p-huge": lambda f, n: (f, n._replace(dropout_p=3e20)),
    "p-negative": lambda f, n: (f, n._replace(dropout_p=-0.1)),
    "p-without-seed": lambda f, n: (f, n._replace(dropout_seed=None)),
    "seed-int32": lambda f, n: (f, n._replace(dropout_seed=torch.zeros(1, dtype=torch.int32))),
    "seed-two-elements": lambda f, n: (f, n._replace(dropout_seed=torch.zeros(2, dtype=torch.int64))),
    "forward-id-too-large": lambda f, n: (f._replace(input_ids=f.input_ids + 50), n),
    "forward-position-mode": lambda f, n: (f._replace(position_mode=9), n),
}


def _outcome(function, *inputs):
    with pytest.raises(Exception) as raised:
        function(*inputs)
    return type(raised.value), str(raised.value).splitlines()[0]


@pytest.mark.parametrize("corrupt", BAD_NORM.values(), ids=BAD_NORM.keys())
def test_bad_input_gets_the_reference_answer(corrupt):
    forward, norm = corrupt(*_good())
    expected = _outcome(reference_norm_forward, *forward, *norm)
    assert expected[0] in (TypeError, ValueError, IndexError)
    assert _outcome(torch.ops.embedfast.norm_forward_extension, *forward, *norm) == expected
    grad_out, stats = torch.randn(6, 4), torch.zeros(6, 2)
    expected = _outcome(reference_norm_backward, grad_out, stats, *forward, *norm, *ALL_NORM_GRADS)
    assert _outcome(torch.ops.embedfast.norm_backward_extension, grad_out, stats, *forward, *norm, *ALL_NORM_GRADS) == expected


BAD_BACKWARD = {
    "grad-rows": lambda g, s: (g[:5], s),
    "grad-dim": lambda g, s: (torch.randn(6, 3), s),
    "grad-noncontiguous": lambda g, s: (torch.randn(4, 6).t(), s),
    "grad-dtype": lambda g, s: (g.double(), s),
    "stats-rows": lambda g, s: (g, s[:5]),
    "stats-dtype": lambda g, s: (g, s.double()),
    "stats-1d": lambda g, s: (g, s[:, 0]),
}


@pytest.mark.parametrize("corrupt", BAD_BACKWARD.values(), ids=BAD_BACKWARD.keys())
def test_bad_backward_input_gets_the_reference_answer(corrupt):
    forward, norm = _good()
    grad_out, stats = corrupt(torch.randn(6, 4), torch.zeros(6, 2))
    inputs = (grad_out, stats, *forward, *norm, *ALL_NORM_GRADS)
    expected = _outcome(reference_norm_backward, *inputs)
    assert expected[0] in (TypeError, ValueError, IndexError)
    assert _outcome(torch.ops.embedfast.norm_backward_extension, *inputs) == expected


def _on(inputs, device):
    return type(inputs)(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in inputs))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("case", POSITIONS.values(), ids=POSITIONS.keys())
@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
def test_cuda_matches_the_reference(dtype, dim, case, mode):
    if dim == 1 and mode != NormMode.NONE:
        pytest.skip(GPU_DIM_1_NORM)
    forward = _forward_inputs(dtype, dim, **case)
    cuda = torch.device("cuda")
    _check(_on(forward, cuda), _on(_norm_inputs(forward, mode, True, 0.3), cuda))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", [0, 12345678901, 2**62 - 1, -7])
@pytest.mark.parametrize("base", [0, 2**32 - 2, 3 * 2**33 + 5], ids=["low", "across-2^32", "high"])
def test_dropout_rows_are_dropout_py_bitwise(dtype, seed, base):
    """The row loops' mask (vector blocks and the tail, each lane order) is dropout.py's for row indices past 32 bits,
    rows on both sides of a multiple of 2^32 and seeds with high bits (or negative); kept values are scaled once."""
    rows, dim, p = 3, 71, 0.3
    values = torch.randn(rows, dim).to(dtype)
    seeds = torch.tensor([seed], dtype=torch.int64)
    out = torch.ops.embedfast.dropout_rows_cpu(values, seeds, base, p)
    row_index = base + torch.arange(rows, dtype=torch.int64)[:, None]
    kept = dropout_bits(seeds, row_index, torch.arange(dim, dtype=torch.int64)[None, :]) >= dropout_threshold(p)
    math = compute_dtype(dtype)
    expected = torch.where(kept, values.to(math) * torch.tensor(1 / (1 - p), dtype=math), 0).to(dtype)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_nan_and_inf_propagate_as_in_the_reference(dtype, mode, p):
    """A NaN in a vector block and an Inf in the tail of token rows: the outputs and every gradient have NaN, Inf and
    zeros where the reference has them (a norm spreads them over the row; dropped elements are zeros)."""
    forward = _forward_inputs(dtype, 71)
    forward.weight[forward.input_ids[1], 3] = float("nan")
    forward.weight[forward.input_ids[5], 70] = float("inf")
    forward.weight[forward.input_ids[9], 40] = float("-inf")
    norm = _norm_inputs(forward, mode, True, p)
    out, stats = torch.ops.embedfast.norm_forward_extension(*forward, *norm)
    ref_out, ref_stats = reference_norm_forward(*forward, *norm)
    tolerance = TOLERANCE[dtype] * 4

    def assert_close(actual, expected):
        assert torch.equal(actual.isnan(), expected.isnan()) and torch.equal(actual.isinf(), expected.isinf())
        torch.testing.assert_close(actual.double(), expected.double(), rtol=tolerance, atol=tolerance * 10,
                                   equal_nan=True)

    assert p > 0 or (ref_out.isnan().any() and ref_out.isinf().any() if mode == NormMode.NONE else ref_out.isnan().any())
    assert_close(out, ref_out)
    assert_close(stats, ref_stats)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    for requested in NORM_GRAD_REQUESTS.values():
        inputs = (grad_out, ref_stats, *forward, *norm, *requested)
        for grad, ref in zip(torch.ops.embedfast.norm_backward_extension(*inputs), reference_norm_backward(*inputs)):
            assert_close(grad, ref)
