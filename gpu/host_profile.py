"""Where a small call's host time goes on a GPU: per backend, the wall time of one forward and one forward +
backward at 1 x 1 token (synchronized, median of 200), with ``check_bounds`` on and off, against ``F.embedding``;
then the Python functions that take the most of 200 such calls (cProfile, own time). Prints a report."""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

import embedfast


def _median_us(fn, rounds: int = 200) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backends", nargs="+", default=["extension", "triton"])
    options = parser.parse_args()
    device = torch.device("cuda")
    ids = torch.randint(0, 30522, (1, 1), device=device)
    types = torch.zeros_like(ids)
    table = torch.randn(30522, 768, device=device, requires_grad=True)
    print(f"F.embedding forward: {_median_us(lambda: F.embedding(ids, table)):.1f} us")
    for backend in options.backends:
        module = embedfast.FusedInputEmbedding(30522, 768, num_segments=2, position="learned", max_positions=512,
                                               backend=backend, device=device)
        for check_bounds in (True, False):
            module.check_bounds = check_bounds
            forward = _median_us(lambda: module(ids, types))
            both = _median_us(lambda: module(ids, types).sum().backward())
            print(f"{backend} check_bounds={check_bounds}: forward {forward:.1f} us, forward + backward {both:.1f} us")
        module.check_bounds = True
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(200):
            module(ids, types).sum().backward()
        torch.cuda.synchronize()
        profiler.disable()
        report = io.StringIO()
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(25)
        print(f"--- {backend}: 200 forward + backward calls, by own time\n{report.getvalue()}")


if __name__ == "__main__":
    main()
