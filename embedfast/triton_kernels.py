"""The Triton backend: ``embedfast::forward_triton`` and ``embedfast::backward_triton``.

Both operators are ``torch.library.triton_op``s: eagerly they launch the kernels below, and under
``torch.compile`` the compiler traces the host code and sees every kernel (``wrap_triton``), so it
can schedule them with the rest of the graph. On CPU tensors they run under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported); that is how CI tests them.

Kernels:
  ``_forward_kernel``       one program per (block of tokens) x (block of columns): gather, scale,
                            position term, segment row, one store.
  ``_grad_rows_kernel``     one pass over ``grad_out`` tiles: the sparse token-gradient values and,
                            for small segment tables, per-program segment partial sums.
  ``_sorted_sum_kernel``    dense row sums by sorted key (token, position or large segment
                            gradients): the program of the first token of each run of equal keys
                            sums the run in token order; the others return at once.
Every reduction has a fixed order, so gradients are bitwise reproducible; no float atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from torch.library import triton_op, wrap_triton

from . import ops
from .positions import sinusoid_frequencies
from .reference import compute_dtype, resolve_positions
from .validation import check_forward_indices, check_index_range, exact_checks

POSITION_CODES = {"none": 0, "learned": 1, "interleaved": 2, "concat": 2}
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
def _forward_kernel(
    ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr, turns_ptr, phase_ptr, token_types_ptr, segment_ptr,
    out_ptr, num_tokens, dim, scale: tl.float64, past_length, seq_len,
    POSITION: tl.constexpr,  # 0 none, 1 learned, 2 sinusoid (turns/phase tables)
    HAS_POSITION_IDS: tl.constexpr, HAS_SEGMENTS: tl.constexpr, HAS_TOKEN_TYPES: tl.constexpr, FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_mask = tokens < num_tokens
    col_mask = cols < dim
    mask = token_mask[:, None] & col_mask[None, :]
    math_type = tl.float64 if FP64 else tl.float32

    ids = tl.load(ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
    acc = tl.load(weight_ptr + ids[:, None] * dim + cols[None, :], mask=mask, other=0).to(math_type) * tl.cast(scale, math_type)
    if POSITION != 0:
        if HAS_POSITION_IDS:
            positions = tl.load(position_ids_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
        else:
            positions = past_length + tokens % seq_len
        if POSITION == 1:
            rows = position_weight_ptr + positions[:, None] * dim + cols[None, :]
            acc += tl.load(rows, mask=mask, other=0).to(math_type)
        else:
            # the angle in turns, reduced to [-1/2, 1/2] in float64 before the sine: a float32
            # product p * w is already off by ~1e-3 rad at p = 16384
            turns_per_position = tl.load(turns_ptr + cols, mask=col_mask, other=0)
            phase = tl.load(phase_ptr + cols, mask=col_mask, other=0)
            turns = positions.to(tl.float64)[:, None] * turns_per_position[None, :] + phase[None, :]
            turns -= (turns + 0.5).to(tl.int64).to(tl.float64)  # turns >= 0: truncation rounds
            if FP64:
                acc += tl.sin(turns * tl.full((), 6.283185307179586, tl.float64))
            else:
                acc += _sin_of_turns(turns)
    if HAS_SEGMENTS:
        if HAS_TOKEN_TYPES:
            segments = tl.load(token_types_ptr + tokens, mask=token_mask, other=0).to(tl.int64)
        else:
            segments = tl.zeros([BLOCK_T], dtype=tl.int64)
        acc += tl.load(segment_ptr + segments[:, None] * dim + cols[None, :], mask=mask, other=0).to(math_type)
    tl.store(out_ptr + tokens[:, None] * dim + cols[None, :], _storage_value(acc, out_ptr), mask=mask)


@triton.jit
def _grad_rows_kernel(
    grad_ptr, values_ptr, token_types_ptr, partials_ptr, num_tokens, dim, scale: tl.float64, num_segments,
    WRITE_VALUES: tl.constexpr, SEGMENT_PARTIALS: tl.constexpr, HAS_TOKEN_TYPES: tl.constexpr, FP64: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
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
        tl.store(values_ptr + offsets, _storage_value(grad * tl.cast(scale, math_type), values_ptr), mask=mask)
    if SEGMENT_PARTIALS:
        if HAS_TOKEN_TYPES:
            segments = tl.load(token_types_ptr + tokens, mask=token_mask, other=-1)
        else:
            segments = tl.where(token_mask, 0, -1)
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
    tl.store(out_ptr + key * dim + cols, _storage_value(acc * tl.cast(scale, math_type), out_ptr), mask=col_mask & (end > start))


def _check_index(name: str, ids: torch.Tensor | None, input_ids: torch.Tensor) -> None:
    if ids is None:
        return
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got dtype {ids.dtype}")
    if ids.dim() != 1 or not ids.is_contiguous() or ids.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{name} must be a contiguous 1-D tensor of {input_ids.shape[0]} ids, got shape "
                         f"{tuple(ids.shape)} and strides {ids.stride()}")
    if ids.device != input_ids.device:
        raise ValueError(f"{name} is on {ids.device}, but input_ids is on {input_ids.device}")


def _check_table(name: str, table: torch.Tensor | None, like: torch.Tensor) -> None:
    if table is None:
        return
    if table.dim() != 2 or not table.is_contiguous() or table.shape[1] != like.shape[-1]:
        raise ValueError(f"{name} must be a contiguous 2-D table with {like.shape[-1]} columns, got shape "
                         f"{tuple(table.shape)} and strides {table.stride()}")
    if table.dtype != like.dtype or table.device != like.device:
        raise ValueError(f"{name} is {table.dtype} on {table.device}, but expected {like.dtype} on {like.device}")


def _check_ranges(checks: list[tuple[str, torch.Tensor | None, int | None]], check_bounds: bool) -> None:
    for name, ids, bound in checks:
        if ids is not None:
            check_index_range(name, ids, bound, exact_checks(check_bounds, ids))


def _sinusoid_turns(dim: int, layout: str, base: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column: turns per position (frequency / 2 pi) and the phase in turns (1/4 for a cosine)."""
    frequency, is_cos = sinusoid_frequencies(dim, layout, base, device)
    return frequency / (2 * math.pi), is_cos.to(torch.float64) * 0.25


INTERPRETED = isinstance(_forward_kernel, InterpretedFunction)


def _operator(kind: str, schema: str):
    """``triton_op`` for compiled kernels. Under the interpreter compile could not trace the kernels
    (``wrap_triton`` hands them back unwrapped), so there the op is an opaque ``custom_op`` instead."""
    if INTERPRETED:
        return torch.library.custom_op(ops.op_name(kind, "triton"), mutates_args=(), schema=schema)
    return triton_op(ops.op_name(kind, "triton"), mutates_args=(), schema=schema)


def _launchable(kernel):
    """The kernel as the host code launches it: ``wrap_triton``'s traceable form when compiled; under the
    interpreter the kernel itself (torch 2.11's ``wrap_triton`` rejects interpreted kernels)."""
    return kernel if INTERPRETED else wrap_triton(kernel)


@_operator("forward", ops.FORWARD_SCHEMA)
def forward_triton(input_ids, weight, position_ids, position_weight, token_type_ids, segment_weight, scale, position,
                   sinusoid_base, max_positions, past_length, seq_len, padding_idx, sparse, check_bounds):
    if weight.dim() != 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous 2-D table, got shape {tuple(weight.shape)} and strides {weight.stride()}")
    if position not in POSITION_CODES:
        raise ValueError(f"position must be one of {tuple(POSITION_CODES)}, got {position!r}")
    if (position == "learned") != (position_weight is not None):
        raise ValueError(f"position_weight must be given exactly when position='learned' (position={position!r})")
    if token_type_ids is not None and segment_weight is None:
        raise ValueError("token_type_ids were given, but there is no segment table")
    _check_index("input_ids", input_ids, input_ids)
    for name, ids in (("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        _check_index(name, ids, input_ids)
    for name, table in (("position_weight", position_weight), ("segment_weight", segment_weight)):
        _check_table(name, table, weight)
    if past_length < 0:
        raise ValueError(f"past_length must be >= 0, got {past_length}")
    num_tokens, dim = input_ids.shape[0], weight.shape[1]
    rows = position_weight.shape[0] if position_weight is not None else max_positions
    bound = rows if rows > 0 else None
    if position_ids is None and position != "none" and num_tokens > 0:
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        last = past_length + min(seq_len, num_tokens) - 1
        if bound is not None and last >= bound:
            raise IndexError(f"positions reach {last} (past_length={past_length}, seq_len={seq_len}), out of range "
                             f"for max_positions={bound}")
    check_forward_indices(input_ids, weight, position_ids, position_weight, max_positions, token_type_ids, segment_weight,
                          check_bounds)

    out = torch.empty((num_tokens, dim), dtype=weight.dtype, device=weight.device)
    if num_tokens == 0 or dim == 0:
        return out
    turns = phase = None
    if POSITION_CODES[position] == 2:
        turns, phase = _sinusoid_turns(dim, position, sinusoid_base, weight.device)
    block_t, block_d, num_warps = launch_config(dim)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(dim, block_d))
    _launchable(_forward_kernel)[grid](
        input_ids, weight, position_ids, position_weight, turns, phase, token_type_ids, segment_weight, out,
        num_tokens, dim, scale, past_length, max(seq_len, 1),
        POSITION=POSITION_CODES[position], HAS_POSITION_IDS=position_ids is not None,
        HAS_SEGMENTS=segment_weight is not None, HAS_TOKEN_TYPES=token_type_ids is not None,
        FP64=weight.dtype == torch.float64, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return out


def _sorted_sum(grad: torch.Tensor, keys: torch.Tensor, num_rows: int, scale: float, skip_key: int) -> torch.Tensor:
    """``out[k] = scale * sum(grad[n] for n with keys[n] == k)`` for ``k != skip_key``; other rows zero.

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
    run_end = torch.where(starts_run & (sorted_keys != skip_key), run_end, index)
    _, block_d, _ = launch_config(dim)
    num_warps = max(block_d // 128, 1)  # one row per program: 4 columns per thread
    _launchable(_sorted_sum_kernel)[(num_tokens, triton.cdiv(dim, block_d))](
        grad, order, sorted_keys, run_end, out, dim, scale, FP64=grad.dtype == torch.float64, BLOCK_D=block_d,
        num_warps=num_warps)
    return out


def _grad_rows(grad: torch.Tensor, token_type_ids: torch.Tensor | None, write_values: bool, scale: float,
               num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over ``grad``: sparse values (or an empty (0, D)) and the (num_segments, D) segment sums."""
    num_tokens, dim = grad.shape
    values = torch.empty((num_tokens if write_values else 0, dim), dtype=grad.dtype, device=grad.device)
    block_t, block_d, num_warps = launch_config(dim)
    num_blocks = triton.cdiv(num_tokens, block_t)
    partials = torch.zeros((num_blocks, num_segments, dim), dtype=compute_dtype(grad.dtype), device=grad.device)
    if num_tokens > 0 and dim > 0 and (write_values or num_segments > 0):
        _launchable(_grad_rows_kernel)[(num_blocks, triton.cdiv(dim, block_d))](
            grad, values, token_type_ids, partials, num_tokens, dim, scale, num_segments,
            WRITE_VALUES=write_values, SEGMENT_PARTIALS=num_segments > 0, HAS_TOKEN_TYPES=token_type_ids is not None,
            FP64=grad.dtype == torch.float64, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)
    return values, partials.sum(dim=0).to(grad.dtype)


@_operator("backward", ops.BACKWARD_SCHEMA)
def backward_triton(grad_out, input_ids, position_ids, token_type_ids, token_grad, num_embeddings, padding_idx, scale,
                    num_positions, num_segments, past_length, seq_len, check_bounds):
    if token_grad not in ("sparse", "dense", "none"):
        raise ValueError(f"token_grad must be 'sparse', 'dense' or 'none', got {token_grad!r}")
    if grad_out.dim() != 2 or not grad_out.is_contiguous() or grad_out.shape[0] != input_ids.shape[0]:
        raise ValueError(f"grad_out must be a contiguous ({input_ids.shape[0]}, embedding_dim) tensor, got shape "
                         f"{tuple(grad_out.shape)} and strides {grad_out.stride()}")
    _check_index("input_ids", input_ids, input_ids)
    for name, ids in (("position_ids", position_ids), ("token_type_ids", token_type_ids)):
        _check_index(name, ids, input_ids)
    num_tokens, dim = grad_out.shape
    positions = resolve_positions(position_ids, num_tokens, past_length, seq_len, grad_out.device) if num_positions else None
    _check_ranges([("input_ids", input_ids if token_grad == "dense" else None, num_embeddings),
                   ("position_ids", positions, num_positions),
                   ("token_type_ids", token_type_ids if num_segments > 0 else None, num_segments)], check_bounds)
    in_registers = num_segments <= MAX_REGISTER_SEGMENTS
    values, segment_grad = _grad_rows(grad_out, token_type_ids, token_grad == "sparse", scale,
                                      num_segments if in_registers else 0)
    if not in_registers:
        segments = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
        segment_grad = _sorted_sum(grad_out, segments, num_segments, 1.0, -1)
    if token_grad == "dense":
        token_grad_out = _sorted_sum(grad_out, input_ids, num_embeddings, scale, padding_idx)
    else:
        token_grad_out = values
    position_grad = grad_out.new_zeros((0, dim))
    if positions is not None:
        position_grad = _sorted_sum(grad_out, positions, num_positions, 1.0, -1)
    return token_grad_out, position_grad, segment_grad


ops.register_fake_and_autograd("triton")
