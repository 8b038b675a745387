"""``fused_input_embedding``: checks the inputs once, picks the backend and calls its operator."""

from __future__ import annotations

import dataclasses

import torch

from .backends import resolve_backend
from .dropout import draw_seed
from .ops import call_forward, call_norm_forward, eager_entry, eager_entry_allowed
from .spec import NormMode, PositionMode, position_mode
from .validation import (
    check_broadcastable,
    check_index_tensor,
    check_nonnegative_int,
    check_norm_settings,
    check_position_settings,
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
    cu_seqlens: torch.Tensor | None = None,
    position_offset: int = 0,
    check_bounds: bool = True,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    norm_eps: float = 1e-5,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``dropout(norm(weight[input_ids] * scale + P[position_ids] + segment_weight[token_type_ids]))`` in one pass.

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
        cu_seqlens: packed sequences: 1-D int32/int64 boundaries ``[0, l1, l1 + l2, ..., N]`` of the
            documents in the ``N`` flattened tokens; token ``n`` of document ``i`` is at position
            ``position_offset + n - cu_seqlens[i]``, computed inside the kernels. Not with
            ``position_ids`` or ``past_length``.
        position_offset: added to every default (or packed) position; RoBERTa-style tables start
            at ``padding_idx + 1``. Not with ``position_ids``.
        check_bounds: how out-of-range ids are caught on CUDA. True: read back before launch and
            reported as an ``IndexError`` naming the value (one host synchronization). False: a
            device-side assertion (no synchronization; needed under CUDA-graph capture, where it is
            also what True falls back to); a bad id then stops the stream with a CUDA error. Ids are
            always checked: never an out-of-bounds read. On CPU the exact check is always made.
        norm: None, ``"layernorm"`` (``F.layer_norm(x, (embedding_dim,), norm_weight, norm_bias, norm_eps)``) or
            ``"rmsnorm"`` (``torch.nn.RMSNorm``'s formula with ``norm_weight``), applied to each token's sum.
        norm_weight: optional ``(embedding_dim,)`` scale of the norm (None: ones), in the weight's dtype.
        norm_bias: optional ``(embedding_dim,)`` shift of ``"layernorm"`` (None: zeros); ``"rmsnorm"`` has none.
        norm_eps: the norm's epsilon.
        dropout_p: when > 0, dropout after the norm (or after the sum without one): each element is zeroed with
            probability ``dropout_p`` and the others scaled by ``1 / (1 - dropout_p)``. The mask comes from a seed
            drawn from torch's default generator of the device (``torch.manual_seed`` reproduces it) and is
            regenerated in the backward, never stored. With a norm or dropout the result is differentiable in
            reverse mode only (once).
        backend: ``"auto"``, ``"extension"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``(*input_ids.shape, embedding_dim)`` in the weight's dtype.
    """
    check_table("weight", weight)
    if segment_weight is not None:
        check_table("segment_weight", segment_weight, weight)
    check_nonnegative_int("past_length", past_length)
    check_nonnegative_int("position_offset", position_offset)
    settings = resolve_settings(weight, position, position_weight, max_positions, sinusoid_layout, sinusoid_base, scale,
                                padding_idx, sparse, check_bounds)
    norm_settings = resolve_norm(norm, norm_weight, norm_bias, norm_eps, "dropout_p", dropout_p)
    return embed(resolve_backend(backend, weight.device), settings, input_ids, weight.contiguous(),
                 _contiguous(position_weight), _contiguous(segment_weight), token_type_ids, position_ids, past_length,
                 cu_seqlens, position_offset, norm=norm_settings, norm_weight=_contiguous(norm_weight),
                 norm_bias=_contiguous(norm_bias))


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.contiguous()


@dataclasses.dataclass(frozen=True)
class NormSettings:
    """What a call's norm and dropout options resolve to (the norm operators' constants)."""

    mode: int  # a spec.NormMode
    eps: float
    dropout_p: float


def resolve_norm(norm: str | None, norm_weight: torch.Tensor | None, norm_bias: torch.Tensor | None, norm_eps: float,
                 dropout_name: str, dropout_p: float) -> NormSettings | None:
    """The norm and dropout options checked (tensor values are the operator's to check); None for neither."""
    check_norm_settings(norm, norm_eps, dropout_name, dropout_p)
    for name, parameter in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if parameter is not None and norm is None:
            raise ValueError(f"{name} was given, but norm=None")
        if parameter is not None and not isinstance(parameter, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(parameter).__name__}")
    if norm_bias is not None and norm == "rmsnorm":
        raise ValueError("norm_bias was given, but norm='rmsnorm' has no bias")
    if norm is None and dropout_p == 0:
        return None
    mode = NormMode.NONE if norm is None else NormMode[norm.upper()]
    return NormSettings(int(mode), float(norm_eps), float(dropout_p))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the options of a call resolve to: the operator's constants, the same for every call of a module."""

    position_mode: int
    max_positions: int  # the bound positions are checked against (0: none)
    scale: float
    sinusoid_base: float
    padding_idx: int
    sparse: bool
    check_bounds: bool
    vocab_start: int = 0  # a vocabulary shard (embedfast.parallel): weight holds the ids [vocab_start, ...)
    vocab_size: int = 0  # of a vocabulary of this many ids (0: weight is the whole vocabulary)


def resolve_settings(weight: torch.Tensor, position: str, position_weight: torch.Tensor | None, max_positions: int | None,
                     sinusoid_layout: str, sinusoid_base: float, scale: str | float | None, padding_idx: int | None,
                     sparse: bool, check_bounds: bool) -> Settings:
    """The options checked and resolved (see ``fused_input_embedding``)."""
    mode, bound = _position_mode(position, position_weight, max_positions, sinusoid_layout, weight)
    return Settings(int(mode), bound, resolve_scale(scale, weight.shape[1]), float(sinusoid_base),
                    normalize_padding_idx(padding_idx, weight.shape[0]), bool(sparse), bool(check_bounds))


def embed(backend: str, settings: Settings, input_ids: torch.Tensor, weight: torch.Tensor,
          position_weight: torch.Tensor | None, segment_weight: torch.Tensor | None, token_type_ids: torch.Tensor | None,
          position_ids: torch.Tensor | None, past_length: int, cu_seqlens: torch.Tensor | None,
          position_offset: int, chunk: tuple[int, int] = (0, -1), norm: NormSettings | None = None,
          norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The call itself, once the (contiguous) tables and settings are known good: what depends on the inputs is
    shaped here and checked by the operator (``op_checks.py``, ``checks.h``); the module calls this directly.
    ``chunk``: the columns ``[start, end)`` of the last dim (-1: to its end) that get the position and segment
    terms (``spec.py``). A backend's eager entry, where allowed, does all of it instead (the extension's in C++,
    ``csrc/eager.cpp``, with the same checks and messages). ``norm``: the norm and dropout, with their
    (contiguous) parameters (through ``ops.call_norm_forward`` where there is no eager entry)."""
    entry = eager_entry(backend, settings) if eager_entry_allowed() else None
    if entry is not None:
        return entry(input_ids, weight, position_weight, segment_weight, token_type_ids, position_ids, past_length,
                     cu_seqlens, position_offset, *chunk, *eager_norm_arguments(norm, norm_weight, norm_bias))
    return _embed_in_python(backend, settings, input_ids, weight, position_weight, segment_weight, token_type_ids,
                            position_ids, past_length, cu_seqlens, position_offset, chunk, norm, norm_weight, norm_bias)


def eager_norm_arguments(norm: NormSettings | None, norm_weight: torch.Tensor | None,
                         norm_bias: torch.Tensor | None) -> tuple:
    """The norm's arguments of an eager entry's call, after ``chunk_end`` (none without a norm)."""
    return () if norm is None else (norm.mode, norm.eps, norm.dropout_p, norm_weight, norm_bias)


def _embed_in_python(backend, settings, input_ids, weight, position_weight, segment_weight, token_type_ids, position_ids,
                     past_length, cu_seqlens, position_offset, chunk, norm=None, norm_weight=None,
                     norm_bias=None) -> torch.Tensor:
    """``embed`` through ``ops.call_forward``: every backend, every derivative mode."""
    check_index_tensor("input_ids", input_ids)
    check_same_device("input_ids", input_ids, weight)
    if past_length or position_offset:  # (0 needs no check)
        check_nonnegative_int("past_length", past_length)
        check_nonnegative_int("position_offset", position_offset)
    shape = input_ids.shape
    if position_ids is not None:
        if settings.position_mode == PositionMode.NONE:
            raise ValueError("position_ids were given, but position='none'")
        if position_offset or cu_seqlens is not None:
            raise ValueError("position_ids were given with position_offset or cu_seqlens: position_ids are the positions")
        position_ids = _flat_indices("position_ids", position_ids, shape, weight)
    if cu_seqlens is not None:
        cu_seqlens = _boundaries(cu_seqlens, past_length, weight)
    if token_type_ids is not None:
        if segment_weight is None:
            raise ValueError("token_type_ids were given, but there is no segment table (num_segments=0)")
        token_type_ids = _flat_indices("token_type_ids", token_type_ids, shape, weight)
    input_ids = input_ids.reshape(-1)
    if position_ids is not None or token_type_ids is not None or cu_seqlens is not None:
        input_ids, position_ids, token_type_ids, cu_seqlens = _common_index_dtype(
            input_ids, position_ids, token_type_ids, cu_seqlens)
    forward_inputs = (
        input_ids.contiguous(), weight, position_ids, position_weight, token_type_ids, segment_weight, cu_seqlens,
        settings.scale, settings.position_mode, settings.sinusoid_base, settings.max_positions,
        past_length + position_offset, shape[-1] if len(shape) > 0 else 1, settings.check_bounds, settings.vocab_start,
        settings.vocab_size, *chunk)
    gradient_options = (settings.padding_idx, settings.sparse)
    if norm is None:
        out = call_forward(backend, *forward_inputs, *gradient_options)
    else:
        seed = draw_seed(weight.device) if norm.dropout_p > 0 else None
        out = call_norm_forward(backend, *forward_inputs, norm_weight, norm_bias, norm.mode, norm.eps, norm.dropout_p,
                                seed, *gradient_options)
    return out.view(*shape, weight.shape[1])


def _position_mode(position, position_weight, max_positions, sinusoid_layout, weight) -> tuple[PositionMode, int]:
    """The operator's position mode and the bound positions are checked against (0: none)."""
    check_position_settings(position, sinusoid_layout, max_positions)
    if position == "learned":
        if position_weight is None:
            raise ValueError("position='learned' needs position_weight (a (max_positions, embedding_dim) table)")
        check_table("position_weight", position_weight, weight)
        return PositionMode.LEARNED, position_weight.shape[0]
    if position_weight is not None:
        raise ValueError(f"position_weight was given, but position={position!r}")
    return position_mode(position, sinusoid_layout), max_positions or 0


def _boundaries(cu_seqlens: torch.Tensor, past_length: int, weight: torch.Tensor) -> torch.Tensor:
    """``cu_seqlens`` checked for what needs no values (those the operator checks)."""
    check_index_tensor("cu_seqlens", cu_seqlens)
    check_same_device("cu_seqlens", cu_seqlens, weight)
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D ([0, l1, l1 + l2, ..., N]), got shape {tuple(cu_seqlens.shape)}")
    if past_length:
        raise ValueError(f"cu_seqlens was given with past_length={past_length}: packed documents start at position_offset")
    return cu_seqlens.contiguous()


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
