"""The operators' vocabulary shard and sequence chunk (spec.py), on every backend: the shards' and chunks' outputs
and gradients add up to the whole operator's, each backend agrees with the reference, and nothing of a row a
token does not use leaks into it."""

import pytest
import torch

from embedfast.backends import forward_op
from embedfast.ops import call_forward
from embedfast.spec import TOLERANCE, BackwardInputs, ForwardInputs, GradientOptions, PositionMode, TokenGrad

VOCAB, BATCH, SEQ_LEN, POSITIONS, SEGMENTS = 50, 3, 7, 12, 3
PADDING = 22  # inside the middle shard of the three-way split: its local row is 5
# (vocab_start, vocab_end, chunk_start, chunk_end) per rank of an uneven three-way split, and a two-way one
SPLITS = {"three-ranks": [(0, 17, 0, 2), (17, 34, 2, 4), (34, 50, 4, 7)], "two-ranks": [(0, 25, 0, 3), (25, 50, 3, -1)]}
SOURCES = ("default", "explicit", "packed", "sinusoid", "none")


def _ops(backend):
    return forward_op(backend), getattr(torch.ops.embedfast, f"backward_{backend}")


def _problem(source, dtype, device, generator):
    """Whole-vocabulary tables and the forward's inputs (flattened BATCH x SEQ_LEN tokens, PADDING among them)."""
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    tokens = BATCH * SEQ_LEN
    ids = torch.randint(0, VOCAB, (tokens,), generator=generator).to(device)
    ids[::4] = PADDING
    types = torch.randint(0, SEGMENTS, (tokens,), generator=generator).to(device)
    learned = source != "sinusoid" and source != "none"
    inputs = ForwardInputs(
        ids, randn(VOCAB, 9), token_type_ids=types, segment_weight=randn(SEGMENTS, 9), scale=1.5,
        position_weight=randn(POSITIONS, 9) if learned else None, seq_len=SEQ_LEN, position_offset=1,
        position_mode=int(PositionMode.LEARNED if learned else PositionMode.NONE if source == "none" else PositionMode.CONCAT),
        position_ids=torch.randint(0, POSITIONS, (tokens,), generator=generator).to(device) if source == "explicit" else None,
        cu_seqlens=torch.tensor([0, 5, 5, 13, tokens], device=device) if source == "packed" else None)
    return inputs, randn(tokens, 9)


def _shard(inputs, start, end, chunk_start, chunk_end):
    return inputs._replace(weight=inputs.weight[start:end].contiguous(), vocab_start=start, vocab_size=VOCAB,
                           chunk_start=chunk_start, chunk_end=chunk_end)


def _backward_inputs(inputs, grad_out, token_grad):
    position_rows = inputs.position_weight.shape[0] if inputs.position_weight is not None else 0
    return BackwardInputs(
        grad_out, inputs.input_ids, inputs.weight.shape[0], position_ids=inputs.position_ids,
        token_type_ids=inputs.token_type_ids, cu_seqlens=inputs.cu_seqlens, token_grad=int(token_grad), padding_idx=PADDING,
        scale=inputs.scale, num_positions=position_rows, num_segments=SEGMENTS, position_offset=inputs.position_offset,
        seq_len=inputs.seq_len, vocab_start=inputs.vocab_start, vocab_size=inputs.vocab_size,
        chunk_start=inputs.chunk_start, chunk_end=inputs.chunk_end)


def _assert_close(actual, expected, dtype, what):
    tol = TOLERANCE[dtype]
    atol = tol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("source", SOURCES)
def test_shards_and_chunks_add_up_to_the_whole_operator(source, split, backend, device):
    """In float64: the ranks' outputs sum to the whole output; their dense token gradients are the whole one's
    rows, and their position and segment gradients sum to the whole one's."""
    forward, backward = _ops(backend)
    whole, grad_out = _problem(source, torch.float64, device, torch.Generator().manual_seed(len(split) * 10 + len(source)))
    out = sum(forward(*_shard(whole, *rank)) for rank in split)
    _assert_close(out, forward(*whole), torch.float64, "forward")
    expected = backward(*_backward_inputs(whole, grad_out, TokenGrad.DENSE))
    ranks = [backward(*_backward_inputs(_shard(whole, *rank), grad_out, TokenGrad.DENSE)) for rank in split]
    _assert_close(torch.cat([grads[0] for grads in ranks]), expected[0], torch.float64, "token gradient")
    for i, name in ((1, "position gradient"), (2, "segment gradient")):
        _assert_close(sum(grads[i] for grads in ranks), expected[i], torch.float64, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("source", SOURCES)
def test_each_backend_matches_the_reference_on_a_shard(source, dtype, backend, device):
    """The middle rank of the three-way split: forward, sparse values and every gradient, element by element."""
    forward, backward = _ops(backend)
    whole, grad_out = _problem(source, dtype, device, torch.Generator().manual_seed(len(source) + 100 * dtype.itemsize))
    inputs = _shard(whole, *SPLITS["three-ranks"][1])
    _assert_close(forward(*inputs), _ops("reference")[0](*inputs), dtype, "forward")
    for token_grad in (TokenGrad.DENSE, TokenGrad.SPARSE):
        args = _backward_inputs(inputs, grad_out, token_grad)
        for what, got, want in zip(("token", "position", "segment"), backward(*args), _ops("reference")[1](*args)):
            _assert_close(got, want, dtype, f"{token_grad.name.lower()} {what} gradient")


def test_nothing_leaks_from_rows_a_token_does_not_use(backend, device):
    """Inf in the position row only tokens out of the chunk use, and in their grad_out: every other output and the
    position and segment gradients stay finite; tokens of other shards read no row."""
    forward, backward = _ops(backend)
    whole, grad_out = _problem("default", torch.float32, device, torch.Generator().manual_seed(7))
    inputs = _shard(whole, 17, 34, 2, 4)
    outside = (torch.arange(BATCH * SEQ_LEN, device=device) % SEQ_LEN < 2) | (torch.arange(BATCH * SEQ_LEN, device=device) % SEQ_LEN >= 4)
    inputs.position_weight[whole.position_offset + 0] = float("inf")  # column 0: outside the chunk
    grad_out[outside] = float("inf")
    out = forward(*inputs)
    assert torch.isfinite(out).all()
    other_shards = (inputs.input_ids < 17) | (inputs.input_ids >= 34)
    assert other_shards.any()
    expected_side = inputs.segment_weight[inputs.token_type_ids] + inputs.position_weight[
        whole.position_offset + torch.arange(BATCH * SEQ_LEN, device=device) % SEQ_LEN]
    torch.testing.assert_close(out[other_shards & ~outside], expected_side[other_shards & ~outside])
    torch.testing.assert_close(out[other_shards & outside], torch.zeros_like(out[other_shards & outside]))
    _, position_grad, segment_grad = backward(*_backward_inputs(inputs, grad_out, TokenGrad.NONE))
    assert torch.isfinite(position_grad).all() and torch.isfinite(segment_grad).all()


def test_ids_are_checked_against_the_whole_vocabulary(backend, device):
    forward, _ = _ops(backend)
    whole, _ = _problem("sinusoid", torch.float32, device, torch.Generator().manual_seed(3))
    inputs = _shard(whole, 17, 34, 0, -1)
    forward(*inputs._replace(input_ids=inputs.input_ids.clone().fill_(VOCAB - 1)))  # another shard's id: fine
    with pytest.raises(IndexError, match=f"input_ids contains {VOCAB}, out of range for a table of {VOCAB} rows"):
        forward(*inputs._replace(input_ids=inputs.input_ids.clone().fill_(VOCAB)))


def test_derivatives_of_a_shard_match_numerical_ones(backend, device):
    """Reverse mode, forward mode and double backward through ``call_forward`` on the middle shard and chunk, in
    float64 (the dense token gradient; no padding id: its row gets no gradient by design, not by derivative)."""
    whole, _ = _problem("default", torch.float64, device, torch.Generator().manual_seed(11))
    inputs = _shard(whole, *SPLITS["three-ranks"][1])
    tables = [t.detach().clone().requires_grad_() for t in (inputs.weight, inputs.position_weight, inputs.segment_weight)]

    def embed(weight, position_weight, segment_weight):
        args = inputs._replace(weight=weight, position_weight=position_weight, segment_weight=segment_weight)
        return call_forward(backend, *args, *GradientOptions(padding_idx=-1, sparse=False))

    assert torch.autograd.gradcheck(embed, tables, check_forward_ad=True, fast_mode=True)
    assert torch.autograd.gradgradcheck(embed, tables, fast_mode=True)
