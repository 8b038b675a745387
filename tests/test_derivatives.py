"""Every derivative PyTorch can ask for, on every backend: gradients that own their memory, double backward,
forward-mode AD and the torch.func transforms, each checked against plain PyTorch on fresh random data."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from embedfast import FusedInputEmbedding, fused_input_embedding
from embedfast.reference import unfused_input_embedding

VOCAB, DIM, POSITIONS, SEGMENTS, PAD = 9, 5, 6, 2, 2
SCALE = 1.75  # exact in float32: the Triton interpreter hands float kernel arguments over as float32


def _tables(device, generator, requires_grad=True):
    return [torch.randn(rows, DIM, dtype=torch.float64, generator=generator).to(device).requires_grad_(requires_grad)
            for rows in (VOCAB, POSITIONS, SEGMENTS)]


def _ids(device, generator, shape=(2, 3)):
    ids = torch.randint(0, VOCAB, shape, generator=generator)
    ids.view(-1)[::3] = PAD
    return ids.to(device), torch.randint(0, SEGMENTS, shape, generator=generator).to(device)


def _embedding(ids, types, backend, position, padding_idx=None, sparse=False):
    """The fused operator as a function of its three tables (positions unused unless learned)."""
    def embed(weight, positions, segments):
        return fused_input_embedding(ids, weight, token_type_ids=types, segment_weight=segments, position=position,
                                     position_weight=positions if position == "learned" else None, scale=SCALE,
                                     padding_idx=padding_idx, sparse=sparse, backend=backend)
    return embed


def _plain(ids, types):
    """The same function in plain PyTorch (learned positions 0..seq_len-1): what the transforms must match."""
    def embed(weight, positions, segments):
        return unfused_input_embedding(ids, weight, scale=SCALE, position_table=positions,
                                       position_ids=torch.arange(ids.shape[-1], device=ids.device),
                                       segment_weight=segments, token_type_ids=types)
    return embed


@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("padding_idx", [None, PAD])
def test_sparse_gradient_owns_its_indices_and_values(padding_idx, ids_dtype, backend, device):
    generator = torch.Generator().manual_seed(1)
    module = FusedInputEmbedding(VOCAB, DIM, padding_idx=padding_idx, backend=backend, device=device)
    ids = torch.randint(0, VOCAB, (2, 4), generator=generator).to(device, ids_dtype)
    out = module(ids)
    grad_out = torch.randn(out.shape, generator=generator).to(device)
    out.backward(grad_out)
    expected = module.weight.grad.coalesce().to_dense().clone()
    ids.add_(1)  # a data loader refilling its buffer before the optimizer step
    grad_out.zero_()
    assert module.weight.grad._indices().data_ptr() != ids.data_ptr()
    torch.testing.assert_close(module.weight.grad.coalesce().to_dense(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_double_backward_matches_numerical_second_derivatives(position, backend, device):
    generator = torch.Generator().manual_seed(2)
    ids, types = _ids(device, generator)
    tables = _tables(device, generator)
    assert torch.autograd.gradgradcheck(_embedding(ids, types, backend, position, padding_idx=PAD), tables)


def test_double_backward_through_sparse_gradients_matches_dense(backend, device):
    """A gradient penalty: gradcheck takes no sparse gradients, so the sparse second derivative (with respect
    to the output's cotangent; the operator is linear, so none with respect to the tables) is compared with
    the dense one, which gradgradcheck checked."""
    generator = torch.Generator().manual_seed(3)
    ids, types = _ids(device, generator)
    tables = _tables(device, generator)
    second = []
    for sparse in (True, False):
        probe = torch.randn(ids.shape + (DIM,), dtype=torch.float64, generator=generator.manual_seed(0)).to(device)
        probe.requires_grad_(True)
        out = _embedding(ids, types, backend, "learned", padding_idx=PAD, sparse=sparse)(*tables)
        grads = torch.autograd.grad(out, tables, probe, create_graph=True)
        assert grads[0].is_sparse == sparse
        penalty = sum(g.to_dense().square().sum() for g in grads)
        second.append(torch.autograd.grad(penalty, probe))
    torch.testing.assert_close(second[0], second[1])


@pytest.mark.parametrize("position", ["learned", "sinusoidal", "none"])
def test_forward_mode_matches_numerical_derivatives(position, backend, device):
    generator = torch.Generator().manual_seed(4)
    ids, types = _ids(device, generator)
    tables = _tables(device, generator)
    assert torch.autograd.gradcheck(_embedding(ids, types, backend, position), tables, check_forward_ad=True)


def test_forward_mode_with_one_dual_table_and_a_padding_row(backend, device):
    """Only the position table carries a tangent; the padding row's tangent flows forward, as in F.embedding."""
    generator = torch.Generator().manual_seed(5)
    ids, types = _ids(device, generator)
    weight, positions, segments = _tables(device, generator, requires_grad=False)
    for dual_index in range(3):
        tangent = torch.randn((weight, positions, segments)[dual_index].shape, dtype=torch.float64, generator=generator).to(device)
        with fwAD.dual_level():
            inputs = [fwAD.make_dual(t, tangent) if i == dual_index else t for i, t in enumerate((weight, positions, segments))]
            actual = fwAD.unpack_dual(_embedding(ids, types, backend, "learned", padding_idx=PAD)(*inputs)).tangent
            expected = fwAD.unpack_dual(_plain(ids, types)(*inputs)).tangent
        torch.testing.assert_close(actual, expected)


def test_torch_func_transforms_match_plain_pytorch(backend, device):
    generator = torch.Generator().manual_seed(6)
    ids, types = _ids(device, generator)
    tables = tuple(_tables(device, generator, requires_grad=False))
    tangents = tuple(torch.randn_like(t) for t in tables)
    fused, plain = _embedding(ids, types, backend, "learned"), _plain(ids, types)

    for actual, expected in zip(torch.func.jvp(fused, tables, tangents), torch.func.jvp(plain, tables, tangents)):
        torch.testing.assert_close(actual, expected)
    for argnums in (0, 1, 2):
        torch.testing.assert_close(torch.func.jacfwd(fused, argnums)(*tables), torch.func.jacfwd(plain, argnums)(*tables))
        torch.testing.assert_close(torch.func.jacrev(fused, argnums)(*tables), torch.func.jacrev(plain, argnums)(*tables))

    def loss(embed):
        return lambda *t: embed(*t).sin().sum()

    for actual, expected in zip(torch.func.grad(loss(fused), (0, 1, 2))(*tables), torch.func.grad(loss(plain), (0, 1, 2))(*tables)):
        torch.testing.assert_close(actual, expected)
    # forward over reverse: jacfwd of jacrev
    torch.testing.assert_close(torch.func.hessian(loss(fused), 2)(*tables), torch.func.hessian(loss(plain), 2)(*tables))


def test_vmap_over_a_batch_of_ids_matches_a_loop(backend, device):
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (4, 2, 3), generator=generator).to(device)
    types = torch.randint(0, SEGMENTS, (4, 2, 3), generator=generator).to(device)
    tables = _tables(device, generator, requires_grad=False)

    def embed(ids, types):
        return _embedding(ids, types, backend, "learned")(*tables)

    expected = torch.stack([embed(i, t) for i, t in zip(ids, types)])
    torch.testing.assert_close(torch.vmap(embed)(ids, types), expected)


def test_double_backward_under_compile_works_or_says_why(backend, device):
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(8)
    ids, types = _ids(device, generator)
    tables = _tables(device, generator)
    compiled = torch.compile(_embedding(ids, types, backend, "learned"), fullgraph=True)
    grads = torch.autograd.grad(compiled(*tables).square().sum(), tables, create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        torch.autograd.grad(sum(g.square().sum() for g in grads), tables)
