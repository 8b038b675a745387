"""pytest-benchmark suites: `pytest bench/ --benchmark-only` (not part of the test suite).

Each contender of `python -m embedfast bench` is its own benchmark over a few model shapes and dtypes;
GB/s of the bytes the operator must move is stored in `benchmark.extra_info`.
"""

import pytest
import torch

from embedfast.bench import Contenders, Problem, available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {  # batch, seq_len, dim, vocab, segments, position
    "bert-base": (8, 512, 768, 30522, 2, "learned"),
    "gpt2-small": (8, 1024, 768, 50257, 0, "learned"),
    "long-sequence": (1, 8192, 512, 32000, 0, "sinusoidal"),
}
CONTENDERS = [f"embedfast[{b}]" for b in available_backends(DEVICE) if b != "triton" or DEVICE == "cuda"] + ["eager", "floor"]


@pytest.fixture(scope="module", params=SHAPES, ids=str)
def contenders_by_dtype(request):
    batch, seq_len, dim, vocab, segments, position = SHAPES[request.param]
    return {dtype: Contenders(Problem(DEVICE, dtype, batch, seq_len, dim, vocab, segments, position),
                              [c[len("embedfast["):-1] for c in CONTENDERS if c.startswith("embedfast[")])
            for dtype in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("contender", CONTENDERS)
def test_bench(benchmark, contenders_by_dtype, dtype, direction, contender):
    contenders = contenders_by_dtype[dtype]
    forward = contenders.forward_fns()[contender]
    fn = forward if direction == "forward" else contenders.backward_fn(contender, forward)
    if DEVICE == "cuda":
        def run():
            fn()
            torch.cuda.synchronize()
    else:
        run = fn
    benchmark.extra_info["bytes"] = contenders.problem.bytes_moved(direction)
    benchmark(run)
    benchmark.extra_info["GB/s"] = contenders.problem.bytes_moved(direction) / benchmark.stats.stats.median / 1e9
