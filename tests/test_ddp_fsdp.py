"""DDP and FSDP2 with the plain FusedInputEmbedding, in real process groups (tests/distributed.py): three training
steps at world size 2 give every rank the losses and parameters of one process training the same model on both
ranks' batches (loss: the mean of the ranks' mean losses, as DDP averages gradients over ranks).

On the CPU: gloo over loopback. Each test spawns its processes once and trains there with every backend that can
run (``embedfast.available_backends``); the single-process runs are in the test's own process. On CUDA (``-m gpu``,
two GPUs or skipped): NCCL, rank r on cuda:r.

Upstream facts these tests pin (torch 2.14):
- DDP decides which parameters get sparse gradients by module type: only ``nn.Embedding`` / ``nn.EmbeddingBag`` with
  ``sparse=True`` (``DistributedDataParallel._build_params_for_reducer``). Any other module's sparse gradient lands in
  a dense bucket and backward fails ("Cannot access storage of SparseTensorImpl"): the sparse tests train through
  ``embedfast.parallel.distributed_data_parallel``, which reduces those gradients itself.
- gloo all-reduces sparse COO tensors, an empty one (a rank whose tokens are all padding) included; NCCL raises
  "NCCL does not support all_reduce with sparse tensors".
- FSDP2 (``fully_shard``) runs on CPU tensors with gloo; it reduce-scatters dense flat buffers, so no sparse gradients
  (``fsdp::chunk_cat`` has no SparseCPU kernel).
"""

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import embedfast
from distributed import run_workers
from embedfast.parallel import distributed_data_parallel

VOCAB, DIM, PAD, POSITIONS, SEGMENTS, OUT = 21, 8, 1, 12, 2, 3
WORLD, BATCH, SEQ_LEN, STEPS = 2, 2, 5, 3
PADDING_RANK, PADDING_STEPS = 1, (0, 2)  # steps at which rank 1's whole batch is padding (the first one included)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)  # float32: the same sums in another order at most
NCCL_SPARSE = "NCCL does not support all_reduce with sparse tensors"

GLOO = pytest.param("gloo", id="gloo")
NCCL = pytest.param("nccl", id="nccl", marks=pytest.mark.gpu)


def device_of(group_backend, rank=0):
    return torch.device("cpu") if group_backend == "gloo" else torch.device("cuda", rank)


def backends_for(group_backend):
    """The embedfast backends to train with; skips the NCCL tests without two GPUs."""
    if group_backend == "nccl" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"NCCL tests need {WORLD} CUDA devices, {torch.cuda.device_count()} visible")
    return embedfast.available_backends(device_of(group_backend))


class Model(nn.Module):
    """The embedding (learned positions, segments, a padding id) and a linear head: parameters DDP buckets as dense."""

    def __init__(self, backend, sparse, device):
        super().__init__()
        torch.manual_seed(0)  # the same tables for every backend, rank and the single process
        self.embed = embedfast.FusedInputEmbedding(
            VOCAB, DIM, padding_idx=PAD, num_segments=SEGMENTS, position="learned", max_positions=POSITIONS,
            sparse=sparse, backend=backend, device=device)
        self.head = nn.Linear(DIM, OUT, device=device)

    def forward(self, input_ids, token_type_ids):
        return self.head(self.embed(input_ids, token_type_ids))


def batches(all_padding):
    """STEPS batches of (ids, token types, targets), each (WORLD, BATCH, SEQ_LEN, ...): rank r's are [r]. Every row
    ends in padding; with ``all_padding``, rank PADDING_RANK's batch is nothing but padding at PADDING_STEPS."""
    generator = torch.Generator().manual_seed(1)
    steps = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (WORLD, BATCH, SEQ_LEN), generator=generator)
        ids[..., -1] = PAD
        if all_padding and step in PADDING_STEPS:
            ids[PADDING_RANK] = PAD
        types = torch.randint(0, SEGMENTS, ids.shape, generator=generator)
        targets = torch.randn(*ids.shape, OUT, generator=generator)
        steps.append((ids, types, targets))
    return steps


def rank_loss(model, batch, rank, device):
    ids, types, targets = (t[rank].to(device) for t in batch)
    return (model(ids, types) - targets).square().mean()


def optimizer_for(model, sparse):
    # SGD takes sparse gradients; Adam's per-element steps show any gradient that differs
    return torch.optim.SGD(model.parameters(), lr=0.5) if sparse else torch.optim.Adam(model.parameters(), lr=1e-2)


def train_worker(rank, world_size, wrapper, group_backend, sparse, all_padding, backends):
    """Rank ``rank``'s training with each backend: {backend: (losses, parameters, weight.grad layouts)}."""
    device = device_of(group_backend, rank)
    results = {}
    for backend in backends:
        model = Model(backend, sparse, device)
        if wrapper == "ddp":
            wrapped = DistributedDataParallel(model)
        elif wrapper == "embedfast-ddp":
            wrapped = distributed_data_parallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(device.type, (world_size,))
            fully_shard(model.embed, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        optimizer = optimizer_for(model, sparse)
        losses, layouts = [], []
        for batch in batches(all_padding):
            loss = rank_loss(wrapped, batch, rank, device)
            loss.backward()
            if wrapper != "fsdp2":
                layouts.append(model.embed.weight.grad.layout)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        if wrapper == "fsdp2":
            params = {name: p.full_tensor().detach().cpu() for name, p in model.named_parameters()}
        else:
            params = {name: p.detach().cpu() for name, p in model.named_parameters()}
        results[backend] = (torch.stack(losses).cpu(), params, layouts)
    return results


def train_single_process(backend, sparse, all_padding, device):
    """One process, both ranks' batches: (initial parameters, losses (STEPS, WORLD), final parameters)."""
    model = Model(backend, sparse, device)
    initial = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    optimizer = optimizer_for(model, sparse)
    losses = []
    for batch in batches(all_padding):
        per_rank = torch.stack([rank_loss(model, batch, rank, device) for rank in range(WORLD)])
        per_rank.mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(per_rank.detach())
    return initial, torch.stack(losses).cpu(), {name: p.detach().cpu() for name, p in model.named_parameters()}


def assert_matches_single_process(results, sparse, all_padding, group_backend):
    device = device_of(group_backend)
    for backend in results[0]:
        initial, expected_losses, expected = train_single_process(backend, sparse, all_padding, device)
        for name, table in expected.items():
            assert not torch.equal(table, initial[name]), f"{backend}: {name} did not train"
        assert not expected["embed.weight"][PAD].any(), f"{backend}: the padding row trained"
        for rank, by_backend in enumerate(results):
            losses, params, layouts = by_backend[backend]
            where = f"{backend}, rank {rank}"
            torch.testing.assert_close(losses, expected_losses[:, rank], **TOLERANCE,
                                       msg=lambda m: f"{where}, losses: {m}")
            assert sorted(params) == sorted(expected), where
            for name, table in expected.items():
                torch.testing.assert_close(params[name], table, **TOLERANCE, msg=lambda m: f"{where}, {name}: {m}")
            if layouts:
                assert layouts == [torch.sparse_coo if sparse else torch.strided] * STEPS, f"{where}: {layouts}"


@pytest.mark.parametrize("all_padding", [False, True], ids=["padded-rows", "all-padding-rank"])
def test_ddp_sparse_gradients_match_single_process(all_padding):
    """embedfast.parallel.distributed_data_parallel(model) with sparse=True on gloo; with all_padding one rank's sparse
    gradient is empty at two steps."""
    backends = backends_for("gloo")
    results = run_workers(train_worker, WORLD, "embedfast-ddp", "gloo", True, all_padding, backends)
    assert_matches_single_process(results, True, all_padding, "gloo")


@pytest.mark.parametrize("group_backend", [GLOO, NCCL])
def test_ddp_dense_gradients_match_single_process(group_backend):
    """sparse=False, Adam; one rank's batch is all padding at two steps."""
    backends = backends_for(group_backend)
    results = run_workers(train_worker, WORLD, "ddp", group_backend, False, True, backends, backend=group_backend)
    assert_matches_single_process(results, False, True, group_backend)


@pytest.mark.parametrize("group_backend", [GLOO, NCCL])
def test_fsdp2_dense_gradients_match_single_process(group_backend):
    """fully_shard on the embedding and on the model, sparse=False, Adam: every table sharded in two (the token
    table's 21 rows and the head's 3 unevenly), one rank's batch all padding at two steps."""
    backends = backends_for(group_backend)
    results = run_workers(train_worker, WORLD, "fsdp2", group_backend, False, True, backends, backend=group_backend)
    assert_matches_single_process(results, False, True, group_backend)


def nccl_sparse_worker(rank, world_size, backend):
    model = Model(backend, True, device_of("nccl", rank))
    model(torch.tensor([[2, 3]], device=model.head.weight.device), None).sum().backward()
    messages = []
    for call in (lambda: dist.all_reduce(model.embed.weight.grad), lambda: distributed_data_parallel(model)):
        try:
            call()
            messages.append(None)
        except Exception as error:  # noqa: BLE001  (the message is the result)
            messages.append(str(error))
    return messages


@pytest.mark.gpu
def test_nccl_refuses_the_sparse_token_gradient():
    """Sparse gradients need gloo: NCCL raises on a sparse all-reduce, distributed_data_parallel says so up front."""
    (backend, *_) = backends_for("nccl")
    for raw, wrapped in run_workers(nccl_sparse_worker, WORLD, backend, backend="nccl"):
        assert raw is not None and NCCL_SPARSE in raw
        assert wrapped is not None and "which NCCL cannot all-reduce" in wrapped
