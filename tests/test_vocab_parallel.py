"""VocabParallelInputEmbedding on real gloo process groups (2 and 3 ranks on loopback): the forward and every
gradient against the single-process module, on every backend, with and without sequence parallelism.

Inputs: the learned configs have explicit position_ids, the sinusoidal ones a past_length and an uneven split of
T without sequence parallelism, the one without positions a 3-D batch; padding ids fall in a shard that does not
start at 0 (so local rows and ids differ)."""

import dataclasses
import itertools
import zlib

import pytest
import torch

import embedfast
from distributed import run_workers
from embedfast.parallel import VocabParallelInputEmbedding, even_split

VOCAB, DIM, BATCH, SEQ_LEN = 37, 12, 2, 6  # T = 6 splits evenly in 2 and 3; non-SP configs take 7


@dataclasses.dataclass(frozen=True)
class Config:
    position: str
    segments: int
    padding_idx: int | None
    sparse: bool
    sequence_parallel: bool
    backend: str = "reference"

    def module(self) -> embedfast.FusedInputEmbedding:
        torch.manual_seed(0)  # the same module on every rank
        return embedfast.FusedInputEmbedding(VOCAB, DIM, padding_idx=self.padding_idx, num_segments=self.segments,
                                             position=self.position, max_positions=SEQ_LEN + 4, sparse=self.sparse,
                                             backend=self.backend)

    def inputs(self) -> tuple[dict, torch.Tensor]:
        generator = torch.Generator().manual_seed(zlib.crc32(repr(self).encode()))  # the same in every process
        shape = (BATCH, SEQ_LEN if self.sequence_parallel else SEQ_LEN + 1)
        if self.position == "none":
            shape = (2, *shape)
        ids = torch.randint(0, VOCAB, shape, generator=generator)
        if self.padding_idx is not None:
            ids[0, ::2] = self.padding_idx
        kwargs = {"input_ids": ids}
        if self.position == "learned":
            kwargs["position_ids"] = torch.randint(0, SEQ_LEN + 4, shape[-1:], generator=generator)
        elif self.position == "sinusoidal":
            kwargs["past_length"] = 2
        if self.segments:
            kwargs["token_type_ids"] = torch.randint(0, self.segments, shape, generator=generator)
        return kwargs, torch.randn(*shape, DIM, generator=generator)


def _available_backends():
    return [b for b in embedfast.backends.BACKENDS if embedfast.backends.unavailable_reason(b, torch.device("cpu")) is None]


# every table setting on each backend, but the Triton interpreter (slow) takes the learned one only
CONFIGS = [Config(position, segments, padding, sparse, sequence_parallel, backend)
           for backend in _available_backends()
           for (position, segments, padding), sparse, sequence_parallel in itertools.product(
               [("learned", 2, 20), ("sinusoidal", 3, None), ("none", 0, 30)], (True, False), (False, True))
           if backend != "triton" or position == "learned"]


def _gradients(module) -> dict:
    grads = {}
    for name in ("weight", "position_weight", "segment_weight"):
        table = getattr(module, name)
        if table is not None:
            grads[name] = table.grad.coalesce().to_dense() if table.grad.is_sparse else table.grad
    return grads


def _rows_in_range(grad: torch.Tensor) -> bool:
    rows = grad.coalesce().indices()
    return bool(((rows >= 0) & (rows < grad.shape[0])).all())


def _shard_worker(rank: int, world_size: int, configs: list, device: str = "cpu") -> list:
    """Every config on this rank: the vocab range, the output, the gradients (sparse ones made dense, local rows);
    on ``device`` "cuda", rank r computes on cuda:r and the results come back to the CPU."""
    device = torch.device("cuda", rank) if device == "cuda" else torch.device(device)
    results = []
    for config in configs:
        parallel = VocabParallelInputEmbedding.from_module(config.module().to(device),
                                                           sequence_parallel=config.sequence_parallel)
        kwargs, grad_out = config.inputs()
        kwargs = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in kwargs.items()}
        grad_out = grad_out.to(device)
        out = parallel(**kwargs)
        assert out.is_contiguous()
        out.mul_(1.0)  # the output takes in-place ops, as the plain module's does
        if config.sequence_parallel:
            grad_out = grad_out.chunk(world_size, dim=-2)[rank]
        out.backward(grad_out)
        sparse = parallel.weight.grad.is_sparse
        results.append({"vocab_range": parallel.vocab_range, "out": out.detach().cpu(), "sparse": sparse,
                        "indices_in_range": not sparse or _rows_in_range(parallel.weight.grad),
                        **{name: grad.cpu() for name, grad in _gradients(parallel).items()}})
    return results


@pytest.mark.parametrize("world_size", [2, 3])
def test_forward_and_gradients_match_the_single_process_module(world_size):
    _assert_match_single_process(CONFIGS, run_workers(_shard_worker, world_size, CONFIGS), world_size)


@pytest.mark.gpu
def test_on_nccl_with_one_gpu_per_rank():
    """The same on CUDA with NCCL (dense and sparse: the token gradient is not all-reduced), two GPUs or skipped."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA devices, {torch.cuda.device_count()} visible")
    configs = [c for c in CONFIGS if embedfast.backends.unavailable_reason(c.backend, torch.device("cuda")) is None]
    _assert_match_single_process(configs, run_workers(_shard_worker, 2, configs, "cuda", backend="nccl"), 2)


def _assert_match_single_process(configs: list, per_rank: list, world_size: int) -> None:
    for i, config in enumerate(configs):
        module = config.module()
        kwargs, grad_out = config.inputs()
        expected = module(**kwargs)
        expected.backward(grad_out)
        whole = _gradients(module)
        for rank in range(world_size):
            got = per_rank[rank][i]
            what = f"{config}, rank {rank} of {world_size}"
            start, end = got["vocab_range"]
            assert (start, end) == even_split(VOCAB, world_size, rank)
            want_out = expected.chunk(world_size, dim=-2)[rank] if config.sequence_parallel else expected
            torch.testing.assert_close(got["out"], want_out.detach(), msg=lambda m: f"{what}: forward: {m}")
            assert got["sparse"] == config.sparse and got["indices_in_range"], what
            torch.testing.assert_close(got["weight"], whole["weight"][start:end], msg=lambda m: f"{what}: weight: {m}")
            for name in ("position_weight", "segment_weight"):
                assert (name in got) == (name in whole), what
                if name in whole:  # replicated tables: the whole module's gradient on every rank
                    torch.testing.assert_close(got[name], whole[name], msg=lambda m: f"{what}: {name}: {m}")


def _errors_worker(rank: int, world_size: int) -> list:
    module = embedfast.FusedInputEmbedding(VOCAB, DIM, backend="reference")
    errors = []
    parallel = VocabParallelInputEmbedding.from_module(module, sequence_parallel=True)
    for call in (lambda: parallel(torch.zeros(2, 5, dtype=torch.long)),
                 lambda: parallel(torch.full((2, 4), VOCAB, dtype=torch.long)),
                 lambda: VocabParallelInputEmbedding.from_module(embedfast.FusedInputEmbedding(1, DIM)),
                 lambda: tuple(VocabParallelInputEmbedding.from_module(module)(torch.zeros(2, 0, dtype=torch.long)).shape)):
        try:
            errors.append(call())
        except Exception as error:  # noqa: BLE001 (the parent checks which)
            errors.append((type(error).__name__, str(error).splitlines()[0]))
    return errors


def test_bad_input_raises_on_every_rank():
    for errors in run_workers(_errors_worker, 2):
        assert errors[0] == ("ValueError", "sequence_parallel needs the sequence length T=5 to be divisible by the "
                                           "world size 2")
        assert errors[1][0] == "IndexError" and f"input_ids contains {VOCAB}, out of range" in errors[1][1]
        assert errors[2] == ("ValueError", "num_embeddings=1 is smaller than the world size 2: a rank would keep no rows")
        assert errors[3] == (2, 0, DIM)  # an empty sequence embeds to nothing, as with the plain module


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        VocabParallelInputEmbedding.from_module(embedfast.FusedInputEmbedding(VOCAB, DIM))


MESH_CONFIG = Config("learned", 2, 0, sparse=True, sequence_parallel=True)


def _mesh_worker(rank: int, world_size: int) -> dict:
    """A (dp=2, tp=2) mesh: vocab parallel over tp, distributed_data_parallel over dp, one SGD step on dp index i's
    batch (the second of two seeded batches for i = 1)."""
    from torch.distributed.device_mesh import init_device_mesh

    from embedfast.parallel import distributed_data_parallel

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    tp_rank, dp_rank = mesh["tp"].get_local_rank(), mesh["dp"].get_local_rank()
    parallel = VocabParallelInputEmbedding.from_module(MESH_CONFIG.module(), mesh["tp"].get_group(), sequence_parallel=True)
    model = distributed_data_parallel(parallel, process_group=mesh["dp"].get_group())
    kwargs, grad_out = _mesh_batches()[dp_rank]
    optimizer = torch.optim.SGD(parallel.parameters(), lr=0.5)
    model(**kwargs).backward(grad_out.chunk(2, dim=1)[tp_rank])  # DDP averages over the dp batches
    optimizer.step()
    return {"vocab_range": parallel.vocab_range, **{name: p.detach() for name, p in parallel.named_parameters()}}


def _mesh_batches():
    first = MESH_CONFIG.inputs()
    second = dataclasses.replace(MESH_CONFIG, sparse=False).inputs()  # other values, the same shapes
    return [first, second]


def test_vocab_parallel_inside_data_parallel_on_a_2d_mesh():
    per_rank = run_workers(_mesh_worker, 4)
    module = MESH_CONFIG.module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for kwargs, grad_out in _mesh_batches():
        module(**kwargs).backward(grad_out / 2)  # the mean of the two batches' losses
    optimizer.step()
    for rank, got in enumerate(per_rank):
        start, end = got["vocab_range"]
        torch.testing.assert_close(got["weight"], module.weight.detach()[start:end], msg=lambda m: f"rank {rank}: {m}")
        for name in ("position_weight", "segment_weight"):
            torch.testing.assert_close(got[name], getattr(module, name).detach(), msg=lambda m: f"rank {rank} {name}: {m}")
