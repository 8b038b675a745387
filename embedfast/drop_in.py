"""Drop-in use in existing models: ``from_modules`` and ``patch_model``.

``patch_model`` changes recognised embedding blocks in place by giving each instance a subclass of
its own class whose ``forward`` runs the fused operator. Parameters, buffers, submodules,
``state_dict`` keys, weight tying and the forward signature stay as they were; only the arithmetic
of the lookup-and-add moves into one kernel.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .functional import fused_input_embedding
from .module import FusedInputEmbedding
from .positions import padding_aware_position_ids


def from_modules(
    word_embeddings: nn.Embedding,
    position_embeddings: nn.Embedding | None = None,
    token_type_embeddings: nn.Embedding | None = None,
    *,
    scale: str | float | None = None,
    position: str | None = None,
    max_positions: int | None = None,
    sinusoid_layout: str = "interleaved",
    sinusoid_base: float = 10000.0,
    sparse: bool | None = None,
    backend: str = "auto",
) -> FusedInputEmbedding:
    """A ``FusedInputEmbedding`` that shares (does not copy) the parameters of existing ``nn.Embedding``s.

    ``weight`` is ``word_embeddings.weight`` itself, so a tied output projection stays tied; likewise
    ``position_weight`` and ``segment_weight``. ``position`` defaults to ``"learned"`` when
    ``position_embeddings`` is given, else ``"none"``; ``sparse`` and ``padding_idx`` default to the
    word embedding's. ``scale`` defaults to None (Hugging Face models do not scale).
    """
    _check_embedding("word_embeddings", word_embeddings)
    if position is None:
        position = "learned" if position_embeddings is not None else "none"
    if position_embeddings is not None:
        if position != "learned":
            raise ValueError(f"position_embeddings were given, but position={position!r}")
        _check_embedding("position_embeddings", position_embeddings, word_embeddings)
        if position_embeddings.padding_idx is not None:
            raise ValueError("position_embeddings.padding_idx is not supported here (its row would get a gradient); "
                             "patch_model handles RoBERTa-style embeddings")
        max_positions = position_embeddings.num_embeddings
    if token_type_embeddings is not None:
        _check_embedding("token_type_embeddings", token_type_embeddings, word_embeddings)
    weight = word_embeddings.weight
    fused = FusedInputEmbedding(
        word_embeddings.num_embeddings, word_embeddings.embedding_dim, padding_idx=word_embeddings.padding_idx,
        num_segments=token_type_embeddings.num_embeddings if token_type_embeddings is not None else 0,
        position=position, max_positions=max_positions, sinusoid_layout=sinusoid_layout, sinusoid_base=sinusoid_base,
        scale=scale, sparse=word_embeddings.sparse if sparse is None else sparse, backend=backend,
        device="meta", dtype=weight.dtype)
    fused.weight = weight
    if position_embeddings is not None:
        fused.position_weight = position_embeddings.weight
    if token_type_embeddings is not None:
        fused.segment_weight = token_type_embeddings.weight
    return fused


def _check_embedding(name: str, module: nn.Embedding, like: nn.Embedding | None = None) -> None:
    if not isinstance(module, nn.Embedding):
        raise TypeError(f"{name} must be an nn.Embedding, got {type(module).__name__}")
    if module.max_norm is not None or module.scale_grad_by_freq:
        raise ValueError(f"{name} uses max_norm or scale_grad_by_freq, which the fused operator does not support")
    if like is not None and module.embedding_dim != like.embedding_dim:
        raise ValueError(f"{name} has embedding_dim {module.embedding_dim}, but word_embeddings has {like.embedding_dim}")


@dataclasses.dataclass
class PatchReport:
    """What ``patch_model`` replaced: one line per embedding block, or why nothing was."""

    replaced: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.replaced)

    def __str__(self) -> str:
        lines = [f"fused: {line}" for line in self.replaced] + [f"left as is: {line}" for line in self.skipped]
        if not self.replaced:
            lines.append("no supported embedding block was found; the model is unchanged (supported: BERT/RoBERTa-style "
                         "*Embeddings with word, position and token-type tables, ModernBERT-style tok_embeddings + norm + drop, "
                         "and GPT-2-style wte + wpe)")
        return "\n".join(lines)


def patch_model(model: nn.Module, *, sparse: bool | None = None, backend: str = "auto") -> PatchReport:
    """Fuse the embedding blocks of a Hugging Face model in place and report what changed.

    Recognised: BERT/RoBERTa-style ``*Embeddings`` modules (word + learned position + token type, then
    their LayerNorm and dropout; RoBERTa's padding-aware positions included), ModernBERT-style ones
    (``tok_embeddings``, then ``norm`` and ``drop``) and GPT-2-style models (``wte`` + ``wpe``). The
    LayerNorm and dropout after the sum are fused too, with their own parameters (shared, not copied),
    ``eps`` and ``p`` (dropout only in training mode), where the fused operator computes exactly what they
    do; otherwise only the sum is fused and they run as before (the report says which and why). Calls
    with ``inputs_embeds`` run the original code. ``sparse=True`` switches the word tables to sparse
    gradients (train them with ``torch.optim.SparseAdam``); None keeps each table's own setting. A model
    with nothing recognised is left untouched and the report (also a warning) says so.
    """
    report = PatchReport()
    for name, module in model.named_modules():
        label = f"{name or type(model).__name__} ({type(module).__name__})"
        if isinstance(module, (_FusedBertStyleEmbeddings, _FusedModernBertStyle, _FusedGPT2Style)):
            report.skipped.append(f"{label}: already fused")
            continue
        # None: not an embedding block; a str: why it is not fused
        kind = _bert_style(module) or _modernbert_style(module) or _gpt2_style(module)
        if kind is None:
            continue
        if isinstance(kind, str):
            report.skipped.append(f"{label}: {kind}")
            continue
        mixin, arguments, word, description, norm_unfused = kind
        if sparse is not None:
            word.sparse = sparse
        module.__class__ = _fused_class(mixin, type(module), arguments)
        module.embedfast_backend = backend
        module.embedfast_fuse_norm = norm_unfused is None
        if mixin is _FusedGPT2Style:
            module.wpe.__class__ = _PositionsAddedUpstream
        report.replaced.append(f"{label}: {description}; {_fusion_description(module, norm_unfused)}")
    if not report.replaced:
        warnings.warn(f"embedfast.patch_model: {report}", stacklevel=2)
    return report


@dataclasses.dataclass(frozen=True)
class _ForwardArguments:
    """A forward's argument names, read once per class when it is patched (never per call).

    The past-length argument has had two names: BERT's ``past_key_values_length`` became
    ``cache_length`` and GPT-2's ``past_key_values`` became ``cache`` in transformers 5.24.
    ``past_names`` holds this release's name, then the older ones, which its deprecation decorator
    still maps through ``**kwargs``. A newer name given to an older release is ignored, as it is there.
    """

    positional: tuple[str, ...]
    keywords: frozenset[str] | None  # every name the forward takes; None when it also takes **kwargs
    past_names: tuple[str, ...]

    @classmethod
    def read(cls, forward, required: set[str], past_names: tuple[str, ...], exact: bool = False) -> _ForwardArguments | str:
        """The names of ``forward`` (an unbound method), or why they are not the ones expected;
        ``past_names`` lists every name the past-length argument has had, oldest first (none: it takes none).
        ``exact``: no other named argument either (one the fused forward would ignore, such as ERNIE's
        ``task_type_ids``, would change the result)."""
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # without self
        names = {p.name for p in parameters if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
        past = [name for name in past_names if name in names]
        if not required <= names or len(past) != min(len(past_names), 1) or (exact and names - required - set(past)):
            expected = ", ".join(sorted(required)) + (f" and one of {' / '.join(past_names)}" if past_names else "")
            return (f"unsupported forward signature ({', '.join(p.name for p in parameters)}): expected "
                    f"{expected}{' and nothing else' if exact else ''}")
        positional = tuple(p.name for p in parameters
                           if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        older = past_names[:past_names.index(past[0])] if past else ()
        return cls(positional, None if takes_any else frozenset(names), (*past, *reversed(older)))

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """The call's arguments by name, or the ``TypeError`` Python raises for a call the forward cannot take."""
        if len(args) > len(self.positional):
            raise TypeError(f"forward() takes {len(self.positional)} positional arguments but {len(args)} were given")
        call = dict(zip(self.positional, args))
        for name in kwargs:
            if name in call:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            if self.keywords is not None and name not in self.keywords:
                raise TypeError(f"forward() got an unexpected keyword argument {name!r}")
        call.update(kwargs)
        return call

    def past(self, call: dict, default=None):
        """The past-length (or cache) argument of a bound call, under whichever name it was given."""
        return next((call[name] for name in self.past_names if name in call), default)


_BERT_ARGUMENTS = {"input_ids", "token_type_ids", "position_ids", "inputs_embeds"}
_BERT_PAST = ("past_key_values_length", "cache_length")
_GPT2_ARGUMENTS = {"input_ids", "position_ids", "inputs_embeds"}
_GPT2_PAST = ("past_key_values", "cache")
_MODERNBERT_ARGUMENTS = {"input_ids", "inputs_embeds"}
# what ModernBertEmbeddings computes for input_ids (from 4.48, when it came; some releases also hold a
# torch.compile'd copy of the same expression, which the fused forward replaces as well)
_MODERNBERT_LOOKUP = "self.drop(self.norm(self.tok_embeddings(input_ids)))"


def _bert_style(module: nn.Module):
    tables = [getattr(module, name, None) for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")]
    if not all(isinstance(t, nn.Embedding) for t in tables) or not hasattr(module, "LayerNorm") or not hasattr(module, "dropout"):
        return None
    arguments = _ForwardArguments.read(type(module).forward, _BERT_ARGUMENTS, _BERT_PAST, exact=True)
    if isinstance(arguments, str):
        return arguments
    if getattr(module, "position_embedding_type", "absolute") != "absolute":
        return f"unsupported position_embedding_type {module.position_embedding_type!r}"
    if any(t.max_norm is not None or t.scale_grad_by_freq for t in tables):
        return "unsupported: max_norm or scale_grad_by_freq"
    if getattr(module, "rescale_embeddings", False):
        return "unsupported: rescale_embeddings (the word rows are scaled)"
    tail = _forward_tail(type(module).forward)
    if tail is not None and tail != ("LayerNorm", "dropout"):
        return ("its forward does not end with self.dropout(self.LayerNorm(embeddings))"
                + (f" but applies {' then '.join(tail)}" if tail else ""))
    roberta = tables[1].padding_idx is not None
    norm_unfused = ("its forward's source cannot be read to confirm it ends with dropout(LayerNorm(sum))" if tail is None
                    else _norm_unfusable(module.LayerNorm, module.dropout, tables[0]))
    return (_FusedBertStyleEmbeddings, arguments, tables[0],
            "padding-aware learned positions (RoBERTa)" if roberta else "learned positions", norm_unfused)


def _forward_tail(forward) -> tuple[str, ...] | None:
    """The submodules a forward applies in its last two statements before ``return``: ``("LayerNorm",
    "dropout")`` for ``x = self.LayerNorm(x); x = self.dropout(x); return x``, () for any other ending,
    None when its source cannot be read. Read once per patched instance, never per call."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.FunctionDef) else []
    if len(body) < 3 or not isinstance(body[-1], ast.Return) or not isinstance(body[-1].value, ast.Name):
        return ()
    value, applied = body[-1].value.id, []
    for statement in body[-3:-1]:
        call = statement.value if isinstance(statement, ast.Assign) else None
        if (not isinstance(call, ast.Call) or len(statement.targets) != 1 or not isinstance(statement.targets[0], ast.Name)
                or statement.targets[0].id != value or call.keywords or len(call.args) != 1
                or not isinstance(call.args[0], ast.Name) or call.args[0].id != value
                or not isinstance(call.func, ast.Attribute) or not isinstance(call.func.value, ast.Name)
                or call.func.value.id != "self"):
            return ()
        applied.append(call.func.attr)
    return tuple(applied)


def _norm_unfusable(norm: nn.Module, dropout: nn.Module, word: nn.Embedding) -> str | None:
    """Why the fused operator cannot compute ``dropout(norm(x))`` exactly as these modules do, or None if it can."""
    if not isinstance(norm, nn.LayerNorm) or type(norm).forward is not nn.LayerNorm.forward:
        return f"its LayerNorm is a {type(norm).__name__}, not an nn.LayerNorm"
    if tuple(norm.normalized_shape) != (word.embedding_dim,):
        return f"its LayerNorm normalizes over {tuple(norm.normalized_shape)}, not ({word.embedding_dim},)"
    if not norm.elementwise_affine:
        return "its LayerNorm has no elementwise_affine weight"
    if not isinstance(dropout, nn.Dropout) or type(dropout).forward is not nn.Dropout.forward:
        return f"its dropout is a {type(dropout).__name__}, not an nn.Dropout"
    return None


def _modernbert_style(module: nn.Module):
    word, norm, dropout = (getattr(module, name, None) for name in ("tok_embeddings", "norm", "drop"))
    if not isinstance(word, nn.Embedding) or not isinstance(norm, nn.LayerNorm) or not isinstance(dropout, nn.Dropout):
        return None
    arguments = _ForwardArguments.read(type(module).forward, _MODERNBERT_ARGUMENTS, (), exact=True)
    if isinstance(arguments, str):
        return arguments
    try:
        source = inspect.getsource(type(module))
    except (OSError, TypeError):
        source = ""
    if _MODERNBERT_LOOKUP not in source:
        return f"its forward's source does not show {_MODERNBERT_LOOKUP}"
    if word.max_norm is not None or word.scale_grad_by_freq:
        return "unsupported: max_norm or scale_grad_by_freq"
    norm_unfused = _norm_unfusable(norm, dropout, word)
    if norm_unfused is not None:  # its word lookup alone is one nn.Embedding already
        return f"{norm_unfused}, and without the norm there is no sum to fuse"
    return _FusedModernBertStyle, arguments, word, "no positions", None


def _gpt2_style(module: nn.Module):
    tables = [getattr(module, name, None) for name in ("wte", "wpe")]
    if not all(isinstance(t, nn.Embedding) for t in tables):
        return None
    arguments = _ForwardArguments.read(type(module).forward, _GPT2_ARGUMENTS, _GPT2_PAST)
    if isinstance(arguments, str):
        return arguments
    if any(t.max_norm is not None or t.scale_grad_by_freq or t.padding_idx is not None for t in tables):
        return "unsupported: max_norm, scale_grad_by_freq or padding_idx"
    return _FusedGPT2Style, arguments, tables[0], "wte + wpe", "no LayerNorm follows the sum"


@functools.cache
def _fused_class(mixin: type, original: type, arguments: _ForwardArguments) -> type:
    """One fused subclass per patched class: every instance of a class shares it and its argument names."""
    return type(f"Fused{original.__name__}", (mixin, original), {"_embedfast_arguments": arguments})


def _cache_length(cache) -> int:
    """Tokens already in a KV cache: a ``Cache`` object, or the legacy tuple of (key, value) per layer."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    first_layer = cache[0] if len(cache) else None
    return 0 if first_layer is None or first_layer[0] is None else first_layer[0].shape[-2]


class _NoGradRow(torch.autograd.Function):
    """Identity whose gradient has one row zeroed: ``nn.Embedding(padding_idx=row)`` for a table."""

    @staticmethod
    def forward(ctx, table: torch.Tensor, row: int) -> torch.Tensor:
        ctx.row = row
        return table.view_as(table)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_fill(0, torch.tensor([ctx.row], device=grad.device), 0), None


def _fusion_description(module: nn.Module, norm_unfused: str | None) -> str:
    """The report's word on the norm: fused (with its eps and p), or why only the sum is."""
    if norm_unfused is not None:
        return f"sum only ({norm_unfused}; it runs as before)"
    norm, dropout = _norm_and_dropout(module)
    what = "lookup" if isinstance(module, _FusedModernBertStyle) else "sum"
    return f"{what} + LayerNorm (eps={norm.eps:g}{'' if norm.bias is not None else ', no bias'}) + dropout (p={dropout.p:g})"


def _norm_and_dropout(module: nn.Module) -> tuple[nn.LayerNorm, nn.Dropout]:
    if isinstance(module, _FusedModernBertStyle):
        return module.norm, module.drop
    return module.LayerNorm, module.dropout


_HALF_DTYPES = (torch.float16, torch.bfloat16)


def _norm_options(module: nn.Module, norm: nn.LayerNorm, dropout: nn.Dropout, weight: torch.Tensor) -> dict | None:
    """The fused operator's norm and dropout arguments for this call, or None where the modules must run themselves:
    hooks on them, parameters in another dtype, autocast (whose LayerNorm returns float32 for half tables), a
    dropout probability the operator does not take."""
    if not module.embedfast_fuse_norm or norm._forward_hooks or norm._forward_pre_hooks or dropout._forward_hooks \
            or dropout._forward_pre_hooks:
        return None
    p = dropout.p if dropout.training else 0.0
    if not 0 <= p < 1 or norm.weight.dtype != weight.dtype or (norm.bias is not None and norm.bias.dtype != weight.dtype):
        return None
    if weight.dtype in _HALF_DTYPES and torch.is_autocast_enabled(weight.device.type):
        return None
    return {"norm": "layernorm", "norm_weight": norm.weight, "norm_bias": norm.bias, "norm_eps": norm.eps, "dropout_p": p}


class _FusedBertStyleEmbeddings:
    """Mixed in front of a BERT/RoBERTa-style ``*Embeddings`` class by ``patch_model``: the sum, and where
    ``_norm_options`` allows it the LayerNorm and dropout, in one operator."""

    def forward(self, *args, **kwargs):
        call = self._embedfast_arguments.bind(args, kwargs)
        input_ids = call.get("input_ids")
        if input_ids is None or call.get("inputs_embeds") is not None:
            return super().forward(*args, **kwargs)
        token_type_ids, position_ids = call.get("token_type_ids"), call.get("position_ids")
        past_length = self._embedfast_arguments.past(call, 0)
        position_weight = self.position_embeddings.weight
        position_padding = self.position_embeddings.padding_idx
        if position_padding is not None:  # RoBERTa: pads sit at position padding_idx, whose row gets no gradient
            if position_ids is None:
                position_ids = padding_aware_position_ids(input_ids, position_padding, past_length)
            position_weight = _NoGradRow.apply(position_weight, position_padding)
        word = self.word_embeddings
        norm = _norm_options(self, self.LayerNorm, self.dropout, word.weight)
        embeddings = fused_input_embedding(
            input_ids, word.weight, token_type_ids=token_type_ids, segment_weight=self.token_type_embeddings.weight,
            position_ids=position_ids, position_weight=position_weight, position="learned", scale=None,
            padding_idx=word.padding_idx, sparse=word.sparse, past_length=past_length,
            backend=self.embedfast_backend, **(norm or {}))
        return embeddings if norm is not None else self.dropout(self.LayerNorm(embeddings))


class _FusedModernBertStyle:
    """Mixed in front of a ModernBERT-style ``*Embeddings`` class by ``patch_model``: ``drop(norm(tok_embeddings(ids)))``
    in one operator; ``inputs_embeds``, or a call ``_norm_options`` refuses, runs the original code."""

    def forward(self, *args, **kwargs):
        call = self._embedfast_arguments.bind(args, kwargs)
        input_ids, word = call.get("input_ids"), self.tok_embeddings
        norm = None if input_ids is None else _norm_options(self, self.norm, self.drop, word.weight)
        if norm is None or call.get("inputs_embeds") is not None:
            return super().forward(*args, **kwargs)
        return fused_input_embedding(input_ids, word.weight, position="none", scale=None, padding_idx=word.padding_idx,
                                     sparse=word.sparse, backend=self.embedfast_backend, **norm)


class _PositionsAddedUpstream(nn.Embedding):
    """GPT-2's ``wpe`` after patching: same table, but the fused embedding already added it."""

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.weight.new_zeros(())


class _FusedGPT2Style:
    """Mixed in front of a GPT-2-style model class by ``patch_model``: ``wte(ids) + wpe(positions)``
    fused and handed to the original forward as ``inputs_embeds``; the original then adds ``wpe``'s
    zero (one elementwise pass) and, if given, the token-type rows."""

    def forward(self, *args, **kwargs):
        call = self._embedfast_arguments.bind(args, kwargs)
        input_ids, inputs_embeds, positions = call.get("input_ids"), call.get("inputs_embeds"), call.get("position_ids")
        past = _cache_length(self._embedfast_arguments.past(call))
        if input_ids is not None and inputs_embeds is None:
            call["inputs_embeds"] = fused_input_embedding(
                input_ids, self.wte.weight, position_ids=positions, position_weight=self.wpe.weight, position="learned",
                scale=None, sparse=self.wte.sparse, past_length=past, backend=self.embedfast_backend)
            call["input_ids"] = None
        elif inputs_embeds is not None:
            if positions is None:
                positions = past + torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
            call["inputs_embeds"] = inputs_embeds + F.embedding(positions, self.wpe.weight)
        return super().forward(**call)
