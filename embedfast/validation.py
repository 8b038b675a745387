"""Input checks at the API boundary: each failure names the argument and the bad value."""

from __future__ import annotations

import torch

from .spec import INDEX_DTYPES, NORMS, POSITION_ENCODINGS, SINUSOID_LAYOUTS, TABLE_DTYPES


def check_choice(name: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(name: str, value: object, optional: bool = False) -> None:
    if not (optional and value is None) and not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def check_nonnegative_int(name: str, value: object) -> None:
    if not (_is_int(value) and value >= 0):
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def check_position_settings(position: str, sinusoid_layout: str, max_positions: int | None) -> None:
    """The position options the module and the functional form share."""
    check_choice("position", position, POSITION_ENCODINGS)
    check_choice("sinusoid_layout", sinusoid_layout, SINUSOID_LAYOUTS)
    check_positive_int("max_positions", max_positions, optional=True)


def check_norm_settings(norm: str | None, norm_eps: float, dropout_name: str, dropout_p: float) -> None:
    """The norm and dropout options the module and the functional form share."""
    check_choice("norm", norm, (None, *NORMS))
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, (int, float)) or not norm_eps >= 0:
        raise ValueError(f"norm_eps must be a float >= 0, got {norm_eps!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"{dropout_name} must be a float in [0, 1), got {dropout_p!r}")


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
