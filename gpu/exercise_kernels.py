"""Every kernel of a backend once, forward and backward, on small inputs: what compute-sanitizer watches in
``make gpu-check``. Covers each position mode, segment tables small (per-block partial sums) and large
(sorted runs), sparse and dense token gradients, padding, int32 and int64 ids, every dtype, a
dimension with a vector tail, and the norm operators (LayerNorm with dropout, RMSNorm). ``--device cpu`` makes the same calls on CPU (``make gpu-check-dry``).
Exits non-zero when a result differs from the reference backend."""

from __future__ import annotations

import argparse
import sys

import torch

import embedfast
from embedfast import spec

CASES = (
    {"position": "sinusoidal", "num_segments": 2},
    {"position": "learned", "max_positions": 64, "num_segments": 20},  # more segments than one block sums
    {"position": "none", "padding_idx": 0, "scale": None},
    {"position": "learned", "max_positions": 64, "num_segments": 2, "norm": "layernorm", "dropout": 0.1},
    {"position": "sinusoidal", "norm": "rmsnorm"},
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# two implementations, each within spec.TOLERANCE of the truth, summing in different orders
TOLERANCE = {dtype: 4 * tolerance for dtype, tolerance in spec.TOLERANCE.items()}


def exercise(backend: str, device: str, dtypes: list[str], dim: int = 70) -> int:
    """Runs the matrix on one backend; returns the number of forward + backward calls made."""
    calls = 0
    generator = torch.Generator().manual_seed(0)
    for dtype in (DTYPES[name] for name in dtypes):
        for ids_dtype in (torch.int32, torch.int64):
            for case in CASES:
                for sparse in (True, False):
                    options = {**case, "sparse": sparse, "device": device, "dtype": dtype}
                    module = embedfast.FusedInputEmbedding(100, dim, backend=backend, **options)
                    reference = embedfast.FusedInputEmbedding(100, dim, backend="reference", **options)
                    reference.load_state_dict(module.state_dict())
                    ids = torch.randint(0, 100, (3, 33), generator=generator).to(device, ids_dtype)
                    types = torch.randint(0, case["num_segments"], (3, 33), generator=generator).to(device, ids_dtype) \
                        if case.get("num_segments") else None
                    grad = torch.randn(3, 33, dim, generator=generator).to(device, dtype)
                    for net in (module, reference):
                        torch.manual_seed(1)  # the same dropout seed for both
                        net(ids, types).backward(grad)
                    calls += 2
                    for name, param in module.named_parameters():
                        expected = getattr(reference, name).grad
                        actual = param.grad
                        if actual.is_sparse:
                            actual, expected = actual.coalesce().to_dense(), expected.coalesce().to_dense()
                        scale = float(expected.abs().max()) or 1.0
                        error = float((actual.double() - expected.double()).abs().max()) / scale
                        if error > TOLERANCE[dtype]:
                            raise AssertionError(f"{backend} {dtype} {case} sparse={sparse}: {name}.grad off by {error:.3g}")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return calls


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="+", default=["extension", "triton"])
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    args = parser.parse_args(argv)
    available = embedfast.available_backends(args.device)
    for backend in args.backends:
        if backend not in available:
            print(f"{backend}: not available on {args.device}: "
                  f"{embedfast.backends.unavailable_reason(backend, torch.device(args.device))}")
            continue
        print(f"{backend}: {exercise(backend, args.device, args.dtypes)} calls on {args.device}, all match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
