"""Position encodings: the sinusoid formulas (in float64) and position-id helpers."""

from __future__ import annotations

import math

import torch

from .spec import SINUSOID_LAYOUTS
from .validation import check_choice


def sinusoid_values(positions: torch.Tensor, dim: int, layout: str = "interleaved", base: float = 10000.0) -> torch.Tensor:
    """The sinusoid encoding of each position, in float64: shape ``positions.shape + (dim,)``.

    ``interleaved`` (Vaswani et al.): ``w_i = base^(-2i/dim)``, column ``2i`` is ``sin(p*w_i)`` and
    column ``2i+1`` is ``cos(p*w_i)``.
    ``concat`` (tensor2tensor, fairseq): ``h = dim // 2``, ``w_i = exp(-i*ln(base)/(h-1))``, columns
    ``[0, h)`` are ``sin(p*w_i)``, columns ``[h, 2h)`` are ``cos(p*w_i)``, and the last column is
    zero when ``dim`` is odd. For ``h == 1`` the single frequency is 1 (fairseq divides by zero).
    """
    frequency, is_cos = sinusoid_frequencies(dim, layout, base, positions.device)
    angle = positions.to(torch.float64).unsqueeze(-1) * frequency
    return torch.where(is_cos, torch.cos(angle), torch.sin(angle))


def sinusoid_frequencies(
    dim: int, layout: str = "interleaved", base: float = 10000.0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column: the angular frequency (float64) and whether the column is a cosine.

    Column ``j`` of the encoding is ``sin(p * frequency[j])`` or ``cos(p * frequency[j])``; the zero
    column of an odd ``concat`` has frequency 0 and is a sine, so it is exactly 0.
    """
    check_choice("sinusoid_layout", layout, SINUSOID_LAYOUTS)
    cols = torch.arange(dim, dtype=torch.float64, device=device)
    if layout == "interleaved":
        return base ** (-2.0 * torch.div(cols, 2, rounding_mode="floor") / dim), cols % 2 == 1
    half = dim // 2
    i = torch.where(cols < half, cols, cols - half)
    frequency = torch.exp(-i * math.log(base) / max(half - 1, 1))
    in_table = cols < 2 * half
    return torch.where(in_table, frequency, torch.zeros_like(frequency)), in_table & (cols >= half)


def sinusoidal_positions(
    num_positions: int,
    dim: int,
    layout: str = "interleaved",
    base: float = 10000.0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The ``(num_positions, dim)`` sinusoid table, computed in float64 and rounded once to ``dtype``."""
    positions = torch.arange(num_positions, dtype=torch.int64, device=device)
    return sinusoid_values(positions, dim, layout, base).to(dtype)


def token_positions(position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, num_tokens: int,
                    position_offset: int, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The int64 position of each of ``num_tokens`` flattened tokens (the operators' rule, see ``spec.py``):
    ``position_ids``; else, for packed documents, ``position_offset + n - cu_seqlens[i]`` for token n of
    document i; else ``position_offset + n % seq_len``."""
    if position_ids is not None:
        return position_ids.long()
    tokens = torch.arange(num_tokens, dtype=torch.int64, device=device)
    if cu_seqlens is not None:
        starts = cu_seqlens.long()
        document = torch.searchsorted(starts, tokens, right=True) - 1
        return position_offset + tokens - starts[document]
    return position_offset + tokens % max(seq_len, 1)


def chunk_tokens(num_tokens: int, seq_len: int, chunk_start: int, chunk_end: int,
                 device: torch.device | str | None = None) -> torch.Tensor | None:
    """Which of ``num_tokens`` flattened tokens lie in the sequence chunk ``[chunk_start, chunk_end)`` (-1: to
    ``seq_len``) of their column ``n % seq_len`` (a bool mask); None when the chunk is the whole sequence."""
    seq_len = max(seq_len, 1)
    stop = seq_len if chunk_end == -1 else chunk_end
    if chunk_start == 0 and stop == seq_len:
        return None
    column = torch.arange(num_tokens, dtype=torch.int64, device=device) % seq_len
    return (column >= chunk_start) & (column < stop)


def padding_aware_position_ids(input_ids: torch.Tensor, padding_idx: int, past_length: int = 0) -> torch.Tensor:
    """fairseq / RoBERTa positions: non-padding tokens count from ``padding_idx + 1 + past_length``
    along the last dim, padding tokens keep ``padding_idx`` (``fairseq.utils.make_positions``)."""
    mask = input_ids.ne(padding_idx).to(torch.int64)
    return (torch.cumsum(mask, dim=-1) + past_length) * mask + padding_idx
