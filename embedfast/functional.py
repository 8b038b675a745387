"""``fused_input_embedding``: checks the inputs once, picks the backend and calls its operator."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .ops import fused_forward
from .positions import SINUSOID_LAYOUTS
from .validation import (
    POSITION_MODES,
    check_broadcastable,
    check_index_tensor,
    check_same_device,
    check_table,
    normalize_padding_idx,
    resolve_scale,
)


def fused_input_embedding(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    *,
    token_type_ids: torch.Tensor | None = None,
    segment_weight: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    position_weight: torch.Tensor | None = None,
    position: str = "sinusoidal",
    max_positions: int | None = None,
    sinusoid_layout: str = "interleaved",
    sinusoid_base: float = 10000.0,
    scale: str | float | None = "sqrt",
    padding_idx: int | None = None,
    sparse: bool = True,
    past_length: int = 0,
    check_bounds: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``weight[input_ids] * scale + P[position_ids] + segment_weight[token_type_ids]`` in one pass.

    Args:
        input_ids: int32/int64 token ids of any shape ``(*)``.
        weight: the ``(num_embeddings, embedding_dim)`` token table.
        token_type_ids: segment ids broadcastable to ``input_ids``; default all zeros when
            ``segment_weight`` is given. Requires ``segment_weight``.
        segment_weight: optional ``(num_segments, embedding_dim)`` token-type table.
        position_ids: positions broadcastable to ``input_ids``; default
            ``past_length + arange(seq_len)`` along the last dim.
        position_weight: the ``(max_positions, embedding_dim)`` table of ``position="learned"``.
        position: ``"sinusoidal"``, ``"learned"`` or ``"none"``.
        max_positions: for ``"sinusoidal"``, an optional bound the positions are checked against.
        sinusoid_layout: ``"interleaved"`` or ``"concat"`` (see ``positions.sinusoid_values``).
        sinusoid_base: the sinusoid wavelength base.
        scale: ``"sqrt"`` (``sqrt(embedding_dim)``), a float, or None for no scaling.
        padding_idx: as in ``nn.Embedding``: that row gets no gradient.
        sparse: the token table's gradient is a sparse COO tensor (as ``nn.Embedding(sparse=True)``).
        past_length: offset of the default positions (KV-cache decoding).
        check_bounds: how out-of-range ids are caught on CUDA. True: read back before launch and
            reported as an ``IndexError`` naming the value (one host synchronization). False: a
            device-side assertion (no synchronization; needed under CUDA-graph capture, where it is
            also what True falls back to); a bad id then stops the stream with a CUDA error. Ids are
            always checked: never an out-of-bounds read. On CPU the exact check is always made.
        backend: ``"auto"``, ``"extension"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(*input_ids.shape, embedding_dim)`` in the weight's dtype.
    """
    check_index_tensor("input_ids", input_ids)
    check_table("weight", weight)
    check_same_device("input_ids", input_ids, weight)
    shape, dim = input_ids.shape, weight.shape[1]
    seq_len = shape[-1] if len(shape) > 0 else 1
    embed_scale = resolve_scale(scale, dim)
    padding = normalize_padding_idx(padding_idx, weight.shape[0])
    if isinstance(past_length, bool) or not isinstance(past_length, int) or past_length < 0:
        raise ValueError(f"past_length must be an int >= 0, got {past_length!r}")

    mode, bound = _position_mode(position, position_weight, max_positions, sinusoid_layout, weight)
    if position_ids is not None:
        if mode == "none":
            raise ValueError("position_ids were given, but position='none'")
        position_ids = _flat_indices("position_ids", position_ids, shape, weight)
    elif bound > 0 and past_length + seq_len > bound:
        raise IndexError(f"positions reach {past_length + seq_len - 1} (past_length={past_length}, seq_len={seq_len}), "
                         f"out of range for max_positions={bound}")

    if segment_weight is not None:
        check_table("segment_weight", segment_weight, weight)
    if token_type_ids is not None:
        if segment_weight is None:
            raise ValueError("token_type_ids were given, but there is no segment table (num_segments=0)")
        token_type_ids = _flat_indices("token_type_ids", token_type_ids, shape, weight)

    input_ids, position_ids, token_type_ids = _common_index_dtype(input_ids.reshape(-1).contiguous(), position_ids, token_type_ids)
    weight, position_weight, segment_weight = (None if t is None else t.contiguous() for t in (weight, position_weight, segment_weight))
    out = fused_forward(resolve_backend(backend, weight.device), input_ids, weight, position_ids, position_weight,
                        token_type_ids, segment_weight, embed_scale, mode, float(sinusoid_base), bound, past_length,
                        seq_len, padding, bool(sparse), bool(check_bounds))
    return out.view(*shape, dim)


def _position_mode(position, position_weight, max_positions, sinusoid_layout, weight) -> tuple[str, int]:
    """The operator's position mode and the bound positions are checked against (0: none)."""
    if position not in POSITION_MODES:
        raise ValueError(f"position must be one of {POSITION_MODES}, got {position!r}")
    if sinusoid_layout not in SINUSOID_LAYOUTS:
        raise ValueError(f"sinusoid_layout must be one of {SINUSOID_LAYOUTS}, got {sinusoid_layout!r}")
    if position == "learned":
        if position_weight is None:
            raise ValueError("position='learned' needs position_weight (a (max_positions, embedding_dim) table)")
        check_table("position_weight", position_weight, weight)
        return "learned", position_weight.shape[0]
    if position_weight is not None:
        raise ValueError(f"position_weight was given, but position={position!r}")
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions <= 0):
        raise ValueError(f"max_positions must be a positive int or None, got {max_positions!r}")
    if position == "none":
        return "none", 0
    return sinusoid_layout, max_positions or 0


def _flat_indices(name: str, ids: torch.Tensor, shape: torch.Size, weight: torch.Tensor) -> torch.Tensor:
    """Index tensor broadcast to ``shape`` and flattened to one id per token."""
    check_index_tensor(name, ids)
    check_same_device(name, ids, weight)
    check_broadcastable(name, ids, shape)
    if ids.shape != shape:
        ids = ids.expand(shape)
    return ids.reshape(-1).contiguous()


def _common_index_dtype(*indices: torch.Tensor | None) -> list[torch.Tensor | None]:
    """All index tensors as int64 if any is int64, else int32: kernels then take one index type."""
    dtype = torch.int64 if any(ids is not None and ids.dtype == torch.int64 for ids in indices) else torch.int32
    return [ids if ids is None or ids.dtype == dtype else ids.to(dtype) for ids in indices]
