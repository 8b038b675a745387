"""gradcheck, opcheck, torch.compile and sparse optimizers, for every backend."""

import pytest
import torch

import embedfast
from embedfast import FusedInputEmbedding, fused_input_embedding
from embedfast.backends import forward_op
from embedfast.spec import BackwardInputs, ForwardInputs, GradientOptions, PositionMode, TokenGrad


def _inputs(device, n=6, vocab=9, dim=5):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n,), generator=generator).to(device)
    types = torch.randint(0, 2, (n,), generator=generator).to(device)
    return ids, types


@pytest.mark.parametrize("position", ["learned", "interleaved", "none"])
def test_gradcheck_float64(position, backend, device):
    ids, types = _inputs(device)
    weight = torch.randn(9, 5, dtype=torch.float64, device=device, requires_grad=True)
    segments = torch.randn(2, 5, dtype=torch.float64, device=device, requires_grad=True)
    positions = torch.randn(6, 5, dtype=torch.float64, device=device, requires_grad=True)
    learned = position == "learned"
    mode = {"interleaved": "sinusoidal"}.get(position, position)

    def f(weight, segments, positions):
        return fused_input_embedding(ids.view(2, 3), weight, token_type_ids=types.view(2, 3), segment_weight=segments,
                                     position=mode, position_weight=positions if learned else None,
                                     sparse=False, scale=1.7, backend=backend)

    assert torch.autograd.gradcheck(f, (weight, segments, positions if learned else positions.detach()))


def _op_samples(device):
    ids, types = _inputs(device)
    for requires_grad in (False, True):
        weight = torch.randn(9, 5, device=device, requires_grad=requires_grad)
        segments = torch.randn(2, 5, device=device, requires_grad=requires_grad)
        positions = torch.randn(8, 5, device=device, requires_grad=requires_grad)
        yield ForwardInputs(ids, weight, position_weight=positions, token_type_ids=types, segment_weight=segments, scale=2.0,
                            position_mode=PositionMode.LEARNED, max_positions=8, position_offset=1, seq_len=3)
        yield ForwardInputs(ids, weight, position_ids=ids % 4, segment_weight=segments, position_mode=PositionMode.CONCAT,
                            sinusoid_base=100.0, seq_len=6, check_bounds=False)
        yield ForwardInputs(ids.int(), weight, position_mode=PositionMode.INTERLEAVED, position_offset=3, seq_len=2)
        yield ForwardInputs(ids, weight, position_weight=positions, cu_seqlens=torch.tensor([0, 2, 2, 6], device=device),
                            position_mode=PositionMode.LEARNED, position_offset=1)
        shard = weight.detach()[3:7].clone().requires_grad_(requires_grad)  # rows 3..6 of 9, the chunk [1, 2) of 3
        yield ForwardInputs(ids, shard, position_weight=positions, token_type_ids=types, segment_weight=segments,
                            position_mode=PositionMode.LEARNED, seq_len=3, vocab_start=3, vocab_size=9, chunk_start=1,
                            chunk_end=2)


def test_opcheck(backend, device):
    """The forward operator is differentiated through ``ops.call_forward``'s Function (the operator has no
    padding_idx or sparse flag): checked here without gradients, and by every gradient test through the API."""
    for args in _op_samples(device):
        if not args.weight.requires_grad:
            torch.library.opcheck(forward_op(backend), args)
    ids, types = _inputs(device)
    backward = getattr(torch.ops.embedfast, f"backward_{backend}")
    packed = torch.tensor([0, 4, 6], device=device)
    for requires_grad in (False, True):  # the backward is differentiable too (double backward)
        grad = torch.randn(6, 5, device=device, requires_grad=requires_grad)
        for token_grad in TokenGrad:
            for check_bounds, cu_seqlens in ((True, None), (False, None), (True, packed)):
                torch.library.opcheck(backward, BackwardInputs(
                    grad, ids, 9, token_type_ids=types, cu_seqlens=cu_seqlens, token_grad=token_grad, padding_idx=2,
                    scale=2.0, num_positions=8, num_segments=2, position_offset=1, seq_len=3, check_bounds=check_bounds))
            torch.library.opcheck(backward, BackwardInputs(
                grad, ids, 4, token_type_ids=types, token_grad=token_grad, padding_idx=2, num_positions=8, num_segments=2,
                seq_len=3, vocab_start=3, vocab_size=9, chunk_start=1, chunk_end=2))
    torch.library.opcheck(torch.ops.embedfast.sparse_rows, (ids, grad.detach(), int(ids[0]), 2.0, 0, 9))
    torch.library.opcheck(torch.ops.embedfast.sparse_rows, (ids, grad.detach(), int(ids[0]), 2.0, 3, 4))


def test_opcheck_of_the_compiled_path(backend, device):
    """``differentiable_forward``, what ``torch.compile`` traces: the forward with the gradient's options."""
    differentiable = getattr(torch.ops.embedfast, f"differentiable_forward_{backend}")
    for args, options in zip(_op_samples(device), [GradientOptions(2, True), GradientOptions(-1, False)] * 5):
        torch.library.opcheck(differentiable, (*args, *options))


def test_forward_operator_says_how_it_is_differentiated(backend, device):
    weight = torch.randn(9, 5, device=device, requires_grad=True)
    out = forward_op(backend)(*ForwardInputs(_inputs(device)[0], weight))
    with pytest.raises(RuntimeError, match="fused_input_embedding"):
        out.sum().backward()


def test_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    module = FusedInputEmbedding(50, 16, num_segments=2, padding_idx=0, backend=backend, device=device)
    ids = torch.randint(0, 50, (2, 8), device=device)
    types = torch.randint(0, 2, (2, 8), device=device)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(ids, types)
    out.square().sum().backward()
    compiled_grads = [module.weight.grad.coalesce(), module.segment_weight.grad]
    module.zero_grad(set_to_none=True)
    expected = module(ids, types)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(compiled_grads[0].to_dense(), module.weight.grad.coalesce().to_dense())
    torch.testing.assert_close(compiled_grads[1], module.segment_weight.grad)


@pytest.mark.parametrize("optimizer", ["SparseAdam", "SGD"])
def test_sparse_optimizer_step_changes_only_rows_seen(optimizer, backend, device):
    module = FusedInputEmbedding(40, 8, num_segments=2, padding_idx=0, backend=backend, device=device)
    ids = torch.tensor([[0, 3, 5, 5], [7, 0, 3, 9]], device=device)
    sparse_params = [module.weight]
    opt = getattr(torch.optim, optimizer)(sparse_params, lr=0.1)
    before = module.weight.detach().clone()
    module(ids).square().sum().backward()
    opt.step()
    changed = (module.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [3, 5, 7, 9]  # every row seen, except the padding row


def test_autocast_keeps_weight_dtype(backend, device):
    module = FusedInputEmbedding(40, 8, backend=backend, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = module(torch.tensor([1, 2], device=device))
    assert out.dtype == torch.float32  # like nn.Embedding: autocast does not cast lookups
    assert embedfast.available_backends(device)
