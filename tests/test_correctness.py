"""Forward and every gradient of each backend against autograd through the unfused reference."""

import pytest
import torch

from cases import Case, assert_case_matches_truth
from embedfast.backends import forward_op
from embedfast.spec import BackwardInputs, ForwardInputs, PositionMode, TokenGrad

CASES = {
    "1d-odd-dim": Case(shape=(7,), dim=7),
    "2d-concat-odd": Case(shape=(2, 6), dim=7, layout="concat", segments=2),
    "3d-learned": Case(shape=(2, 3, 4), dim=64, position="learned", max_positions=16),
    "bert": Case(shape=(2, 6), dim=768, vocab=300, position="learned", max_positions=8, segments=2, padding_idx=0,
                 ids_dtype=torch.int32),
    "decode-past-length": Case(shape=(2, 1), past_length=5, layout="concat", segments=3, max_positions=8),
    "explicit-positions": Case(shape=(3, 5), explicit_positions=True, padding_idx=-1),
    "explicit-positions-learned": Case(shape=(2, 5), position="learned", max_positions=40, explicit_positions=True),
    "no-position-no-scale": Case(position="none", scale=None, padding_idx=3, ids_dtype=torch.int32),
    "default-token-types": Case(segments=2, explicit_token_types=False, scale=0.5),
    "many-segments": Case(shape=(3, 7), segments=20, padding_idx=4),
    "sinusoid-batch": Case(shape=(6, 5), dim=16, past_length=2),
    "sinusoid-long-rotation": Case(shape=(2, 600), dim=9, layout="concat", past_length=100),  # crosses exact seeds
    # whole 16-column blocks and a tail (the CPU kernel's vector loops), a short last tile of positions
    "sinusoid-wide-rows": Case(shape=(3, 300), dim=40, segments=2, past_length=7),
    # outputs past the CPU kernel's streaming threshold (8 MB), rows of alternating 32-byte alignment in bf16
    "large-output": Case(shape=(16, 520), dim=520, vocab=300, segments=2, padding_idx=0, position="learned",
                         max_positions=520),
    "dense-grad": Case(shape=(4, 8), position="learned", max_positions=8, segments=2, padding_idx=1, sparse=False),
    "noncontiguous": Case(shape=(3, 4), segments=2, noncontiguous=True),
    "empty": Case(shape=(0,), segments=2),
    "empty-batch": Case(shape=(2, 0), position="learned", max_positions=4),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_reference(case, dtype, backend, device):
    if case is CASES["large-output"] and (backend, device) == ("triton", "cpu"):
        pytest.skip("~30 s in the Triton interpreter; the case is for the CPU kernel's streaming stores")
    generator = torch.Generator().manual_seed(hash((str(case), str(dtype))) % 2**31)
    assert_case_matches_truth(case, dtype, backend, device, generator)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_gradient_has_one_row_per_non_padding_token(dtype, backend, device):
    case = Case(shape=(4, 6), padding_idx=2, segments=2)
    module = case.module(dtype, device, backend)
    ids = case.inputs(device)["input_ids"]
    module(ids).sum().backward()
    grad = module.weight.grad
    reference = torch.nn.Embedding(case.vocab, case.dim, padding_idx=2, sparse=True, device=device, dtype=dtype)
    (reference(ids) * module.embed_scale).sum().backward()
    assert grad._nnz() == reference.weight.grad._nnz() == int((ids != 2).sum())
    torch.testing.assert_close(grad._indices(), reference.weight.grad._indices())
    torch.testing.assert_close(grad._values(), reference.weight.grad._values())


@pytest.mark.parametrize("frozen", [("weight",), ("segment_weight",), ("position_weight",), ("weight", "segment_weight")],
                         ids="-".join)
def test_frozen_tables_get_no_gradient_and_the_others_stay_right(frozen, backend, device):
    case = Case(shape=(3, 20), position="learned", max_positions=24, segments=3, sparse=False)
    module = case.module(torch.float32, device, backend)
    inputs = case.inputs(device, torch.Generator().manual_seed(len(frozen)))
    tables = {name: getattr(module, name) for name in ("weight", "position_weight", "segment_weight")}
    for name in frozen:
        tables[name].requires_grad_(False)
    grad_out = torch.randn(case.shape + (case.dim,), generator=torch.Generator().manual_seed(1)).to(device)
    module(**inputs).backward(grad_out)
    module.backend = "reference"
    trained = [table for table in tables.values() if table.requires_grad]
    expected = torch.autograd.grad(module(**inputs), trained, grad_out)
    for name, table in tables.items():
        assert (table.grad is None) == (name in frozen), name
    for table, truth in zip(trained, expected):
        torch.testing.assert_close(table.grad, truth)


@pytest.mark.parametrize("seq_len", [5, 1000], ids=["ragged-last-sequence", "longer-than-the-input"])
def test_default_positions_wrap_at_seq_len(seq_len, backend, device):
    """The ops' contract: token n is at position past_length + n % seq_len, whatever seq_len is: forward
    (sinusoid and learned) and backward (sparse values, position and segment gradients)."""
    generator = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, 30, (37,), generator=generator).to(device)
    types = torch.randint(0, 2, (37,), generator=generator).to(device)
    weight = torch.randn(30, 40, generator=generator).to(device)
    segments = torch.randn(2, 40, generator=generator).to(device)
    positions = torch.randn(45, 40, generator=generator).to(device)
    for mode, table, bound in ((PositionMode.INTERLEAVED, None, 0), (PositionMode.LEARNED, positions, 45)):
        args = ForwardInputs(ids, weight, position_weight=table, token_type_ids=types, segment_weight=segments, scale=2.0,
                             position_mode=mode, max_positions=bound, position_offset=3, seq_len=seq_len)
        torch.testing.assert_close(forward_op(backend)(*args), torch.ops.embedfast.forward_reference(*args),
                                   rtol=1e-5, atol=1e-5)
    grad = torch.randn(37, 40, generator=generator).to(device)
    args = BackwardInputs(grad, ids, 30, token_type_ids=types, token_grad=TokenGrad.SPARSE, scale=2.0, num_positions=45,
                          num_segments=2, position_offset=3, seq_len=seq_len)
    backward = getattr(torch.ops.embedfast, f"backward_{backend}")
    for got, want in zip(backward(*args), torch.ops.embedfast.backward_reference(*args)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sinusoid_rows_are_right_across_calls(backend, device):
    """Decoding a token at a time, then longer batches, then positions past the CPU kernel's 32 MB cache of
    sinusoid tables (where it rotates rows per thread instead): every call matches the reference op."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(30, 16, generator=generator).to(device)
    for past_length, seq_len in [(0, 3), (3, 1), (4, 1), (5, 1), (6, 50), (0, 300), (600_000, 20)]:
        ids = torch.randint(0, 30, (2 * seq_len,), generator=generator).to(device)
        args = ForwardInputs(ids, weight, position_mode=PositionMode.INTERLEAVED, position_offset=past_length, seq_len=seq_len)
        torch.testing.assert_close(forward_op(backend)(*args), torch.ops.embedfast.forward_reference(*args),
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"past_length={past_length}: {m}")
