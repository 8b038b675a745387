"""Packed sequences (``cu_seqlens``): documents laid end to end, each numbering its positions from
``position_offset``; the forward and every gradient against the float64 truth, on every backend."""

import pytest
import torch

import embedfast
from cases import assert_close, dense_grad
from embedfast.reference import unfused_input_embedding

LENGTHS = (5, 0, 1, 9, 3)  # an empty document and a one-token one


def _positions(lengths, offset):
    """Token positions written out document by document: the truth the kernels' binary search must find."""
    return torch.tensor([offset + k for length in lengths for k in range(length)])


def _boundaries(lengths, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_packed_forward_and_gradients_match_truth(position, sparse, ids_dtype, backend, device):
    generator = torch.Generator().manual_seed(len(position) + sparse)
    offset, num_tokens, dim = 2, sum(LENGTHS), 20
    module = embedfast.FusedInputEmbedding(30, dim, num_segments=2, position=position, max_positions=12, padding_idx=1,
                                           sparse=sparse, backend=backend, device=device)
    ids = torch.randint(0, 30, (1, num_tokens), generator=generator).to(device, ids_dtype)
    types = torch.randint(0, 2, (1, num_tokens), generator=generator).to(device, ids_dtype)
    cu_seqlens = _boundaries(LENGTHS, ids_dtype).to(device)
    out = module(ids, types, cu_seqlens=cu_seqlens, position_offset=offset)

    positions = _positions(LENGTHS, offset).to(device).view(1, -1)
    tables = {"weight": module.weight.detach().double().requires_grad_(),
              "segment_weight": module.segment_weight.detach().double().requires_grad_()}
    if position == "learned":
        tables["position_weight"] = module.position_weight.detach().double().requires_grad_()
        position_table = tables["position_weight"]
    else:
        position_table = embedfast.sinusoidal_positions(12, dim, dtype=torch.float64, device=device)
    expected = unfused_input_embedding(ids, tables["weight"], scale=module.embed_scale, position_table=position_table,
                                       position_ids=positions, segment_weight=tables["segment_weight"],
                                       token_type_ids=types, padding_idx=1)
    assert_close(out, expected, torch.float32, "forward")

    grad_out = torch.randn(out.shape, generator=generator).to(device)
    out.backward(grad_out)
    expected.backward(grad_out.double())
    assert module.weight.grad.is_sparse == sparse
    for name, table in tables.items():
        assert_close(dense_grad(getattr(module, name).grad), table.grad, torch.float32, f"{name}.grad")


def test_packed_equals_one_call_per_document(backend, device):
    """Packing changes nothing but the layout: each document's rows are what it gets on its own."""
    module = embedfast.FusedInputEmbedding(30, 16, position="learned", max_positions=10, backend=backend, device=device)
    ids = torch.randint(0, 30, (sum(LENGTHS),), generator=torch.Generator().manual_seed(3)).to(device)
    packed = module(ids, cu_seqlens=_boundaries(LENGTHS).to(device))
    alone = torch.cat([module(part.view(1, -1)).view(-1, 16) for part in ids.split(LENGTHS) if part.numel()])
    torch.testing.assert_close(packed, alone, rtol=0, atol=0)


BAD_PACKED_CALLS = {
    "with-position-ids": ({"position_ids": torch.zeros(1, 4, dtype=torch.int64)}, ValueError, "position_ids were given with"),
    "with-past-length": ({"past_length": 2}, ValueError, "cu_seqlens was given with past_length=2"),
    "not-from-zero": ({"cu_seqlens": torch.tensor([1, 4])}, ValueError, "cu_seqlens must start at 0, got 1"),
    "decreasing": ({"cu_seqlens": torch.tensor([0, 3, 2, 4])}, ValueError,
                   r"cu_seqlens must not decrease, got cu_seqlens\[1\] = 3 > cu_seqlens\[2\] = 2"),
    "not-to-the-end": ({"cu_seqlens": torch.tensor([0, 3])}, ValueError, "cu_seqlens must end at the number of tokens, 4, got 3"),
    "past-max-positions": ({"cu_seqlens": torch.tensor([0, 4]), "position_offset": 3}, IndexError,
                           r"positions reach 6 \(position_offset=3, longest document 4\), out of range for max_positions=6"),
    "two-dimensional": ({"cu_seqlens": torch.tensor([[0, 4]])}, ValueError, r"cu_seqlens must be 1-D"),
    "float": ({"cu_seqlens": torch.tensor([0.0, 4.0])}, TypeError, "cu_seqlens must be int32 or int64"),
    "negative-offset": ({"position_offset": -1}, ValueError, "position_offset must be an int >= 0, got -1"),
}


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
@pytest.mark.parametrize("options, error, message", BAD_PACKED_CALLS.values(), ids=BAD_PACKED_CALLS.keys())
def test_bad_packed_call_raises_and_writes_nothing(options, error, message, position, backend, device):
    module = embedfast.FusedInputEmbedding(20, 8, position=position, max_positions=6, backend=backend, device=device)
    before = module.state_dict()
    options = {"cu_seqlens": torch.tensor([0, 1, 4]), **options}
    options = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    with pytest.raises(error, match=message):
        module(torch.tensor([[1, 2, 3, 4]], device=device), **options)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def test_packed_batch_from_hugging_face_flattening_collator(backend, device):
    """The README's recipe: a packed batch of ``DataCollatorWithFlattening`` embeds as its own position_ids say."""
    transformers = pytest.importorskip("transformers")
    collator = transformers.DataCollatorWithFlattening()
    batch = collator([{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 3]}, {"input_ids": [4, 4, 2]}])
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    cu_seqlens = torch.cat([starts, torch.tensor([batch["input_ids"].shape[1]])])
    module = embedfast.FusedInputEmbedding(10, 8, position="learned", max_positions=6, backend=backend, device=device)
    packed = module(batch["input_ids"].to(device), cu_seqlens=cu_seqlens.to(device))
    torch.testing.assert_close(packed, module(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device)),
                               rtol=0, atol=0)


def test_packed_compiles_without_graph_breaks(backend, device):
    torch._dynamo.reset()
    module = embedfast.FusedInputEmbedding(30, 16, position="learned", max_positions=10, backend=backend, device=device)
    ids = torch.randint(0, 30, (1, 8), device=device)
    cu_seqlens = torch.tensor([0, 3, 8], device=device)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(ids, cu_seqlens=cu_seqlens)
    out.sum().backward()
    grad = module.position_weight.grad.clone()
    module.zero_grad(set_to_none=True)
    expected = module(ids, cu_seqlens=cu_seqlens)
    expected.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, module.position_weight.grad)
