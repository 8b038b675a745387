"""The Triton backend: ``embedfast::forward_triton`` and ``embedfast::backward_triton``.

Both operators are ``torch.library.triton_op``s: eagerly they launch the kernels below, and under
``torch.compile`` the compiler traces the host code and sees every kernel (``wrap_triton``), so it
can schedule them with the rest of the graph. On CPU tensors they run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported); that is how CI tests them.

Kernels:
  ``_forward_kernel``       one program per (block of tokens) x (block of columns): the sum of ``_sum_tile``
                            (gather, scale, position term, segment row), one store. ``triton_norm.py`` builds
                            its rows with the same ``_sum_tile`` (the norm operators).
  ``_grad_rows_kernel``     one pass over ``grad_out`` tiles: the sparse token-gradient values and,
                            for small segment tables, per-program segment partial sums.
  ``_sorted_sum_kernel``    dense row sums by sorted key (token, position or large segment
                            gradients): the program of the first token of each run of equal keys
                            sums the run in token order; the others return at once.
  ``_packed_position_sum_kernel``  position gradients of packed documents: one program per position
                            row sums that offset of every document, in document order.
Packed documents (``cu_seqlens``) find their positions in the kernels, by binary search over the
boundaries. A vocabulary shard and a sequence chunk (spec.py) are masked loads in the forward; in the
backward, the tokens they leave out are skipped keys (or masked segment loads) of the sums.
Every reduction has a fixed order, so gradients are bitwise reproducible; no float atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from torch.library import triton_op, wrap_triton
from torch.torch_version import TorchVersion

from . import ops
from .op_checks import check_backward, check_forward
from .positions import chunk_tokens, sinusoid_frequencies, token_positions
from .spec import BackwardInputs, ForwardInputs, PositionMode, TokenGrad, compute_dtype, schema

_NONE = tl.constexpr(PositionMode.NONE.value)
_LEARNED = tl.constexpr(PositionMode.LEARNED.value)
# segment tables up to this many rows are summed per program in registers; larger ones are sorted
MAX_REGISTER_SEGMENTS = 16


def launch_config(dim: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` for a table of ``dim`` columns, whatever its dtype.

    A tile holds ~4096 elements: 16 per thread with 8 warps, i.e. four 16-byte loads in flight per
    thread for fp32 (two for 16-bit types) at <= 86 registers (the sinusoid needs float64 angle
    math; 4 warps would take ~160 registers). Columns come in blocks of at most 256 so that ``dim``
    768 (BERT-base) splits into three full blocks instead of one 1024-wide block that is a quarter
    masked. The interpreter also prefers few, large programs.
    """
    block_d = min(triton.next_power_of_2(max(dim, 1)), 256)
    return max(4096 // block_d, 1), block_d, 8


@triton.jit
def _storage_value(x, ptr):
    """``x`` rounded to nearest-even in ``ptr``'s element type. bf16 is rounded by hand: the
    interpreter's float-to-bf16 cast does not round to nearest-even; on a GPU this is the same
    result as ``cvt.rn.bf16.f32``, for a few integer operations in a memory-bound kernel."""
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))  # NaN stays NaN (the carry could clear it)
    else:
        return x.to(ptr.dtype.element_ty)


@triton.jit
def _float_arg(x, dtype: tl.constexpr):
    """A ``tl.float64`` scalar argument in ``dtype``. The interpreter passes float arguments as Python floats, which
    ``tl.cast`` would take for float32 constants first; ``tl.full`` keeps all 53 bits (compiled: a plain cast)."""
    return tl.full((), x, tl.float64).to(dtype)


@triton.jit
def _sin_of_turns(turns):
    """``sin(2 pi t)`` for float64 ``t`` in [-1/2, 1/2], in float32: quadrant and angle in float64,
    then Cephes' minimax polynomials on [-pi/4, pi/4]. ``tl.sin`` would call libdevice's ``sinf``,
    whose slow path for huge arguments keeps a stack frame (32-40 bytes); this argument is small."""
    quadrant = (turns * 4 + 2.5).to(tl.int32) - 2  # round(4 t), in [-2, 2]
    two_pi = tl.full((), 6.283185307179586, tl.float64)  # a bare float literal would be a float32 constant
    x = ((turns - quadrant.to(tl.float64) * 0.25) * two_pi).to(tl.float32)  # in [-pi/4, pi/4]
    x2 = x * x
    sine = x + x * x2 * (-1.6666654611e-1 + x2 * (8.3321608736e-3 + x2 * -1.9515295891e-4))
    cosine = 1 - 0.5 * x2 + x2 * x2 * (4.166664568298827e-2 + x2 * (-1.388731625493765e-3 + x2 * 2.443315711809948e-5))
    value = tl.where((quadrant & 1) == 1, cosine, sine)  # sin(x + q pi/2)
    return tl.where((quadrant & 2) == 2, -value, value)


@triton.jit
def _document_start(cu_seqlens_ptr, tokens, num_documents, SEARCH_STEPS: tl.constexpr):
    """The first token of each token's document: binary search for ``cu_seqlens[lo] <= n < cu_seqlens[hi]``
    (``SEARCH_STEPS = ceil(log2(num_documents))``; tokens past the end settle on the last document)."""
    lo = tl.zeros_like(tokens)
    hi = lo + num_documents
    for _ in tl.static_range(SEARCH_STEPS):
        mid = (lo + hi) // 2
        below = tl.load(cu_seqlens_ptr + mid).to(tl.int64) <= tokens
        lo = tl.where(below, mid, lo)
        hi = tl.where(below, hi, mid)
    return tl.load(cu_seqlens_ptr + lo).to(tl.int64)


@triton.jit
def _sum_tile(
    tokens, cols, token_mask, col_mask, ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr, turns_ptr, phase_ptr,
    token_types_ptr, segment_ptr, cu_seqlens_ptr, dim, scale, position_offset, num_documents, vocab_start, num_rows,
    seq_len, chunk_start, chunk_stop, POSITION: tl.constexpr, HAS_POSITION_IDS: tl.constexpr, PACKED: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_TOKEN_TYPES: tl.constexpr, SHARDED: tl.constexpr,
    CHUNKED: tl.constexpr, FP64: tl.constexpr,
):
    """The forward's sum on a tile of ``tokens`` x ``cols``, in the compute dtype: token row * scale, position term,
    segment row (zero where the masks are off; what the sinusoid gives for tokens past the end is for the caller
    to mask)."""
    mask = token_mask[:, None] & col_mask[None, :]
    math_type = tl.float64 if FP64 else tl.float32

    ids = tl.load(ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    row_mask = mask
    if SHARDED:
        ids -= vocab_start
        row_mask &= ((ids >= 0) & (ids < num_rows))[:, None]
    acc = tl.load(weight_ptr + ids[:, None] * dim + cols[None, :], mask=row_mask, other=0).to(math_type) * _float_arg(scale, math_type)
    side_tokens, side_mask = token_mask, mask  # the tokens that take the position and segment terms
    if CHUNKED:
        column = tokens % seq_len
        side_tokens &= (column >= chunk_start) & (column < chunk_stop)
        side_mask = side_tokens[:, None] & col_mask[None, :]
    if POSITION != _NONE:
        if HAS_POSITION_IDS:
            positions = tl.load(position_ids_ptr + tokens, mask=side_tokens, other=0).to(tl.int64)
        elif PACKED:
            positions = position_offset + tokens - _document_start(cu_seqlens_ptr, tokens, num_documents, SEARCH_STEPS)
        else:
            positions = position_offset + tokens % seq_len
        if POSITION == _LEARNED:
            rows = position_weight_ptr + positions[:, None] * dim + cols[None, :]
            acc += tl.load(rows, mask=side_mask, other=0).to(math_type)
        else:
            # the angle in turns, reduced to [-1/2, 1/2] in float64 before the sine: a float32
            # product p * w is already off by ~1e-3 rad at p = 16384
            turns_per_position = tl.load(turns_ptr + cols, mask=col_mask, other=0)
            phase = tl.load(phase_ptr + cols, mask=col_mask, other=0)
            turns = positions.to(tl.float64)[:, None] * turns_per_position[None, :] + phase[None, :]
            turns -= (turns + 0.5).to(tl.int64).to(tl.float64)  # turns >= 0: truncation rounds
            if FP64:
                sine = tl.sin(turns * tl.full((), 6.283185307179586, tl.float64))
            else:
                sine = _sin_of_turns(turns)
            if CHUNKED:
                sine = tl.where(side_mask, sine, 0)
            acc += sine
    if HAS_SEGMENTS:
        if HAS_TOKEN_TYPES:
            segments = tl.load(token_types_ptr + tokens, mask=side_tokens, other=0).to(tl.int64)
        else:
            segments = tl.zeros_like(tokens)
        acc += tl.load(segment_ptr + segments[:, None] * dim + cols[None, :], mask=side_mask, other=0).to(math_type)
    return acc


@triton.jit
def _forward_kernel(
    ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr, turns_ptr, phase_ptr, token_types_ptr, segment_ptr,
    cu_seqlens_ptr, out_ptr, num_tokens, dim, scale: tl.float64, position_offset, num_documents, vocab_start, num_rows,
    seq_len, chunk_start, chunk_stop,
    POSITION: tl.constexpr,  # a PositionMode; both sinusoid layouts read the turns/phase tables
    HAS_POSITION_IDS: tl.constexpr, PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
    HAS_TOKEN_TYPES: tl.constexpr, SHARDED: tl.constexpr, CHUNKED: tl.constexpr, FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < dim
    acc = _sum_tile(tokens, cols, token_mask, col_mask, ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr,
                    turns_ptr, phase_ptr, token_types_ptr, segment_ptr, cu_seqlens_ptr, dim, scale, position_offset,
                    num_documents, vocab_start, num_rows, seq_len, chunk_start, chunk_stop, POSITION, HAS_POSITION_IDS,
                    PACKED, SEARCH_STEPS, HAS_SEGMENTS, HAS_TOKEN_TYPES, SHARDED, CHUNKED, FP64)
    mask = token_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + tokens[:, None] * dim + cols[None, :], _storage_value(acc, out_ptr), mask=mask)


@triton.jit
def _grad_rows_kernel(
    grad_ptr, values_ptr, token_types_ptr, partials_ptr, num_tokens, dim, scale: tl.float64, num_segments,
    seq_len, chunk_start, chunk_stop,
    WRITE_VALUES: tl.constexpr, SEGMENT_PARTIALS: tl.constexpr, HAS_TOKEN_TYPES: tl.constexpr, CHUNKED: tl.constexpr,
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    tokens = block.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < dim
    mask = token_mask[:, None] & col_mask[None, :]
    math_type = tl.float64 if FP64 else tl.float32
    offsets = tokens[:, None] * dim + cols[None, :]

    grad = tl.load(grad_ptr + offsets, mask=mask, other=0).to(math_type)
    if WRITE_VALUES:
        tl.store(values_ptr + offsets, _storage_value(grad * _float_arg(scale, math_type), values_ptr), mask=mask)
    if SEGMENT_PARTIALS:
        segment_tokens = token_mask
        if CHUNKED:
            column = tokens % seq_len
            segment_tokens &= (column >= chunk_start) & (column < chunk_stop)
        if HAS_TOKEN_TYPES:
            segments = tl.load(token_types_ptr + tokens, mask=segment_tokens, other=-1)
        else:
            segments = tl.where(segment_tokens, 0, -1)
        for segment in range(num_segments):
            partial = tl.sum(tl.where((segments == segment)[:, None], grad, 0), axis=0)
            tl.store(partials_ptr + (block.to(tl.int64) * num_segments + segment) * dim + cols, partial, mask=col_mask)


@triton.jit
def _sorted_sum_kernel(
    grad_ptr, order_ptr, keys_ptr, run_end_ptr, out_ptr, dim, scale: tl.float64, FP64: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    math_type = tl.float64 if FP64 else tl.float32
    end = tl.load(run_end_ptr + start)  # == start unless this program starts a run of equal keys
    acc = tl.zeros([BLOCK_D], dtype=math_type)
    for i in range(start, end):
        row = tl.load(order_ptr + i)
        acc += tl.load(grad_ptr + row * dim + cols, mask=col_mask, other=0).to(math_type)
    key = tl.load(keys_ptr + start)
    tl.store(out_ptr + key * dim + cols, _storage_value(acc * _float_arg(scale, math_type), out_ptr), mask=col_mask & (end > start))


@triton.jit
def _packed_position_sum_kernel(grad_ptr, cu_seqlens_ptr, out_ptr, num_documents, dim, position_offset, seq_len,
                                chunk_start, chunk_stop, CHUNKED: tl.constexpr, FP64: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    position = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    offset = position - position_offset  # of the token within its document
    acc = tl.zeros([BLOCK_D], dtype=tl.float64 if FP64 else tl.float32)
    if offset >= 0:
        for document in range(num_documents):
            token = tl.load(cu_seqlens_ptr + document).to(tl.int64) + offset
            use = token < tl.load(cu_seqlens_ptr + document + 1).to(tl.int64)
            if CHUNKED:
                use &= (token % seq_len >= chunk_start) & (token % seq_len < chunk_stop)
            if use:
                acc += tl.load(grad_ptr + token * dim + cols, mask=col_mask, other=0).to(acc.dtype)
    tl.store(out_ptr + position * dim + cols, _storage_value(acc, out_ptr), mask=col_mask)


def _sinusoid_turns(dim: int, layout: str, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column: turns per position (frequency / 2 pi) and the phase in turns (1/4 for a cosine)."""
    frequency, is_cos = sinusoid_frequencies(dim, layout, base, device)
    return frequency / (2 * math.pi), is_cos.to(torch.float64) * 0.25


def _fp64_math(table: torch.Tensor) -> bool:
    return compute_dtype(table.dtype) == torch.float64


def _chunk_args(args) -> dict:
    """The kernels' ``seq_len``, ``chunk_start``, ``chunk_stop`` and ``CHUNKED`` (not the whole sequence) for forward
    or backward inputs."""
    seq_len = max(args.seq_len, 1)
    stop = seq_len if args.chunk_end == -1 else args.chunk_end
    return dict(seq_len=seq_len, chunk_start=args.chunk_start, chunk_stop=stop,
                CHUNKED=(args.chunk_start, stop) != (0, seq_len))


INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)
# torch.compile traces into a triton_op's kernels. Not under the interpreter (wrap_triton hands interpreted kernels
# back unwrapped, torch 2.11 rejects them), nor before torch 2.14, whose triton_op ignores schema= and infers one
# from the function's annotations. There the operators are opaque custom_ops with the same schema.
TRACEABLE = not INTERPRETED and TorchVersion(torch.__version__) >= "2.14"


def _operator(kind: str):
    """The ``kind`` operator of this backend, registered with its schema from ``spec``."""
    define = triton_op if TRACEABLE else torch.library.custom_op
    return define(ops.op_name(kind, "triton"), mutates_args=(), schema=schema(kind))


def _launchable(kernel):
    """The kernel as the host code launches it: ``wrap_triton``'s traceable form inside a triton_op."""
    return wrap_triton(kernel) if TRACEABLE else kernel


def sum_arguments(args: ForwardInputs, mode: PositionMode) -> dict:
    """The arguments of ``_sum_tile`` for checked forward inputs, by the kernels' parameter names (``_forward_kernel``
    and the norm kernels take the same)."""
    dim = args.weight.shape[1]
    turns = phase = None
    if mode not in (PositionMode.NONE, PositionMode.LEARNED):
        turns, phase = _sinusoid_turns(dim, mode.name.lower(), args.sinusoid_base, args.weight.device)
    packed = args.cu_seqlens is not None and args.position_ids is None
    num_documents = args.cu_seqlens.shape[0] - 1 if packed else 0
    return dict(
        ids_ptr=args.input_ids, weight_ptr=args.weight, position_ids_ptr=args.position_ids,
        position_weight_ptr=args.position_weight, turns_ptr=turns, phase_ptr=phase, token_types_ptr=args.token_type_ids,
        segment_ptr=args.segment_weight, cu_seqlens_ptr=args.cu_seqlens, dim=dim, scale=args.scale,
        position_offset=args.position_offset, num_documents=num_documents, vocab_start=args.vocab_start,
        num_rows=args.weight.shape[0], **_chunk_args(args), POSITION=mode.value,
        HAS_POSITION_IDS=args.position_ids is not None, PACKED=packed, SEARCH_STEPS=max(num_documents - 1, 1).bit_length(),
        HAS_SEGMENTS=args.segment_weight is not None, HAS_TOKEN_TYPES=args.token_type_ids is not None,
        SHARDED=args.vocab_size != 0, FP64=_fp64_math(args.weight))


@_operator("forward")
def forward_triton(*inputs):
    args = ForwardInputs(*inputs)
    mode = check_forward(args)
    num_tokens, dim = args.input_ids.shape[0], args.weight.shape[1]
    out = torch.empty((num_tokens, dim), dtype=args.weight.dtype, device=args.weight.device)
    if num_tokens == 0 or dim == 0:
        return out
    block_t, block_d, num_warps = launch_config(dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    _launchable(_forward_kernel)[grid](**sum_arguments(args, mode), out_ptr=out, num_tokens=num_tokens,
                                       BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out


def _sorted_sum(grad: torch.Tensor, keys: torch.Tensor, num_rows: int, scale: float, skip_key: int) -> torch.Tensor:
    """``out[k] = scale * sum(grad[n] for n with keys[n] == k)`` for ``k != skip_key``; other rows zero, and
    tokens whose key is outside ``[0, num_rows)`` are skipped.

    A stable sort groups equal keys; the first token of each run sums the run in token order.
    """
    num_tokens, dim = grad.shape
    out = torch.zeros((num_rows, dim), dtype=grad.dtype, device=grad.device)
    if num_tokens == 0 or num_rows == 0 or dim == 0:
        return out
    sorted_keys, order = torch.sort(keys.to(torch.int64), stable=True)
    run_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    starts_run = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts_run[1:] = sorted_keys[1:] != sorted_keys[:-1]
    index = torch.arange(num_tokens, device=grad.device)
    summed = starts_run & (sorted_keys != skip_key) & (sorted_keys >= 0) & (sorted_keys < num_rows)
    run_end = torch.where(summed, run_end, index)
    _, block_d, _ = launch_config(dim)
    num_warps = max(block_d // 128, 1)  # one row per program: 4 columns per thread
    _launchable(_sorted_sum_kernel)[(num_tokens, triton.cdiv(dim, block_d))](
        grad, order, sorted_keys, run_end, out, dim, scale, FP64=_fp64_math(grad), BLOCK_D=block_d,
        num_warps=num_warps)
    return out


def _grad_rows(grad: torch.Tensor, token_type_ids: torch.Tensor | None, write_values: bool, scale: float,
               num_segments: int, chunk: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``grad``: sparse values (or an empty (0, D)) and the (num_segments, D) segment sums of the
    chunk's tokens (``chunk``: ``_chunk_args``)."""
    num_tokens, dim = grad.shape
    values = torch.empty((num_tokens if write_values else 0, dim), dtype=grad.dtype, device=grad.device)
    block_t, block_d, num_warps = launch_config(dim)
    num_blocks = triton.cdiv(num_tokens, block_t)
    partials = torch.zeros((num_blocks, num_segments, dim), dtype=compute_dtype(grad.dtype), device=grad.device)
    if num_tokens > 0 and dim > 0 and (write_values or num_segments > 0):
        _launchable(_grad_rows_kernel)[(num_blocks, triton.cdiv(dim, block_d))](
            grad, values, token_type_ids, partials, num_tokens, dim, scale, num_segments, **chunk,
            WRITE_VALUES=write_values, SEGMENT_PARTIALS=num_segments > 0, HAS_TOKEN_TYPES=token_type_ids is not None,
            FP64=_fp64_math(grad), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return values, partials.sum(dim=0).to(grad.dtype)


def _packed_position_sum(grad: torch.Tensor, cu_seqlens: torch.Tensor, num_positions: int, position_offset: int,
                         chunk: dict) -> torch.Tensor:
    """``out[p] = sum over documents of grad[cu_seqlens[i] + p - position_offset]`` where the document reaches it
    and that token is in the chunk (``chunk``: ``_chunk_args``)."""
    out = torch.empty((num_positions, grad.shape[1]), dtype=grad.dtype, device=grad.device)
    _, block_d, _ = launch_config(grad.shape[1])
    _launchable(_packed_position_sum_kernel)[(num_positions, triton.cdiv(grad.shape[1], block_d))](
        grad, cu_seqlens, out, cu_seqlens.shape[0] - 1, grad.shape[1], position_offset, **chunk,
        FP64=_fp64_math(grad), BLOCK_D=block_d, num_warps=max(block_d // 128, 1))
    return out


def _chunk_keys(keys: torch.Tensor, args: BackwardInputs) -> torch.Tensor:
    """``keys`` with -1, a key ``_sorted_sum`` skips, for the tokens out of the sequence chunk."""
    in_chunk = chunk_tokens(keys.shape[0], args.seq_len, args.chunk_start, args.chunk_end, keys.device)
    return keys if in_chunk is None else torch.where(in_chunk, keys, -1)


@_operator("backward")
def backward_triton(*inputs):
    return table_grads(BackwardInputs(*inputs))


def table_grads(args: BackwardInputs, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
                position_grad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward operator's results (token, position, segment gradients) for its inputs, checked here. ``rows``:
    what one pass over ``grad_out`` makes (``_grad_rows``: the sparse values, the segment sums when they fit in
    registers), and ``position_grad``, when a caller's kernel made them already (the norm backward's)."""
    token_grad = check_backward(args)
    grad_out, input_ids = args.grad_out, args.input_ids
    num_tokens, dim = grad_out.shape
    chunk = _chunk_args(args)
    in_registers = args.num_segments <= MAX_REGISTER_SEGMENTS
    if rows is None:
        rows = _grad_rows(grad_out, args.token_type_ids, token_grad == TokenGrad.SPARSE, args.scale,
                          args.num_segments if in_registers else 0, chunk)
    values, segment_grad = rows
    if not in_registers:
        segments = args.token_type_ids if args.token_type_ids is not None else torch.zeros_like(input_ids)
        segment_grad = _sorted_sum(grad_out, _chunk_keys(segments, args), args.num_segments, 1.0, -1)
    if token_grad == TokenGrad.DENSE:
        # a shard's rows: ids of other shards fall outside [0, num_embeddings) and are skipped
        token_rows = input_ids.long() - args.vocab_start if args.vocab_start else input_ids
        token_grad_out = _sorted_sum(grad_out, token_rows, args.num_embeddings, args.scale, args.padding_idx - args.vocab_start)
    else:
        token_grad_out = values
    if position_grad is not None:
        return token_grad_out, position_grad, segment_grad
    if args.num_positions == 0 or dim == 0:
        position_grad = grad_out.new_zeros((args.num_positions, dim))
    elif args.cu_seqlens is not None and args.position_ids is None:
        position_grad = _packed_position_sum(grad_out, args.cu_seqlens, args.num_positions, args.position_offset, chunk)
    else:
        positions = token_positions(args.position_ids, None, num_tokens, args.position_offset, args.seq_len, grad_out.device)
        position_grad = _sorted_sum(grad_out, _chunk_keys(positions, args), args.num_positions, 1.0, -1)
    return token_grad_out, position_grad, segment_grad


from . import triton_norm  # noqa: E402,F401  (the norm operators, on the helpers above)

ops.register_fake_and_autograd("triton")
