"""The operators' own checks: every backend rejects each bad input with the same exception and message
(op_checks.py for the Python operators, checks.h for the C++ ones), and reads nothing it should not."""

import pytest
import torch

from cases import ALL_NORM_GRADS
from embedfast.backends import unavailable_reason
from embedfast.spec import BackwardInputs, ForwardInputs, NormInputs, NormMode, PositionMode, TokenGrad


def _forward(device):
    ids = torch.tensor([1, 4, 2, 0, 3, 3], device=device)
    return ForwardInputs(ids, torch.randn(5, 4, device=device), token_type_ids=ids % 2,
                         segment_weight=torch.randn(2, 4, device=device), position_weight=torch.randn(6, 4, device=device),
                         position_mode=PositionMode.LEARNED, seq_len=3)


def _backward(device):
    ids = torch.tensor([1, 4, 2, 0, 3, 3], device=device)
    return BackwardInputs(torch.randn(6, 4, device=device), ids, 5, token_type_ids=ids % 2, token_grad=TokenGrad.DENSE,
                          num_positions=6, num_segments=2, seq_len=3)


def _packed(device, *boundaries):
    return torch.tensor(boundaries, device=device)


BAD_FORWARD = {
    "weight-1d": lambda a, d: a._replace(weight=a.weight[0]),
    "ids-float": lambda a, d: a._replace(input_ids=a.input_ids.float()),
    "ids-2d": lambda a, d: a._replace(input_ids=a.input_ids.view(2, 3)),
    "ids-noncontiguous": lambda a, d: a._replace(input_ids=torch.stack([a.input_ids, a.input_ids], 1)[:, 0]),
    "token-types-count": lambda a, d: a._replace(token_type_ids=a.token_type_ids[:4]),
    "token-types-dtype": lambda a, d: a._replace(token_type_ids=a.token_type_ids.int()),
    "token-types-without-table": lambda a, d: a._replace(segment_weight=None),
    "position-mode": lambda a, d: a._replace(position_mode=7),
    "learned-without-table": lambda a, d: a._replace(position_weight=None),
    "table-without-learned": lambda a, d: a._replace(position_mode=PositionMode.CONCAT),
    "segment-dim": lambda a, d: a._replace(segment_weight=torch.randn(2, 3, device=d)),
    "segment-dtype": lambda a, d: a._replace(segment_weight=a.segment_weight.double()),
    "id-too-large": lambda a, d: a._replace(input_ids=a.input_ids + 1),
    "token-type-negative": lambda a, d: a._replace(token_type_ids=a.token_type_ids - 1),
    "position-id-too-large": lambda a, d: a._replace(position_ids=a.input_ids + 2),
    "default-positions-past-table": lambda a, d: a._replace(position_offset=4),
    "position-offset-negative": lambda a, d: a._replace(position_offset=-1),
    "seq-len-zero": lambda a, d: a._replace(seq_len=0),
    "packed-with-position-ids": lambda a, d: a._replace(position_ids=a.input_ids, cu_seqlens=_packed(d, 0, 6)),
    "packed-empty": lambda a, d: a._replace(cu_seqlens=_packed(d)),
    "packed-not-from-zero": lambda a, d: a._replace(cu_seqlens=_packed(d, 1, 6)),
    "packed-decreasing": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 4, 3, 6)),
    "packed-not-to-the-end": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 2, 5)),
    "packed-past-table": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 6), position_offset=1),
    "packed-dtype": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 6).int()),
    "vocab-start-negative": lambda a, d: a._replace(vocab_start=-1, vocab_size=9),
    "vocab-size-negative": lambda a, d: a._replace(vocab_size=-2),
    "vocab-start-without-size": lambda a, d: a._replace(vocab_start=2),
    "shard-past-vocabulary": lambda a, d: a._replace(vocab_start=3, vocab_size=7),
    "id-past-vocabulary": lambda a, d: a._replace(input_ids=a.input_ids + 4, vocab_start=2, vocab_size=8),
    "chunk-past-sequence": lambda a, d: a._replace(chunk_end=4),
    "chunk-reversed": lambda a, d: a._replace(chunk_start=2, chunk_end=1),
    "chunk-end-below-minus-one": lambda a, d: a._replace(chunk_end=-2),
}
BAD_BACKWARD = {
    "grad-rows": lambda a, d: a._replace(grad_out=a.grad_out[:5]),
    "token-grad": lambda a, d: a._replace(token_grad=5),
    "dense-id-too-large": lambda a, d: a._replace(num_embeddings=4),
    "no-embeddings": lambda a, d: a._replace(num_embeddings=0),
    "position-id-too-large": lambda a, d: a._replace(position_ids=a.input_ids + 2),
    "default-positions-past-table": lambda a, d: a._replace(position_offset=4),
    "packed-not-to-the-end": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 2, 7)),
    "packed-past-table": lambda a, d: a._replace(cu_seqlens=_packed(d, 0, 6), position_offset=1),
    "token-type-too-large": lambda a, d: a._replace(token_type_ids=a.token_type_ids + 1),
    "shard-past-vocabulary": lambda a, d: a._replace(vocab_start=2, vocab_size=6),
    "dense-id-past-vocabulary": lambda a, d: a._replace(num_embeddings=2, vocab_start=1, vocab_size=4),
    "chunk-past-sequence": lambda a, d: a._replace(chunk_start=1, chunk_end=5),
}


def _norm(device):
    return NormInputs(torch.randn(4, device=device), torch.randn(4, device=device), NormMode.LAYERNORM, 1e-5, 0.2,
                      torch.tensor([7], device=device))


def _norm_backward(device):
    forward, norm = _forward(device), _norm(device)
    return (torch.randn(6, 4, device=device), torch.randn(6, 2, device=device), *forward, *norm, *ALL_NORM_GRADS)


BAD_NORM = {
    "norm-mode": lambda n, d: n._replace(norm_mode=3),
    "parameters-without-norm": lambda n, d: n._replace(norm_mode=NormMode.NONE),
    "rmsnorm-bias": lambda n, d: n._replace(norm_mode=NormMode.RMSNORM),
    "norm-weight-size": lambda n, d: n._replace(norm_weight=torch.randn(5, device=d)),
    "norm-bias-2d": lambda n, d: n._replace(norm_bias=torch.randn(1, 4, device=d)),
    "norm-weight-dtype": lambda n, d: n._replace(norm_weight=n.norm_weight.double()),
    "norm-eps-negative": lambda n, d: n._replace(norm_eps=-1.0),
    "dropout-one": lambda n, d: n._replace(dropout_p=1.0),
    "dropout-without-seed": lambda n, d: n._replace(dropout_seed=None),
    "seed-dtype": lambda n, d: n._replace(dropout_seed=n.dropout_seed.int()),
    "seed-size": lambda n, d: n._replace(dropout_seed=torch.tensor([1, 2], device=d)),
}
BAD_NORM_BACKWARD = {
    "grad-rows": lambda a, d: (a[0][:5], *a[1:]),
    "grad-dtype": lambda a, d: (a[0].double(), *a[1:]),
    "stats-shape": lambda a, d: (a[0], a[1][:, :1].contiguous(), *a[2:]),
    "stats-dtype": lambda a, d: (a[0], a[1].double(), *a[2:]),
}


def _outcomes(kind, inputs, device):
    outcomes = {}
    for backend in ("reference", "extension", "triton"):
        if unavailable_reason(backend, torch.device(device)) is not None:
            continue
        with pytest.raises(Exception) as raised:
            getattr(torch.ops.embedfast, f"{kind}_{backend}")(*inputs)
        outcomes[backend] = (type(raised.value), str(raised.value).splitlines()[0])
    return outcomes


def _assert_same(outcomes):
    assert outcomes, "no backend to run"
    reference = outcomes["reference"]
    assert reference[0] in (TypeError, ValueError, IndexError), reference
    for backend, outcome in outcomes.items():
        assert outcome == reference, f"{backend}: {outcome} != reference: {reference}"


@pytest.mark.parametrize("corrupt", BAD_FORWARD.values(), ids=BAD_FORWARD.keys())
def test_bad_forward_input_gets_one_answer_from_every_backend(corrupt, device):
    _assert_same(_outcomes("forward", corrupt(_forward(device), device), device))


@pytest.mark.parametrize("corrupt", BAD_BACKWARD.values(), ids=BAD_BACKWARD.keys())
def test_bad_backward_input_gets_one_answer_from_every_backend(corrupt, device):
    _assert_same(_outcomes("backward", corrupt(_backward(device), device), device))


def test_the_good_inputs_pass_everywhere(backend, device):
    forward, backward = _forward(device), _backward(device)
    getattr(torch.ops.embedfast, f"forward_{backend}")(*forward)
    getattr(torch.ops.embedfast, f"backward_{backend}")(*backward)


@pytest.mark.parametrize("corrupt", BAD_NORM.values(), ids=BAD_NORM.keys())
def test_bad_norm_input_gets_one_answer_from_every_backend(corrupt, device):
    forward, norm = _forward(device), corrupt(_norm(device), device)
    _assert_same(_outcomes("norm_forward", (*forward, *norm), device))
    grad_out, stats = torch.randn(6, 4, device=device), torch.randn(6, 2, device=device)
    _assert_same(_outcomes("norm_backward", (grad_out, stats, *forward, *norm, *ALL_NORM_GRADS), device))


@pytest.mark.parametrize("corrupt", BAD_NORM_BACKWARD.values(), ids=BAD_NORM_BACKWARD.keys())
def test_bad_norm_backward_input_gets_one_answer_from_every_backend(corrupt, device):
    _assert_same(_outcomes("norm_backward", corrupt(_norm_backward(device), device), device))


def test_the_good_norm_inputs_pass_everywhere(backend, device):
    getattr(torch.ops.embedfast, f"norm_forward_{backend}")(*_forward(device), *_norm(device))
    getattr(torch.ops.embedfast, f"norm_backward_{backend}")(*_norm_backward(device))
