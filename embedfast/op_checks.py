"""The checks the Python implementations of the operators (reference, Triton) make before they read a value.

``csrc/include/embedfast/checks.h`` makes the same checks, with the same messages, for the C++ operators;
``tests/test_op_checks.py`` runs each bad operator input through every backend and compares the messages.
Shapes print as lists and dtypes by their short names, as the C++ side prints them.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

from .spec import INDEX_DTYPES, BackwardInputs, ForwardInputs, NormBackwardInputs, NormInputs, NormMode, PositionMode, TokenGrad


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _choices(enum) -> str:
    names = [f"{m.value} ({m.name.lower()})" for m in enum]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check(condition: bool, error: type[Exception], message: str) -> None:
    if not condition:
        raise error(message)


def exact_checks(check_bounds: bool, ids: torch.Tensor) -> bool:
    """Whether index values are checked exactly (read back, ``IndexError``) rather than by a device-side
    assertion: always on CPU; on CUDA when ``check_bounds`` and no graph is being captured."""
    if is_fake(ids):
        return False  # traced by torch.compile: there are no values to read
    if ids.device.type != "cuda":
        return True
    return check_bounds and not torch.cuda.is_current_stream_capturing()


def check_index_range(name: str, ids: torch.Tensor, bound: int, exact: bool) -> None:
    """Every element of ``ids`` must lie in ``[0, bound)`` (``bound <= 0``: no upper bound).

    ``exact``: read the values and raise ``IndexError`` naming the bad one (on CUDA a host synchronization).
    Otherwise a device-side assertion in the stream: no synchronization, CUDA-graph safe, what compile traces.
    """
    if ids.numel() == 0:
        return
    if not exact:
        valid = ids >= 0 if bound <= 0 else (ids >= 0) & (ids < bound)
        torch._assert_async(valid.all(), f"{name} contains an index out of range (check_bounds=False)")
        return
    low, high = (int(v) for v in torch.aminmax(ids))
    _check(low >= 0, IndexError, f"{name} contains {low}: indices must be >= 0")
    _check(bound <= 0 or high < bound, IndexError,
           f"{name} contains {high}, out of range for a table of {bound} rows (valid: 0..{bound - 1})")


def _check_index_tensor(name: str, ids: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    _check(ids.dtype in INDEX_DTYPES, TypeError, f"{name} must be int32 or int64, got dtype {_dtype(ids)}")
    _check(ids.dim() == 1 and ids.is_contiguous(), ValueError,
           f"{name} must be a contiguous 1-D tensor, got shape {list(ids.shape)} and strides {list(ids.stride())}")
    _check(ids.device == like.device, ValueError, f"{name} is on {ids.device}, but {like_name} is on {like.device}")


def _check_optional_index(name: str, ids: torch.Tensor | None, input_ids: torch.Tensor, like: torch.Tensor,
                          like_name: str, per_token: bool = True) -> None:
    if ids is None:
        return
    _check_index_tensor(name, ids, like, like_name)
    if per_token:
        _check(ids.numel() == input_ids.numel(), ValueError,
               f"{name} has {ids.numel()} elements, but input_ids has {input_ids.numel()}")
    _check(ids.dtype == input_ids.dtype, TypeError, f"{name} has dtype {_dtype(ids)}, but input_ids has {_dtype(input_ids)}")


def _check_table(name: str, table: torch.Tensor | None, weight: torch.Tensor) -> None:
    if table is None:
        return
    _check(table.dim() == 2 and table.is_contiguous(), ValueError,
           f"{name} must be a contiguous 2-D table, got shape {list(table.shape)} and strides {list(table.stride())}")
    _check(table.shape[1] == weight.shape[1], ValueError,
           f"{name} has embedding_dim {table.shape[1]}, but weight has {weight.shape[1]}")
    _check(table.dtype == weight.dtype, TypeError, f"{name} has dtype {_dtype(table)}, but weight has {_dtype(weight)}")
    _check(table.device == weight.device, ValueError, f"{name} is on {table.device}, but weight is on {weight.device}")


def _check_position_source(position_ids, cu_seqlens, input_ids, like, like_name: str, position_offset: int,
                           seq_len: int, bound: int, exact: bool) -> None:
    """The positions tokens get (see ``spec.py``) must stay inside a table of ``bound`` rows (0: unbounded)."""
    _check_optional_index("position_ids", position_ids, input_ids, like, like_name)
    _check_optional_index("cu_seqlens", cu_seqlens, input_ids, like, like_name, per_token=False)
    _check(position_offset >= 0, ValueError, f"position_offset must be >= 0, got {position_offset}")
    num_tokens = input_ids.numel()
    if position_ids is not None:
        _check(cu_seqlens is None, ValueError, "position_ids and cu_seqlens were both given: packed documents number "
               "their own positions")
        check_index_range("position_ids", position_ids, bound, exact)
    elif cu_seqlens is not None:
        _check_documents(cu_seqlens, num_tokens, position_offset, bound, exact)
    elif num_tokens > 0:
        _check(seq_len > 0, ValueError, f"seq_len must be > 0, got {seq_len}")
        last = position_offset + min(seq_len, num_tokens) - 1
        _check(bound <= 0 or last < bound, IndexError, f"positions reach {last} (position_offset={position_offset}, "
               f"seq_len={seq_len}), out of range for max_positions={bound}")


def _check_documents(cu_seqlens: torch.Tensor, num_tokens: int, position_offset: int, bound: int, exact: bool) -> None:
    """``cu_seqlens`` is ``[0, l1, l1 + l2, ..., num_tokens]``; the longest document's last position is in range."""
    _check(cu_seqlens.numel() > 0, ValueError, "cu_seqlens must hold at least one boundary ([0] for no tokens), got none")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if not exact:
        valid = (cu_seqlens[0] == 0) & (cu_seqlens[-1] == num_tokens) & (lengths >= 0).all()
        if bound > 0 and lengths.numel() > 0:
            valid = valid & (position_offset + lengths.max() <= bound)
        torch._assert_async(valid, "cu_seqlens is not a valid [0, ..., num_tokens] boundary list in range "
                                   "(check_bounds=False)")
        return
    first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
    _check(first == 0, ValueError, f"cu_seqlens must start at 0, got {first}")
    if lengths.numel() > 0:
        shortest = int(lengths.min())
        if shortest < 0:
            i = int(torch.argmin(lengths))
            raise ValueError(f"cu_seqlens must not decrease, got cu_seqlens[{i}] = {int(cu_seqlens[i])} > "
                             f"cu_seqlens[{i + 1}] = {int(cu_seqlens[i + 1])}")
    _check(last == num_tokens, ValueError, f"cu_seqlens must end at the number of tokens, {num_tokens}, got {last}")
    longest = int(lengths.max()) if lengths.numel() > 0 else 0
    last_position = position_offset + longest - 1
    _check(bound <= 0 or longest == 0 or last_position < bound, IndexError,
           f"positions reach {last_position} (position_offset={position_offset}, longest document {longest}), out of "
           f"range for max_positions={bound}")


def check_shard(vocab_start: int, vocab_size: int, rows: int) -> int:
    """A shard of ``rows`` rows starting at id ``vocab_start`` fits in a vocabulary of ``vocab_size`` ids (0: the
    rows are the whole vocabulary); the bound ids are checked against."""
    _check(vocab_start >= 0, ValueError, f"vocab_start must be >= 0, got {vocab_start}")
    _check(vocab_size >= 0, ValueError, f"vocab_size must be >= 0 (0: the table is the whole vocabulary), got {vocab_size}")
    if vocab_size == 0:
        _check(vocab_start == 0, ValueError, f"vocab_start={vocab_start} needs vocab_size (the ids of the whole vocabulary)")
        return rows
    _check(vocab_start + rows <= vocab_size, ValueError,
           f"the shard's rows [{vocab_start}, {vocab_start + rows}) do not fit in vocab_size={vocab_size}")
    return vocab_size


def check_chunk(chunk_start: int, chunk_end: int, seq_len: int) -> None:
    """The sequence chunk ``[chunk_start, chunk_end)`` (-1: to seq_len) lies within ``[0, seq_len]``."""
    if chunk_start == 0 and chunk_end == -1:
        return
    stop = seq_len if chunk_end == -1 else chunk_end
    _check(seq_len > 0 and 0 <= chunk_start <= stop <= seq_len and chunk_end >= -1, ValueError,
           f"the chunk [chunk_start, chunk_end) = [{chunk_start}, {chunk_end}) must lie in [0, seq_len={seq_len}]")


def check_forward(inputs: ForwardInputs) -> PositionMode:
    """The forward's checks (those of ``check_forward_args`` in checks.h); the position mode."""
    weight, input_ids = inputs.weight, inputs.input_ids
    _check(weight.dim() == 2 and weight.is_contiguous(), ValueError,
           f"weight must be a contiguous 2-D table, got shape {list(weight.shape)} and strides {list(weight.stride())}")
    _check_index_tensor("input_ids", input_ids, weight, "weight")
    _check_optional_index("token_type_ids", inputs.token_type_ids, input_ids, weight, "weight")
    _check(inputs.position_mode in PositionMode.__members__.values(), ValueError,
           f"position_mode must be {_choices(PositionMode)}, got {inputs.position_mode}")
    mode = PositionMode(inputs.position_mode)
    _check((mode == PositionMode.LEARNED) == (inputs.position_weight is not None), ValueError,
           f"position_weight must be given exactly when position_mode is {PositionMode.LEARNED.value} (learned), "
           f"got {mode.value}")
    _check_table("position_weight", inputs.position_weight, weight)
    _check_table("segment_weight", inputs.segment_weight, weight)
    _check(inputs.segment_weight is not None or inputs.token_type_ids is None, ValueError,
           "token_type_ids were given, but there is no segment table")
    vocab_bound = check_shard(inputs.vocab_start, inputs.vocab_size, weight.shape[0])
    check_chunk(inputs.chunk_start, inputs.chunk_end, inputs.seq_len)
    exact = exact_checks(inputs.check_bounds, input_ids)
    check_index_range("input_ids", input_ids, vocab_bound, exact)
    if mode != PositionMode.NONE:
        bound = inputs.position_weight.shape[0] if mode == PositionMode.LEARNED else inputs.max_positions
        _check_position_source(inputs.position_ids, inputs.cu_seqlens, input_ids, weight, "weight",
                               inputs.position_offset, inputs.seq_len, bound, exact)
    if inputs.token_type_ids is not None:
        check_index_range("token_type_ids", inputs.token_type_ids, inputs.segment_weight.shape[0], exact)
    return mode


def check_backward(inputs: BackwardInputs) -> TokenGrad:
    """The backward's checks (those of ``check_backward_args`` in checks.h); the token gradient's kind."""
    grad_out, input_ids = inputs.grad_out, inputs.input_ids
    _check(grad_out.dim() == 2 and grad_out.is_contiguous() and grad_out.shape[0] == input_ids.numel(), ValueError,
           f"grad_out must be a contiguous (num_tokens, embedding_dim) tensor, got shape {list(grad_out.shape)} and "
           f"strides {list(grad_out.stride())}")
    _check_index_tensor("input_ids", input_ids, grad_out, "grad_out")
    _check_optional_index("token_type_ids", inputs.token_type_ids, input_ids, grad_out, "grad_out")
    _check(inputs.token_grad in TokenGrad.__members__.values(), ValueError,
           f"token_grad must be {_choices(TokenGrad)}, got {inputs.token_grad}")
    _check(inputs.num_embeddings > 0 and inputs.num_positions >= 0 and inputs.num_segments >= 0, ValueError,
           f"table sizes must be positive, got num_embeddings={inputs.num_embeddings}, num_positions="
           f"{inputs.num_positions}, num_segments={inputs.num_segments}")
    token_grad = TokenGrad(inputs.token_grad)
    vocab_bound = check_shard(inputs.vocab_start, inputs.vocab_size, inputs.num_embeddings)
    check_chunk(inputs.chunk_start, inputs.chunk_end, inputs.seq_len)
    exact = exact_checks(inputs.check_bounds, input_ids)
    if token_grad == TokenGrad.DENSE:
        check_index_range("input_ids", input_ids, vocab_bound, exact)
    if inputs.num_positions > 0:
        _check_position_source(inputs.position_ids, inputs.cu_seqlens, input_ids, grad_out, "grad_out",
                               inputs.position_offset, inputs.seq_len, inputs.num_positions, exact)
    if inputs.num_segments > 0 and inputs.token_type_ids is not None:
        check_index_range("token_type_ids", inputs.token_type_ids, inputs.num_segments, exact)
    return token_grad


def _check_norm_parameter(name: str, parameter: torch.Tensor | None, weight: torch.Tensor) -> None:
    if parameter is None:
        return
    _check(parameter.dim() == 1 and parameter.is_contiguous() and parameter.shape[0] == weight.shape[1], ValueError,
           f"{name} must be a contiguous ({weight.shape[1]},) vector (embedding_dim), got shape {list(parameter.shape)}")
    _check(parameter.dtype == weight.dtype, TypeError, f"{name} has dtype {_dtype(parameter)}, but weight has {_dtype(weight)}")
    _check(parameter.device == weight.device, ValueError, f"{name} is on {parameter.device}, but weight is on {weight.device}")


def check_norm(inputs: ForwardInputs, norm: NormInputs) -> NormMode:
    """The norm operators' checks of their epilogue (those of ``check_norm_args`` in checks.h); the norm mode."""
    weight = inputs.weight
    _check(norm.norm_mode in NormMode.__members__.values(), ValueError,
           f"norm_mode must be {_choices(NormMode)}, got {norm.norm_mode}")
    mode = NormMode(norm.norm_mode)
    _check(mode != NormMode.NONE or (norm.norm_weight is None and norm.norm_bias is None), ValueError,
           f"norm_weight and norm_bias need a norm, but norm_mode is {mode.value} (none)")
    _check(mode != NormMode.RMSNORM or norm.norm_bias is None, ValueError,
           f"norm_bias was given, but norm_mode is {mode.value} (rmsnorm), which has no bias")
    _check_norm_parameter("norm_weight", norm.norm_weight, weight)
    _check_norm_parameter("norm_bias", norm.norm_bias, weight)
    _check(norm.norm_eps >= 0, ValueError, f"norm_eps must be >= 0, got {norm.norm_eps}")
    _check(0 <= norm.dropout_p < 1, ValueError, f"dropout_p must be in [0, 1), got {norm.dropout_p}")
    seed = norm.dropout_seed
    if norm.dropout_p > 0:
        _check(seed is not None, ValueError, "dropout_p > 0 needs dropout_seed (a 1-element int64 tensor)")
    if seed is not None:
        _check(seed.dtype == torch.int64 and seed.numel() == 1, TypeError,
               f"dropout_seed must be a 1-element int64 tensor, got dtype {_dtype(seed)} and shape {list(seed.shape)}")
        _check(seed.device == weight.device, ValueError, f"dropout_seed is on {seed.device}, but weight is on {weight.device}")
    return mode


def check_norm_backward(inputs: NormBackwardInputs) -> None:
    """``token_grad`` is a ``TokenGrad``, ``grad_out`` and ``stats`` fit the tokens (the rest is checked as the norm
    forward's inputs)."""
    _check(inputs.token_grad in TokenGrad.__members__.values(), ValueError,
           f"token_grad must be {_choices(TokenGrad)}, got {inputs.token_grad}")
    weight, num_tokens = inputs.weight, inputs.input_ids.numel()
    dim = weight.shape[1] if weight.dim() == 2 else -1
    _check(inputs.grad_out.shape == (num_tokens, dim) and inputs.grad_out.is_contiguous(), ValueError,
           f"grad_out must be a contiguous ({num_tokens}, {dim}) tensor, got shape {list(inputs.grad_out.shape)}")
    _check(inputs.grad_out.dtype == weight.dtype, TypeError,
           f"grad_out has dtype {_dtype(inputs.grad_out)}, but weight has {_dtype(weight)}")
    stats_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    stats_name = str(stats_dtype).removeprefix("torch.")
    _check(inputs.stats.shape == (num_tokens, 2) and inputs.stats.is_contiguous() and inputs.stats.dtype == stats_dtype,
           ValueError, f"stats must be a contiguous ({num_tokens}, 2) {stats_name} tensor "
           f"(the norm forward's), got shape {list(inputs.stats.shape)} and dtype {_dtype(inputs.stats)}")
