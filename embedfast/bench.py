"""``python -m embedfast bench``: each backend against eager PyTorch, torch.compile and the physical floor.

For every contender it prints the median time, the bytes the operator must move (counted explicitly),
GB/s, the time relative to two floors (a bare gather of the same rows for forward or a bare scaled copy of
``grad_out`` for backward; and a plain copy of the bytes the operator must move) and the speed-up over eager
PyTorch and over ``torch.compile``. On CUDA, times come from CUDA events. Each contender
is first checked against the float64 reference; one that disagrees is marked and not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .backends import available_backends, cpu_info
from .module import FusedInputEmbedding
from .positions import sinusoidal_positions
from .reference import unfused_input_embedding
from .spec import POSITION_ENCODINGS, TOLERANCE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# glibc's allocator returns big freed blocks to the OS, so every 50 MB output page-faults again; these keep
# them (set for every contender alike: the launcher re-executes itself with them)
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"
NORM_EPS = 1e-5  # the fused module's default norm_eps, given to nn.LayerNorm / nn.RMSNorm alike
FWD_BWD = "fwd+bwd"  # the direction of the norm / dropout rows: one forward (training mode) and its backward


@dataclasses.dataclass
class Problem:
    device: str
    dtype: torch.dtype
    batch: int
    seq_len: int
    dim: int
    vocab: int
    segments: int
    position: str
    past_length: int = 0  # default positions start here (a decode step)
    sparse: bool = True  # the token table's gradient
    norm: str | None = None  # "layernorm" / "rmsnorm" after the sum (--norm)
    dropout: float = 0.0  # after the norm, in training mode (--dropout)

    @property
    def norm_mode(self) -> bool:
        """A norm and / or dropout after the sum: the fused module with them against eager and compiled HF-style
        blocks."""
        return self.norm is not None or self.dropout > 0

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    @property
    def positions(self) -> int:
        return self.past_length + self.seq_len

    def bytes_moved(self, direction: str) -> int:
        """The least the fused operator must move: token rows in, output rows out (forward; backward: grad rows in,
        sparse values out, or the whole dense (vocab, dim) gradient out), the ids, the small tables. With a norm:
        also the float32 mean and rstd of each token (8 bytes, written forward and read backward), the norm's
        weight and bias (read; their gradients written backward) and, backward, the token rows read again to
        recompute the sum. The dropout mask is regenerated from a seed: no bytes. ``fwd+bwd`` is the sum of both."""
        if direction == FWD_BWD:
            return self.bytes_moved("forward") + self.bytes_moved("backward")
        element = torch.empty((), dtype=self.dtype).element_size()
        if self.norm_mode:
            norm_params = {None: 0, "rmsnorm": 1, "layernorm": 2}[self.norm] * self.dim * element
            stats = 8 * self.tokens if self.norm else 0
            if direction == "forward":
                return self._table_bytes(direction, element) + stats + norm_params
            recompute = self.tokens * self.dim * element if self.norm else 0
            return self._table_bytes(direction, element) + stats + 2 * norm_params + recompute
        return self._table_bytes(direction, element)

    def _table_bytes(self, direction: str, element: int) -> int:
        rows_out = self.tokens if direction == "forward" or self.sparse else self.vocab
        rows = (self.tokens + rows_out) * self.dim * element
        ids = self.tokens * 8 * (1 + (self.segments > 0))
        tables = (self.segments + (self.seq_len if self.position == "learned" else 0)) * self.dim * element
        return rows + ids + (tables if direction == "forward" else 2 * tables)

    def label(self) -> str:
        past = f" (past_length {self.past_length})" if self.past_length else ""
        return f"{self.batch} x {self.seq_len}{past}"

    def norm_label(self) -> str:
        """What follows the sum: the norm then the dropout (as BertEmbeddings), in training mode."""
        parts = [self.norm] if self.norm else []
        parts += [f"dropout {self.dropout:g}"] if self.dropout > 0 else []
        return " + ".join(parts) + " after the sum, training mode"


@dataclasses.dataclass
class Result:
    contender: str
    direction: str
    median_ms: float | None
    gbps: float | None
    status: str = "ok"
    times_floor: float | None = None
    times_copy: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compile: float | None = None


class Contenders:
    """Builds the callables of one problem: forward returns the output; backward runs autograd once."""

    def __init__(self, problem: Problem, backends: list[str]):
        p = problem
        self.problem = p
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, p.vocab, (p.batch, p.seq_len), generator=generator).to(p.device)
        self.types = torch.randint(0, max(p.segments, 1), (p.batch, p.seq_len), generator=generator).to(p.device) if p.segments else None
        self.modules = {}
        for name in backends or ["reference"]:
            module = FusedInputEmbedding(p.vocab, p.dim, num_segments=p.segments, position=p.position,
                                         max_positions=p.positions if p.position == "learned" else None,
                                         sparse=p.sparse, backend=name, device=p.device, dtype=p.dtype,
                                         norm=p.norm, norm_eps=NORM_EPS, dropout=p.dropout)
            if self.modules:  # every contender shares the first module's tables
                module.load_state_dict(next(iter(self.modules.values())).state_dict())
            self.modules[name] = module
        first = next(iter(self.modules.values()))
        self.scale = first.embed_scale
        self.weight, self.segment_weight, self.position_weight = first.weight, first.segment_weight, first.position_weight
        self.position_table = None
        if p.position == "sinusoidal":
            self.position_table = sinusoidal_positions(p.positions, p.dim, dtype=p.dtype, device=p.device)
        elif p.position == "learned":
            self.position_table = self.position_weight
        self.positions = torch.arange(p.past_length, p.positions, device=p.device).expand(p.batch, p.seq_len)
        self.gather_out = torch.empty(p.tokens, p.dim, dtype=p.dtype, device=p.device)
        # the dense gradient's floor clears a (vocab, dim) result
        self.dense_out = None if p.sparse else torch.empty(p.vocab, p.dim, dtype=p.dtype, device=p.device)
        self.grad_out = torch.randn(p.batch, p.seq_len, p.dim, generator=generator).to(p.device, p.dtype)
        self.norm_layer = self.dropout_layer = None
        if p.norm_mode:  # BertEmbeddings' tail: the norm, then the dropout; the norm's parameters are the module's
            self.norm_layer = nn.Identity()
            if p.norm:
                kind = nn.LayerNorm if p.norm == "layernorm" else nn.RMSNorm
                self.norm_layer = kind(p.dim, eps=NORM_EPS, device=p.device, dtype=p.dtype)
                self.norm_layer.load_state_dict({"weight": first.norm_weight.detach(), **(
                    {"bias": first.norm_bias.detach()} if first.norm_bias is not None else {})})
            self.dropout_layer = nn.Dropout(p.dropout) if p.dropout > 0 else nn.Identity()
            self.train(True)
        # torch.compile cannot make the sparse gradient: the norm rows compile the dense one (the header says so).
        # Each problem compiles afresh, for its static shapes: dynamo keys its cache on the code of `eager`, which
        # every problem shares; past recompile_limit entries it would run eager code silently, and a second shape
        # would get a dynamic-shape graph.
        torch._dynamo.reset()
        self.compiled = torch.compile(self.eager_dense if p.norm_mode else self.eager, dynamic=False)

    def eager(self, ids, types, sparse: bool | None = None):
        """The unfused PyTorch a user would write: nn.Embedding lookups (sparse or dense gradient), scale, adds;
        with a norm / dropout, then nn.LayerNorm or nn.RMSNorm, then nn.Dropout (as BertEmbeddings)."""
        out = unfused_input_embedding(ids, self.weight, scale=self.scale, position_table=self.position_table,
                                      position_ids=self.positions if self.position_table is not None else None,
                                      segment_weight=self.segment_weight, token_type_ids=types,
                                      sparse=self.problem.sparse if sparse is None else sparse)
        if self.norm_layer is not None:
            out = self.dropout_layer(self.norm_layer(out))
        return out

    def eager_dense(self, ids, types):
        """``eager`` with the dense token gradient: what torch.compile of the norm / dropout block is given."""
        return self.eager(ids, types, sparse=False)

    def train(self, mode: bool) -> None:
        """Training mode (dropout on) or eval mode for every contender with a dropout."""
        for module in (*self.modules.values(), self.dropout_layer):
            if module is not None:
                module.train(mode)

    @contextlib.contextmanager
    def checking(self):
        """The check against the float64 truth: without dropout (its masks differ between contenders)."""
        self.train(False)
        try:
            yield
        finally:
            self.train(True)

    def forward_fns(self) -> dict[str, Callable[[], torch.Tensor]]:
        past = self.problem.past_length
        fns = {f"embedfast[{name}]": (lambda m=module: m(self.ids, self.types, past_length=past))
               for name, module in self.modules.items()}
        fns["eager"] = lambda: self.eager(self.ids, self.types)
        fns["torch.compile"] = lambda: self.compiled(self.ids, self.types)
        fns["floor"] = lambda: torch.index_select(self.weight.detach(), 0, self.ids.view(-1), out=self.gather_out)
        fns["copy"] = self.copy_fn("forward")
        return fns

    def copy_fn(self, direction: str) -> Callable[[], torch.Tensor]:
        """A plain copy that reads and writes as many bytes as the operator must move: the bandwidth roof."""
        size = self.problem.bytes_moved(direction) // 2
        source, destination = (torch.empty(size, dtype=torch.uint8, device=self.problem.device) for _ in range(2))
        return lambda: destination.copy_(source)

    def backward_fn(self, name: str, forward: Callable[[], torch.Tensor]) -> Callable[[], object]:
        """The backward of one forward (retained graph); with a norm / dropout (``fwd+bwd``) a forward and its
        backward each call, the floor being the forward's gather then the backward's scaled copy."""
        direction = FWD_BWD if self.problem.norm_mode else "backward"
        if name == "copy":
            return self.copy_fn(direction)
        if name == "floor":
            grad = self.grad_out.view(-1, self.problem.dim)
            scaled = lambda: torch.mul(grad, self.scale, out=self.gather_out)  # noqa: E731
            if self.dense_out is not None:
                backward = lambda: (self.dense_out.zero_(), scaled())  # noqa: E731
            else:
                backward = scaled
            return (lambda: (forward(), backward())) if self.problem.norm_mode else backward
        tables = self.weight, self.segment_weight, self.position_weight, *(
            () if self.norm_layer is None else self.norm_layer.parameters())
        if name.startswith("embedfast["):
            module = self.modules[name[len("embedfast["):-1]]
            tables = module.weight, module.segment_weight, module.position_weight, module.norm_weight, module.norm_bias
        params = [t for t in tables if t is not None]
        if self.problem.norm_mode:
            return lambda: torch.autograd.grad(forward(), params, self.grad_out)
        out = forward()
        return lambda: torch.autograd.grad(out, params, self.grad_out, retain_graph=True)

    def truth(self) -> torch.Tensor:
        table = None if self.position_table is None else (
            sinusoidal_positions(self.problem.positions, self.problem.dim, dtype=torch.float64, device=self.problem.device)
            if self.problem.position == "sinusoidal" else self.position_table.double())
        out = unfused_input_embedding(
            self.ids, self.weight.double(), scale=self.scale, position_table=table,
            position_ids=self.positions if table is not None else None,
            segment_weight=None if self.segment_weight is None else self.segment_weight.double(), token_type_ids=self.types)
        if self.problem.norm == "layernorm":
            out = F.layer_norm(out, (self.problem.dim,), self.norm_layer.weight.double(), self.norm_layer.bias.double(),
                               NORM_EPS)
        elif self.problem.norm == "rmsnorm":
            out = F.rms_norm(out, (self.problem.dim,), self.norm_layer.weight.double(), NORM_EPS)
        return out  # (no dropout: the check runs in eval mode)


def time_once_ms(fn: Callable[[], object], device: str) -> float:
    """Wall time of one call of ``fn`` in ms: CUDA events on CUDA, a monotonic clock on CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_side_by_side(fns: dict[str, Callable[[], object]], device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median time of each callable in ms, sampled in rounds (one call of each per round), so that a machine
    that slows down or speeds up during the run shifts every contender alike and the ratios hold. The order
    within a round is shuffled (seeded), so that no contender always follows the same one (a predecessor
    leaves its output in the caches, dirty, for the next one to evict)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order, shuffle = list(fns), random.Random(0).shuffle
    for _ in range(repeats):
        shuffle(order)
        for name in order:
            samples[name].append(time_once_ms(fns[name], device))
    return {name: statistics.median(times) for name, times in samples.items()}


def run(problem: Problem, backends: list[str], directions: list[str], warmup: int, repeats: int,
        progress: Callable[[str], None]) -> list[Result]:
    contenders = Contenders(problem, backends)
    with torch.no_grad():
        expected = contenders.truth()
    tol = TOLERANCE[problem.dtype]
    results = []
    forward_fns = {}
    for name, forward in contenders.forward_fns().items():
        if name not in ("floor", "copy"):
            with torch.no_grad(), contenders.checking():
                error = float((forward().double() - expected).abs().max())
            if error > tol * float(expected.abs().max()):
                results += [Result(name, d, None, None, status=f"MISMATCH (max error {error:.3g})") for d in directions]
                continue
        forward_fns[name] = forward
    for direction in directions:
        progress(f"{direction:8s} {', '.join(forward_fns)}")
        fns = {name: (_no_grad(forward) if name not in ("floor", "copy") else forward) if direction == "forward"
               else contenders.backward_fn(name, forward) for name, forward in forward_fns.items()}
        nbytes = problem.bytes_moved(direction)
        for name, ms in time_side_by_side(fns, problem.device, warmup, repeats).items():
            results.append(Result(name, direction, ms, nbytes / ms / 1e6))
    _add_ratios(results)
    return results


def _no_grad(fn):
    def call():
        with torch.no_grad():
            return fn()
    return call


def _add_ratios(results: list[Result]) -> None:
    for direction in {r.direction for r in results}:
        rows = {r.contender: r for r in results if r.direction == direction}
        for row in rows.values():
            if row.median_ms is None:
                continue
            for attr, base in (("times_floor", "floor"), ("times_copy", "copy"), ("speedup_vs_eager", "eager"),
                               ("speedup_vs_compile", "torch.compile")):
                other = rows.get(base)
                if other is not None and other.median_ms:
                    value = row.median_ms / other.median_ms if attr.startswith("times") else other.median_ms / row.median_ms
                    setattr(row, attr, value)


def format_table(problem: Problem, results: list[Result]) -> str:
    header = (f"{'direction':9s} {'contender':22s} {'median ms':>10s} {'MB moved':>9s} {'GB/s':>7s} {'x floor':>8s} "
              f"{'x copy':>7s} {'vs eager':>9s} {'vs compile':>11s}")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.median_ms is None:
            lines.append(f"{r.direction:9s} {r.contender:22s} {r.status}")
            continue
        fmt = lambda v, suffix="x": f"{v:.2f}{suffix}" if v is not None else "-"  # noqa: E731
        lines.append(f"{r.direction:9s} {r.contender:22s} {r.median_ms:10.3f} {problem.bytes_moved(r.direction) / 1e6:9.1f} "
                     f"{r.gbps:7.1f} {fmt(r.times_floor):>8s} {fmt(r.times_copy):>7s} {fmt(r.speedup_vs_eager):>9s} "
                     f"{fmt(r.speedup_vs_compile):>11s}")
    return "\n".join(lines)


def machine_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    description = f"{cpu}, {torch.get_num_threads()} threads"
    info = cpu_info()
    if info is not None:
        l1d, l2, l3 = (_size(b) for b in info.cache_bytes)
        description += (f"; CPU kernels: {info.isa} (this CPU runs {', '.join(info.runnable)}); caches: L1d {l1d} and "
                        f"L2 {l2} per core, L3 {l3}")
    return description


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


# (batch, seq_len, past_length): a decode step, 64 decode steps at once, training batches, one long sequence
SHAPES = ("1x1", "64x1+100", "8x512", "32x512", "1x8192")
QUICK_SHAPES = ("1x1", "8x512")
# with --norm / --dropout: BERT-like training batches (learned positions, 512 of them)
NORM_SHAPES = ("8x512", "32x512")
NORM_QUICK_SHAPES = ("8x512",)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``BxT`` or ``BxT+P`` (P: past_length) as (batch, seq_len, past_length)."""
    try:
        sizes, _, past = text.partition("+")
        batch, seq_len = (int(v) for v in sizes.split("x"))
        shape = batch, seq_len, int(past or 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is BxT or BxT+P (P: past_length), got {text!r}") from None
    if min(shape[:2]) < 1 or shape[2] < 0:
        raise argparse.ArgumentTypeError(f"a shape needs batch, seq_len >= 1 and past_length >= 0, got {text!r}")
    return shape


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m embedfast bench", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=DTYPES, nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--shapes", type=parse_shape, nargs="+", metavar="BxT[+P]",
                        help=f"batch x seq_len [+ past_length] (default: {' '.join(SHAPES)}; --quick: "
                             f"{' '.join(QUICK_SHAPES)})")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--segments", type=int, default=2)
    parser.add_argument("--position", choices=POSITION_ENCODINGS,
                        help="the position encoding (default: sinusoidal; learned with --norm / --dropout)")
    parser.add_argument("--backends", nargs="+", help="embedfast backends to time (default: every available one)")
    parser.add_argument("--direction", choices=["forward", "backward", "both"], default="both")
    parser.add_argument("--grad", choices=["sparse", "dense"], nargs="+", default=["sparse", "dense"],
                        help="token-table gradients to time the backward with (the forward is timed once)")
    parser.add_argument("--norm", choices=["layernorm", "rmsnorm"],
                        help="a norm after the sum: the fused module with it against the unfused sum then nn.LayerNorm "
                             "/ nn.RMSNorm (then nn.Dropout), eager and compiled; the backward rows become fwd+bwd")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="dropout probability after the norm (training mode), as --norm (default 0: none)")
    parser.add_argument("--sweep", choices=["tokens", "dim"], help="time each contender over growing work")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="draw the results as a PNG (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per problem (default 20; 200 at <= 64 tokens)")
    return parser.parse_args(argv)


def _reexec_with_allocator_settings(argv: list[str]) -> None:
    """On glibc, run again with MALLOC_TUNABLES so freed outputs are reused, not re-faulted."""
    if platform.libc_ver()[0] != "glibc" or MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(filter(None, [os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES])))
    os.execve(sys.executable, [sys.executable, "-m", "embedfast", "bench", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] != ["bench"]:
        print("usage: python -m embedfast bench [options]   (--help for the options)", file=sys.stderr)
        return 2
    args = parse_args(argv[1:])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"embedfast bench: --device {args.device} needs a visible CUDA GPU, and torch sees none "
              f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda"):
        _reexec_with_allocator_settings(argv[1:])
    norm_mode = args.norm is not None or args.dropout > 0
    if not 0 <= args.dropout < 1:
        print(f"embedfast bench: --dropout must be in [0, 1), got {args.dropout}", file=sys.stderr)
        return 2
    position = args.position or ("learned" if norm_mode else "sinusoidal")
    default_shapes = (NORM_QUICK_SHAPES if args.quick else NORM_SHAPES) if norm_mode else (
        QUICK_SHAPES if args.quick else SHAPES)
    shapes = args.shapes or [parse_shape(s) for s in default_shapes]
    warmup = 2 if args.quick else 3
    backends = args.backends or available_backends(args.device)
    missing = [b for b in backends if b not in available_backends(args.device)]
    if missing:
        print(f"not available on {args.device}: {missing}; available: {available_backends(args.device)}", file=sys.stderr)
        return 2

    def progress(text: str) -> None:
        print(f"\r  timing {text:<60s}", end="", file=sys.stderr, flush=True)

    allocator = "glibc malloc tunables " + os.environ.get("GLIBC_TUNABLES", "(none)") if not args.device.startswith("cuda") else "PyTorch CUDA caching allocator"
    print(f"embedfast bench on {machine_description(args.device)}; torch {torch.__version__}; allocator: {allocator}")
    report = {"machine": machine_description(args.device), "torch": torch.__version__, "allocator": allocator, "runs": []}
    for dtype_name in args.dtype:
        for batch, seq_len, past_length, dim in _points(args, shapes):
            for index, grad in enumerate(args.grad):
                sparse = grad == "sparse"
                directions = _directions(args.direction, timed_forward=index == 0, norm_mode=norm_mode)
                if not directions:
                    continue
                problem = Problem(args.device, DTYPES[dtype_name], batch, seq_len, dim, args.vocab, args.segments,
                                  position, past_length, sparse, args.norm, args.dropout)
                repeats = args.repeats or (5 if args.quick else 200 if problem.tokens <= 64 else 20)
                results = run(problem, backends, directions, warmup, repeats, progress)
                print("\r" + " " * 72 + "\r", end="", file=sys.stderr)
                norm = f", {problem.norm_label()}" if norm_mode else ""
                print(f"\n{dtype_name}: {problem.label()} tokens, dim {dim}, vocab {args.vocab}, {args.segments} segments, "
                      f"{position} positions{norm}, {'sparse' if sparse else 'dense'} token gradient; median of {repeats} "
                      "rounds")
                if norm_mode:
                    print(f"eager: F.embedding sum, then {_tail_name(args.norm, args.dropout)}; torch.compile of it"
                          f"{' with the dense token gradient (it cannot make the sparse one)' if sparse else ''}; "
                          f"{FWD_BWD}: one forward and its backward; floor: gather (for {FWD_BWD} then the scaled copy "
                          "of grad_out)"
                          "; bytes: token rows, output, position / segment rows, ids and, with a norm, 8 B/token of statistics "
                          "and its weight and bias; the backward adds grad_out, the token rows again, the gradients")
                print(format_table(problem, results))
                report["runs"].append({"problem": {**dataclasses.asdict(problem), "dtype": dtype_name},
                                       "results": [dataclasses.asdict(r) for r in results]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        from .bench_plot import plot

        plot(report, args.plot, sweep=args.sweep)
    return 0


def _directions(direction: str, timed_forward: bool, norm_mode: bool = False) -> list[str]:
    """The directions of one gradient mode's problem: the forward only with the first mode (it is the same).
    With a norm / dropout the backward is timed with its forward (``fwd+bwd``): each call draws a fresh mask."""
    wanted = ["forward", "backward"] if direction == "both" else [direction]
    return [FWD_BWD if d == "backward" and norm_mode else d for d in wanted if d == "backward" or timed_forward]


def _tail_name(norm: str | None, dropout: float) -> str:
    """The eager layers after the sum, in order."""
    layers = [{"layernorm": "nn.LayerNorm", "rmsnorm": "nn.RMSNorm"}[norm]] if norm else []
    return ", ".join(layers + ([f"nn.Dropout({dropout:g})"] if dropout > 0 else []))


def _points(args: argparse.Namespace, shapes: list[tuple[int, int, int]]) -> list[tuple[int, int, int, int]]:
    """(batch, seq_len, past_length, dim) of each problem: the shapes, or a sweep over the first one."""
    batch, seq_len, past_length = shapes[0]
    if args.sweep == "tokens":
        return [(b, seq_len, past_length, args.dim) for b in (1, 2, 4, 8, 16, 32) if b <= max(batch, 1)]
    if args.sweep == "dim":
        return [(batch, seq_len, past_length, d) for d in (64, 128, 256, 512, 768, 1024) if d <= max(args.dim, 64)]
    return [(*shape, args.dim) for shape in shapes]
