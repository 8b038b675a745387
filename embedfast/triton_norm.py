"""The Triton backend's norm operators: ``embedfast::norm_forward_triton`` and ``embedfast::norm_backward_triton``.

Both launch ``_norm_kernel``: each program takes whole token rows (``BLOCK_D >= D``), builds the forward's sum on
them in registers with ``triton_kernels._sum_tile`` (the same code as ``_forward_kernel``), and then
  forward   the row's (mean, rstd) as ``spec.py`` defines them (LAYERNORM: two passes over the row in registers),
            ``y = (x - mean) * rstd * norm_weight + norm_bias``, the dropout, one store;
  backward  ``x_hat`` from the forward's stats, ``dy`` = grad_out under the same mask and scale, the gradient of
            the sum (grad_sum), and in the same pass the sparse values, the segment sums and, for default positions,
            the position rows: a program then takes a tile of positions and walks the sequences, summing the tile's
            rows in registers. With ``norm_grads``, per-program partial sums of ``dy * x_hat`` and ``dy``. Partial
            sums are per program, over a fixed set of tokens, and the host adds them in a fixed order (no atomics:
            reproducible bits). grad_sum is stored only for what is summed by key afterwards
            (``triton_kernels.table_grads``: dense token gradients, explicit or packed positions, many segments).
The dropout mask is ``dropout.py``'s: a MurmurHash3 fmix32 round in uint32 over the column and the row's key (two rounds
over the token index and the seed, which the kernel reads from its 1-element device tensor: no host synchronization,
CUDA-graph safe).
Registered from ``triton_kernels`` (imported at its end); the same interpreter rules hold (see there).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from .op_checks import check_forward, check_norm, check_norm_backward
from .spec import (ForwardInputs, NormBackwardInputs, NormInputs, NormMode, PositionMode, TokenGrad, compute_dtype,
                   dropout_threshold, table_backward_inputs)
from .triton_kernels import (MAX_REGISTER_SEGMENTS, _float_arg, _launchable, _operator, _storage_value, _sum_tile,
                             sum_arguments, table_grads)

_NUM_FORWARD = len(ForwardInputs._fields)
_LAYERNORM = tl.constexpr(NormMode.LAYERNORM.value)
_RMSNORM = tl.constexpr(NormMode.RMSNORM.value)
# the backward's weight and bias partial sums: at most this many programs (each a fixed block of tokens)
MAX_PARTIAL_BLOCKS = 512


def norm_launch_config(dim: int, backward: bool = False) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)``: whole rows (``BLOCK_D >= dim``), ~2048 elements a tile (fewer rows for
    wide ones, at least one), 4 warps, 8 from 2048 columns and 16 from 8192 (~16 fp32 values per thread); twice the
    warps for the backward, which keeps a second tile (the position sums) beside the row's (<= 128 registers)."""
    block_d = triton.next_power_of_2(max(dim, 1))
    num_warps = 16 if block_d >= 8192 else 8 if block_d >= 2048 else 4
    return max(min(2048 // block_d, 16), 1), block_d, num_warps * (2 if backward else 1)


@triton.jit
def _fmix32(h):
    """MurmurHash3's 32-bit finaliser on uint32 (wrapping multiplies)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _dropout_keep(seed_ptr, rows, columns, threshold):
    """Whether each element (row, column) of the (int64) ``rows`` and ``columns`` vectors is kept, as a (rows,
    columns) tile: ``dropout.dropout_bits(seed, row, column) >= threshold``."""
    seed = tl.load(seed_ptr)
    seed_low = seed.to(tl.uint32)  # int64 -> uint32 keeps the low 32 bits
    seed_high = (seed >> 32).to(tl.uint32)
    key = _fmix32(_fmix32(rows.to(tl.uint32) ^ seed_low) ^ seed_high ^ ((rows >> 32).to(tl.uint32) * 0x9E3779B9))
    bits = _fmix32(columns.to(tl.uint32)[None, :] ^ key[:, None])
    return bits.to(tl.int64) >= threshold


@triton.jit
def _rstd(variance, FP64: tl.constexpr):
    """``1 / sqrt(variance)``, the square root correctly rounded (``tl.sqrt`` is approximate in float32; float64's
    is exact) and a true division."""
    if FP64:
        return 1.0 / tl.sqrt(variance)
    else:
        return 1.0 / tl.sqrt_rn(variance)


@triton.jit
def _norm_kernel(
    ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr, turns_ptr, phase_ptr, token_types_ptr, segment_ptr,
    cu_seqlens_ptr, dim, scale: tl.float64, position_offset, num_documents, vocab_start, num_rows, seq_len, chunk_start,
    chunk_stop, norm_weight_ptr, norm_bias_ptr, seed_ptr, stats_ptr, out_ptr, grad_ptr, partials_ptr, values_ptr,
    segment_partials_ptr, position_grad_ptr, num_tokens, num_segments, steps, period, eps: tl.float64, threshold,
    keep_scale: tl.float64,
    POSITION: tl.constexpr, HAS_POSITION_IDS: tl.constexpr, PACKED: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr, HAS_TOKEN_TYPES: tl.constexpr, SHARDED: tl.constexpr, CHUNKED: tl.constexpr,
    FP64: tl.constexpr,
    NORM: tl.constexpr,  # a NormMode
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BACKWARD: tl.constexpr,  # False: out = the norm forward's output, stats written; True: out = grad_sum
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,  # the backward's partial sums, in rows 0 and 1 of partials
    WRITE_OUT: tl.constexpr,  # the backward's grad_sum is stored (for sums by key after the kernel)
    WRITE_VALUES: tl.constexpr,  # the backward's sparse values: grad_sum * scale
    SEGMENT_GRAD: tl.constexpr,  # the backward's per-program segment sums, in segment_partials
    POSITION_TILES: tl.constexpr,  # a program: BLOCK_T default positions, for each sequence in turn (the steps);
    # the backward then sums their position rows too. Else BLOCK_T consecutive tokens a step, `steps` of them.
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    math_type = tl.float64 if FP64 else tl.float32
    if HAS_WEIGHT:
        norm_weight = tl.load(norm_weight_ptr + cols, mask=col_mask, other=0).to(math_type)
    if HAS_BIAS:
        norm_bias = tl.load(norm_bias_ptr + cols, mask=col_mask, other=0).to(math_type)
    weight_grad = tl.zeros([BLOCK_D], dtype=math_type)
    bias_grad = tl.zeros([BLOCK_D], dtype=math_type)
    position_sums = tl.zeros([BLOCK_T, BLOCK_D], dtype=math_type)
    offsets_in_period = block * BLOCK_T + tl.arange(0, BLOCK_T)
    for step in range(steps):  # in a fixed order: so are the partial sums'
        if POSITION_TILES:
            tokens = step * period + offsets_in_period
            token_mask = (offsets_in_period < period) & (tokens < num_tokens)
        else:
            tokens = (block * steps + step) * BLOCK_T + tl.arange(0, BLOCK_T)
            token_mask = tokens < num_tokens
        mask = token_mask[:, None] & col_mask[None, :]
        x = _sum_tile(tokens, cols, token_mask, col_mask, ids_ptr, weight_ptr, position_ids_ptr, position_weight_ptr,
                      turns_ptr, phase_ptr, token_types_ptr, segment_ptr, cu_seqlens_ptr, dim, scale, position_offset,
                      num_documents, vocab_start, num_rows, seq_len, chunk_start, chunk_stop, POSITION, HAS_POSITION_IDS,
                      PACKED, SEARCH_STEPS, HAS_SEGMENTS, HAS_TOKEN_TYPES, SHARDED, CHUNKED, FP64)
        x = tl.where(mask, x, 0)
        if BACKWARD:
            mean = tl.load(stats_ptr + tokens * 2, mask=token_mask, other=0).to(math_type)
            rstd = tl.load(stats_ptr + tokens * 2 + 1, mask=token_mask, other=0).to(math_type)
        else:
            mean = tl.zeros([BLOCK_T], dtype=math_type)
            if NORM == _LAYERNORM:
                mean = tl.sum(x, axis=1) / dim
                centred = tl.where(mask, x - mean[:, None], 0)
                rstd = _rstd(tl.sum(centred * centred, axis=1) / dim + _float_arg(eps, math_type), FP64)
            elif NORM == _RMSNORM:
                rstd = _rstd(tl.sum(x * x, axis=1) / dim + _float_arg(eps, math_type), FP64)
            else:
                rstd = mean + 1
            tl.store(stats_ptr + tokens * 2, mean, mask=token_mask)
            tl.store(stats_ptr + tokens * 2 + 1, rstd, mask=token_mask)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0)
        offsets = tokens[:, None] * dim + cols[None, :]
        if DROPOUT:
            keep = _dropout_keep(seed_ptr, tokens, cols, threshold)
        if BACKWARD:
            dy = tl.load(grad_ptr + offsets, mask=mask, other=0).to(math_type)
            if DROPOUT:
                dy = tl.where(keep, dy * _float_arg(keep_scale, math_type), 0)
            if NORM == _LAYERNORM or NORM == _RMSNORM:
                g = dy
                if HAS_WEIGHT:
                    g = dy * norm_weight[None, :]
                mean_gx = tl.sum(g * x_hat, axis=1) / dim
                if NORM == _LAYERNORM:
                    g -= (tl.sum(g, axis=1) / dim)[:, None]
                result = rstd[:, None] * (g - x_hat * mean_gx[:, None])
            else:
                result = dy
            if WEIGHT_GRAD:
                weight_grad += tl.sum(dy * x_hat, axis=0)
            if BIAS_GRAD:
                bias_grad += tl.sum(dy, axis=0)
            grad_sum = _storage_value(result, out_ptr).to(math_type)  # as stored: the tables' gradients sum it
            if WRITE_VALUES:
                tl.store(values_ptr + offsets, _storage_value(grad_sum * _float_arg(scale, math_type), values_ptr),
                         mask=mask)
            side_tokens = token_mask  # those that get the position and segment terms
            if CHUNKED:
                column = tokens % seq_len
                side_tokens &= (column >= chunk_start) & (column < chunk_stop)
            if SEGMENT_GRAD:
                if HAS_TOKEN_TYPES:
                    segments = tl.load(token_types_ptr + tokens, mask=side_tokens, other=-1)
                else:
                    segments = tl.where(side_tokens, 0, -1)
                for segment in range(num_segments):  # the program's own rows: no other program adds to them
                    partial = segment_partials_ptr + (block * num_segments + segment) * dim + cols
                    added = tl.sum(tl.where((segments == segment)[:, None], grad_sum, 0), axis=0)
                    tl.store(partial, tl.load(partial, mask=col_mask, other=0) + added, mask=col_mask)
            if POSITION_TILES:
                position_sums += tl.where(side_tokens[:, None], grad_sum, 0)
        else:
            result = x_hat
            if HAS_WEIGHT:
                result = result * norm_weight[None, :]
            if HAS_BIAS:
                result = result + norm_bias[None, :]
            if DROPOUT:
                result = tl.where(keep, result * _float_arg(keep_scale, math_type), 0)
        if WRITE_OUT:
            tl.store(out_ptr + offsets, _storage_value(result, out_ptr), mask=mask)
    if POSITION_TILES:
        rows = position_offset + offsets_in_period
        tl.store(position_grad_ptr + rows[:, None] * dim + cols[None, :], _storage_value(position_sums, position_grad_ptr),
                 mask=(offsets_in_period < period)[:, None] & col_mask[None, :])
    if WEIGHT_GRAD:
        tl.store(partials_ptr + block * 2 * dim + cols, weight_grad, mask=col_mask)
    if BIAS_GRAD:
        tl.store(partials_ptr + (block * 2 + 1) * dim + cols, bias_grad, mask=col_mask)


@dataclasses.dataclass
class _BackwardPass:
    """What ``_norm_kernel``'s backward reads and writes besides grad_sum (``write_grad_sum``), and its walk: ``steps``
    tiles of consecutive tokens a program, or with ``position_grad`` one tile of positions of ``period`` a program,
    each sequence a step. The defaults are the forward's: no backward, one tile a program."""
    grad: torch.Tensor | None = None  # grad_out
    partials: torch.Tensor | None = None  # (programs, 2, D): norm weight and bias sums
    weight_grad: bool = False
    bias_grad: bool = False
    write_grad_sum: bool = True
    values: torch.Tensor | None = None  # the sparse values
    segment_partials: torch.Tensor | None = None  # (programs, segments, D), zeros; None or 0 segments: none summed
    position_grad: torch.Tensor | None = None  # (positions, D), zeros
    steps: int = 1
    period: int = 0


def _launch(forward: ForwardInputs, position_mode: PositionMode, norm: NormInputs, mode: NormMode, out: torch.Tensor,
            stats: torch.Tensor, backward: _BackwardPass | None = None) -> None:
    """``_norm_kernel`` on checked inputs (the modes their checks returned): the forward (``backward`` None, one tile
    of ``norm_launch_config`` rows a program) or the backward."""
    num_tokens, dim = forward.input_ids.shape[0], forward.weight.shape[1]
    block_t, block_d, num_warps = norm_launch_config(dim, backward is not None)
    dropout = norm.dropout_p > 0
    backward = backward or _BackwardPass()
    if backward.position_grad is not None:
        grid = (triton.cdiv(backward.period, block_t),)
    else:
        grid = (triton.cdiv(num_tokens, block_t * backward.steps),)
    segment_partials = backward.segment_partials
    num_segments = segment_partials.shape[1] if segment_partials is not None else 0
    _launchable(_norm_kernel)[grid](
        **sum_arguments(forward, position_mode), norm_weight_ptr=norm.norm_weight, norm_bias_ptr=norm.norm_bias,
        seed_ptr=norm.dropout_seed, stats_ptr=stats, out_ptr=out, grad_ptr=backward.grad, partials_ptr=backward.partials,
        values_ptr=backward.values, segment_partials_ptr=segment_partials, position_grad_ptr=backward.position_grad,
        num_tokens=num_tokens, num_segments=num_segments, steps=backward.steps, period=backward.period,
        eps=norm.norm_eps, threshold=dropout_threshold(norm.dropout_p) if dropout else 0,
        keep_scale=1.0 / (1.0 - norm.dropout_p), NORM=mode.value, HAS_WEIGHT=norm.norm_weight is not None,
        HAS_BIAS=norm.norm_bias is not None, DROPOUT=dropout, BACKWARD=backward.grad is not None,
        WEIGHT_GRAD=backward.weight_grad, BIAS_GRAD=backward.bias_grad, WRITE_OUT=backward.write_grad_sum,
        WRITE_VALUES=backward.values is not None, SEGMENT_GRAD=num_segments > 0,
        POSITION_TILES=backward.position_grad is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)


@_operator("norm_forward")
def norm_forward_triton(*inputs):
    forward, norm = ForwardInputs(*inputs[:_NUM_FORWARD]), NormInputs(*inputs[_NUM_FORWARD:])
    position_mode = check_forward(forward)
    mode = check_norm(forward, norm)
    weight = forward.weight
    num_tokens, dim = forward.input_ids.shape[0], weight.shape[1]
    out = torch.empty((num_tokens, dim), dtype=weight.dtype, device=weight.device)
    stats = torch.empty((num_tokens, 2), dtype=compute_dtype(weight.dtype), device=weight.device)
    if num_tokens > 0:
        _launch(forward, position_mode, norm, mode, out, stats)
    return out, stats


@_operator("norm_backward")
def norm_backward_triton(*inputs):
    args = NormBackwardInputs(*inputs)
    forward = ForwardInputs(*inputs[2:2 + _NUM_FORWARD])
    norm = NormInputs(*inputs[2 + _NUM_FORWARD:2 + _NUM_FORWARD + len(NormInputs._fields)])
    mode = check_norm(forward, norm)
    check_norm_backward(args)
    position_mode = check_forward(forward)
    weight = forward.weight
    num_tokens, dim = args.grad_out.shape
    like = dict(dtype=weight.dtype, device=weight.device)
    math = dict(dtype=compute_dtype(weight.dtype), device=weight.device)
    grad_sum = torch.empty((num_tokens, dim), **like)
    tables = table_backward_inputs(args, grad_sum)
    wanted = [args.norm_grads and t is not None for t in (norm.norm_weight, norm.norm_bias)]
    block_t, _, _ = norm_launch_config(dim)
    # default positions: a program sums its tile of positions over the sequences (when the programs are few enough)
    period = min(max(forward.seq_len, 1), num_tokens)
    position_tiles = (tables.num_positions > 0 and forward.position_ids is None and forward.cu_seqlens is None
                      and num_tokens > 0 and triton.cdiv(period, block_t) <= MAX_PARTIAL_BLOCKS)
    if position_tiles:
        steps, programs = triton.cdiv(num_tokens, period), triton.cdiv(period, block_t)
    else:  # a fixed block of tokens a program, from the shape alone: the partial sums and their order do not vary
        steps = max(triton.cdiv(triton.cdiv(num_tokens, block_t), MAX_PARTIAL_BLOCKS), 1)
        programs = triton.cdiv(num_tokens, block_t * steps)
    segments_here = 0 < tables.num_segments <= MAX_REGISTER_SEGMENTS
    sparse, dense = args.token_grad == TokenGrad.SPARSE, args.token_grad == TokenGrad.DENSE
    backward = _BackwardPass(
        grad=args.grad_out, partials=torch.zeros((programs if any(wanted) else 0, 2, dim), **math), weight_grad=wanted[0],
        bias_grad=wanted[1],
        write_grad_sum=dense or (tables.num_positions > 0 and not position_tiles) or (tables.num_segments > 0 and not segments_here),
        values=torch.empty((num_tokens, dim), **like) if sparse else None,
        segment_partials=torch.zeros((programs, tables.num_segments if segments_here else 0, dim), **math),
        position_grad=torch.zeros((tables.num_positions, dim), **like) if position_tiles else None,
        steps=steps, period=period)
    if num_tokens > 0:
        _launch(forward, position_mode, norm, mode, grad_sum, args.stats, backward)
    # summed over programs in a fixed order (torch's reductions are deterministic)
    weight_grad, bias_grad = (backward.partials[:, i].sum(dim=0).to(weight.dtype) if wanted[i] else weight.new_empty(0)
                              for i in range(2))
    values = backward.values if sparse else weight.new_empty((0, dim))
    # summed from grad_sum where the kernel did not make them: a second pass, as the plain backward's
    token_grad, position_grad, segment_grad = table_grads(
        tables, (values, backward.segment_partials.sum(dim=0).to(weight.dtype)), backward.position_grad)
    return token_grad, position_grad, segment_grad, weight_grad, bias_grad
