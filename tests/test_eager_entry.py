"""The extension's eager entry (``_C.EagerEmbedding``, ``csrc/eager.cpp``): the call shaped in C++ and its C++
autograd node. Bad input raises what ``functional.embed``'s Python shaping raises, type and message; gradients
equal the reference backend's."""

import pytest
import torch

import embedfast
from embedfast import FusedInputEmbedding, fused_input_embedding
from tests.cases import dense_grad

VOCAB, DIM = 20, 8
NODE = "FusedInputEmbeddingBackward"


@pytest.fixture(autouse=True)
def _extension():
    reason = embedfast.backends.unavailable_reason("extension", torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"extension backend unavailable: {reason}")


def python_shaping(monkeypatch):
    """Every call from here on takes functional.embed's Python path (ops.call_forward), as under forward mode."""
    monkeypatch.setattr(embedfast.module, "eager_entry_allowed", lambda: False)
    monkeypatch.setattr(embedfast.functional, "eager_entry_allowed", lambda: False)


def make(**options):
    defaults = {"num_segments": 2, "position": "learned", "max_positions": 6, "backend": "extension"}
    return FusedInputEmbedding(VOCAB, DIM, **{**defaults, **options})


def ids(*values, dtype=torch.int64, device="cpu"):
    return torch.tensor([list(values)], dtype=dtype, device=device)


# (module options, the call's arguments): each raises in both paths
BAD_CALLS = {
    "ids-not-a-tensor": ({}, lambda: ([1, 2],)),
    "ids-none": ({}, lambda: (None,)),
    "float-ids": ({}, lambda: (torch.tensor([1.0]),)),
    "bool-ids": ({}, lambda: (torch.tensor([True]),)),
    "ids-on-meta": ({}, lambda: (ids(1, device="meta"),)),
    "id-too-large": ({}, lambda: (ids(1, VOCAB),)),
    "id-negative": ({}, lambda: (ids(1, -1),)),
    "negative-past-length": ({}, lambda: (ids(1),), {"past_length": -1}),
    "past-length-a-string": ({}, lambda: (ids(1),), {"past_length": "2"}),
    "past-length-a-float": ({}, lambda: (ids(1),), {"past_length": 1.5}),
    "past-length-a-bool": ({}, lambda: (ids(1),), {"past_length": True}),
    "negative-position-offset": ({}, lambda: (ids(1),), {"position_offset": -2}),
    "default-positions-past-max": ({}, lambda: (ids(1, 2),), {"past_length": 5}),
    "position-ids-without-positions": ({"position": "none"}, lambda: (ids(1),), {"position_ids": ids(0)}),
    "position-ids-not-a-tensor-without-positions": ({"position": "none"}, lambda: (ids(1),), {"position_ids": "0"}),
    "position-ids-with-offset": ({}, lambda: (ids(1),), {"position_ids": ids(0), "position_offset": 1}),
    "position-ids-with-cu-seqlens": ({}, lambda: (ids(1),), {"position_ids": ids(0), "cu_seqlens": torch.tensor([0, 1])}),
    "position-ids-a-list": ({}, lambda: (ids(1),), {"position_ids": [0]}),
    "float-position-ids": ({}, lambda: (ids(1),), {"position_ids": torch.tensor([0.0])}),
    "position-ids-on-meta": ({}, lambda: (ids(1),), {"position_ids": ids(0, device="meta")}),
    "position-ids-shape": ({}, lambda: (ids(1, 2),), {"position_ids": ids(0, 1, 2)}),
    "position-ids-more-dims": ({}, lambda: (ids(1, 2),), {"position_ids": torch.zeros(1, 1, 2, dtype=torch.long)}),
    "position-too-large": ({}, lambda: (ids(1, 2),), {"position_ids": ids(0, 6)}),
    "position-negative": ({}, lambda: (ids(1, 2),), {"position_ids": ids(-1, 0)}),
    "cu-seqlens-a-tuple": ({}, lambda: (ids(1),), {"cu_seqlens": (0, 1)}),
    "float-cu-seqlens": ({}, lambda: (ids(1),), {"cu_seqlens": torch.tensor([0.0, 1.0])}),
    "cu-seqlens-on-meta": ({}, lambda: (ids(1),), {"cu_seqlens": torch.tensor([0, 1], device="meta")}),
    "2-d-cu-seqlens": ({}, lambda: (ids(1),), {"cu_seqlens": torch.tensor([[0, 1]])}),
    "cu-seqlens-with-past-length": ({}, lambda: (ids(1),), {"cu_seqlens": torch.tensor([0, 1]), "past_length": 2}),
    "cu-seqlens-not-from-0": ({}, lambda: (ids(1, 2),), {"cu_seqlens": torch.tensor([1, 2])}),
    "cu-seqlens-short": ({}, lambda: (ids(1, 2),), {"cu_seqlens": torch.tensor([0, 1])}),
    "documents-past-max": ({}, lambda: (ids(*range(7)),), {"cu_seqlens": torch.tensor([0, 7])}),
    "token-types-without-segments": ({"num_segments": 0}, lambda: (ids(1), ids(0))),
    "token-types-a-list-without-segments": ({"num_segments": 0}, lambda: (ids(1), [0])),
    "token-types-a-list": ({}, lambda: (ids(1), [0])),
    "float-token-types": ({}, lambda: (ids(1), torch.tensor([[0.0]]))),
    "token-types-on-meta": ({}, lambda: (ids(1), ids(0, device="meta"))),
    "token-types-shape": ({}, lambda: (ids(1, 2), ids(0, 1, 1))),
    "token-type-too-large": ({}, lambda: (ids(1, 2), ids(0, 2))),
    "token-type-negative": ({}, lambda: (ids(1, 2), ids(-3, 0))),
}


def _raised(call):
    with pytest.raises(Exception) as raised:
        call()
    return type(raised.value), str(raised.value)


@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_module_call_raises_as_the_python_shaping_does(case, monkeypatch):
    options, arguments, kwargs = (*case, {})[:3]
    module = make(**options)
    fast = _raised(lambda: module(*arguments(), **kwargs))
    python_shaping(monkeypatch)
    assert fast == _raised(lambda: module(*arguments(), **kwargs))
    assert fast[0] in (TypeError, ValueError, IndexError)


@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_functional_call_raises_as_the_python_shaping_does(case, monkeypatch):
    options, arguments, kwargs = (*case, {})[:3]
    module = make(**options)
    tables = {"segment_weight": module.segment_weight, "position_weight": module.position_weight,
              "position": module.position, "max_positions": module.max_positions}

    def call():
        input_ids, *token_type_ids = arguments()
        return fused_input_embedding(input_ids, module.weight, **dict(zip(["token_type_ids"], token_type_ids)), **tables,
                                     **kwargs, backend="extension")

    fast = _raised(call)
    python_shaping(monkeypatch)
    assert fast == _raised(call)


# module options, call arguments (built per device), as the gradient tests run them
GRAD_CASES = {
    "sparse": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d),), {})),
    "dense": ({"sparse": False}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d),), {})),
    "sparse-padding": ({"padding_idx": 1}, lambda d: ((torch.tensor([[1, 2, 1], [3, 1, 4]], device=d),), {})),
    "dense-padding": ({"padding_idx": 1, "sparse": False},
                      lambda d: ((torch.tensor([[1, 2, 1], [3, 1, 4]], device=d),), {})),
    "token-types": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d), torch.randint(0, 2, (2, 3), device=d)), {})),
    "broadcast-token-types": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d), torch.tensor([0, 1, 1], device=d)), {})),
    "broadcast-position-ids": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d),),
                                              {"position_ids": torch.tensor([[4, 0, 4]], device=d)})),
    "3-d": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 2, 3), device=d), torch.randint(0, 2, (2, 1, 3), device=d)), {})),
    "int32-ids": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d, dtype=torch.int32),
                                  torch.randint(0, 2, (2, 3), device=d)), {})),
    "past-length": ({}, lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d),), {"past_length": 2})),
    "sinusoid": ({"position": "sinusoidal", "max_positions": None},
                 lambda d: ((torch.randint(0, VOCAB, (2, 3), device=d),), {"past_length": 5})),
    "no-positions": ({"position": "none", "max_positions": None},
                     lambda d: ((torch.randint(0, VOCAB, (4,), device=d),), {})),
    "packed": ({}, lambda d: ((torch.randint(0, VOCAB, (1, 7), device=d),),
                              {"cu_seqlens": torch.tensor([0, 3, 3, 7], device=d, dtype=torch.int32), "position_offset": 1})),
    "scalar-id": ({"num_segments": 0}, lambda d: ((torch.tensor(5, device=d),), {})),
    "no-tokens": ({}, lambda d: ((torch.zeros(2, 0, dtype=torch.long, device=d),), {})),
}


def _pair(device, **options):
    """The extension module and a reference one with the same tables."""
    extension = make(**options).to(device)
    reference = make(**{**options, "backend": "reference"}).to(device)
    reference.load_state_dict(extension.state_dict())
    return extension, reference


def _grads(module):
    return {name: None if p.grad is None else dense_grad(p.grad) for name, p in module.named_parameters()}


@pytest.mark.parametrize("case", GRAD_CASES.values(), ids=GRAD_CASES.keys())
def test_gradients_equal_the_reference(case, device):
    options, arguments = case
    extension, reference = _pair(device, **options)
    args, kwargs = arguments(device)
    out = extension(*args, **kwargs)
    expected = reference(*args, **kwargs)
    assert out.grad_fn.name() == NODE and out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert extension.weight.grad.is_sparse == reference.weight.grad.is_sparse == extension.sparse
    for name, value in _grads(reference).items():
        torch.testing.assert_close(_grads(extension)[name], value, msg=name)


def test_tables_not_requiring_grad_get_none(device):
    extension, reference = _pair(device, padding_idx=1)
    for module in (extension, reference):
        module.position_weight.requires_grad_(False)
        module.weight.requires_grad_(False)
    args = (torch.tensor([[1, 2, 3]], device=device), torch.tensor([[0, 1, 1]], device=device))
    out = extension(*args)
    assert [edge is None for edge, _ in out.grad_fn.next_functions] == [True, True, False]
    out.sum().backward()
    reference(*args).sum().backward()
    assert extension.weight.grad is None and extension.position_weight.grad is None
    torch.testing.assert_close(extension.segment_weight.grad, reference.segment_weight.grad)
    extension.segment_weight.requires_grad_(False)
    assert not extension(*args).requires_grad


def test_grad_of_some_tables_only(device):
    extension, reference = _pair(device, sparse=False)
    args = (torch.randint(0, VOCAB, (2, 3), device=device), torch.randint(0, 2, (2, 3), device=device))
    (segments,) = torch.autograd.grad(extension(*args).sum(), [extension.segment_weight])
    (expected,) = torch.autograd.grad(reference(*args).sum(), [reference.segment_weight])
    torch.testing.assert_close(segments, expected)


@pytest.mark.parametrize("guard", [torch.no_grad, torch.inference_mode])
def test_without_grad_mode_no_graph(guard, device):
    module = make().to(device)
    with guard():
        out = module(torch.tensor([[1, 2]], device=device))
    assert out.grad_fn is None and not out.requires_grad


@pytest.mark.parametrize("sparse", [False, True])
def test_double_backward_equals_the_reference(sparse, device):
    extension, reference = _pair(device, sparse=sparse)
    args = (torch.randint(0, VOCAB, (2, 3), device=device), torch.randint(0, 2, (2, 3), device=device))
    results = []
    for module in (extension, reference):
        out = module(*args)
        grad_out = torch.randn(out.shape, device=device, generator=torch.Generator(device).manual_seed(0),
                               requires_grad=True)
        grads = torch.autograd.grad(out, list(module.parameters()), grad_out, create_graph=True)
        sum(dense_grad(g).sin().sum() for g in grads).backward()
        results.append(grad_out.grad)
    torch.testing.assert_close(*results)


def test_gradcheck_through_the_entry():
    ids_, types = torch.tensor([[1, 3, 1], [2, 0, 4]]), torch.tensor([[0, 1, 1], [1, 0, 0]])
    tables = [torch.randn(n, 3, dtype=torch.float64, requires_grad=True) for n in (5, 4, 2)]

    def f(weight, positions, segments):
        out = fused_input_embedding(ids_, weight, token_type_ids=types, segment_weight=segments, position="learned",
                                    position_weight=positions, sparse=False, backend="extension")
        assert out.grad_fn.name() == NODE
        return out

    assert torch.autograd.gradcheck(f, tables)
    assert torch.autograd.gradgradcheck(f, tables)


def test_parametrized_weight_is_read_through_the_module():
    """The plan's entry is handed the tables from _parameters; a parametrization takes the weight out of them."""
    module = make(sparse=False)
    expected = module(ids(1, 2)) * 2 - module.position_weight[:2] - module.segment_weight[0]
    torch.nn.utils.parametrize.register_parametrization(module, "weight", _Double())
    out = module(ids(1, 2))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert module.parametrizations.weight.original.grad is not None


class _Double(torch.nn.Module):
    def forward(self, weight):
        return weight * 2


def test_the_comparison_reaches_both_paths(monkeypatch):
    module = make()
    assert module(ids(1)).grad_fn.name() == NODE
    assert fused_input_embedding(ids(1), module.weight, backend="extension").grad_fn.name() == NODE
    python_shaping(monkeypatch)
    assert module(ids(1)).grad_fn.name() != NODE
    assert fused_input_embedding(ids(1), module.weight, backend="extension").grad_fn.name() != NODE


@pytest.mark.parametrize("shape", [(4,), (2, 2)])
def test_ids_changed_in_place_after_the_forward_fail_the_backward(shape):
    """As with any saved tensor: the backward would otherwise read other ids than the forward did."""
    module = make(sparse=False)
    input_ids, token_type_ids = torch.ones(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    out = module(input_ids, token_type_ids)
    token_type_ids.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


NORM_NODE = "FusedNormEmbeddingBackward"
# module options (with a norm or dropout), train mode, call arguments
NORM_CASES = {
    "layernorm-dropout-train": ({"norm": "layernorm", "dropout": 0.3}, True, {}),
    "layernorm-eval": ({"norm": "layernorm", "dropout": 0.3}, False, {}),
    "rmsnorm-dense-padding": ({"norm": "rmsnorm", "sparse": False, "padding_idx": 1}, True, {}),
    "layernorm-sparse-padding": ({"norm": "layernorm", "dropout": 0.2, "padding_idx": 1}, True, {}),
    "dropout-only-train": ({"dropout": 0.5}, True, {}),
    "sinusoid-past-length": ({"norm": "layernorm", "dropout": 0.1, "position": "sinusoidal", "max_positions": None}, True,
                             {"past_length": 3}),
}


def _norm_call(module, device, kwargs, seed):
    torch.manual_seed(seed)  # the ids, then the dropout seed
    out = module(torch.randint(0, VOCAB, (3, 5), device=device), torch.randint(0, 2, (3, 5), device=device), **kwargs)
    out.backward(torch.randn(out.shape, device=device, generator=torch.Generator(device).manual_seed(seed)))
    return out, _grads(module)


@pytest.mark.parametrize("case", NORM_CASES.values(), ids=NORM_CASES.keys())
def test_norm_calls_equal_the_python_path(case, device, monkeypatch):
    """With a norm or dropout the entry's output (the same dropout mask from the same manual_seed) and every
    gradient, the norm's weight and bias too, are the Python path's, bitwise."""
    options, training, kwargs = case
    module = make(**options).to(device).train(training)
    torch.manual_seed(0)
    args = (torch.randint(0, VOCAB, (3, 5), device=device), torch.randint(0, 2, (3, 5), device=device))
    assert module(*args, **kwargs).grad_fn.name() == NORM_NODE
    module.zero_grad(set_to_none=True)
    out, grads = _norm_call(module, device, kwargs, seed=1)
    module.zero_grad(set_to_none=True)
    python_shaping(monkeypatch)
    expected, expected_grads = _norm_call(module, device, kwargs, seed=1)
    assert expected.grad_fn.name() != NORM_NODE
    assert torch.equal(out, expected)
    assert grads.keys() == expected_grads.keys() and all(grads[name] is not None for name in grads)
    for name, value in expected_grads.items():
        assert torch.equal(grads[name], value), name


def test_norm_parameters_not_requiring_grad_get_none(device):
    module = make(norm="layernorm").to(device)
    module.norm_bias.requires_grad_(False)
    module.weight.requires_grad_(False)
    out = module(torch.tensor([[1, 2, 3]], device=device))
    assert out.grad_fn.name() == NORM_NODE
    assert [edge is None for edge, _ in out.grad_fn.next_functions] == [True, False, False, False, True]
    out.square().sum().backward()
    assert module.weight.grad is None and module.norm_bias.grad is None
    assert module.norm_weight.grad is not None and module.position_weight.grad is not None
    for parameter in (module.position_weight, module.segment_weight, module.norm_weight):
        parameter.requires_grad_(False)
    assert not module(torch.tensor([[1, 2, 3]], device=device)).requires_grad


def test_norm_double_backward_raises_through_the_entry(device):
    module = make(norm="layernorm", sparse=False).to(device)
    out = module(torch.tensor([[1, 2, 3]], device=device))
    assert out.grad_fn.name() == NORM_NODE
    grads = torch.autograd.grad(out.square().sum(), module.weight, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grads[0].sum().backward()
