"""``FusedInputEmbedding``: token, position and segment embeddings as one module."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .backends import check_backend_name, resolve_backend
from .functional import (NormSettings, Settings, eager_norm_arguments, embed, fused_input_embedding, resolve_norm,
                         resolve_settings)
from .ops import eager_entry, eager_entry_allowed
from .validation import (check_nonnegative_int, check_norm_settings, check_position_settings, check_positive_int,
                         normalize_padding_idx, resolve_scale)


class _Plan(NamedTuple):
    """What a module's call needs besides its inputs."""

    device: torch.device  # the tables' device
    backend: str
    settings: Settings
    entry: object | None  # the backend's eager entry (ops.eager_entry), where the module may call it
    norm_train: NormSettings | None  # the norm and dropout in training mode
    norm_eval: NormSettings | None  # and in eval mode (no dropout)


class FusedInputEmbedding(nn.Module):
    """``dropout(norm(weight[ids] * scale + P[pos] + segment_weight[token_type]))``, forward and backward in one pass.

    A drop-in for ``nn.Embedding`` (+ a position encoding, + a BERT token-type embedding, + the LayerNorm or
    RMSNorm and dropout after them): the same parameters, initialisation, ``padding_idx`` rule and sparse gradient.

    Args:
        num_embeddings: vocabulary size.
        embedding_dim: width of every table and of the output.
        padding_idx: as in ``nn.Embedding``: that row is zero-initialised and gets no gradient.
        num_segments: > 0 adds a ``(num_segments, embedding_dim)`` token-type table ``segment_weight``.
        position: ``"sinusoidal"`` (fixed), ``"learned"`` (table ``position_weight``) or ``"none"``.
        max_positions: rows of ``position_weight`` (required for ``"learned"``); for ``"sinusoidal"``
            an optional bound positions are checked against.
        sinusoid_layout: ``"interleaved"`` (Vaswani et al.) or ``"concat"`` (tensor2tensor, fairseq).
        sinusoid_base: the sinusoid wavelength base.
        scale: ``"sqrt"`` for ``sqrt(embedding_dim)``, a float, or None for no scaling.
        sparse: ``weight.grad`` is a sparse COO tensor, as with ``nn.Embedding(sparse=True)``.
        check_bounds: True (default): out-of-range ids raise ``IndexError`` (on CUDA after a host
            synchronization); False: a device-side assertion instead, for CUDA-graph capture (see
            ``fused_input_embedding``). An attribute: switch it on a built module.
        norm: None, ``"layernorm"`` (``F.layer_norm`` with ``norm_weight``, ``norm_bias``) or ``"rmsnorm"``
            (``torch.nn.RMSNorm``'s formula with ``norm_weight``) over each token's sum. ``norm_weight`` (D,)
            starts at ones, ``norm_bias`` (D,) at zeros for ``"layernorm"``; both are None without a norm.
        norm_eps: the norm's epsilon.
        dropout: the dropout probability after the norm, active only in training mode (``module.train()``).
        backend: ``"auto"``, ``"extension"``, ``"triton"`` or ``"reference"``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        padding_idx: int | None = None,
        num_segments: int = 0,
        position: str = "sinusoidal",
        max_positions: int | None = None,
        sinusoid_layout: str = "interleaved",
        sinusoid_base: float = 10000.0,
        scale: str | float | None = "sqrt",
        sparse: bool = True,
        check_bounds: bool = True,
        norm: str | None = None,
        norm_eps: float = 1e-5,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("num_embeddings", num_embeddings)
        check_positive_int("embedding_dim", embedding_dim)
        check_nonnegative_int("num_segments", num_segments)
        check_position_settings(position, sinusoid_layout, max_positions)
        if position == "learned" and max_positions is None:
            raise ValueError("position='learned' needs max_positions (the rows of position_weight)")
        check_norm_settings(norm, norm_eps, "dropout", dropout)
        check_backend_name(backend)
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = None if padding_idx is None else normalize_padding_idx(padding_idx, num_embeddings)
        self.num_segments = num_segments
        self.position = position
        self.max_positions = max_positions
        self.sinusoid_layout = sinusoid_layout
        self.sinusoid_base = float(sinusoid_base)
        self.scale = scale
        self.embed_scale = resolve_scale(scale, embedding_dim)
        self.sparse = sparse
        self.check_bounds = check_bounds
        self.norm = norm
        self.norm_eps = float(norm_eps)
        self.dropout = float(dropout)
        self.backend = backend

        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, **factory))
        self.segment_weight = nn.Parameter(torch.empty(num_segments, embedding_dim, **factory)) if num_segments else None
        learned = position == "learned"
        self.position_weight = nn.Parameter(torch.empty(max_positions, embedding_dim, **factory)) if learned else None
        self.norm_weight = nn.Parameter(torch.empty(embedding_dim, **factory)) if norm else None
        self.norm_bias = nn.Parameter(torch.empty(embedding_dim, **factory)) if norm == "layernorm" else None
        self.reset_parameters()

    # the attributes a call's plan comes from: setting or deleting one makes the next call resolve it again
    _PLAN_ATTRIBUTES = frozenset({"weight", "position_weight", "segment_weight", "position", "max_positions",
                                  "sinusoid_layout", "sinusoid_base", "embed_scale", "padding_idx", "sparse",
                                  "check_bounds", "backend", "norm", "norm_eps", "dropout", "norm_weight",
                                  "norm_bias"})
    _TABLES = ("weight", "position_weight", "segment_weight")

    def __setattr__(self, name: str, value) -> None:
        if name in self._PLAN_ATTRIBUTES:
            self.__dict__["_plan"] = None
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:  # (torch.nn.utils.parametrize deletes a table before replacing it)
        if name in self._PLAN_ATTRIBUTES:
            self.__dict__["_plan"] = None
        super().__delattr__(name)

    def _call_plan(self) -> _Plan:
        """The next call's plan, resolved once and kept until an attribute it comes from changes or the tables move
        to another device: a decode step pays for none of it."""
        plan = self.__dict__.get("_plan")
        weight = self._parameters.get("weight")
        device = (self.weight if weight is None else weight).device
        if plan is None or plan.device != device:
            settings = resolve_settings(self.weight, self.position, self.position_weight, self.max_positions,
                                        self.sinusoid_layout, self.sinusoid_base, self.embed_scale, self.padding_idx,
                                        self.sparse, self.check_bounds)
            backend = resolve_backend(self.backend, device)
            # the entry is handed the tables and norm parameters straight from _parameters: only where they all
            # live there
            plain_tables = all(name in self._parameters or getattr(self, name) is None
                               for name in (*self._TABLES, "norm_weight", "norm_bias"))
            norm_train = resolve_norm(self.norm, self.norm_weight, self.norm_bias, self.norm_eps, "dropout", self.dropout)
            norm_eval = resolve_norm(self.norm, self.norm_weight, self.norm_bias, self.norm_eps, "dropout", 0.0)
            entry = eager_entry(backend, settings) if plain_tables else None
            plan = self.__dict__["_plan"] = _Plan(device, backend, settings, entry, norm_train, norm_eval)
        return plan

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s initialisation: N(0, 1), the padding row zero; the norm's weight ones, its bias zeros."""
        for table in (self.weight, self.segment_weight, self.position_weight):
            if table is not None:
                nn.init.normal_(table)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].zero_()
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        past_length: int = 0,
        cu_seqlens: torch.Tensor | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        """Embed ``input_ids`` (any shape ``(*)``) into ``(*, embedding_dim)`` in the weight's dtype.

        ``past_length``: offset of the default positions (KV-cache decoding). ``cu_seqlens``: packed
        documents ``[0, l1, l1 + l2, ..., N]`` over the flattened tokens, each numbering its positions from
        ``position_offset`` (see ``fused_input_embedding``).
        """
        if not torch.compiler.is_compiling():
            plan = self._call_plan()
            norm = plan.norm_train if self.training else plan.norm_eval
            if plan.entry is not None and eager_entry_allowed():  # (nn.Module.__getattr__ costs a microsecond a table)
                tables = self._parameters
                return plan.entry(input_ids, tables["weight"], tables.get("position_weight"), tables.get("segment_weight"),
                                  token_type_ids, position_ids, past_length, cu_seqlens, position_offset, 0, -1,
                                  *eager_norm_arguments(norm, tables.get("norm_weight"), tables.get("norm_bias")))
            return embed(plan.backend, plan.settings, input_ids, self.weight, self.position_weight, self.segment_weight,
                         token_type_ids, position_ids, past_length, cu_seqlens, position_offset, norm=norm,
                         norm_weight=self.norm_weight, norm_bias=self.norm_bias)
        return fused_input_embedding(
            input_ids,
            self.weight,
            token_type_ids=token_type_ids,
            segment_weight=self.segment_weight,
            position_ids=position_ids,
            position_weight=self.position_weight,
            position=self.position,
            max_positions=self.max_positions,
            sinusoid_layout=self.sinusoid_layout,
            sinusoid_base=self.sinusoid_base,
            scale=self.embed_scale,
            padding_idx=self.padding_idx,
            sparse=self.sparse,
            past_length=past_length,
            cu_seqlens=cu_seqlens,
            position_offset=position_offset,
            check_bounds=self.check_bounds,
            norm=self.norm,
            norm_weight=self.norm_weight,
            norm_bias=self.norm_bias,
            norm_eps=self.norm_eps,
            dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        parts = [f"{self.num_embeddings}, {self.embedding_dim}"]
        if self.padding_idx is not None:
            parts.append(f"padding_idx={self.padding_idx}")
        if self.num_segments:
            parts.append(f"num_segments={self.num_segments}")
        parts.append(f"position={self.position!r}")
        if self.max_positions is not None:
            parts.append(f"max_positions={self.max_positions}")
        if self.position == "sinusoidal":
            parts.append(f"sinusoid_layout={self.sinusoid_layout!r}, sinusoid_base={self.sinusoid_base}")
        parts.append(f"scale={self.scale!r}")
        if self.norm is not None:
            parts.append(f"norm={self.norm!r}, norm_eps={self.norm_eps}")
        if self.dropout:
            parts.append(f"dropout={self.dropout}")
        parts.append(f"sparse={self.sparse}, backend={self.backend!r}")
        return ", ".join(parts)
