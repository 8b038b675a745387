"""Which backends can run where, and the one place that picks one.

``"auto"`` tries, in order, the compiled extension, Triton (on CUDA) and the reference; the
environment variable ``EMBEDFAST_BACKEND`` replaces ``"auto"``. A backend asked for by name that
cannot run raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import warnings
from typing import NamedTuple

import torch

from . import ops
from .validation import check_choice

BACKENDS = ("extension", "triton", "reference")


_BROKEN_EXTENSION = "the C++ extension embedfast._C is built but does not load"
REBUILD_HINT = ("rebuild it against the torch it runs with: pip install --no-build-isolation -e . "
                "(or make setup) in the embedfast checkout")


@functools.cache
def _load_failure(backend: str) -> str | None:
    """Import the backend's kernels once; the reason it cannot load, or None."""
    if backend == "extension":
        ops.define_ops("extension")
        if importlib.util.find_spec("embedfast._C") is None:
            return "the C++ extension embedfast._C is not built"
        try:
            extension = importlib.import_module("embedfast._C")
        except (ImportError, OSError) as error:
            return f"{_BROKEN_EXTENSION} ({error}); {REBUILD_HINT}"
        ops.register_fake_and_autograd("extension")
        ops.register_eager_entry("extension", extension.EagerEmbedding)
    elif backend == "triton":
        try:
            importlib.import_module("embedfast.triton_kernels")
        except ImportError as error:
            return f"triton is not usable ({error})"
    return None


def check_backend_name(backend: str, allow_auto: bool = True) -> None:
    check_choice("backend", backend, ("auto", *BACKENDS) if allow_auto else BACKENDS)


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    check_backend_name(backend, allow_auto=False)
    if backend == "reference":
        return None
    if device.type not in ("cpu", "cuda"):
        return f"the {backend} backend runs on CPU and CUDA tensors, not {device.type}"
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton runs on CUDA tensors; CPU tensors need the interpreter (TRITON_INTERPRET=1 before import)"
    failure = _load_failure(backend)
    if failure is not None:
        return failure
    if backend == "extension" and device.type == "cuda" and not _has_kernel(ops.op_name("forward", "extension"), "CUDA"):
        return "embedfast._C was built without CUDA kernels"
    return None


def _has_kernel(name: str, dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(name, dispatch_key)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    # the Triton interpreter on CPU is for testing only: never chosen ahead of the reference
    return BACKENDS if device.type == "cuda" else ("extension", "reference", "triton")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends that can run on ``device`` (default CPU), in the order ``"auto"`` tries them."""
    device = torch.device(device if device is not None else "cpu")
    return [name for name in _auto_order(device) if unavailable_reason(name, device) is None]


@torch.compiler.assume_constant_result  # torch.compile runs it once, while tracing, and keeps the answer
def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: ``backend`` itself, or the first available one for ``"auto"``."""
    if backend == "auto":
        backend = os.environ.get("EMBEDFAST_BACKEND", "auto") or "auto"
        if backend == "auto":
            _warn_if_extension_is_broken()
            return available_backends(device)[0]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"embedfast backend {backend!r} is not available on {device.type}: {reason}")
    return backend


class CpuInfo(NamedTuple):
    isa: str  # the instruction-set path the CPU kernels take (a spec.CpuIsa name, lower case)
    runnable: list[str]  # the paths this CPU can run, lowest first
    cache_bytes: list[int]  # L1 data and L2 per core, L3 in all


def cpu_info() -> CpuInfo | None:
    """What the extension's CPU kernels found of this machine, or None without a loadable extension. The path is
    the best one the CPU runs unless the environment variable ``EMBEDFAST_CPU_ISA`` names a lower one."""
    if _load_failure("extension") is not None:
        return None
    return CpuInfo(*torch.ops.embedfast.cpu_info())


def forward_op(backend: str):
    return getattr(torch.ops.embedfast, f"forward_{backend}")


@functools.cache
def _warn_if_extension_is_broken() -> None:
    """Once per process: "auto" passing over an extension that exists but fails to load is worth a warning
    (it runs many times slower); one that was never built is not."""
    failure = _load_failure("extension")
    if failure is not None and failure.startswith(_BROKEN_EXTENSION):
        warnings.warn(f"embedfast: backend='auto' falls back from the extension: {failure}", RuntimeWarning)
