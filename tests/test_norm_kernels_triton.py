"""The Triton norm operators (``norm_forward_triton``, ``norm_backward_triton``) against the reference operators on
fresh random data: every norm mode, with and without the norm's weight and bias, with and without dropout (the mask
bitwise the reference's), odd and even widths, every table dtype, every position source. On CPU they run under the
Triton interpreter (conftest.py turns it on), on CUDA compiled; shapes are small for the interpreter."""

import re

import pytest
import torch

from cases import ALL_NORM_GRADS, GPU_DIM_1_NORM, NORM_GRAD_REQUESTS
from embedfast.dropout import dropout_bits
from embedfast.reference import reference_norm_backward, reference_norm_forward
from embedfast.spec import TOLERANCE, ForwardInputs, NormInputs, NormMode, PositionMode, dropout_threshold

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from embedfast import triton_kernels  # noqa: E402,F401  (loads the backend: its operators, fakes and derivatives)
from embedfast import triton_norm  # noqa: E402

VOCAB, SEQ_LEN, POSITIONS, SEGMENTS = 23, 5, 8, 3
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# the forward's sum, each way it can be built (learned and sinusoid positions, segments, packed documents, a vocabulary
# shard, a sequence chunk), and so each way the backward sums the tables' gradients
SOURCES = ("learned", "interleaved", "concat-segments", "explicit-positions", "packed", "default-segments",
           "shard-chunk", "none", "learned-segments-chunk", "many-segments")


def _forward_inputs(source, num_tokens, dim, dtype, ids_dtype, device, generator) -> ForwardInputs:
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    def randint(high, n=num_tokens):
        return torch.randint(0, high, (n,), generator=generator).to(device, ids_dtype)

    args = ForwardInputs(randint(VOCAB), randn(VOCAB, dim), scale=1.5, seq_len=SEQ_LEN, position_offset=1)
    if source in ("learned", "explicit-positions", "packed", "learned-segments-chunk", "many-segments"):
        args = args._replace(position_weight=randn(POSITIONS + 2, dim), position_mode=int(PositionMode.LEARNED))
    elif source in ("interleaved", "shard-chunk"):
        args = args._replace(position_mode=int(PositionMode.INTERLEAVED))
    elif source == "concat-segments":
        args = args._replace(position_mode=int(PositionMode.CONCAT), position_offset=300)
    if source in ("concat-segments", "shard-chunk", "learned-segments-chunk"):
        args = args._replace(segment_weight=randn(SEGMENTS, dim), token_type_ids=randint(SEGMENTS))
    elif source == "many-segments":  # more than the kernels sum in registers
        many = triton_kernels.MAX_REGISTER_SEGMENTS + 1
        args = args._replace(segment_weight=randn(many, dim), token_type_ids=randint(many))
    elif source == "default-segments":
        args = args._replace(segment_weight=randn(1, dim))
    if source == "explicit-positions":
        args = args._replace(position_ids=randint(POSITIONS))
    elif source == "packed":
        lengths, left = [], num_tokens  # documents of 5, 0, 1, 7, 3, 5, ... tokens (an empty one, a one-token one)
        while left > 0:
            lengths.append(min((5, 0, 1, 7, 3)[len(lengths) % 5], left))
            left -= lengths[-1]
        lengths = torch.tensor(lengths, dtype=torch.int64)
        cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
        args = args._replace(cu_seqlens=cu_seqlens.to(device, ids_dtype), position_offset=2)
    elif source == "shard-chunk":  # the rows [5, 5 + 12) of the vocabulary, the columns [1, 4) of each sequence
        args = args._replace(weight=args.weight[5:17].contiguous(), vocab_start=5, vocab_size=VOCAB, chunk_start=1,
                             chunk_end=4)
    elif source == "learned-segments-chunk":
        args = args._replace(chunk_start=1, chunk_end=4)
    return args


def _norm_inputs(mode, affine, dropout_p, dim, dtype, device, generator) -> NormInputs:
    weight = bias = None
    if mode != NormMode.NONE and affine in ("weight", "both"):
        weight = (1 + 0.5 * torch.randn(dim, generator=generator, dtype=torch.float64)).to(device, dtype)
    if mode == NormMode.LAYERNORM and affine in ("bias", "both"):
        bias = torch.randn(dim, generator=generator, dtype=torch.float64).to(device, dtype)
    seed = torch.randint(0, 2**62, (1,), generator=generator).to(device) if dropout_p > 0 else None
    return NormInputs(weight, bias, int(mode), 1e-5, dropout_p, seed)


def _assert_close(actual, expected, dtype, what):
    """Within the dtype's tolerance of the reference (absolute: that times the largest |expected|)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    tol = TOLERANCE[dtype]
    atol = tol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def _check(forward, norm, dtype, generator, norm_grads=True):
    """Forward and backward of the Triton ops against the reference's, the dropout's zeros exactly the same."""
    out, stats = torch.ops.embedfast.norm_forward_triton(*forward, *norm)
    expected_out, expected_stats = reference_norm_forward(*forward, *norm)
    _assert_close(stats, expected_stats, dtype, "stats")
    _assert_close(out, expected_out, dtype, "out")
    if norm.dropout_p > 0:
        assert torch.equal(out == 0, expected_out == 0), "the dropout mask differs from the reference's"
    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, dtype)
    results = {}
    for request, (_, *table_grads) in NORM_GRAD_REQUESTS.items():
        backward_args = (grad_out, expected_stats, *forward, *norm, norm_grads, *table_grads)
        got = results[request] = torch.ops.embedfast.norm_backward_triton(*backward_args)
        names = ("token_grad", "position_grad", "segment_grad", "norm_weight_grad", "norm_bias_grad")
        for name, actual, expected in zip(names, got, reference_norm_backward(*backward_args)):
            _assert_close(actual, expected, dtype, f"{request} {name}")
    return out, results["sparse"]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dim", [1, 7, 64, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(NormMode), ids=lambda m: m.name.lower())
def test_norm_ops_match_reference(mode, dtype, dim, dropout_p, device):
    if device == "cuda" and dim == 1 and mode != NormMode.NONE:
        pytest.skip(GPU_DIM_1_NORM)
    generator = torch.Generator().manual_seed(1000 * int(mode) + 100 * DTYPES.index(dtype) + dim + int(10 * dropout_p))
    # the sum's source and the ids' dtype vary with the case, so that each is met under several norms and dtypes
    source = SOURCES[(dim + 3 * int(mode) + DTYPES.index(dtype)) % len(SOURCES)]
    ids_dtype = torch.int32 if (dim + DTYPES.index(dtype)) % 2 else torch.int64
    forward = _forward_inputs(source, 13, dim, dtype, ids_dtype, device, generator)
    _check(forward, _norm_inputs(mode, "both", dropout_p, dim, dtype, device, generator), dtype, generator)


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
def test_every_sum_source(source, ids_dtype, device):
    generator = torch.Generator().manual_seed(len(source) + (ids_dtype == torch.int32))
    forward = _forward_inputs(source, 17, 12, torch.float32, ids_dtype, device, generator)
    _check(forward, _norm_inputs(NormMode.LAYERNORM, "both", 0.3, 12, torch.float32, device, generator), torch.float32,
           generator)


@pytest.mark.parametrize("mode, affine", [(NormMode.LAYERNORM, "none"), (NormMode.LAYERNORM, "weight"),
                                          (NormMode.LAYERNORM, "bias"), (NormMode.RMSNORM, "none"),
                                          (NormMode.RMSNORM, "weight")], ids=lambda v: getattr(v, "name", v))
@pytest.mark.parametrize("norm_grads", [True, False], ids=["norm-grads", "no-norm-grads"])
def test_norm_weight_and_bias_each_optional(mode, affine, norm_grads, device):
    generator = torch.Generator().manual_seed(len(affine) + int(mode) + norm_grads)
    forward = _forward_inputs("learned", 11, 9, torch.float32, torch.int64, device, generator)
    norm = _norm_inputs(mode, affine, 0.3, 9, torch.float32, device, generator)
    *_, weight_grad, bias_grad = _check(forward, norm, torch.float32, generator, norm_grads)[1]
    assert weight_grad.shape == ((9,) if norm_grads and norm.norm_weight is not None else (0,))
    assert bias_grad.shape == ((9,) if norm_grads and norm.norm_bias is not None else (0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_no_tokens(dtype, device):
    generator = torch.Generator().manual_seed(0)
    forward = _forward_inputs("learned", 0, 7, dtype, torch.int64, device, generator)
    norm = _norm_inputs(NormMode.LAYERNORM, "both", 0.3, 7, dtype, device, generator)
    out, (values, *_, weight_grad, bias_grad) = _check(forward, norm, dtype, generator)
    assert out.shape == values.shape == (0, 7)
    assert torch.equal(weight_grad, torch.zeros(7, dtype=dtype, device=device))
    assert torch.equal(bias_grad, torch.zeros(7, dtype=dtype, device=device))


def test_weight_and_bias_grads_over_many_programs_are_right_and_reproducible(monkeypatch, device):
    """At most MAX_PARTIAL_BLOCKS programs: each sums several tiles of tokens; the result is bitwise the same on
    every call."""
    monkeypatch.setattr(triton_norm, "MAX_PARTIAL_BLOCKS", 2)
    generator = torch.Generator().manual_seed(3)
    num_tokens, dim = 70, 20  # 16 rows a tile: 5 tiles, 3 a program
    assert triton_norm.norm_launch_config(dim)[0] == 16
    forward = _forward_inputs("concat-segments", num_tokens, dim, torch.float32, torch.int64, device, generator)
    norm = _norm_inputs(NormMode.LAYERNORM, "both", 0.3, dim, torch.float32, device, generator)
    _, first = _check(forward, norm, torch.float32, generator)
    grad_out = torch.randn(num_tokens, dim, generator=generator).to(device)
    stats = torch.ops.embedfast.norm_forward_triton(*forward, *norm)[1]
    once, again = (torch.ops.embedfast.norm_backward_triton(grad_out, stats, *forward, *norm, *ALL_NORM_GRADS)
                   for _ in range(2))
    for a, b in zip(once, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seq_len", [16, 70], ids=["position-tiles", "too-many-tiles"])
def test_position_sums_by_tile_and_past_the_program_limit(monkeypatch, seq_len, device):
    """Default learned positions: a program sums a tile of positions over the sequences (the last one ragged), or,
    with more tiles than MAX_PARTIAL_BLOCKS programs, the position rows are summed from grad_sum after the kernel."""
    monkeypatch.setattr(triton_norm, "MAX_PARTIAL_BLOCKS", 2)
    generator = torch.Generator().manual_seed(seq_len)
    num_tokens, dim = 70, 20  # 16 rows a tile
    forward = _forward_inputs("learned-segments-chunk", num_tokens, dim, torch.float32, torch.int64, device, generator)
    forward = forward._replace(seq_len=seq_len, chunk_end=seq_len - 3,
                               position_weight=torch.randn(seq_len + 1, dim, generator=generator).to(device))
    norm = _norm_inputs(NormMode.LAYERNORM, "both", 0.3, dim, torch.float32, device, generator)
    _check(forward, norm, torch.float32, generator)


def test_without_norm_or_dropout_the_norm_forward_is_the_forward():
    """Without a norm or dropout the norm forward is the forward (the same row-building code): bitwise."""
    generator = torch.Generator().manual_seed(5)
    forward = _forward_inputs("concat-segments", 9, 10, torch.bfloat16, torch.int64, "cpu", generator)
    out, stats = torch.ops.embedfast.norm_forward_triton(*forward, *NormInputs())
    assert torch.equal(out, torch.ops.embedfast.forward_triton(*forward))
    assert torch.equal(stats, torch.stack([torch.zeros(9), torch.ones(9)], 1))


@triton.jit
def _keep_kernel(seed_ptr, out_ptr, base, threshold, ROWS: tl.constexpr, COLUMNS: tl.constexpr):
    rows = base + tl.arange(0, ROWS).to(tl.int64)
    columns = tl.arange(0, COLUMNS).to(tl.int64)
    keep = triton_norm._dropout_keep(seed_ptr, rows, columns, threshold)
    tl.store(out_ptr + tl.arange(0, ROWS)[:, None] * COLUMNS + tl.arange(0, COLUMNS)[None, :], keep.to(tl.int8))


@pytest.mark.parametrize("seed", [0, 12345678901, 2**62 - 1, -7])
@pytest.mark.parametrize("base", [0, 2**32 - 2, 3 * 2**33 + 5], ids=["low", "across-2^32", "high"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.999])
def test_dropout_mask_is_dropout_py_bitwise(seed, base, p):
    """The kernels' mask is dropout.py's for row indices past 32 bits and seeds with high bits (or negative)."""
    seeds = torch.tensor([seed], dtype=torch.int64)
    out = torch.empty(4, 16, dtype=torch.int8)
    _keep_kernel[(1,)](seeds, out, base, dropout_threshold(p), ROWS=4, COLUMNS=16)
    rows, columns = base + torch.arange(4, dtype=torch.int64)[:, None], torch.arange(16, dtype=torch.int64)[None, :]
    expected = dropout_bits(seeds, rows, columns) >= dropout_threshold(p)
    assert torch.equal(out.bool(), expected)


@pytest.mark.parametrize("bad", ["dropout-p-1", "bias-with-rmsnorm", "no-seed", "stats-dtype", "grad-shape"])
def test_bad_inputs_raise_what_the_reference_raises(bad):
    generator = torch.Generator().manual_seed(1)
    forward = _forward_inputs("learned", 6, 4, torch.float32, torch.int64, "cpu", generator)
    norm = _norm_inputs(NormMode.LAYERNORM, "both", 0.3, 4, torch.float32, "cpu", generator)
    grad_out, stats = torch.zeros(6, 4), torch.zeros(6, 2)
    norm = {"dropout-p-1": norm._replace(dropout_p=1.0), "bias-with-rmsnorm": norm._replace(norm_mode=int(NormMode.RMSNORM)),
            "no-seed": norm._replace(dropout_seed=None)}.get(bad, norm)
    if bad == "stats-dtype":
        stats = stats.double()
    elif bad == "grad-shape":
        grad_out = torch.zeros(6, 5)
    calls = [(torch.ops.embedfast.norm_backward_triton, reference_norm_backward,
              (grad_out, stats, *forward, *norm, *ALL_NORM_GRADS))]
    if bad not in ("stats-dtype", "grad-shape"):
        calls.append((torch.ops.embedfast.norm_forward_triton, reference_norm_forward, (*forward, *norm)))
    for op, reference, args in calls:
        with pytest.raises(Exception) as expected:
            reference(*args)
        with pytest.raises(expected.type, match=f"^{re.escape(str(expected.value))}$"):
            op(*args)
