"""The embedfast operators: schemas (declared here, once), fake kernels and autograd.

Every backend implements the same two operators under its own name, ``embedfast::forward_<backend>``
and ``embedfast::backward_<backend>``, so each backend can be picked explicitly on any device
while the dispatcher still chooses CPU or CUDA code by tensor device. All tensors are flattened
to tokens by ``functional.py``; ``N`` tokens, ``D = embedding_dim``.

forward: ``out[n] = weight[ids[n]] * scale + P[pos[n]] + segment_weight[seg[n]]``, shape (N, D).
  position:  "none" | "learned" (P = position_weight) | "interleaved" | "concat" (sinusoids).
  position_ids None: pos[n] = past_length + n % seq_len.  token_type_ids None: seg[n] = 0.
  max_positions: bound the positions are checked against (0: none).
  padding_idx (-1: none) and sparse only shape the backward.
  check_bounds: index values are checked against their tables either way; True: exactly, raising an
    IndexError that names the bad value (reads the ids back: a host synchronization on CUDA); False on
    CUDA: by a device-side assertion instead (no synchronization, CUDA-graph safe). CPU always checks exactly.

backward: one pass over grad_out, returns (token_grad, position_grad, segment_grad):
  token_grad "sparse": (N, D) values grad_out * scale (asked for only without padding: with a padding_idx,
             ``embedfast::sparse_rows`` gathers the non-padding rows instead);
             "dense":  (num_embeddings, D), the padding row zero; "none": (0, D).
  position_grad (num_positions, D), segment_grad (num_segments, D); 0 rows when not wanted.
"""

from __future__ import annotations

import torch

FORWARD_SCHEMA = (
    "(Tensor input_ids, Tensor weight, Tensor? position_ids, Tensor? position_weight, "
    "Tensor? token_type_ids, Tensor? segment_weight, float scale, str position, float sinusoid_base, "
    "int max_positions, int past_length, int seq_len, int padding_idx, bool sparse, bool check_bounds) -> Tensor"
)
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor input_ids, Tensor? position_ids, Tensor? token_type_ids, str token_grad, "
    "int num_embeddings, int padding_idx, float scale, int num_positions, int num_segments, "
    "int past_length, int seq_len, bool check_bounds) -> (Tensor, Tensor, Tensor)"
)
SPARSE_ROWS_SCHEMA = "(Tensor input_ids, Tensor grad_out, int padding_idx, float scale) -> (Tensor, Tensor)"


def op_name(kind: str, backend: str) -> str:
    return f"embedfast::{kind}_{backend}"


def define_ops(backend: str) -> None:
    """Declare ``forward_<backend>`` and ``backward_<backend>``; the backend then registers kernels."""
    torch.library.define(op_name("forward", backend), FORWARD_SCHEMA)
    torch.library.define(op_name("backward", backend), BACKWARD_SCHEMA)


def register_fake_and_autograd(backend: str) -> None:
    """Shape functions and the autograd formula, the same for every backend."""
    torch.library.register_fake(op_name("forward", backend), _forward_fake)
    torch.library.register_fake(op_name("backward", backend), _backward_fake)
    backward_op = getattr(torch.ops.embedfast, f"backward_{backend}")

    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, backward_op)

    torch.library.register_autograd(op_name("forward", backend), backward, setup_context=_setup_context)


def _forward_fake(input_ids, weight, position_ids, position_weight, token_type_ids, segment_weight, scale, position,
                  sinusoid_base, max_positions, past_length, seq_len, padding_idx, sparse, check_bounds):
    return weight.new_empty((input_ids.shape[0], weight.shape[1]))


def _backward_fake(grad_out, input_ids, position_ids, token_type_ids, token_grad, num_embeddings, padding_idx, scale,
                   num_positions, num_segments, past_length, seq_len, check_bounds):
    num_tokens, dim = grad_out.shape
    rows = {"sparse": num_tokens, "dense": num_embeddings}.get(token_grad, 0)
    return grad_out.new_empty((rows, dim)), grad_out.new_empty((num_positions, dim)), grad_out.new_empty((num_segments, dim))


def _setup_context(ctx, inputs, output):
    (input_ids, weight, position_ids, position_weight, token_type_ids, segment_weight, scale, position,
     _base, _max_positions, past_length, seq_len, padding_idx, sparse, check_bounds) = inputs
    ctx.save_for_backward(input_ids, position_ids, token_type_ids)
    ctx.num_embeddings = weight.shape[0]
    ctx.num_positions = position_weight.shape[0] if position_weight is not None else 0
    ctx.num_segments = segment_weight.shape[0] if segment_weight is not None else 0
    ctx.scale, ctx.padding_idx, ctx.sparse = scale, padding_idx, sparse
    ctx.past_length, ctx.seq_len, ctx.check_bounds = past_length, seq_len, check_bounds


def _backward(ctx, grad_out, backward_op):
    input_ids, position_ids, token_type_ids = ctx.saved_tensors
    wants = ctx.needs_input_grad
    grad_out = grad_out.contiguous()
    # sparse with padding: the rows kept are only known from the ids, so sparse_rows gathers them instead
    gather_rows = wants[1] and ctx.sparse and ctx.padding_idx >= 0
    token_grad = "none" if not wants[1] or gather_rows else ("sparse" if ctx.sparse else "dense")
    weight_grad, position_grad, segment_grad = backward_op(
        grad_out, input_ids, position_ids, token_type_ids, token_grad, ctx.num_embeddings,
        ctx.padding_idx, ctx.scale, ctx.num_positions if wants[3] else 0, ctx.num_segments if wants[5] else 0,
        ctx.past_length, ctx.seq_len, ctx.check_bounds)
    if gather_rows:
        indices, values = torch.ops.embedfast.sparse_rows(input_ids, grad_out, ctx.padding_idx, ctx.scale)
        weight_grad = _sparse_coo(indices, values, ctx.num_embeddings)
    elif token_grad == "sparse":
        weight_grad = _sparse_coo(input_ids.to(torch.int64).unsqueeze(0), weight_grad, ctx.num_embeddings)
    elif token_grad == "none":
        weight_grad = None
    return (None, weight_grad, None, position_grad if wants[3] else None, None, segment_grad if wants[5] else None,
            None, None, None, None, None, None, None, None, None)


def _sparse_coo(indices, values, num_embeddings):
    """The uncoalesced COO gradient ``nn.Embedding(sparse=True)`` returns: one row per non-padding token."""
    return torch.sparse_coo_tensor(indices, values, (num_embeddings, values.shape[1]), check_invariants=False)


torch.library.define("embedfast::sparse_rows", SPARSE_ROWS_SCHEMA)


@torch.library.impl("embedfast::sparse_rows", "default")
def _sparse_rows(input_ids, grad_out, padding_idx, scale):
    """The tokens that are not ``padding_idx``: (1, M) int64 indices and ``scale`` times their grad rows,
    gathered and scaled in place, so the only allocation is the (M, D) values."""
    keep = input_ids != padding_idx
    return input_ids[keep].to(torch.int64).unsqueeze(0), grad_out[keep].mul_(scale)


@torch.library.register_fake("embedfast::sparse_rows")
def _sparse_rows_fake(input_ids, grad_out, padding_idx, scale):
    kept = torch.library.get_ctx().new_dynamic_size()
    return input_ids.new_empty((1, kept), dtype=torch.int64), grad_out.new_empty((kept, grad_out.shape[1]))


def _register_reference() -> None:
    from .reference import reference_backward, reference_forward

    define_ops("reference")
    torch.library.impl(op_name("forward", "reference"), "CompositeExplicitAutograd")(reference_forward)
    torch.library.impl(op_name("backward", "reference"), "CompositeExplicitAutograd")(reference_backward)
    register_fake_and_autograd("reference")


_register_reference()
