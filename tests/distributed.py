"""Run a worker function in a real multi-process group: ``run_workers(worker, world_size, *args)``.

Each rank is a ``torch.multiprocessing`` process started with the ``spawn`` method. It joins a process group
(gloo by default) rendezvousing over TCP on 127.0.0.1 at a port the OS picked free, with gloo's sockets on the
loopback interface, calls ``worker(rank, world_size, *args)`` with one intra-op thread, and sends back what it
returns. The parent gets the results in rank order, or an exception: ``WorkerError`` with the traceback of the
rank that failed first (the others' errors, such as a peer's closed connection, follow it in one line each), or
``TimeoutError`` when the whole run is not done within ``timeout`` seconds (a hung collective gets every rank killed
rather than the test run hung). Collectives themselves give up after ``collective_timeout`` seconds.

``worker`` and ``args`` travel by pickle: a module-level function of an importable module (a test module is one:
pytest puts its folder on ``sys.path``, which spawned children inherit) and picklable arguments. Results are saved
with ``torch.save``, so tensors and plain containers of them come back as they were (keep them on the CPU).
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_TIMEOUT = 120.0
DEFAULT_COLLECTIVE_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    names = [name for _, name in socket.if_nameindex()]
    return next((name for name in names if name in ("lo", "lo0")), next((n for n in names if n.startswith("lo")), "lo"))


def _rank_main(rank, worker, world_size, backend, init_method, interface, collective_timeout, result_dir, args):
    os.environ["GLOO_SOCKET_IFNAME"] = interface  # gloo's own sockets on loopback only
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result_dir = Path(result_dir)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=collective_timeout))
        try:
            result = worker(rank, world_size, *args)
        except BaseException:
            _record_error(result_dir, rank)  # before the group goes down and the other ranks fail in turn
            raise
        finally:
            dist.destroy_process_group()
        torch.save(result, result_dir / f"rank{rank}.part")
        os.replace(result_dir / f"rank{rank}.part", result_dir / f"rank{rank}.result")
    except BaseException:
        _record_error(result_dir, rank)
        raise


def _record_error(result_dir: Path, rank: int) -> None:
    """The error being raised and when, once per rank: the parent reports the earliest first."""
    path = result_dir / f"rank{rank}.error"
    if not path.exists():
        path.write_text(f"{time.time()!r}\n{traceback.format_exc()}")


class WorkerError(RuntimeError):
    """A rank failed: the message has the first failure's traceback, then the other ranks' last lines."""


def _worker_error(result_dir: Path, world_size: int, reported: BaseException) -> WorkerError:
    errors = []
    for rank in range(world_size):
        path = result_dir / f"rank{rank}.error"
        if path.exists():
            when, trace = path.read_text().split("\n", 1)
            errors.append((float(when), rank, trace.rstrip()))
    if not errors:
        return WorkerError(str(reported))
    errors.sort()
    _, first_rank, first_trace = errors[0]
    others = "".join(f"\nrank {rank} then: {trace.splitlines()[-1]}" for _, rank, trace in errors[1:])
    return WorkerError(f"rank {first_rank} failed first:\n{first_trace}{others}")


def run_workers(worker, world_size: int, *args, backend: str = "gloo", timeout: float = DEFAULT_TIMEOUT,
                collective_timeout: float = DEFAULT_COLLECTIVE_TIMEOUT, start_method: str = "spawn") -> list:
    """``[worker(0, world_size, *args), ..., worker(world_size - 1, world_size, *args)]``, each run in its own
    spawned process inside one process group of ``world_size`` ranks (``backend``: "gloo", or "nccl" with one GPU
    per rank, rank r on cuda:r). Raises ``WorkerError`` with the traceback of the rank that failed first, or
    ``TimeoutError`` after ``timeout`` seconds in all (start-up included), having killed every rank still running.

    ``start_method="forkserver"``, after ``torch.multiprocessing.set_forkserver_preload(["torch", "embedfast"])``,
    pays the imports once per session instead of once per rank and run (spawn: seconds a run)."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    init_method = f"tcp://127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="embedfast-dist-") as result_dir:
        context = mp.start_processes(
            _rank_main, nprocs=world_size, join=False, start_method=start_method,
            args=(worker, world_size, backend, init_method, loopback_interface(), collective_timeout, result_dir, args))
        deadline = time.monotonic() + timeout
        try:
            while not _join(context, result_dir, world_size, max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    running = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                    raise TimeoutError(f"{getattr(worker, '__name__', worker)} at world size {world_size}: ranks "
                                       f"{running} still running after {timeout:g} s (a hung collective?); killed")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            for process in context.processes:
                process.join(timeout=10)
        return [torch.load(Path(result_dir) / f"rank{rank}.result", weights_only=False) for rank in range(world_size)]


def _join(context, result_dir, world_size, timeout):
    """True once every rank is done; a failed rank's error (the others are then stopped)."""
    try:
        return context.join(timeout=timeout)
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as error:
        raise _worker_error(Path(result_dir), world_size, error) from error
