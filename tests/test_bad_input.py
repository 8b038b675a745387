"""Bad input: a Python exception naming the argument and the value, and nothing written."""

import pytest
import torch

from embedfast import FusedInputEmbedding, fused_input_embedding

VOCAB, DIM = 20, 8


def make(backend_name, device_name, **options):
    defaults = {"num_segments": 2, "position": "learned", "max_positions": 6, "backend": backend_name, "device": device_name}
    return FusedInputEmbedding(VOCAB, DIM, **{**defaults, **options})


def ids(device, *values):
    return torch.tensor([list(values)], device=device)


BAD_CALLS = {
    "id-too-large": (lambda m, d: m(ids(d, 1, VOCAB)), IndexError, "input_ids contains 20"),
    "id-negative": (lambda m, d: m(ids(d, 1, -1)), IndexError, "input_ids contains -1"),
    "token-type-too-large": (lambda m, d: m(ids(d, 1, 2), ids(d, 0, 2)), IndexError, "token_type_ids contains 2"),
    "token-type-negative": (lambda m, d: m(ids(d, 1, 2), ids(d, -3, 0)), IndexError, "token_type_ids contains -3"),
    "position-too-large": (lambda m, d: m(ids(d, 1, 2), position_ids=ids(d, 0, 6)), IndexError, "position_ids contains 6"),
    "position-negative": (lambda m, d: m(ids(d, 1, 2), position_ids=ids(d, -1, 0)), IndexError, "position_ids contains -1"),
    "default-positions-past-max": (lambda m, d: m(ids(d, 1, 2), past_length=5), IndexError, "max_positions=6"),
    "float-ids": (lambda m, d: m(torch.tensor([1.0, 2.0], device=d)), TypeError, "input_ids must be int32 or int64, got dtype torch.float32"),
    "bool-ids": (lambda m, d: m(torch.tensor([True], device=d)), TypeError, "input_ids must be int32 or int64, got dtype torch.bool"),
    "float-token-types": (lambda m, d: m(ids(d, 1), torch.tensor([[0.0]], device=d)), TypeError, "token_type_ids must be int32"),
    "token-type-shape": (lambda m, d: m(ids(d, 1, 2), ids(d, 0, 1, 1)), ValueError, r"token_type_ids has shape \(1, 3\)"),
    "position-shape": (lambda m, d: m(ids(d, 1, 2), position_ids=ids(d, 0, 1, 2)), ValueError, r"position_ids has shape \(1, 3\)"),
    "negative-past-length": (lambda m, d: m(ids(d, 1), past_length=-1), ValueError, "past_length must be an int >= 0, got -1"),
    "ids-on-other-device": (lambda m, d: m(ids("meta", 1)), ValueError, "input_ids is on meta"),
}


@pytest.mark.parametrize("call, error, message", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_call_raises_and_writes_nothing(call, error, message, backend, device):
    module = make(backend, device)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with pytest.raises(error, match=message):
        call(module, device)
    for name, p in module.named_parameters():
        assert torch.equal(p, before[name]) and p.grad is None, name


def test_token_types_without_segment_table(backend, device):
    module = make(backend, device, num_segments=0)
    with pytest.raises(ValueError, match="token_type_ids were given, but there is no segment table"):
        module(ids(device, 1), ids(device, 0))


def test_sinusoidal_positions_checked_against_max_positions(backend, device):
    module = make(backend, device, position="sinusoidal", max_positions=4)
    with pytest.raises(IndexError, match="position_ids contains 4"):
        module(ids(device, 1, 2), position_ids=ids(device, 0, 4))
    assert make(backend, device, position="sinusoidal", max_positions=None)(ids(device, 1), position_ids=ids(device, 10**6)).isfinite().all()


def test_position_ids_with_no_position_encoding(backend, device):
    with pytest.raises(ValueError, match="position_ids were given, but position='none'"):
        make(backend, device, position="none")(ids(device, 1), position_ids=ids(device, 0))


BAD_CONSTRUCTORS = {
    "position": ({"position": "rotary"}, "position must be one of .* got 'rotary'"),
    "layout": ({"position": "sinusoidal", "sinusoid_layout": "diagonal"}, "sinusoid_layout must be one of .* got 'diagonal'"),
    "backend": ({"backend": "cuda-graphs"}, "backend must be .* got 'cuda-graphs'"),
    "learned-without-max": ({"max_positions": None}, "position='learned' needs max_positions"),
    "max-positions": ({"position": "sinusoidal", "max_positions": 0}, "max_positions must be a positive int or None, got 0"),
    "padding-idx": ({"padding_idx": VOCAB}, r"padding_idx must be within \[-20, 20\), got 20"),
    "scale": ({"scale": "log"}, "scale must be 'sqrt', a float or None, got 'log'"),
    "segments": ({"num_segments": -1}, "num_segments must be an int >= 0, got -1"),
}


@pytest.mark.parametrize("options, message", BAD_CONSTRUCTORS.values(), ids=BAD_CONSTRUCTORS.keys())
def test_bad_constructor_arguments(options, message):
    with pytest.raises(ValueError, match=message):
        make("reference", "cpu", **options)


def test_functional_checks_tables():
    weight = torch.randn(VOCAB, DIM)
    with pytest.raises(ValueError, match=r"segment_weight has embedding_dim 4, but weight has 8"):
        fused_input_embedding(ids("cpu", 1), weight, segment_weight=torch.randn(2, 4))
    with pytest.raises(TypeError, match="segment_weight has dtype torch.float16, but weight has torch.float32"):
        fused_input_embedding(ids("cpu", 1), weight, segment_weight=torch.randn(2, DIM, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight must be 2-D .* got shape \(20,\)"):
        fused_input_embedding(ids("cpu", 1), torch.randn(VOCAB))
    with pytest.raises(ValueError, match="position='learned' needs position_weight"):
        fused_input_embedding(ids("cpu", 1), weight, position="learned")
    with pytest.raises(ValueError, match="position_weight was given, but position='sinusoidal'"):
        fused_input_embedding(ids("cpu", 1), weight, position_weight=torch.randn(4, DIM))


def table(device, *shape, dtype=torch.float32):
    return torch.randn(*shape, device=device).to(dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype, device=device)


FUNCTIONAL_BAD_CALLS = {
    "integer-weight": (lambda d: ((ids(d, 1), table(d, VOCAB, DIM, dtype=torch.int64)), {}),
                       TypeError, "weight must be float32, float16, bfloat16 or float64, got dtype torch.int64"),
    "ids-not-a-tensor": (lambda d: (([1, 2], table(d, VOCAB, DIM)), {}), TypeError, "input_ids must be a torch.Tensor, got list"),
    "padding-idx-out-of-range": (lambda d: ((ids(d, 1), table(d, VOCAB, DIM)), {"padding_idx": -21}),
                                 ValueError, r"padding_idx must be within \[-20, 20\), got -21"),
    "scale-not-a-number": (lambda d: ((ids(d, 1), table(d, VOCAB, DIM)), {"scale": [2.0]}),
                           TypeError, r"scale must be 'sqrt', a float or None, got \[2.0\]"),
    "3-d-position-table": (lambda d: ((ids(d, 1), table(d, VOCAB, DIM)), {"position": "learned", "position_weight": table(d, 4, DIM, 1)}),
                           ValueError, "position_weight must be 2-D"),
    "table-on-other-device": (lambda d: ((ids(d, 1), table(d, VOCAB, DIM)), {"segment_weight": table("meta", 2, DIM)}),
                              ValueError, "segment_weight is on meta"),
}


@pytest.mark.parametrize("arguments, error, message", FUNCTIONAL_BAD_CALLS.values(), ids=FUNCTIONAL_BAD_CALLS.keys())
def test_bad_functional_call_raises(arguments, error, message, backend, device):
    args, kwargs = arguments(device)
    with pytest.raises(error, match=message):
        fused_input_embedding(*args, **kwargs, backend=backend)
