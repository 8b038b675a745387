"""The pure-PyTorch reference: the ground truth every backend is tested against.

``unfused_input_embedding`` is the operator written the way a user writes it without embedfast
(``nn.functional.embedding`` lookups, a scale, two adds); autograd differentiates it. Called on
float64 copies of the tables it is the exact answer; called on the tables themselves it is the
"eager PyTorch" contender of the benchmark.

``reference_forward`` / ``reference_backward`` implement the ``embedfast`` operators (see ``spec.py``)
on top of it: math in float32 (float64 for float64 tables), one rounding at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dropout import keep_mask
from .op_checks import check_backward, check_forward, check_norm, check_norm_backward
from .positions import chunk_tokens, sinusoid_values, token_positions
from .spec import (BackwardInputs, ForwardInputs, NormBackwardInputs, NormInputs, NormMode, PositionMode, TokenGrad,
                   compute_dtype, dropout_threshold, table_backward_inputs)

_NUM_FORWARD = len(ForwardInputs._fields)


def unfused_input_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    scale: float = 1.0,
    position_table: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    segment_weight: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    padding_idx: int | None = None,
    sparse: bool = False,
) -> torch.Tensor:
    """``weight[ids] * scale + position_table[position_ids] + segment_weight[token_type_ids]``, unfused."""
    out = F.embedding(input_ids, weight, padding_idx=padding_idx, sparse=sparse) * scale
    if position_table is not None:
        out = out + F.embedding(position_ids, position_table)
    if segment_weight is not None:
        out = out + F.embedding(token_type_ids, segment_weight)
    return out


def reference_forward(*inputs) -> torch.Tensor:
    """Reference implementation of ``embedfast::forward_*`` (flattened tokens, see ``spec.py``)."""
    args = ForwardInputs(*inputs)
    return _reference_sum(args, check_forward(args)).to(args.weight.dtype)


def _reference_sum(args: ForwardInputs, mode: PositionMode) -> torch.Tensor:
    """The forward's sum in the compute dtype, before its rounding."""
    input_ids, weight = args.input_ids, args.weight
    math_dtype = compute_dtype(weight.dtype)
    num_tokens, dim = input_ids.shape[0], weight.shape[1]
    position_table = positions = None
    if mode != PositionMode.NONE:
        positions = token_positions(args.position_ids, args.cu_seqlens, num_tokens, args.position_offset, args.seq_len,
                                    input_ids.device)
    if mode == PositionMode.LEARNED:
        position_table = args.position_weight.to(math_dtype)
    elif mode != PositionMode.NONE:
        # one row per token: a table indexed by position could be huge for sparse, large positions
        position_table = sinusoid_values(positions, dim, mode.name.lower(), args.sinusoid_base).to(math_dtype)
        positions = torch.arange(num_tokens, device=input_ids.device)
    segment_weight, token_type_ids = args.segment_weight, args.token_type_ids
    if segment_weight is not None:
        segment_weight = segment_weight.to(math_dtype)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
    token_table, token_rows = weight.to(math_dtype), input_ids
    if args.vocab_size:  # a shard: ids of other shards take an appended zero row
        token_rows = input_ids.long() - args.vocab_start
        in_shard = (token_rows >= 0) & (token_rows < weight.shape[0])
        token_table, token_rows = _zero_row_outside(token_table, token_rows, in_shard)
    in_chunk = chunk_tokens(num_tokens, args.seq_len, args.chunk_start, args.chunk_end, input_ids.device)
    if in_chunk is not None:  # tokens out of the chunk take an appended zero row of each side table
        if position_table is not None:
            position_table, positions = _zero_row_outside(position_table, positions, in_chunk)
        if segment_weight is not None:
            segment_weight, token_type_ids = _zero_row_outside(segment_weight, token_type_ids.long(), in_chunk)
    out = unfused_input_embedding(
        token_rows,
        token_table,
        scale=args.scale,
        position_table=position_table,
        position_ids=positions,
        segment_weight=segment_weight,
        token_type_ids=token_type_ids,
    )
    return out


def _zero_row_outside(table: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``table`` with a zero row appended, and ``rows`` sent to it where not ``keep``."""
    extended = torch.cat([table, table.new_zeros(1, table.shape[1])])
    return extended, torch.where(keep, rows, table.shape[0])


def reference_backward(*inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation of ``embedfast::backward_*`` (see ``spec.py``)."""
    args = BackwardInputs(*inputs)
    token_grad = check_backward(args)
    dtype, math_dtype = args.grad_out.dtype, compute_dtype(args.grad_out.dtype)
    num_tokens, dim = args.grad_out.shape
    grad = args.grad_out.to(math_dtype)
    ids = args.input_ids.long()
    if token_grad == TokenGrad.SPARSE:
        weight_grad = (grad * args.scale).to(dtype)
    elif token_grad == TokenGrad.DENSE:
        rows = ids - args.vocab_start
        keep = (ids != args.padding_idx) & (rows >= 0) & (rows < args.num_embeddings)
        weight_grad = grad.new_zeros(args.num_embeddings, dim).index_add_(0, rows[keep], grad[keep] * args.scale).to(dtype)
    else:
        weight_grad = args.grad_out.new_empty(0, dim)
    side = chunk_tokens(num_tokens, args.seq_len, args.chunk_start, args.chunk_end, grad.device)
    if side is None:
        side = slice(None)
    position_grad = grad.new_zeros(args.num_positions, dim)
    if args.num_positions > 0:
        positions = token_positions(args.position_ids, args.cu_seqlens, num_tokens, args.position_offset, args.seq_len,
                                    grad.device)
        position_grad.index_add_(0, positions[side], grad[side])
    segment_grad = grad.new_zeros(args.num_segments, dim)
    if args.num_segments > 0:
        segments = args.token_type_ids.long() if args.token_type_ids is not None else torch.zeros_like(ids)
        segment_grad.index_add_(0, segments[side], grad[side])
    return weight_grad, position_grad.to(dtype), segment_grad.to(dtype)


def reference_norm_forward(*inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation of ``embedfast::norm_forward_*``: ``dropout(norm(sum))`` and each token's stats."""
    args, norm = ForwardInputs(*inputs[:_NUM_FORWARD]), NormInputs(*inputs[_NUM_FORWARD:])
    x = _reference_sum(args, check_forward(args))
    mode = check_norm(args, norm)
    stats = _norm_stats(x, mode, norm.norm_eps)
    y = _normalized(x, stats) * _vector(norm.norm_weight, x, 1.0) + _vector(norm.norm_bias, x, 0.0)
    return (_dropout(y, norm) if norm.dropout_p > 0 else y).to(args.weight.dtype), stats


def reference_norm_backward(*inputs) -> tuple[torch.Tensor, ...]:
    """Reference implementation of ``embedfast::norm_backward_*``: the tables' gradients (``reference_backward`` of
    the sum's gradient, rounded to the tables' dtype as a kernel's grad_sum row is) and the norm's."""
    args = NormBackwardInputs(*inputs)
    forward = ForwardInputs(*inputs[2:2 + _NUM_FORWARD])
    norm = NormInputs(*inputs[2 + _NUM_FORWARD:2 + _NUM_FORWARD + len(NormInputs._fields)])
    position_mode = check_forward(forward)
    mode, dtype = check_norm(forward, norm), forward.weight.dtype
    check_norm_backward(args)
    dy = args.grad_out.to(compute_dtype(dtype))
    if norm.dropout_p > 0:
        dy = _dropout(dy, norm)
    wanted = [args.norm_grads and mode != NormMode.NONE and t is not None for t in (norm.norm_weight, norm.norm_bias)]
    if mode == NormMode.NONE:
        grad_sum = dy
    else:
        x_hat = _normalized(_reference_sum(forward, position_mode), args.stats)
        g = dy * _vector(norm.norm_weight, dy, 1.0)
        centred = g - g.mean(-1, keepdim=True) if mode == NormMode.LAYERNORM else g
        grad_sum = args.stats[:, 1:] * (centred - x_hat * (g * x_hat).mean(-1, keepdim=True))
    weight_grad = (dy * x_hat).sum(0) if wanted[0] else dy.new_empty(0)
    bias_grad = dy.sum(0) if wanted[1] else dy.new_empty(0)
    table_grads = reference_backward(*table_backward_inputs(args, grad_sum.to(dtype)))
    return (*table_grads, weight_grad.to(dtype), bias_grad.to(dtype))


def _norm_stats(x: torch.Tensor, mode: NormMode, eps: float) -> torch.Tensor:
    """Each token's (mean, rstd) as ``spec.py`` defines them."""
    zeros = x.new_zeros(x.shape[0])
    if mode == NormMode.NONE:
        return torch.stack([zeros, torch.ones_like(zeros)], 1)
    mean = x.mean(-1) if mode == NormMode.LAYERNORM else zeros
    return torch.stack([mean, torch.rsqrt(((x - mean[:, None]) ** 2).mean(-1) + eps)], 1)


def _normalized(x: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return (x - stats[:, :1]) * stats[:, 1:]


def _vector(parameter: torch.Tensor | None, like: torch.Tensor, missing: float) -> torch.Tensor | float:
    return missing if parameter is None else parameter.to(like.dtype)


def _dropout(values: torch.Tensor, norm: NormInputs) -> torch.Tensor:
    """``values`` with the call's mask applied and the kept elements scaled by ``1 / (1 - p)``."""
    keep = keep_mask(norm.dropout_seed, values.shape[0], values.shape[1], dropout_threshold(norm.dropout_p))
    return torch.where(keep, values * (1.0 / (1.0 - norm.dropout_p)), 0.0)
