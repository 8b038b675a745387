"""The sinusoid tables against the published formulas, written out independently, element by element."""

import math

import pytest
import torch

import embedfast
from embedfast.positions import token_positions


def paper_interleaved(p, j, dim, base):
    """Vaswani et al. 2017: PE(p, 2i) = sin(p / base^(2i/d)), PE(p, 2i+1) = cos(p / base^(2i/d))."""
    i = j // 2
    angle = p / base ** (2 * i / dim)
    return math.sin(angle) if j % 2 == 0 else math.cos(angle)


def tensor2tensor_concat(p, j, dim, base):
    """tensor2tensor get_timing_signal_1d / fairseq: [sin(p*w_0..h-1), cos(p*w_0..h-1), 0 if d odd]."""
    half = dim // 2
    increment = math.log(base) / max(half - 1, 1)
    if j >= 2 * half:
        return 0.0
    i = j if j < half else j - half
    angle = p * math.exp(-i * increment)
    return math.sin(angle) if j < half else math.cos(angle)


FORMULAS = {"interleaved": paper_interleaved, "concat": tensor2tensor_concat}


@pytest.mark.parametrize("layout", FORMULAS)
@pytest.mark.parametrize("dim", [1, 2, 3, 7, 64, 129])
@pytest.mark.parametrize("base", [10000.0, 500.0])
def test_table_matches_published_formula(layout, dim, base):
    rows = 50
    table = embedfast.sinusoidal_positions(rows, dim, layout, base, dtype=torch.float64)
    expected = torch.tensor([[FORMULAS[layout](p, j, dim, base) for j in range(dim)] for p in range(rows)], dtype=torch.float64)
    assert table.shape == (rows, dim)
    torch.testing.assert_close(table, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_table_is_rounded_once_from_float64(dtype):
    table = embedfast.sinusoidal_positions(20000, 16, "interleaved", dtype=dtype)
    exact = embedfast.sinusoidal_positions(20000, 16, "interleaved", dtype=torch.float64)
    assert table.dtype == dtype
    assert torch.equal(table, exact.to(dtype))


def test_large_positions_stay_accurate():
    p, j, dim = 16383, 2, 768
    value = embedfast.sinusoidal_positions(p + 1, dim, dtype=torch.float64)[p, j]
    assert abs(float(value) - paper_interleaved(p, j, dim, 10000.0)) < 1e-12


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="sinusoid_layout.*'diagonal'"):
        embedfast.sinusoidal_positions(4, 8, "diagonal")


def test_default_positions_restart_every_sequence():
    expected = torch.tensor([3, 4, 5, 3, 4, 5])
    assert torch.equal(token_positions(None, None, 6, position_offset=3, seq_len=3), expected)


def test_packed_positions_restart_every_document():
    cu_seqlens = torch.tensor([0, 3, 3, 4, 7])  # an empty document, a single token
    expected = torch.tensor([2, 3, 4, 2, 2, 3, 4])
    assert torch.equal(token_positions(None, cu_seqlens, 7, position_offset=2, seq_len=99), expected)
