"""The embedfast operators: their schemas (derived from ``spec.py``), fake kernels and every derivative.

Every backend implements the same two operators under its own name, ``embedfast::forward_<backend>`` and
``embedfast::backward_<backend>`` (see ``spec.py`` for what they compute), so each backend can be picked
explicitly on any device while the dispatcher still chooses CPU or CUDA code by tensor device.

The forward operator is differentiated through ``call_forward``, never by itself: what only the gradient needs
(``padding_idx``, ``sparse``: ``spec.GradientOptions``) is not among its inputs. Eagerly an ``autograd.Function``
carries them (every derivative mode; the extension's C++ entry, ``csrc/eager.cpp``, does the same for reverse
mode); under ``torch.compile``, ``embedfast::differentiable_forward_<backend>``
(the forward's inputs, then the gradient options; Dynamo traces no sparse tensor inside a Function's backward,
AOT autograd traces this operator's).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F

from .positions import chunk_tokens, token_positions
from .reference import reference_backward, reference_forward, reference_norm_backward, reference_norm_forward
from .spec import (BackwardInputs, ForwardInputs, GradientOptions, NormBackwardInputs, NormInputs, PositionMode, TokenGrad,
                   backward_inputs, compute_dtype, schema, table_backward_inputs)

_NUM_FORWARD = len(ForwardInputs._fields)
_NUM_BACKWARD = len(BackwardInputs._fields)
_NUM_NORM = len(NormInputs._fields)


def op_name(kind: str, backend: str) -> str:
    return f"embedfast::{kind}_{backend}"


def define_ops(backend: str) -> None:
    """Declare the backend's operators (``forward_<backend>``, ``backward_<backend>``, ``norm_forward_<backend>``,
    ``norm_backward_<backend>``); the backend then registers kernels."""
    for kind in ("forward", "backward", "norm_forward", "norm_backward"):
        torch.library.define(op_name(kind, backend), schema(kind))


def register_fake_and_autograd(backend: str) -> None:
    """Shape functions and derivatives, the same for every backend: the ``autograd.Function``s and the
    ``differentiable_forward`` operator that ``call_forward`` calls, and reverse mode on the backward operator
    itself (double backward)."""
    torch.library.register_fake(op_name("forward", backend), _forward_fake)
    torch.library.register_fake(op_name("backward", backend), _backward_fake)
    forward_op = getattr(torch.ops.embedfast, f"forward_{backend}")
    backward_op = getattr(torch.ops.embedfast, f"backward_{backend}")
    torch.library.register_autograd(op_name("forward", backend), _not_differentiable(f"forward_{backend}"),
                                    setup_context=lambda ctx, inputs, output: None)
    torch.library.register_autograd(op_name("backward", backend), _backward_adjoint, setup_context=_setup_backward_context)

    differentiable = op_name("differentiable_forward", backend)
    torch.library.define(differentiable, schema("differentiable_forward"))
    torch.library.impl(differentiable, "CompositeExplicitAutograd")(lambda *inputs: forward_op(*inputs[:_NUM_FORWARD]))
    torch.library.register_fake(differentiable, lambda *inputs: _forward_fake(*inputs[:_NUM_FORWARD]))
    torch.library.register_autograd(
        differentiable, lambda ctx, grad_out: _backward(ctx, grad_out, backward_op, torch.ops.embedfast.sparse_rows),
        setup_context=_setup_context)

    backward_function = _function(f"backward_{backend}", backward_op, _setup_backward_forward_mode_context,
                                  _backward_adjoint, jvp=lambda ctx, *tangents: backward_op(*_backward_tangent(ctx, tangents)))
    _FUNCTIONS[backend] = _function(
        f"forward_{backend}", forward_op, _setup_forward_context,
        lambda ctx, grad_out: _backward(ctx, grad_out, backward_function.apply, _SparseRows.apply),
        jvp=lambda ctx, *tangents: forward_op(*_tangent_inputs(ctx, tangents)), op_inputs=_NUM_FORWARD)
    _register_norm(backend)


def _register_norm(backend: str) -> None:
    """The norm operators' fakes and their reverse-mode derivative: eagerly an ``autograd.Function``, under
    ``torch.compile`` the ``differentiable_norm_forward`` operator (as for the plain forward)."""
    torch.library.register_fake(op_name("norm_forward", backend), _norm_forward_fake)
    torch.library.register_fake(op_name("norm_backward", backend), _norm_backward_fake)
    norm_forward_op = getattr(torch.ops.embedfast, f"norm_forward_{backend}")
    norm_backward_op = getattr(torch.ops.embedfast, f"norm_backward_{backend}")
    no_context = lambda ctx, inputs, output: None  # noqa: E731
    torch.library.register_autograd(op_name("norm_forward", backend), _not_differentiable(f"norm_forward_{backend}"),
                                    setup_context=no_context)
    torch.library.register_autograd(op_name("norm_backward", backend), _no_double_backward, setup_context=no_context)

    differentiable = op_name("differentiable_norm_forward", backend)
    torch.library.define(differentiable, schema("differentiable_norm_forward"))
    torch.library.impl(differentiable, "CompositeExplicitAutograd")(
        lambda *inputs: norm_forward_op(*inputs[:_NUM_FORWARD + _NUM_NORM]))
    torch.library.register_fake(differentiable, lambda *inputs: _norm_forward_fake(*inputs[:_NUM_FORWARD + _NUM_NORM]))
    torch.library.register_autograd(
        differentiable, lambda ctx, grad_out, _grad_stats: _norm_backward(
            ctx, grad_out, norm_backward_op, torch.ops.embedfast.sparse_rows),
        setup_context=_setup_norm_context)

    def forward(ctx, *inputs):
        out, stats = _without_autograd_kernel(norm_forward_op, *inputs[:_NUM_FORWARD + _NUM_NORM])
        _setup_norm_context(ctx, inputs, (out, stats))
        return out

    def backward(ctx, grad_out):
        return _norm_backward(ctx, grad_out, norm_backward_op, _SparseRows.apply)

    _NORM_FUNCTIONS[backend] = type(f"norm_forward_{backend}_function", (torch.autograd.Function,),
                                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}
_NORM_FUNCTIONS: dict[str, type[torch.autograd.Function]] = {}
# backends with an eager entry of their own: a class built from a call's settings, then called as functional.embed
# is after its backend and settings, differentiable in reverse mode (the extension's C++ shaping and autograd node)
_EAGER_ENTRIES: dict[str, type] = {}


def register_eager_entry(backend: str, entry_class: type) -> None:
    """``entry_class(**fields of functional.Settings)(input_ids, weight, ..., position_offset, *chunk)``."""
    _EAGER_ENTRIES[backend] = entry_class
    eager_entry.cache_clear()


@functools.lru_cache(maxsize=256)
def eager_entry(backend: str, settings) -> object | None:
    """The backend's eager entry for ``settings`` (a ``functional.Settings``), or None if it has none; built once."""
    entry_class = _EAGER_ENTRIES.get(backend)
    return None if entry_class is None else entry_class(**dataclasses.asdict(settings))


def eager_entry_allowed() -> bool:
    """Whether a call may take a backend's eager entry: not while ``torch.compile`` traces, nor under forward mode
    or ``torch.func``, which go through ``call_forward``."""
    return not (torch.compiler.is_compiling() or torch.autograd.forward_ad._current_level >= 0
                or torch._C._are_functorch_transforms_active())


def call_forward(backend: str, *arguments) -> torch.Tensor:
    """The forward operator of a loaded backend on ``(*ForwardInputs, *GradientOptions)``, differentiable in
    every mode PyTorch has: reverse (also twice), forward mode and ``torch.func`` (``grad``, ``jvp``, ``jacfwd``,
    ``jacrev``, ``vmap``).

    Eagerly, the ``autograd.Function`` whenever a derivative may be asked for, otherwise (inference) the operator
    itself, which skips the Function's per-call cost (it binds its arguments by signature, ~0.1 ms). Forward mode
    and ``torch.func`` always take the ``autograd.Function``. (``functional.embed`` calls a backend's eager entry
    instead where one is allowed: see ``eager_entry``.)
    While ``torch.compile`` traces, ``differentiable_forward`` when a gradient is wanted (reverse mode; compiled
    graphs have no forward mode), else the operator itself (Inductor then sees the Triton kernels).
    """
    if torch.compiler.is_compiling():
        if _reverse_mode(arguments):
            return getattr(torch.ops.embedfast, f"differentiable_forward_{backend}")(*arguments)
    elif torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        return _FUNCTIONS[backend].apply(*arguments)
    elif _reverse_mode(arguments):
        return _FUNCTIONS[backend].apply(*arguments)
    return getattr(torch.ops.embedfast, f"forward_{backend}")(*arguments[:_NUM_FORWARD])


def _reverse_mode(arguments: tuple, parameters: tuple = ()) -> bool:
    inputs = ForwardInputs(*arguments[:_NUM_FORWARD])
    tables = (inputs.weight, inputs.position_weight, inputs.segment_weight, *parameters)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tables)


def call_norm_forward(backend: str, *arguments) -> torch.Tensor:
    """The norm forward operator of a loaded backend on ``(*ForwardInputs, *NormInputs, *GradientOptions)``: its
    output, differentiable in reverse mode (eagerly and under ``torch.compile``; not twice). Forward mode and
    ``torch.func`` raise: the norm's derivative is not affine in the tables, and only reverse mode is written."""
    norm = NormInputs(*arguments[_NUM_FORWARD:_NUM_FORWARD + _NUM_NORM])
    wanted = _reverse_mode(arguments, (norm.norm_weight, norm.norm_bias))
    op, op_inputs = getattr(torch.ops.embedfast, f"norm_forward_{backend}"), arguments[:_NUM_FORWARD + _NUM_NORM]
    if torch.compiler.is_compiling():
        if wanted:
            return getattr(torch.ops.embedfast, f"differentiable_norm_forward_{backend}")(*arguments)[0]
        return op(*op_inputs)[0]
    if torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
        raise NotImplementedError("embedfast: with a norm or dropout the operator is differentiable in reverse mode "
                                  "only, not under forward-mode AD or torch.func transforms")
    if wanted:
        return _NORM_FUNCTIONS[backend].apply(*arguments)
    return _without_autograd_kernel(op, *op_inputs)[0]


def _without_autograd_kernel(op, *arguments):
    """``op(*arguments)`` eagerly where no derivative of it can be asked for (grad mode off, or no input that
    requires grad), below the autograd kernel ``register_autograd`` gave it: that kernel only redispatches then, in
    Python, for about 15 us a call."""
    with torch._C._AutoDispatchBelowAutograd():
        return op(*arguments)


def _function(name: str, op, setup_context, backward, jvp=None, op_inputs: int | None = None) -> type[torch.autograd.Function]:
    """``op`` as an ``autograd.Function`` of the form ``torch.func`` takes (``setup_context``, a generated vmap
    rule). Inputs past the first ``op_inputs`` (``GradientOptions``) are for ``setup_context`` only."""
    members = {"generate_vmap_rule": True, "setup_context": staticmethod(setup_context),
               "forward": staticmethod(lambda *inputs: op(*inputs[:op_inputs])), "backward": staticmethod(backward)}
    if jvp is not None:
        members["jvp"] = staticmethod(jvp)
    return type(f"{name}_function", (torch.autograd.Function,), members)


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"torch.ops.embedfast.{name} is not differentiated by itself: call "
                           "embedfast.fused_input_embedding (or embedfast.ops.call_forward / call_norm_forward), which "
                           "knows the gradient's padding_idx and sparse layout")
    return backward


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("embedfast: the gradient through a norm or dropout cannot be differentiated again "
                              "(double backward is written for the operator without a norm)")


def _forward_fake(*inputs):
    forward = ForwardInputs(*inputs)
    return forward.weight.new_empty((forward.input_ids.shape[0], forward.weight.shape[1]))


def _backward_fake(*inputs):
    backward = BackwardInputs(*inputs)
    num_tokens, dim = backward.grad_out.shape
    rows = {TokenGrad.SPARSE: num_tokens, TokenGrad.DENSE: backward.num_embeddings}.get(backward.token_grad, 0)
    like = backward.grad_out
    return like.new_empty((rows, dim)), like.new_empty((backward.num_positions, dim)), like.new_empty((backward.num_segments, dim))


def _norm_forward_fake(*inputs):
    forward = ForwardInputs(*inputs[:_NUM_FORWARD])
    num_tokens, dim = forward.input_ids.shape[0], forward.weight.shape[1]
    stats = forward.weight.new_empty((num_tokens, 2), dtype=compute_dtype(forward.weight.dtype))
    return forward.weight.new_empty((num_tokens, dim)), stats


def _norm_backward_fake(*inputs):
    backward = NormBackwardInputs(*inputs)
    table_grads = _backward_fake(*table_backward_inputs(backward, backward.grad_out))

    def vector(parameter):
        return backward.grad_out.new_empty(parameter.shape[0] if backward.norm_grads and parameter is not None else 0)

    return (*table_grads, vector(backward.norm_weight), vector(backward.norm_bias))


def _setup_context(ctx, inputs, output):
    forward = ForwardInputs(*inputs[:_NUM_FORWARD])
    ctx.save_for_backward(forward.input_ids, forward.position_ids, forward.token_type_ids, forward.cu_seqlens)
    _set_backward_inputs(ctx, forward, GradientOptions(*inputs[_NUM_FORWARD:]))


def _set_backward_inputs(ctx, forward: ForwardInputs, options: GradientOptions) -> None:
    # the backward's inputs but the tensors (saved) and what the backward decides from ctx.needs_input_grad
    ctx.backward_inputs = backward_inputs(forward, None)._replace(
        padding_idx=options.padding_idx, **dict.fromkeys(_INDEX_NAMES))
    ctx.sparse = options.sparse


_NORM_TENSORS = ("norm_weight", "norm_bias", "dropout_seed")


def _setup_norm_context(ctx, inputs, output):
    """What the norm's backward needs: the index tensors, the tables (the sum is recomputed from them), the norm's
    tensors and the forward's stats."""
    forward, norm = ForwardInputs(*inputs[:_NUM_FORWARD]), NormInputs(*inputs[_NUM_FORWARD:_NUM_FORWARD + _NUM_NORM])
    ctx.save_for_backward(forward.input_ids, forward.position_ids, forward.token_type_ids, forward.cu_seqlens,
                          forward.weight, forward.position_weight, forward.segment_weight,
                          *(getattr(norm, name) for name in _NORM_TENSORS), output[1])
    _set_backward_inputs(ctx, forward, GradientOptions(*inputs[_NUM_FORWARD + _NUM_NORM:]))
    ctx.forward_inputs = forward._replace(**dict.fromkeys(_INDEX_NAMES + _TABLE_NAMES))
    ctx.norm_inputs = norm._replace(**dict.fromkeys(_NORM_TENSORS))


def _norm_backward(ctx, grad_out, norm_backward_op, sparse_rows):
    """The norm backward operator: the tables' gradients and the norm's parameters', in one pass over ``grad_out``."""
    saved = ctx.saved_tensors
    tables, norm_tensors, stats = saved[4:7], saved[7:10], saved[10]
    forward = _with_index_tensors(ctx.forward_inputs, saved)._replace(**dict(zip(_TABLE_NAMES, tables)))
    norm = ctx.norm_inputs._replace(**dict(zip(_NORM_TENSORS, norm_tensors)))
    wants = ForwardInputs(*ctx.needs_input_grad[:_NUM_FORWARD])
    wants_norm = NormInputs(*ctx.needs_input_grad[_NUM_FORWARD:_NUM_FORWARD + _NUM_NORM])
    token_grad, gather_rows = _token_request(ctx, wants.weight)
    if gather_rows:  # the kept rows are gathered from the sparse values
        token_grad = TokenGrad.SPARSE
    inputs = (grad_out.contiguous(), stats, *forward, *norm, wants_norm.norm_weight or wants_norm.norm_bias,
              int(token_grad), ctx.backward_inputs.padding_idx, wants.position_weight, wants.segment_weight)
    if torch.is_grad_enabled():  # create_graph: through the op's autograd kernel, which refuses a double backward
        weight_grad, position_grad, segment_grad, norm_weight_grad, norm_bias_grad = norm_backward_op(*inputs)
    else:
        weight_grad, position_grad, segment_grad, norm_weight_grad, norm_bias_grad = _without_autograd_kernel(
            norm_backward_op, *inputs)
    table_grads = _table_grads(ctx, wants, token_grad, gather_rows, weight_grad, position_grad, segment_grad,
                               lambda: sparse_rows(forward.input_ids, weight_grad, ctx.backward_inputs.padding_idx, 1.0,
                                                   forward.vocab_start, forward.weight.shape[0]))
    norm_grads = NormInputs(*(None,) * _NUM_NORM)._replace(
        norm_weight=norm_weight_grad if wants_norm.norm_weight else None,
        norm_bias=norm_bias_grad if wants_norm.norm_bias else None)
    return (*table_grads, *norm_grads, *(None,) * len(GradientOptions._fields))


def _setup_forward_context(ctx, inputs, output):
    """``_setup_context``, and what the forward-mode formula needs."""
    _setup_context(ctx, inputs, output)
    forward = ForwardInputs(*inputs[:_NUM_FORWARD])
    ctx.save_for_forward(forward.input_ids, forward.position_ids, forward.token_type_ids, forward.cu_seqlens)
    ctx.forward_inputs = forward._replace(input_ids=None, weight=None, position_ids=None, position_weight=None,
                                          token_type_ids=None, segment_weight=None, cu_seqlens=None)
    ctx.weight_like = (forward.weight.shape, forward.weight.dtype, forward.weight.device)


_INDEX_NAMES = ("input_ids", "position_ids", "token_type_ids", "cu_seqlens")
_TABLE_NAMES = ("weight", "position_weight", "segment_weight")


def _with_index_tensors(inputs, saved):
    return inputs._replace(**dict(zip(_INDEX_NAMES, saved)))


def _token_request(ctx, wants_weight: bool) -> tuple[TokenGrad, bool]:
    """The token gradient to ask a backward operator for, and whether its kept rows are gathered instead: sparse
    with padding or of a shard, the rows kept are only known from the ids."""
    inputs = ctx.backward_inputs
    gather_rows = wants_weight and ctx.sparse and (inputs.padding_idx >= 0 or inputs.vocab_size > 0)
    if not wants_weight or gather_rows:
        return TokenGrad.NONE, gather_rows
    return (TokenGrad.SPARSE if ctx.sparse else TokenGrad.DENSE), False


def _table_grads(ctx, wants: ForwardInputs, token_grad: TokenGrad, gather_rows: bool, weight_grad, position_grad,
                 segment_grad, gathered_rows) -> ForwardInputs:
    """The tables' gradients from a backward operator's results: the token gradient as a sparse COO tensor (its
    kept rows from ``gathered_rows()`` when ``gather_rows``), dense, or None."""
    input_ids, num_embeddings = ctx.saved_tensors[0], ctx.backward_inputs.num_embeddings
    if gather_rows:
        indices, values = gathered_rows()
        weight_grad = _sparse_coo(indices, values, num_embeddings)
    elif token_grad == TokenGrad.SPARSE:  # indices copied: the gradient must not change when the caller reuses its ids
        weight_grad = _sparse_coo(input_ids.to(torch.int64, copy=True).unsqueeze(0), weight_grad, num_embeddings)
    elif token_grad == TokenGrad.NONE:
        weight_grad = None
    return ForwardInputs(*(None,) * _NUM_FORWARD)._replace(
        weight=weight_grad, position_weight=position_grad if wants.position_weight else None,
        segment_weight=segment_grad if wants.segment_weight else None)


def _backward(ctx, grad_out, backward_op, sparse_rows):
    wants = ForwardInputs(*ctx.needs_input_grad[:_NUM_FORWARD])
    inputs = _with_index_tensors(ctx.backward_inputs, ctx.saved_tensors)
    token_grad, gather_rows = _token_request(ctx, wants.weight)
    grad_out = grad_out.contiguous()
    weight_grad, position_grad, segment_grad = backward_op(*inputs._replace(
        grad_out=grad_out, token_grad=int(token_grad),
        num_positions=inputs.num_positions if wants.position_weight else 0,
        num_segments=inputs.num_segments if wants.segment_weight else 0))
    grads = _table_grads(ctx, wants, token_grad, gather_rows, weight_grad, position_grad, segment_grad,
                         lambda: sparse_rows(inputs.input_ids, grad_out, inputs.padding_idx, inputs.scale,
                                             inputs.vocab_start, inputs.num_embeddings))
    return (*grads, *(None,) * len(GradientOptions._fields))


def _tangent_inputs(ctx, tangents) -> ForwardInputs:
    """Forward mode: the operator is affine in its tables, so the output's tangent is the operator applied to
    the tables' tangents, without the sinusoid (a constant); a table without a tangent contributes nothing."""
    tangent = ForwardInputs(*tangents[:_NUM_FORWARD])
    inputs = _with_index_tensors(ctx.forward_inputs, ctx.saved_tensors)
    weight = tangent.weight
    if weight is None:
        shape, dtype, device = ctx.weight_like
        weight = torch.zeros(shape, dtype=dtype, device=device)
    learned = inputs.position_mode == PositionMode.LEARNED and tangent.position_weight is not None
    segments = tangent.segment_weight is not None
    return inputs._replace(
        weight=weight, position_weight=tangent.position_weight if learned else None,
        position_mode=int(PositionMode.LEARNED if learned else PositionMode.NONE),
        position_ids=inputs.position_ids if learned else None, cu_seqlens=inputs.cu_seqlens if learned else None,
        max_positions=tangent.position_weight.shape[0] if learned else 0,
        token_type_ids=inputs.token_type_ids if segments else None, segment_weight=tangent.segment_weight)


def _setup_backward_context(ctx, inputs, output):
    backward = BackwardInputs(*inputs)
    ctx.save_for_backward(backward.input_ids, backward.position_ids, backward.token_type_ids, backward.cu_seqlens)
    ctx.backward_inputs = backward._replace(grad_out=None, input_ids=None, position_ids=None, token_type_ids=None,
                                            cu_seqlens=None)


def _setup_backward_forward_mode_context(ctx, inputs, output):
    """``_setup_backward_context``, and what forward mode through the backward needs."""
    _setup_backward_context(ctx, inputs, output)
    backward = BackwardInputs(*inputs)
    ctx.save_for_forward(backward.input_ids, backward.position_ids, backward.token_type_ids, backward.cu_seqlens)


def _backward_tangent(ctx, tangents) -> BackwardInputs:
    """Forward mode through the backward (forward-over-reverse): it is linear in ``grad_out``."""
    return _with_index_tensors(ctx.backward_inputs, ctx.saved_tensors)._replace(grad_out=tangents[0])


def _backward_adjoint(ctx, token_cotangent, position_cotangent, segment_cotangent):
    """Double backward. The backward is linear in ``grad_out``; its adjoint gathers the cotangents of the
    three gradients back onto the tokens: ``scale * Gw[ids] + Gp[pos] + Gs[seg]`` (per token for sparse values),
    in plain differentiable PyTorch so it works on every backend and can be differentiated again."""
    inputs = _with_index_tensors(ctx.backward_inputs, ctx.saved_tensors)
    ids = inputs.input_ids.long()
    if inputs.token_grad == TokenGrad.SPARSE:
        grad = token_cotangent * inputs.scale
    elif inputs.token_grad == TokenGrad.DENSE:
        rows, keep = _kept_rows(ids, inputs.padding_idx, inputs.vocab_start, inputs.num_embeddings)
        grad = torch.where(keep.unsqueeze(-1), F.embedding(torch.where(keep, rows, 0), token_cotangent), 0) * inputs.scale
    else:
        grad = token_cotangent.new_zeros(ids.shape[0], token_cotangent.shape[1])
    side = torch.zeros_like(grad)
    if inputs.num_positions > 0:
        positions = token_positions(inputs.position_ids, inputs.cu_seqlens, ids.shape[0], inputs.position_offset,
                                    inputs.seq_len, ids.device)
        side = side + F.embedding(positions, position_cotangent)
    if inputs.num_segments > 0:
        segments = inputs.token_type_ids.long() if inputs.token_type_ids is not None else torch.zeros_like(ids)
        side = side + F.embedding(segments, segment_cotangent)
    in_chunk = chunk_tokens(ids.shape[0], inputs.seq_len, inputs.chunk_start, inputs.chunk_end, ids.device)
    if in_chunk is not None:
        side = torch.where(in_chunk.unsqueeze(-1), side, 0)
    return (grad + side,) + (None,) * (_NUM_BACKWARD - 1)


def _sparse_coo(indices, values, num_embeddings):
    """The uncoalesced COO gradient ``nn.Embedding(sparse=True)`` returns: one row per non-padding token."""
    return torch.sparse_coo_tensor(indices, values, (num_embeddings, values.shape[1]), check_invariants=False)


torch.library.define("embedfast::sparse_rows", "(Tensor input_ids, Tensor grad_out, int padding_idx, float scale, "
                                                "int vocab_start, int num_rows) -> (Tensor, Tensor)")


def _kept_rows(input_ids, padding_idx, vocab_start, num_rows):
    """Each token's row ``id - vocab_start`` and whether it gets one: not ``padding_idx``, in the shard."""
    rows = input_ids.to(torch.int64) - vocab_start
    return rows, (input_ids != padding_idx) & (rows >= 0) & (rows < num_rows)


@torch.library.impl("embedfast::sparse_rows", "default")
def _sparse_rows(input_ids, grad_out, padding_idx, scale, vocab_start, num_rows):
    """The tokens that get a row of the ``num_rows`` from id ``vocab_start`` (not ``padding_idx``): (1, M) int64
    rows and ``scale`` times their grad rows, gathered and scaled in place, so the only allocation is the (M, D)
    values."""
    rows, keep = _kept_rows(input_ids, padding_idx, vocab_start, num_rows)
    return rows[keep].unsqueeze(0), grad_out[keep].mul_(scale)


def _setup_sparse_rows_context(ctx, inputs, output):
    input_ids, grad_out, padding_idx, scale, vocab_start, num_rows = inputs
    ctx.save_for_backward(input_ids)
    ctx.padding_idx, ctx.scale, ctx.vocab_start, ctx.num_rows = padding_idx, scale, vocab_start, num_rows


def _sparse_rows_adjoint(ctx, _indices_cotangent, values_cotangent):
    (input_ids,) = ctx.saved_tensors
    _, keep = _kept_rows(input_ids, ctx.padding_idx, ctx.vocab_start, ctx.num_rows)
    grad = values_cotangent.new_zeros(input_ids.shape[0], values_cotangent.shape[1])
    return None, grad.index_put((keep,), values_cotangent * ctx.scale), None, None, None, None


# differentiable through this Function only: registered on the op, the autograd wrapper would make AOT dispatch
# trace its data-dependent output size under static shapes (and compiled graphs have no double backward anyway)
_SparseRows = _function("sparse_rows", torch.ops.embedfast.sparse_rows, _setup_sparse_rows_context, _sparse_rows_adjoint)


@torch.library.register_fake("embedfast::sparse_rows")
def _sparse_rows_fake(input_ids, grad_out, padding_idx, scale, vocab_start, num_rows):
    kept = torch.library.get_ctx().new_dynamic_size()
    return input_ids.new_empty((1, kept), dtype=torch.int64), grad_out.new_empty((kept, grad_out.shape[1]))


define_ops("reference")
torch.library.impl(op_name("forward", "reference"), "default")(reference_forward)
torch.library.impl(op_name("backward", "reference"), "default")(reference_backward)
torch.library.impl(op_name("norm_forward", "reference"), "default")(reference_norm_forward)
torch.library.impl(op_name("norm_backward", "reference"), "default")(reference_norm_backward)
register_fake_and_autograd("reference")
