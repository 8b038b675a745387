"""The dropout of the norm operators: a counter-based mask, the same bits on every backend.

Element ``(n, d)`` of a call with seed ``s`` (token n's column d) is kept when ``dropout_bits(s, n, d) >=
dropout_threshold(p)`` (``spec.py``). The bits are one round of MurmurHash3's 32-bit finaliser over the column and a
key of the row, itself two rounds over the token index and the seed: two rounds a row, one an element. The mask is
never stored: the backward regenerates it from the seed (``csrc/include/embedfast/kernel_math.h`` and
``triton_norm.py`` compute the same bits; the tests compare the masks bitwise).

The seed is drawn from torch's default generator of the device (``torch.manual_seed`` makes a call reproducible)
into a 1-element device tensor that the kernels read: no host synchronization, and under CUDA-graph capture each
replay draws a new seed, as PyTorch's own fused dropout does with its philox seed and offset.
"""

from __future__ import annotations

import torch

from .spec import DROPOUT_SEED_BOUND

_MASK32 = 0xFFFFFFFF


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh seed from the default generator of ``device``: a 1-element int64 tensor on it."""
    return torch.randint(0, DROPOUT_SEED_BOUND, (1,), dtype=torch.int64, device=device)


def _mul32(h: torch.Tensor, constant: int) -> torch.Tensor:
    """``h * constant mod 2**32`` for ``h`` in [0, 2**32), in int64 without overflow (16-bit halves)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (h * low + ((h * high) << 16)) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _row_key(seed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The key (as int64 in [0, 2**32)) of each token index in ``rows`` (int64) under ``seed``."""
    seed = seed.reshape(()).to(torch.int64)
    mixed = _fmix32((rows & _MASK32) ^ (seed & _MASK32))
    return _fmix32(mixed ^ ((seed >> 32) & _MASK32) ^ _mul32((rows >> 32) & _MASK32, 0x9E3779B9))


def dropout_bits(seed: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """The 32 random bits (as int64 in [0, 2**32)) of the elements (row, column) of ``rows`` and ``columns`` (int64,
    broadcast together) under ``seed``."""
    return _fmix32((columns & _MASK32) ^ _row_key(seed, rows))


def keep_mask(seed: torch.Tensor, num_tokens: int, dim: int, threshold: int) -> torch.Tensor:
    """The (num_tokens, dim) boolean mask of the elements a call keeps."""
    rows = torch.arange(num_tokens, dtype=torch.int64, device=seed.device)[:, None]
    columns = torch.arange(dim, dtype=torch.int64, device=seed.device)[None, :]
    return dropout_bits(seed, rows, columns) >= threshold
