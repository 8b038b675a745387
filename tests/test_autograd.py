"""gradcheck, opcheck, torch.compile and sparse optimizers, for every backend."""

import pytest
import torch

import embedfast
from embedfast import FusedInputEmbedding, fused_input_embedding
from embedfast.backends import forward_op


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
        yield (ids, weight, None, positions, types, segments, 2.0, "learned", 10000.0, 8, 1, 3, 2, True, True)
        yield (ids, weight, ids % 4, None, None, segments, 1.0, "concat", 100.0, 0, 0, 6, -1, False, False)
        yield (ids.int(), weight, None, None, None, None, 1.0, "interleaved", 10000.0, 0, 3, 2, 0, False, True)


def test_opcheck(backend, device):
    for args in _op_samples(device):
        torch.library.opcheck(forward_op(backend), args)
    ids, types = _inputs(device)
    backward = getattr(torch.ops.embedfast, f"backward_{backend}")
    for requires_grad in (False, True):  # the backward is differentiable too (double backward)
        grad = torch.randn(6, 5, device=device, requires_grad=requires_grad)
        for token_grad in ("sparse", "dense", "none"):
            for check_bounds in (True, False):
                torch.library.opcheck(backward, (grad, ids, None, types, token_grad, 9, 2, 2.0, 8, 2, 1, 3, check_bounds))
    torch.library.opcheck(torch.ops.embedfast.sparse_rows, (ids, grad.detach(), int(ids[0]), 2.0))


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
