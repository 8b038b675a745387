"""embedfast on torch.distributed: ``VocabParallelInputEmbedding`` (tensor parallelism over the vocabulary) and
``distributed_data_parallel`` (DDP that takes the sparse token gradient).

Each rank of a process group keeps a contiguous shard of the token table; the position and segment tables are
replicated. Every rank embeds the whole batch in one pass of the fused kernel with its shard's row range (tokens
of other shards add nothing; ids are checked against the whole vocabulary) and adds the position and segment rows
only for its own chunk of each sequence, so one collective sums the shards and adds each position exactly once:
an all-reduce (every rank gets the whole (B, T, D)) or, with ``sequence_parallel``, a reduce-scatter along T (rank
r gets ``[:, r*T/W:(r+1)*T/W]``).

Backward: the collective's adjoint (identity for the all-reduce, whose consumers are replicated; an all-gather
for the reduce-scatter) gives every rank the whole ``grad_out``; the kernel writes the shard's token gradient
(sparse COO with local row indices, or dense ``(end - start, D)``) and the position and segment gradients of the
rank's chunk, which an all-reduce sums, so that the replicated tables get the whole module's gradient on every rank.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.parallel import DistributedDataParallel

from .backends import resolve_backend
from .functional import embed, resolve_settings
from .module import FusedInputEmbedding


# torch 2.14 renamed these (the old names warn); older releases have only the old ones
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def even_split(total: int, parts: int, index: int) -> tuple[int, int]:
    """Part ``index`` ``[start, end)`` of ``range(total)`` cut into ``parts`` contiguous parts whose sizes differ by at
    most one: rank r's ids of the vocabulary, and its chunk of a sequence."""
    return index * total // parts, (index + 1) * total // parts


class VocabParallelInputEmbedding(nn.Module):
    """A ``FusedInputEmbedding`` whose token table is split over the ranks of a process group by rows.

    Build it with ``from_module``. Attributes: ``vocab_range`` (this rank's ids ``[start, end)``), ``weight`` (those
    rows), the replicated ``position_weight`` and ``segment_weight``, ``num_embeddings`` (the whole vocabulary's
    size), and, switchable on a built module, ``sparse`` and ``check_bounds``.
    """

    def __init__(self, module: FusedInputEmbedding, process_group: dist.ProcessGroup | None = None,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        if not isinstance(module, FusedInputEmbedding):
            raise TypeError(f"module must be a FusedInputEmbedding, got {type(module).__name__}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("VocabParallelInputEmbedding needs an initialized torch.distributed process group")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        if module.num_embeddings < self.world_size:
            raise ValueError(f"num_embeddings={module.num_embeddings} is smaller than the world size {self.world_size}: "
                             "a rank would keep no rows")
        self.sequence_parallel = bool(sequence_parallel)
        self.num_embeddings = module.num_embeddings
        self.embedding_dim = module.embedding_dim
        self.padding_idx = module.padding_idx
        self.vocab_range = even_split(module.num_embeddings, self.world_size, self.rank)
        self.backend = module.backend
        settings = resolve_settings(module.weight, module.position, module.position_weight, module.max_positions,
                                    module.sinusoid_layout, module.sinusoid_base, module.embed_scale, module.padding_idx,
                                    module.sparse, module.check_bounds)
        self._settings = dataclasses.replace(settings, vocab_start=self.vocab_range[0], vocab_size=module.num_embeddings)
        start, end = self.vocab_range
        self.weight = nn.Parameter(module.weight.detach()[start:end].clone(), requires_grad=module.weight.requires_grad)
        self.position_weight = _replica(module.position_weight)
        self.segment_weight = _replica(module.segment_weight)

    @property
    def sparse(self) -> bool:
        """Whether ``weight.grad`` is sparse (COO, local row indices) or dense ``(end - start, D)``."""
        return self._settings.sparse

    @sparse.setter
    def sparse(self, value: bool) -> None:
        self._settings = dataclasses.replace(self._settings, sparse=bool(value))

    @property
    def check_bounds(self) -> bool:
        """As ``FusedInputEmbedding.check_bounds``."""
        return self._settings.check_bounds

    @check_bounds.setter
    def check_bounds(self, value: bool) -> None:
        self._settings = dataclasses.replace(self._settings, check_bounds=bool(value))

    @classmethod
    def from_module(cls, module: FusedInputEmbedding, process_group: dist.ProcessGroup | None = None,
                    sequence_parallel: bool = False) -> VocabParallelInputEmbedding:
        """This rank's part of ``module``, which must be the same on every rank of ``process_group`` (default: the
        world). ``sequence_parallel``: ``forward`` returns this rank's chunk of the sequence (a reduce-scatter)
        instead of the whole output (an all-reduce)."""
        return cls(module, process_group, sequence_parallel)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, *, past_length: int = 0) -> torch.Tensor:
        """Embed ``input_ids`` ``(*, T)``, the same on every rank: ``(*, T, D)``, or with ``sequence_parallel`` this
        rank's chunk ``(*, T / world_size, D)`` of it."""
        if input_ids.dim() == 0:
            raise ValueError("input_ids must have a sequence dimension (shape (*, T)), got a 0-d tensor")
        seq_len = input_ids.shape[-1]
        if self.sequence_parallel and seq_len % self.world_size:
            raise ValueError(f"sequence_parallel needs the sequence length T={seq_len} to be divisible by the world "
                             f"size {self.world_size}")
        # this rank's columns of the position and segment terms (an empty sequence has no columns to split)
        chunk = even_split(seq_len, self.world_size, self.rank) if seq_len else (0, -1)
        partial = embed(resolve_backend(self.backend, self.weight.device), self._settings, input_ids, self.weight,
                        _ReduceGradient.wrap(self.position_weight, self.process_group),
                        _ReduceGradient.wrap(self.segment_weight, self.process_group), token_type_ids, position_ids,
                        past_length, None, 0, chunk)
        if self.sequence_parallel:
            return _ReduceScatterSequence.apply(partial, self.process_group)
        return _AllReduceSum.apply(partial, self.process_group)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, vocab_range={self.vocab_range}, rank={self.rank}/"
                f"{self.world_size}, sequence_parallel={self.sequence_parallel}")


def _replica(table: nn.Parameter | None) -> nn.Parameter | None:
    return None if table is None else nn.Parameter(table.detach().clone(), requires_grad=table.requires_grad)


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over the group. Backward: the identity, since every rank's consumers of the sum are the
    same computation (Megatron's reduce-from-tensor-parallel region)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        dist.all_reduce(partial, group=group)  # in place: the operator's output, contiguous, nobody else's
        ctx.mark_dirty(partial)
        return partial

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Forward: the sum over the group of ``(*, T, D)``, rank r keeping columns ``[r*T/W, (r+1)*T/W)`` of T.
    Backward: the all-gather of the chunks' gradients. The collectives need each rank's chunk contiguous: the
    partial sum is copied to (T, B, D) order (no copy when B is 1) and the chunk back to (B, T / W, D)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group) -> torch.Tensor:
        ctx.group, ctx.shape = group, partial.shape
        world = dist.get_world_size(group)
        *lead, seq_len, dim = partial.shape
        by_position = partial.reshape(-1, seq_len, dim).transpose(0, 1).contiguous()  # (T, B, D): chunks are contiguous
        chunk = by_position.new_empty(seq_len // world, *by_position.shape[1:])
        _reduce_scatter(chunk, by_position, group=group)
        out = chunk.new_empty(*lead, seq_len // world, dim)  # a tensor of its own, not a view: in-place ops work
        out.view(-1, seq_len // world, dim).copy_(chunk.transpose(0, 1))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        *lead, seq_len, dim = ctx.shape
        chunk = grad.reshape(-1, grad.shape[-2], dim).transpose(0, 1).contiguous()
        whole = chunk.new_empty(seq_len, *chunk.shape[1:])
        _all_gather(whole, chunk, group=ctx.group)
        return whole.transpose(0, 1).reshape(ctx.shape), None


class _ReduceGradient(torch.autograd.Function):
    """Forward: the identity. Backward: the sum of the gradient over the group (Megatron's copy-to-tensor-parallel
    region): each rank's kernel sums the position and segment gradients of its own chunk only."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return table.view_as(table)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None

    @classmethod
    def wrap(cls, table: torch.Tensor | None, group) -> torch.Tensor | None:
        if table is None or not (table.requires_grad and torch.is_grad_enabled()):
            return table
        return cls.apply(table, group)


def distributed_data_parallel(model: nn.Module, **kwargs) -> DistributedDataParallel:
    """``DistributedDataParallel(model, **kwargs)`` that also averages the sparse token gradients of the model's
    ``FusedInputEmbedding`` and ``VocabParallelInputEmbedding`` modules with ``sparse=True`` over the ranks of its
    process group, as DDP does for ``nn.Embedding(sparse=True)``.

    DDP expects a sparse gradient only from ``nn.Embedding`` and ``nn.EmbeddingBag`` (it decides by module type), so
    plain ``DistributedDataParallel(model)`` fails in backward on any other module's sparse gradient ("Cannot
    access storage of SparseTensorImpl"). Here DDP leaves those token tables out; they are broadcast from the
    group's first rank once (as DDP does with its parameters, unless ``init_sync=False``), and each one's gradient
    is all-reduced and divided by the world size as soon as backward has accumulated it, unless the forward ran
    under ``no_sync()`` (the accumulated gradient is then reduced after the next synchronizing backward). As with
    DDP's own parameters, every rank must use every such table in every step. Sparse gradients need a process group
    that all-reduces sparse tensors: gloo, not NCCL. Every other parameter, the dense position and segment tables
    included, is DDP's as usual. Wrap a model once.
    """
    sparse_tables = {f"{name}.weight" if name else "weight": module.weight for name, module in model.named_modules()
                     if isinstance(module, (FusedInputEmbedding, VocabParallelInputEmbedding)) and module.sparse
                     and module.weight.requires_grad}
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ())) | set(sparse_tables)
    if "weight" in sparse_tables:  # DDP names the root module's own parameters ".weight" in one place, "weight" in another
        ignored.add(".weight")
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored))
    ddp = DistributedDataParallel(model, **kwargs)
    group = ddp.process_group
    on_nccl = [name for name, table in sparse_tables.items() if table.is_cuda and "nccl" in str(dist.get_backend(group))]
    if on_nccl:
        raise ValueError(f"the token tables {on_nccl} have sparse gradients (sparse=True), which NCCL cannot all-reduce: "
                         "build them with sparse=False, or use a gloo process group")
    if kwargs.get("init_sync", True):
        with torch.no_grad():
            for table in sparse_tables.values():
                dist.broadcast(table, src=dist.get_global_rank(group, 0), group=group)
    # DDP decides at forward time whether the coming backward synchronizes (no_sync() around the forward)
    synchronize = {"next_backward": True}
    ddp.register_forward_pre_hook(lambda module, inputs: synchronize.update(next_backward=module.require_backward_grad_sync))
    world_size = dist.get_world_size(group)

    def average(table: torch.Tensor) -> None:
        if synchronize["next_backward"]:
            dist.all_reduce(table.grad.div_(world_size), group=group)

    for table in sparse_tables.values():
        table.register_post_accumulate_grad_hook(average)
    return ddp
