"""Test cases and the ground truth: autograd through the unfused reference in float64."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import embedfast
from embedfast.reference import unfused_input_embedding
from embedfast.spec import TOLERANCE  # relative; the absolute tolerance is this times the largest |truth|
from embedfast.spec import TokenGrad

# the norm backward's last arguments (norm_grads, token_grad, padding_idx, position_grad, segment_grad): every
# gradient, the token table's sparse
ALL_NORM_GRADS = (True, int(TokenGrad.SPARSE), -1, True, True)
# each way a norm backward can be asked for the tables' gradients: sparse, dense with a padding row, none
NORM_GRAD_REQUESTS = {"sparse": ALL_NORM_GRADS, "dense-padding": (True, int(TokenGrad.DENSE), 3, True, True),
                      "none": (True, int(TokenGrad.NONE), -1, False, False)}
# why a GPU's norm over one column is not compared with the reference: LayerNorm's variance is 0 there (rstd
# 1/sqrt(eps)), RMSNorm's output is +-weight and its derivative a cancellation, so the one rounding fewer of a GPU's
# fused multiply-add, amplified ~300x, moves the gradients past any fixed tolerance; the CPU tests cover dim 1, where
# both round alike
GPU_DIM_1_NORM = "a norm over one column is degenerate: rounding differences amplified by 1/sqrt(eps) (tests/cases.py)"


@dataclasses.dataclass(frozen=True)
class Case:
    shape: tuple = (3, 5)
    dim: int = 64
    vocab: int = 50
    position: str = "sinusoidal"
    layout: str = "interleaved"
    max_positions: int | None = None
    segments: int = 0
    padding_idx: int | None = None
    past_length: int = 0
    explicit_positions: bool = False
    explicit_token_types: bool = True
    ids_dtype: torch.dtype = torch.int64
    noncontiguous: bool = False
    scale: object = "sqrt"
    sparse: bool = True
    norm: str | None = None
    norm_eps: float = 1e-5

    def module(self, dtype, device, backend, dropout: float = 0.0) -> embedfast.FusedInputEmbedding:
        module = embedfast.FusedInputEmbedding(
            self.vocab, self.dim, padding_idx=self.padding_idx, num_segments=self.segments, position=self.position,
            max_positions=self.max_positions, sinusoid_layout=self.layout, scale=self.scale, sparse=self.sparse,
            norm=self.norm, norm_eps=self.norm_eps, dropout=dropout, backend=backend, device=device, dtype=dtype)
        with torch.no_grad():  # a non-zero padding row makes the forward check the padding row too
            module.weight.normal_()
            for parameter in (module.norm_weight, module.norm_bias):  # not the ones and zeros a bug could hide behind
                if parameter is not None:
                    parameter.uniform_(0.5, 1.5)
        return module

    def inputs(self, device, generator=None) -> dict:
        """Fresh random ids (with duplicates and the padding token) and optional positions / token types."""
        ids = _randint(self.vocab, self.shape, self.ids_dtype, device, generator)
        if self.padding_idx is not None and ids.numel() > 0:
            ids.view(-1)[:: 3] = self.padding_idx % self.vocab
        if self.noncontiguous:
            ids = _noncontiguous(ids)
        kwargs = {"input_ids": ids}
        if self.segments and self.explicit_token_types:
            types = _randint(self.segments, self.shape, self.ids_dtype, device, generator)
            kwargs["token_type_ids"] = _noncontiguous(types) if self.noncontiguous else types
        if self.explicit_positions:
            bound = self.max_positions or 40
            kwargs["position_ids"] = _randint(bound, self.shape[-1:], torch.int64, device, generator)  # broadcast over batch
        return kwargs


def _noncontiguous(t):
    """The same values, every other element of a wider buffer."""
    return torch.stack([t, t], dim=-1)[..., 0]


def _randint(high, shape, dtype, device, generator):
    return torch.randint(0, high, shape, dtype=dtype, generator=generator).to(device)


def truth(module: embedfast.FusedInputEmbedding, inputs: dict, past_length: int = 0, dtype: torch.dtype = torch.float64):
    """The unfused reference on ``dtype`` copies of the module's tables (leaves that collect gradients)."""
    ids = inputs["input_ids"]
    weight = module.weight.detach().to(dtype).requires_grad_()
    tables = {"weight": weight}
    kwargs = {"scale": module.embed_scale, "padding_idx": module.padding_idx}
    if module.position != "none":
        seq_len = ids.shape[-1] if ids.dim() else 1
        positions = inputs.get("position_ids")
        if positions is None:
            positions = past_length + torch.arange(seq_len, device=ids.device)
        positions = positions.expand(ids.shape)
        if module.position == "learned":
            table = module.position_weight.detach().to(dtype).requires_grad_()
            tables["position_weight"] = table
        else:
            rows = int(positions.max()) + 1 if positions.numel() else 1
            table = embedfast.sinusoidal_positions(rows, module.embedding_dim, module.sinusoid_layout, module.sinusoid_base,
                                                   dtype=torch.float64, device=ids.device).to(dtype)
        kwargs.update(position_table=table, position_ids=positions)
    if module.segment_weight is not None:
        segments = module.segment_weight.detach().to(dtype).requires_grad_()
        tables["segment_weight"] = segments
        kwargs.update(segment_weight=segments, token_type_ids=inputs.get("token_type_ids", torch.zeros_like(ids)).expand(ids.shape))
    out = unfused_input_embedding(ids, weight, **kwargs)
    if module.norm is not None:
        for name in ("norm_weight", "norm_bias"):
            if getattr(module, name) is not None:
                tables[name] = getattr(module, name).detach().to(dtype).requires_grad_()
        shape = (module.embedding_dim,)
        if module.norm == "layernorm":
            out = F.layer_norm(out, shape, tables["norm_weight"], tables.get("norm_bias"), module.norm_eps)
        else:
            out = F.rms_norm(out, shape, tables["norm_weight"], module.norm_eps)
    return out, tables


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Every element within the dtype's tolerance of the float64 truth."""
    tol = TOLERANCE[dtype]
    expected = expected.detach().to(torch.float64)
    atol = tol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


def dense_grad(grad: torch.Tensor) -> torch.Tensor:
    """A sparse gradient summed in float64: its per-token values are what the operator computes; summing
    duplicates in float16 (as ``coalesce`` would) adds rounding the operator is not responsible for."""
    return grad.to(torch.float64).coalesce().to_dense() if grad.is_sparse else grad


def assert_case_matches_truth(case: Case, dtype: torch.dtype, backend: str, device: str, generator: torch.Generator,
                              extremes: bool = False) -> None:
    """The module's forward and every gradient against autograd through the float64 reference.

    ``extremes``: the first and last ids are 0 and ``vocab - 1``.
    """
    module = case.module(dtype, device, backend)
    inputs = case.inputs(device, generator)
    ids = inputs["input_ids"]
    if extremes and ids.numel() >= 2:
        ids.view(-1)[0], ids.view(-1)[-1] = 0, case.vocab - 1

    out = module(**inputs, past_length=case.past_length)
    expected, tables = truth(module, inputs, case.past_length)
    assert out.shape == (*ids.shape, case.dim)
    assert out.dtype == dtype
    assert_close(out, expected, dtype, "forward")
    if dtype != torch.float32:  # one rounding: no worse than twice the error of eager PyTorch in this dtype
        eager, _ = truth(module, inputs, case.past_length, dtype=dtype)
        error, eager_error = (out.double() - expected).abs(), (eager.double() - expected).abs()
        if error.numel():
            assert error.max() <= 2 * eager_error.max() + 1e-6 * expected.abs().max()

    grad_out = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(device, dtype)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    assert module.weight.grad.is_sparse == case.sparse
    if case.sparse:
        assert module.weight.grad._nnz() < 2 or not module.weight.grad.is_coalesced()
        assert module.weight.grad.dtype == dtype
    for name, table in tables.items():
        grad = getattr(module, name).grad
        assert grad.dtype == dtype
        assert_close(dense_grad(grad), table.grad, dtype, f"{name}.grad")
