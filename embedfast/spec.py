"""What the embedfast operators are, defined once: their arguments, the position modes, the dtype policy.

Everything else derives from here: the operator schemas and the unpacking of their inputs (``ops.py``),
the tests' argument building, the Triton kernels' constexprs. ``csrc/include/embedfast/spec.h`` mirrors
it for C++; ``tests/test_spec.py`` fails when the two differ.

Each backend implements ``embedfast::forward_<backend>`` and ``embedfast::backward_<backend>`` on flattened
tokens (``N`` tokens, ``D = embedding_dim``):

forward: ``out[n] = weight[ids[n]] * scale + P[pos[n]] + segment_weight[seg[n]]``, shape (N, D), where P is
  ``position_weight`` (``PositionMode.LEARNED``) or a sinusoid table (``INTERLEAVED``, ``CONCAT``).
  The position source: ``position_ids[n]``; else, with ``cu_seqlens`` (packed documents
  ``[0, l1, l1 + l2, ..., N]``), ``position_offset + n - cu_seqlens[i]`` for token n of document i; else
  ``position_offset + n % seq_len``. ``token_type_ids`` None: seg[n] = 0.
  ``max_positions``: the bound positions are checked against (0: none).
  ``check_bounds``: index values are always checked against their tables; True: exactly, raising an
  IndexError that names the bad value (reads the ids back: a host synchronization on CUDA); False on CUDA:
  by a device-side assertion (no synchronization, CUDA-graph safe). CPU always checks exactly.
  A vocabulary shard (tensor parallelism): ``weight`` holds the rows ``[vocab_start, vocab_start + rows)`` of a
  vocabulary of ``vocab_size`` ids (0: weight is the whole vocabulary). ids are checked against the whole
  vocabulary; a token whose id is outside the shard takes no token row (its token term is zero).
  A sequence chunk: only tokens whose column ``n % seq_len`` lies in ``[chunk_start, chunk_end)`` (-1: seq_len)
  get the position and segment terms.

backward: one pass over grad_out returns (token_grad, position_grad, segment_grad):
  ``token_grad`` SPARSE: (N, D) values grad_out * scale; DENSE: (num_embeddings, D), the ``padding_idx`` row
  zero; NONE: (0, D). position_grad (num_positions, D) and segment_grad (num_segments, D): 0 rows when not
  wanted. With a vocabulary shard, num_embeddings is the shard's rows and DENSE sums only the tokens of the
  shard into them (padding_idx is an id of the whole vocabulary; SPARSE values stay per token); with a sequence
  chunk, only the chunk's tokens reach the position and segment gradients: the exact derivative of the forward
  with the same arguments.

norm_forward (the forward's inputs, then ``NormInputs``) returns (out, stats): ``out = dropout(norm(x))`` for
  ``x`` the forward's sum in the compute dtype, never rounded. ``stats`` (N, 2) in the compute dtype holds each
  token's (mean, rstd): LAYERNORM ``mean(x)``, ``1 / sqrt(mean((x - mean)^2) + norm_eps)``; RMSNORM 0,
  ``1 / sqrt(mean(x^2) + norm_eps)``; NONE 0, 1. ``norm_weight`` / ``norm_bias`` (D,) in the tables' dtype, each
  optional (None: ones / zeros; RMSNORM takes no bias). Dropout, when ``dropout_p > 0``: element
  ``(n, d)`` is kept when ``dropout_bits(seed, n, d) >= dropout_threshold(dropout_p)`` and then scaled by
  ``1 / (1 - dropout_p)``; ``dropout_seed`` is a 1-element int64 tensor on the tables' device (``dropout.py``).
norm_backward (grad_out, stats, the norm forward's inputs, then norm_grads, token_grad, padding_idx,
  position_grad, segment_grad) returns (token_grad, position_grad, segment_grad, norm_weight_grad,
  norm_bias_grad): the tables' gradients as ``backward`` returns them for ``grad_sum``, the gradient of the sum
  ``x`` (recomputed from the tables, with the mask regenerated from the seed) rounded to the tables' dtype, and
  the norm's. ``position_grad`` / ``segment_grad``: whether the learned position / segment table (if given) gets
  its (rows, D) gradient, else (0, D); with ``norm_grads`` the (D,) gradients of the norm_weight and norm_bias that
  were given, else (0,). One pass over ``grad_out``: ``grad_sum`` exists per token row only, where a kernel can.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

import torch


class PositionMode(enum.IntEnum):
    """How the operator makes the position term (its ``position_mode`` argument)."""

    NONE = 0
    LEARNED = 1  # rows of position_weight
    INTERLEAVED = 2  # sinusoids, sin and cos interleaved (Vaswani et al.)
    CONCAT = 3  # sinusoids, [sin | cos] (tensor2tensor, fairseq)


class TokenGrad(enum.IntEnum):
    """Which token-table gradient the backward writes (its ``token_grad`` argument)."""

    NONE = 0
    SPARSE = 1
    DENSE = 2


class NormMode(enum.IntEnum):
    """What the norm operators apply to each token's sum before the dropout (their ``norm_mode`` argument)."""

    NONE = 0
    LAYERNORM = 1  # F.layer_norm over the last dim: (x - mean) * rstd * norm_weight + norm_bias
    RMSNORM = 2  # torch.nn.RMSNorm: x * rstd * norm_weight, rstd = 1 / sqrt(mean(x^2) + eps)


class CpuIsa(enum.IntEnum):
    """The instruction-set paths of the C++ CPU kernels, lowest first. The best one the CPU can run is taken
    once per process; the environment variable ``EMBEDFAST_CPU_ISA`` (a lower-case name) forces a lower one."""

    PORTABLE = 0  # plain C++, vectorized by the compiler for the baseline x86-64 (or any other CPU)
    AVX2 = 1  # AVX2 + FMA + F16C
    AVX512 = 2  # AVX-512 F, BW, VL, DQ
    AVX512BF16 = 3  # the same and AVX512-BF16: bfloat16 outputs rounded by instruction


# the API's names: position= and sinusoid_layout= of the module and the functional form
POSITION_ENCODINGS = ("sinusoidal", "learned", "none")
SINUSOID_LAYOUTS = ("interleaved", "concat")
NORMS = ("layernorm", "rmsnorm")  # norm= of the module and the functional form (or None)

INDEX_DTYPES = (torch.int32, torch.int64)
TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# relative accuracy of one rounding from float32 math, per storage dtype (tests and bench compare with it)
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in: float64 for float64 tables, float32 for every other table dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def position_mode(position: str, sinusoid_layout: str) -> PositionMode:
    """The operator's mode for the API's ``position`` and ``sinusoid_layout`` (both already checked)."""
    if position == "sinusoidal":
        return PositionMode[sinusoid_layout.upper()]
    return PositionMode[position.upper()]


_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Argument:
    name: str
    type: str  # as in an operator schema
    default: object = _REQUIRED  # what the tests' argument building fills in (required ones first)


_FORWARD = (
    Argument("input_ids", "Tensor"),
    Argument("weight", "Tensor"),
    Argument("position_ids", "Tensor?", None),
    Argument("position_weight", "Tensor?", None),
    Argument("token_type_ids", "Tensor?", None),
    Argument("segment_weight", "Tensor?", None),
    Argument("cu_seqlens", "Tensor?", None),
    Argument("scale", "float", 1.0),
    Argument("position_mode", "int", PositionMode.NONE),
    Argument("sinusoid_base", "float", 10000.0),
    Argument("max_positions", "int", 0),
    Argument("position_offset", "int", 0),
    Argument("seq_len", "int", 1),
    Argument("check_bounds", "bool", True),
    Argument("vocab_start", "int", 0),
    Argument("vocab_size", "int", 0),
    Argument("chunk_start", "int", 0),
    Argument("chunk_end", "int", -1),
)
_BACKWARD = (
    Argument("grad_out", "Tensor"),
    Argument("input_ids", "Tensor"),
    Argument("num_embeddings", "int"),
    Argument("position_ids", "Tensor?", None),
    Argument("token_type_ids", "Tensor?", None),
    Argument("cu_seqlens", "Tensor?", None),
    Argument("token_grad", "int", TokenGrad.NONE),
    Argument("padding_idx", "int", -1),
    Argument("scale", "float", 1.0),
    Argument("num_positions", "int", 0),
    Argument("num_segments", "int", 0),
    Argument("position_offset", "int", 0),
    Argument("seq_len", "int", 1),
    Argument("check_bounds", "bool", True),
    Argument("vocab_start", "int", 0),
    Argument("vocab_size", "int", 0),
    Argument("chunk_start", "int", 0),
    Argument("chunk_end", "int", -1),
)
# the norm operators' epilogue: dropout(norm(sum)), applied per token in the same pass (see the module docstring)
_NORM = (
    Argument("norm_weight", "Tensor?", None),
    Argument("norm_bias", "Tensor?", None),
    Argument("norm_mode", "int", NormMode.NONE),
    Argument("norm_eps", "float", 1e-5),
    Argument("dropout_p", "float", 0.0),
    Argument("dropout_seed", "Tensor?", None),
)
_NORM_BACKWARD = ((Argument("grad_out", "Tensor"), Argument("stats", "Tensor")) + _FORWARD + _NORM
                  + (Argument("norm_grads", "bool", False), Argument("token_grad", "int", TokenGrad.NONE),
                     Argument("padding_idx", "int", -1), Argument("position_grad", "bool", False),
                     Argument("segment_grad", "bool", False)))
# what only the derivative needs: the autograd.Function takes it after the forward's inputs
_GRADIENT = (Argument("padding_idx", "int", -1), Argument("sparse", "bool", False))

# differentiable_forward: the forward under torch.compile, with what its derivative needs (see ops.py)
OPERATORS = {"forward": (_FORWARD, "Tensor"), "backward": (_BACKWARD, "(Tensor, Tensor, Tensor)"),
             "differentiable_forward": (_FORWARD + _GRADIENT, "Tensor"),
             "norm_forward": (_FORWARD + _NORM, "(Tensor, Tensor)"),
             "norm_backward": (_NORM_BACKWARD, "(Tensor, Tensor, Tensor, Tensor, Tensor)"),
             "differentiable_norm_forward": (_FORWARD + _NORM + _GRADIENT, "(Tensor, Tensor)")}


def _inputs_type(name: str, arguments: tuple[Argument, ...]) -> type:
    """A named tuple of the arguments, in schema order; the tests build operator inputs with its defaults."""
    defaults = [a.default for a in arguments if a.default is not _REQUIRED]
    return collections.namedtuple(name, [a.name for a in arguments], defaults=defaults)


ForwardInputs = _inputs_type("ForwardInputs", _FORWARD)
BackwardInputs = _inputs_type("BackwardInputs", _BACKWARD)
GradientOptions = _inputs_type("GradientOptions", _GRADIENT)
NormInputs = _inputs_type("NormInputs", _NORM)
NormBackwardInputs = _inputs_type("NormBackwardInputs", _NORM_BACKWARD)


def backward_inputs(inputs, grad_out: torch.Tensor | None) -> BackwardInputs:
    """The plain backward's inputs for a forward's (``ForwardInputs``, ``NormBackwardInputs``) and ``grad_out``: the
    fields of the same name (index tensors, constants), and every table's rows (``spec.h`` mirrors it:
    ``backward_of``)."""
    def rows(table):
        return table.shape[0] if table is not None else 0

    shared = {name: getattr(inputs, name) for name in BackwardInputs._fields if name in inputs._fields}
    return BackwardInputs(**{**shared, "grad_out": grad_out}, num_embeddings=inputs.weight.shape[0],
                          num_positions=rows(inputs.position_weight), num_segments=rows(inputs.segment_weight))


def table_backward_inputs(args: NormBackwardInputs, grad_sum: torch.Tensor) -> BackwardInputs:
    """The plain backward's inputs for ``grad_sum``, the gradient of a norm backward's sum: the table gradients
    that norm backward asks for (``spec.h`` mirrors it: ``backward_part``)."""
    inputs = backward_inputs(args, grad_sum)
    return inputs._replace(num_positions=inputs.num_positions if args.position_grad else 0,
                           num_segments=inputs.num_segments if args.segment_grad else 0)


DROPOUT_SEED_BOUND = 2**62
"""Dropout seeds are drawn uniformly from ``[0, DROPOUT_SEED_BOUND)`` (``dropout.draw_seed``; the extension's eager
entry draws them in C++, ``spec.h`` mirrors it)."""


def dropout_threshold(p: float) -> int:
    """A dropout element is dropped when its 32 random bits are below this (``kernel_math.h`` mirrors it)."""
    return min(int(p * 4294967296.0), 4294967295)


def schema(kind: str) -> str:
    """The schema of the ``kind`` operator (a key of ``OPERATORS``)."""
    arguments, returns = OPERATORS[kind]
    return f"({', '.join(f'{a.type} {a.name}' for a in arguments)}) -> {returns}"
