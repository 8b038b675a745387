"""Input checks at the API boundary: each failure names the argument and the bad value."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

INDEX_DTYPES = (torch.int32, torch.int64)
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
POSITION_MODES = ("sinusoidal", "learned", "none")


def exact_checks(check_bounds: bool, ids: torch.Tensor) -> bool:
    """Whether index ranges are checked exactly (read back, ``IndexError``) rather than by a
    device-side assertion: always on CPU; on CUDA when ``check_bounds`` and no graph is being captured."""
    if is_fake(ids):
        return False  # traced by torch.compile: there are no values to read
    if ids.device.type != "cuda":
        return True
    return check_bounds and not torch.cuda.is_current_stream_capturing()


def check_index_range(name: str, ids: torch.Tensor, bound: int | None, exact: bool = True) -> None:
    """Every element of ``ids`` must lie in ``[0, bound)`` (``[0, inf)`` if None).

    ``exact``: read the values and raise ``IndexError`` naming the bad one (on CUDA a host
    synchronization). Otherwise a device-side assertion in the stream: no synchronization,
    CUDA-graph safe, and what ``torch.compile`` traces.
    """
    if ids.numel() == 0:
        return
    if not exact:
        valid = ids >= 0 if bound is None else (ids >= 0) & (ids < bound)
        torch._assert_async(valid.all(), f"{name} contains an index out of range [0, {bound})")
        return
    low, high = torch.aminmax(ids)
    low, high = int(low), int(high)
    if low < 0:
        raise IndexError(f"{name} contains {low}: indices must be >= 0")
    if bound is not None and high >= bound:
        raise IndexError(f"{name} contains {high}, out of range for a table of {bound} rows (valid: 0..{bound - 1})")


def check_index_tensor(name: str, ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got dtype {ids.dtype}")


def check_table(name: str, table: torch.Tensor, weight: torch.Tensor | None = None) -> None:
    """A 2-D floating table; with ``weight`` given, also its dim, dtype and device must match."""
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, embedding_dim), got shape {tuple(table.shape)}")
    if table.dtype not in TABLE_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got dtype {table.dtype}")
    if weight is None:
        return
    if table.shape[1] != weight.shape[1]:
        raise ValueError(f"{name} has embedding_dim {table.shape[1]}, but weight has {weight.shape[1]}")
    if table.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {table.dtype}, but weight has {weight.dtype}")
    if table.device != weight.device:
        raise ValueError(f"{name} is on {table.device}, but weight is on {weight.device}")


def check_same_device(name: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    if tensor.device != weight.device:
        raise ValueError(f"{name} is on {tensor.device}, but weight is on {weight.device}")


def check_broadcastable(name: str, ids: torch.Tensor, shape: torch.Size) -> None:
    # the same rule as torch.broadcast_shapes(ids.shape, shape) == shape, without its cost (~50 us a call)
    fits = ids.dim() <= len(shape) and all(size in (1, full) for size, full in zip(reversed(ids.shape), reversed(shape)))
    if not fits:
        raise ValueError(f"{name} has shape {tuple(ids.shape)}, which does not broadcast to input_ids' shape {tuple(shape)}")


def normalize_padding_idx(padding_idx: int | None, num_embeddings: int) -> int:
    """nn.Embedding's rule: ``padding_idx`` in ``[-num_embeddings, num_embeddings)``; -1 means none."""
    if padding_idx is None:
        return -1
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


def resolve_scale(scale: str | float | None, embedding_dim: int) -> float:
    """``"sqrt"`` -> ``sqrt(embedding_dim)``, ``None`` -> 1.0, a number -> itself."""
    if scale is None:
        return 1.0
    if isinstance(scale, str):
        if scale != "sqrt":
            raise ValueError(f"scale must be 'sqrt', a float or None, got {scale!r}")
        return float(embedding_dim) ** 0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be 'sqrt', a float or None, got {scale!r}")
    return float(scale)


def check_forward_indices(
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    position_ids: torch.Tensor | None,
    position_weight: torch.Tensor | None,
    max_positions: int,
    token_type_ids: torch.Tensor | None,
    segment_weight: torch.Tensor | None,
    check_bounds: bool,
) -> None:
    """The index values the forward reads rows with, each against its table (see ``check_index_range``)."""
    exact = exact_checks(check_bounds, input_ids)
    check_index_range("input_ids", input_ids, weight.shape[0], exact)
    if position_ids is not None:
        bound = position_weight.shape[0] if position_weight is not None else max_positions
        check_index_range("position_ids", position_ids, bound if bound > 0 else None, exact)
    if token_type_ids is not None:
        check_index_range("token_type_ids", token_type_ids, segment_weight.shape[0], exact)
