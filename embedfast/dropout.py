"""The dropout of the norm operators: a counter-based mask, the same bits on every backend.

Element ``e = n * D + d`` of a call with seed ``s`` is kept when ``dropout_bits(s, e) >= dropout_threshold(p)``
(``spec.py``). The bits are two rounds of MurmurHash3's 32-bit finaliser over the element index and the seed, so
the mask is never stored: the backward regenerates it from the seed (``csrc/include/embedfast/kernel_math.h`` and
``triton_kernels.py`` compute the same bits; the tests compare the masks bitwise).

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


def dropout_bits(seed: torch.Tensor, elements: torch.Tensor) -> torch.Tensor:
    """The 32 random bits (as int64 in [0, 2**32)) of each element index in ``elements`` (int64) under ``seed``."""
    seed = seed.reshape(()).to(torch.int64)
    mixed = _fmix32((elements & _MASK32) ^ (seed & _MASK32))
    return _fmix32(mixed ^ ((seed >> 32) & _MASK32) ^ _mul32((elements >> 32) & _MASK32, 0x9E3779B9))


def keep_mask(seed: torch.Tensor, num_tokens: int, dim: int, threshold: int) -> torch.Tensor:
    """The (num_tokens, dim) boolean mask of the elements a call keeps."""
    elements = torch.arange(num_tokens * dim, dtype=torch.int64, device=seed.device).view(num_tokens, dim)
    return dropout_bits(seed, elements) >= threshold
