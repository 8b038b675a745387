"""The embedfast operators: schemas (declared here, once), fake kernels and every derivative.

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
import torch.nn.functional as F

from .reference import reference_backward, reference_forward, resolve_positions

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
    """Shape functions and derivatives, the same for every backend: on the operators themselves (reverse
    mode, also twice) and on the ``autograd.Function``s that ``fused_forward`` calls (every mode)."""
    torch.library.register_fake(op_name("forward", backend), _forward_fake)
    torch.library.register_fake(op_name("backward", backend), _backward_fake)
    forward_op = getattr(torch.ops.embedfast, f"forward_{backend}")
    backward_op = getattr(torch.ops.embedfast, f"backward_{backend}")

    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, backward_op, torch.ops.embedfast.sparse_rows)

    torch.library.register_autograd(op_name("forward", backend), backward, setup_context=_setup_context)
    torch.library.register_autograd(op_name("backward", backend), _backward_adjoint, setup_context=_setup_backward_context)

    backward_function = _function(f"backward_{backend}", backward_op, _setup_backward_forward_mode_context, _backward_adjoint,
                                  jvp=lambda ctx, grad_out_tangent, *_: _backward_tangent(ctx, grad_out_tangent, backward_op))
    _FUNCTIONS[backend] = _function(
        f"forward_{backend}", forward_op, _setup_forward_context,
        lambda ctx, grad_out: _backward(ctx, grad_out, backward_function.apply, _SparseRows.apply),
        jvp=lambda ctx, *tangents: _tangent(ctx, tangents, forward_op))


_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}


def fused_forward(backend: str, *inputs):
    """The forward operator of a loaded backend, differentiable in every mode PyTorch has: reverse (also
    twice), forward mode and ``torch.func`` (``grad``, ``jvp``, ``jacfwd``, ``jacrev``, ``vmap``).

    Through the ``autograd.Function`` whenever a derivative may be asked for; otherwise (inference) the
    operator itself, which skips the Function's per-call cost (it binds its arguments by signature, ~0.1 ms).
    While ``torch.compile`` traces, also the operator itself (reverse mode through ``register_autograd``):
    Dynamo cannot trace an ``autograd.Function`` with a ``jvp``, and compiled graphs have no forward mode.
    """
    if torch.compiler.is_compiling() or not _may_need_derivatives(inputs[1], inputs[3], inputs[5]):
        return getattr(torch.ops.embedfast, f"forward_{backend}")(*inputs)
    return _FUNCTIONS[backend].apply(*inputs)


def _may_need_derivatives(*tables: torch.Tensor | None) -> bool:
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tables)


def _function(name: str, op, setup_context, backward, jvp=None) -> type[torch.autograd.Function]:
    """``op`` as an ``autograd.Function`` of the form ``torch.func`` takes (``setup_context``, a generated vmap
    rule). ``register_autograd``'s own wrapper has neither, nor a forward-mode formula."""
    members = {"generate_vmap_rule": True, "forward": staticmethod(lambda *inputs: op(*inputs)),
               "setup_context": staticmethod(setup_context), "backward": staticmethod(backward)}
    if jvp is not None:
        members["jvp"] = staticmethod(jvp)
    return type(f"{name}_function", (torch.autograd.Function,), members)


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


def _setup_forward_context(ctx, inputs, output):
    """``_setup_context``, and what the forward-mode formula needs."""
    _setup_context(ctx, inputs, output)
    input_ids, weight, position_ids, _, token_type_ids = inputs[:5]
    ctx.save_for_forward(input_ids, position_ids, token_type_ids)
    ctx.learned = inputs[7] == "learned"
    ctx.dim, ctx.weight_dtype, ctx.weight_device = weight.shape[1], weight.dtype, weight.device


def _backward(ctx, grad_out, backward_op, sparse_rows):
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
        indices, values = sparse_rows(input_ids, grad_out, ctx.padding_idx, ctx.scale)
        weight_grad = _sparse_coo(indices, values, ctx.num_embeddings)
    elif token_grad == "sparse":  # indices copied: the gradient must not change when the caller reuses its ids
        weight_grad = _sparse_coo(input_ids.to(torch.int64, copy=True).unsqueeze(0), weight_grad, ctx.num_embeddings)
    elif token_grad == "none":
        weight_grad = None
    return (None, weight_grad, None, position_grad if wants[3] else None, None, segment_grad if wants[5] else None,
            None, None, None, None, None, None, None, None, None)


def _tangent(ctx, tangents, forward_op):
    """Forward mode: the operator is affine in its tables, so the output's tangent is the operator applied to
    the tables' tangents, without the sinusoid (a constant); a table without a tangent contributes nothing."""
    input_ids, position_ids, token_type_ids = ctx.saved_tensors
    _, weight_tangent, _, position_tangent, _, segment_tangent = tangents[:6]
    if weight_tangent is None:
        weight_tangent = torch.zeros(ctx.num_embeddings, ctx.dim, dtype=ctx.weight_dtype, device=ctx.weight_device)
    learned = ctx.learned and position_tangent is not None
    return forward_op(
        input_ids, weight_tangent, position_ids if learned else None, position_tangent if learned else None,
        token_type_ids if segment_tangent is not None else None, segment_tangent, ctx.scale,
        "learned" if learned else "none", 0.0, position_tangent.shape[0] if learned else 0, ctx.past_length,
        ctx.seq_len, -1, False, ctx.check_bounds)


def _setup_backward_context(ctx, inputs, output):
    (grad_out, input_ids, position_ids, token_type_ids, token_grad, num_embeddings, padding_idx, scale,
     num_positions, num_segments, past_length, seq_len, check_bounds) = inputs
    ctx.save_for_backward(input_ids, position_ids, token_type_ids)
    ctx.token_grad, ctx.num_embeddings, ctx.padding_idx, ctx.scale = token_grad, num_embeddings, padding_idx, scale
    ctx.num_positions, ctx.num_segments, ctx.past_length, ctx.seq_len = num_positions, num_segments, past_length, seq_len
    ctx.check_bounds = check_bounds


def _setup_backward_forward_mode_context(ctx, inputs, output):
    """``_setup_backward_context``, and what forward mode through the backward needs."""
    _setup_backward_context(ctx, inputs, output)
    ctx.save_for_forward(*inputs[1:4])


def _backward_tangent(ctx, grad_out_tangent, backward_op):
    """Forward mode through the backward (forward-over-reverse): it is linear in ``grad_out``."""
    input_ids, position_ids, token_type_ids = ctx.saved_tensors
    return backward_op(grad_out_tangent, input_ids, position_ids, token_type_ids, ctx.token_grad, ctx.num_embeddings,
                       ctx.padding_idx, ctx.scale, ctx.num_positions, ctx.num_segments, ctx.past_length, ctx.seq_len,
                       ctx.check_bounds)


def _backward_adjoint(ctx, token_cotangent, position_cotangent, segment_cotangent):
    """Double backward. The backward is linear in ``grad_out``; its adjoint gathers the cotangents of the
    three gradients back onto the tokens: ``scale * Gw[ids] + Gp[pos] + Gs[seg]`` (per token for sparse values),
    in plain differentiable PyTorch so it works on every backend and can be differentiated again."""
    input_ids, position_ids, token_type_ids = ctx.saved_tensors
    ids = input_ids.long()
    if ctx.token_grad == "sparse":
        grad = token_cotangent * ctx.scale
    elif ctx.token_grad == "dense":
        keep = (ids != ctx.padding_idx).unsqueeze(-1)
        grad = torch.where(keep, F.embedding(ids, token_cotangent), 0) * ctx.scale
    else:
        grad = token_cotangent.new_zeros(ids.shape[0], token_cotangent.shape[1])
    if ctx.num_positions > 0:
        positions = resolve_positions(position_ids, ids.shape[0], ctx.past_length, ctx.seq_len, ids.device)
        grad = grad + F.embedding(positions, position_cotangent)
    if ctx.num_segments > 0:
        segments = token_type_ids.long() if token_type_ids is not None else torch.zeros_like(ids)
        grad = grad + F.embedding(segments, segment_cotangent)
    return (grad,) + (None,) * 12


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


def _setup_sparse_rows_context(ctx, inputs, output):
    input_ids, grad_out, padding_idx, scale = inputs
    ctx.save_for_backward(input_ids)
    ctx.padding_idx, ctx.scale = padding_idx, scale


def _sparse_rows_adjoint(ctx, _indices_cotangent, values_cotangent):
    (input_ids,) = ctx.saved_tensors
    keep = input_ids != ctx.padding_idx
    grad = values_cotangent.new_zeros(input_ids.shape[0], values_cotangent.shape[1])
    return None, grad.index_put((keep,), values_cotangent * ctx.scale), None, None


# differentiable through this Function only: registered on the op, the autograd wrapper would make AOT dispatch
# trace its data-dependent output size under static shapes (and compiled graphs have no double backward anyway)
_SparseRows = _function("sparse_rows", torch.ops.embedfast.sparse_rows, _setup_sparse_rows_context, _sparse_rows_adjoint)


@torch.library.register_fake("embedfast::sparse_rows")
def _sparse_rows_fake(input_ids, grad_out, padding_idx, scale):
    kept = torch.library.get_ctx().new_dynamic_size()
    return input_ids.new_empty((1, kept), dtype=torch.int64), grad_out.new_empty((kept, grad_out.shape[1]))


def _register_reference() -> None:
    define_ops("reference")
    torch.library.impl(op_name("forward", "reference"), "CompositeExplicitAutograd")(reference_forward)
    torch.library.impl(op_name("backward", "reference"), "CompositeExplicitAutograd")(reference_backward)
    register_fake_and_autograd("reference")


_register_reference()
