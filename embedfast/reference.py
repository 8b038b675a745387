"""The pure-PyTorch reference: the ground truth every backend is tested against.

``unfused_input_embedding`` is the operator written the way a user writes it without embedfast
(``nn.functional.embedding`` lookups, a scale, two adds); autograd differentiates it. Called on
float64 copies of the tables it is the exact answer; called on the tables themselves it is the
"eager PyTorch" contender of the benchmark.

``reference_forward`` / ``reference_backward`` implement the ``embedfast`` operators (see ``ops.py``)
on top of it: math in float32 (float64 for float64 tables), one rounding at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .positions import default_position_ids, sinusoid_values
from .validation import check_forward_indices


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


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 storage, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_positions(position_ids: torch.Tensor | None, num_tokens: int, past_length: int, seq_len: int, device) -> torch.Tensor:
    """Explicit ``position_ids`` as int64, or the default ``past_length + n % seq_len``."""
    if position_ids is None:
        return default_position_ids(num_tokens, seq_len, past_length, device)
    return position_ids.long()


def reference_forward(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_weight: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    segment_weight: torch.Tensor | None,
    scale: float,
    position: str,
    sinusoid_base: float,
    max_positions: int,
    past_length: int,
    seq_len: int,
    padding_idx: int,
    sparse: bool,
    check_bounds: bool,
) -> torch.Tensor:
    """Reference implementation of ``embedfast::forward_*`` (flattened tokens, see ``ops.py``)."""
    check_forward_indices(input_ids, weight, position_ids, position_weight, max_positions, token_type_ids, segment_weight,
                          check_bounds)
    math_dtype = compute_dtype(weight.dtype)
    num_tokens, dim = input_ids.shape[0], weight.shape[1]
    position_table = None
    positions = resolve_positions(position_ids, num_tokens, past_length, seq_len, input_ids.device)
    if position == "learned":
        position_table = position_weight.to(math_dtype)
    elif position in ("interleaved", "concat"):
        # one row per token: a table indexed by position could be huge for sparse, large positions
        position_table = sinusoid_values(positions, dim, position, sinusoid_base).to(math_dtype)
        positions = torch.arange(num_tokens, device=input_ids.device)
    if segment_weight is not None and token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    out = unfused_input_embedding(
        input_ids,
        weight.to(math_dtype),
        scale=scale,
        position_table=position_table,
        position_ids=positions,
        segment_weight=None if segment_weight is None else segment_weight.to(math_dtype),
        token_type_ids=token_type_ids,
    )
    return out.to(weight.dtype)


def reference_backward(
    grad_out: torch.Tensor,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    token_grad: str,
    num_embeddings: int,
    padding_idx: int,
    scale: float,
    num_positions: int,
    num_segments: int,
    past_length: int,
    seq_len: int,
    check_bounds: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference implementation of ``embedfast::backward_*`` (see ``ops.py``); ``index_add_`` checks the
    indices itself (``check_bounds`` has nothing left to choose)."""
    dtype, math_dtype = grad_out.dtype, compute_dtype(grad_out.dtype)
    num_tokens, dim = grad_out.shape
    grad = grad_out.to(math_dtype)
    ids = input_ids.long()
    if token_grad == "sparse":
        weight_grad = (grad * scale).to(dtype)
    elif token_grad == "dense":
        rows = ids != padding_idx
        weight_grad = grad.new_zeros(num_embeddings, dim).index_add_(0, ids[rows], grad[rows] * scale).to(dtype)
    else:
        weight_grad = grad_out.new_empty(0, dim)
    positions = resolve_positions(position_ids, num_tokens, past_length, seq_len, grad.device)
    position_grad = grad.new_zeros(num_positions, dim)
    if num_positions > 0:
        position_grad.index_add_(0, positions, grad)
    segment_grad = grad.new_zeros(num_segments, dim)
    if num_segments > 0:
        segments = token_type_ids.long() if token_type_ids is not None else torch.zeros_like(ids)
        segment_grad.index_add_(0, segments, grad)
    return weight_grad, position_grad.to(dtype), segment_grad.to(dtype)
