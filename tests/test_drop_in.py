"""Drop-in use: patched Hugging Face models match their unpatched selves; from_modules shares tables."""

import copy
import inspect
import math
import sys

import pytest
import torch
from torch import nn

import embedfast
from embedfast.positions import padding_aware_position_ids

transformers = pytest.importorskip("transformers")

PAD, VOCAB, DIM, MAX_POSITIONS = 1, 60, 32, 40
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def bert_like(kind, dtype, dropout=0.0):
    config_class, model_class = {"bert": (transformers.BertConfig, transformers.BertModel),
                                 "roberta": (transformers.RobertaConfig, transformers.RobertaModel)}[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                          max_position_embeddings=MAX_POSITIONS, hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
                          pad_token_id=PAD, type_vocab_size=2, layer_norm_eps=1e-7)
    return model_class(config).to(dtype)


HAS_MODERNBERT = hasattr(transformers, "ModernBertModel")  # from transformers 4.48


def modernbert(dtype, dropout=0.0, norm_bias=False):
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=MAX_POSITIONS, pad_token_id=PAD, bos_token_id=2, eos_token_id=3, cls_token_id=2,
        sep_token_id=3, norm_eps=1e-6, norm_bias=norm_bias, embedding_dropout=dropout, attention_dropout=0.0,
        mlp_dropout=0.0, reference_compile=False)
    return transformers.ModernBertModel(config).to(dtype)


def gpt2(dtype):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=DIM, n_layer=1, n_head=2, n_positions=MAX_POSITIONS,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(dtype)


MODELS = {"bert": lambda dtype: bert_like("bert", dtype), "roberta": lambda dtype: bert_like("roberta", dtype), "gpt2": gpt2}


def inputs(kind, generator):
    ids = torch.randint(2, VOCAB, (3, 9), generator=generator)
    ids[0, -3:] = PAD  # right padding: RoBERTa's positions must skip it
    kwargs = {"input_ids": ids}
    if kind != "gpt2":
        kwargs["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=generator)
    return kwargs


def output(model, kwargs):
    result = model(**kwargs)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def patched_copy(model, backend, **options):
    patched = copy.deepcopy(model)
    report = embedfast.patch_model(patched, backend=backend, **options)
    assert report, str(report)
    return patched, report


def assert_same_gradients(model, patched, dtype):
    """Every parameter's gradient, within the dtype's tolerance of the largest gradient element
    (some, like attention key biases, are zero up to rounding noise)."""
    pairs = list(zip(model.named_parameters(), patched.named_parameters()))
    scale = max(float(p.grad.to_dense().abs().max()) for _, p in model.named_parameters() if p.grad is not None)
    for (name, expected), (patched_name, actual) in pairs:
        assert name == patched_name
        if expected.grad is None:
            assert actual.grad is None, name
            continue
        torch.testing.assert_close(actual.grad.to_dense() / scale, expected.grad.to_dense() / scale, **TOLERANCE[dtype],
                                   msg=lambda m: f"{name}.grad: {m}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", MODELS)
def test_patched_model_matches_unpatched(kind, dtype, train, backend, device):
    model = MODELS[kind](dtype).to(device).train(train)
    patched, report = patched_copy(model, backend)
    assert sorted(patched.state_dict()) == sorted(model.state_dict())
    kwargs = {k: v.to(device) for k, v in inputs(kind, torch.Generator().manual_seed(len(kind))).items()}

    expected, actual = output(model, kwargs), output(patched, kwargs)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0)).to(device)  # well-conditioned gradients
    (expected.float() * probe).sum().backward()
    (actual.float() * probe).sum().backward()
    assert_same_gradients(model, patched, dtype)


def test_roberta_positions_match_hugging_face_and_skip_the_padding_row():
    ids = torch.tensor([[5, 7, PAD, PAD], [PAD, 4, 4, 9]])
    modeling = transformers.models.roberta.modeling_roberta  # a static method from 5.0, a function before
    hf_positions = getattr(modeling.RobertaEmbeddings, "create_position_ids_from_input_ids", None)
    hf_positions = hf_positions or modeling.create_position_ids_from_input_ids
    for past in (0, 3):
        expected = hf_positions(ids, PAD, past)
        assert torch.equal(padding_aware_position_ids(ids, PAD, past), expected)
    model = bert_like("roberta", torch.float32)
    embedfast.patch_model(model, backend="reference")
    out = model(ids).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    grad = model.embeddings.position_embeddings.weight.grad
    assert grad[PAD].abs().max() == 0 and grad[PAD + 1].abs().max() > 0


def own_argument_name(forward, candidates):
    """The one name among ``candidates`` that an unpatched forward's signature has."""
    (name,) = [name for name in candidates if name in inspect.signature(forward).parameters]
    return name


def test_gpt2_with_cache_matches_and_keeps_weights_tied():
    model = gpt2(torch.float32).eval()
    patched, _ = patched_copy(model, "auto")
    assert patched.lm_head.weight is patched.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        first, first_patched = model(ids[:, :4], use_cache=True), patched(ids[:, :4], use_cache=True)
        torch.testing.assert_close(first_patched.logits, first.logits)
        own = own_argument_name(type(model.transformer).forward, ("past_key_values", "cache"))
        # GPT2Model itself, under its own name; from 5.24 (cache) also the old name, which it still maps
        for name in {own, "past_key_values"}:
            step = model.transformer(ids[:, 4:], **{name: copy.deepcopy(first.past_key_values)})
            step_patched = patched.transformer(ids[:, 4:], **{name: copy.deepcopy(first_patched.past_key_values)})
            torch.testing.assert_close(step_patched.last_hidden_state, step.last_hidden_state, msg=lambda m: f"{name}: {m}")
        embeds = model.transformer.wte(ids)
        by_embeds, by_embeds_patched = model(inputs_embeds=embeds), patched(inputs_embeds=embeds)
    torch.testing.assert_close(by_embeds_patched.logits, by_embeds.logits)


def test_cache_length_of_a_cache_object_and_of_a_legacy_tuple():
    keys = torch.zeros(2, 2, 7, 16)
    assert embedfast.drop_in._cache_length(((keys, keys),)) == 7
    assert embedfast.drop_in._cache_length(None) == 0
    cache = transformers.DynamicCache()
    cache.update(keys, keys, 0)
    assert embedfast.drop_in._cache_length(cache) == 7


def test_bert_inputs_embeds_and_past_length_pass_through():
    model = bert_like("bert", torch.float32).eval()
    patched, _ = patched_copy(model, "auto")
    ids = torch.randint(2, VOCAB, (2, 5))
    embeds = model.embeddings.word_embeddings(ids)
    past_name = own_argument_name(type(model.embeddings).forward, ("past_key_values_length", "cache_length"))
    for kwargs in ({"inputs_embeds": embeds}, {"input_ids": ids, past_name: 4}):
        torch.testing.assert_close(patched.embeddings(**kwargs), model.embeddings(**kwargs))
    torch.testing.assert_close(patched.embeddings(ids, None, None, None, 4), model.embeddings(ids, None, None, None, 4))
    wrong_name = "cache_length" if past_name == "past_key_values_length" else "past_key_values_length"
    for embeddings in (model.embeddings, patched.embeddings):  # a name this release does not take fails as before
        with pytest.raises(TypeError, match=wrong_name):
            embeddings(ids, **{wrong_name: 4})


def test_patched_forward_reads_no_signature_per_call(monkeypatch):
    bert, gpt = bert_like("bert", torch.float32).eval(), gpt2(torch.float32).eval()
    embedfast.patch_model(bert), embedfast.patch_model(gpt)
    ids = torch.randint(2, VOCAB, (2, 5))
    bert(ids), gpt(ids)  # first calls: operators load and register once

    signature = inspect.signature

    def signature_outside_drop_in(*args, **kwargs):  # transformers' own layers may read signatures
        assert sys._getframe(1).f_code.co_filename != embedfast.drop_in.__file__, "patch_model read a signature per call"
        return signature(*args, **kwargs)

    monkeypatch.setattr(inspect, "signature", signature_outside_drop_in)
    bert(ids), gpt(ids)


def test_unknown_forward_signature_is_left_untouched_and_reported():
    class NewEmbeddings(nn.Module):  # a future release that renamed the past-length argument once more
        def __init__(self):
            super().__init__()
            self.word_embeddings, self.position_embeddings = nn.Embedding(VOCAB, DIM), nn.Embedding(MAX_POSITIONS, DIM)
            self.token_type_embeddings = nn.Embedding(2, DIM)
            self.LayerNorm, self.dropout = nn.LayerNorm(DIM), nn.Dropout(0.0)

        def forward(self, input_ids=None, token_type_ids=None, position_ids=None, inputs_embeds=None, offset=0):
            raise NotImplementedError

    model = nn.Sequential(NewEmbeddings())
    with pytest.warns(UserWarning, match="unchanged"):
        report = embedfast.patch_model(model)
    assert type(model[0]) is NewEmbeddings
    assert "unsupported forward signature" in str(report) and "cache_length" in str(report)


def test_unrecognised_model_is_left_untouched_with_a_message():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(UserWarning, match="no supported embedding block was found; the model is unchanged"):
        report = embedfast.patch_model(model)
    assert not report and type(model[0]) is nn.Embedding
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_patching_twice_changes_nothing_more():
    model = bert_like("bert", torch.float32)
    embedfast.patch_model(model)
    with pytest.warns(UserWarning):
        report = embedfast.patch_model(model)
    assert not report and "already fused" in str(report)


def test_from_modules_shares_parameters(backend, device):
    word = nn.Embedding(VOCAB, DIM, padding_idx=PAD, device=device)
    positions = nn.Embedding(MAX_POSITIONS, DIM, device=device)
    types = nn.Embedding(2, DIM, device=device)
    fused = embedfast.from_modules(word, positions, types, backend=backend)
    assert fused.weight is word.weight and fused.position_weight is positions.weight and fused.segment_weight is types.weight
    projection = nn.Linear(DIM, VOCAB, bias=False, device=device)
    projection.weight = word.weight  # tied output layer
    ids = torch.randint(0, VOCAB, (2, 7), device=device)
    token_types = torch.randint(0, 2, (2, 7), device=device)
    out = fused(ids, token_types)
    expected = word(ids) + positions(torch.arange(7, device=device)) + types(token_types)
    torch.testing.assert_close(out, expected)
    projection(out).sum().backward()
    assert word.weight.grad is not None and not word.weight.grad.is_sparse  # nn.Embedding's default: dense


def test_from_modules_rejects_what_it_cannot_fuse():
    word = nn.Embedding(VOCAB, DIM)
    with pytest.raises(ValueError, match="position_embeddings has embedding_dim 8, but word_embeddings has 32"):
        embedfast.from_modules(word, nn.Embedding(4, 8))
    with pytest.raises(ValueError, match="word_embeddings uses max_norm"):
        embedfast.from_modules(nn.Embedding(VOCAB, DIM, max_norm=1.0))
    with pytest.raises(TypeError, match="word_embeddings must be an nn.Embedding, got Linear"):
        embedfast.from_modules(nn.Linear(2, 2))


def fairseq_embedding(ids, weight, padding_idx):
    """fairseq's TransformerEncoder input: sqrt(d) * embed(ids) + SinusoidalPositionalEmbedding(ids), written out."""
    dim = weight.shape[1]
    half = dim // 2
    step = math.log(10000) / (half - 1)
    frequencies = torch.exp(torch.arange(half, dtype=torch.float64) * -step)
    positions = padding_aware_position_ids(ids, padding_idx).to(torch.float64)
    angles = positions.unsqueeze(-1) * frequencies
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return math.sqrt(dim) * weight.double()[ids] + table


def test_fairseq_style_configuration(backend, device):
    module = embedfast.FusedInputEmbedding(VOCAB, DIM, padding_idx=PAD, scale="sqrt", position="sinusoidal",
                                           sinusoid_layout="concat", backend=backend, device=device)
    ids = torch.randint(2, VOCAB, (3, 8))
    ids[1, -2:] = PAD
    out = module(ids.to(device), position_ids=padding_aware_position_ids(ids, PAD).to(device))
    expected = fairseq_embedding(ids, module.weight.detach().cpu(), PAD)
    not_pad = ids != PAD  # fairseq zeroes the table row of padding_idx; pads are masked downstream either way
    torch.testing.assert_close(out.cpu().double()[not_pad], expected[not_pad], rtol=1e-5, atol=1e-5)


def test_sparse_training_with_two_optimizers_matches_nn_embedding():
    torch.manual_seed(0)
    model = bert_like("bert", torch.float32)
    model.embeddings.word_embeddings.sparse = True
    patched, _ = patched_copy(model, "auto", sparse=True)
    batches = [inputs("bert", torch.Generator().manual_seed(i)) for i in range(3)]
    for net in (model, patched):
        word = net.embeddings.word_embeddings.weight
        sparse_opt = torch.optim.SparseAdam([word], lr=1e-2)
        dense_opt = torch.optim.AdamW([p for p in net.parameters() if p is not word], lr=1e-2)
        for kwargs in batches:
            out = output(net, kwargs)
            loss = (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum()
            loss.backward()
            assert word.grad.is_sparse
            sparse_opt.step(), dense_opt.step()
            sparse_opt.zero_grad(), dense_opt.zero_grad()
    # the embedding tables; AdamW turns zero-up-to-rounding gradients elsewhere (key biases) into noise steps
    for (name, expected), (_, actual) in zip(model.embeddings.named_parameters(), patched.embeddings.named_parameters()):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_sparse_training_under_autocast_with_grad_scaler():
    model = bert_like("bert", torch.float32)
    embedfast.patch_model(model, sparse=True)
    word = model.embeddings.word_embeddings.weight
    before = word.detach().clone()
    sparse_opt = torch.optim.SparseAdam([word], lr=1e-2)
    dense_opt = torch.optim.AdamW([p for p in model.parameters() if p is not word], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    kwargs = inputs("bert", torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = output(model, kwargs).float().square().mean()
    scaler.scale(loss).backward()
    scaler.step(sparse_opt)
    scaler.step(dense_opt)
    scaler.update()
    assert torch.isfinite(loss)
    changed = (word.detach() != before).any(dim=1).nonzero().flatten()
    seen = torch.unique(kwargs["input_ids"][kwargs["input_ids"] != PAD])
    assert torch.equal(changed, seen)


# --- the LayerNorm and dropout after the sum, fused too (backend="reference")

NORM_MODELS = {"bert": lambda **o: bert_like("bert", torch.float32, **o),
               "roberta": lambda **o: bert_like("roberta", torch.float32, **o),
               "modernbert": lambda **o: modernbert(torch.float32, **o)}
NORM_KINDS = ["bert", "roberta", pytest.param("modernbert", marks=pytest.mark.skipif(not HAS_MODERNBERT,
                                                                                      reason="no ModernBERT before 4.48"))]


def norm_and_dropout(model):
    embeddings = model.embeddings
    return (embeddings.norm, embeddings.drop) if hasattr(embeddings, "tok_embeddings") else (embeddings.LayerNorm, embeddings.dropout)


def record_fused_calls(monkeypatch):
    """The keyword arguments of every fused_input_embedding call patch_model's forwards make."""
    calls, fused = [], embedfast.drop_in.fused_input_embedding

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return fused(*args, **kwargs)

    monkeypatch.setattr(embedfast.drop_in, "fused_input_embedding", recording)
    return calls


def model_inputs(kind, generator, shape=(3, 9)):
    ids = torch.randint(2, VOCAB, shape, generator=generator)
    ids[0, -3:] = PAD
    kwargs = {"input_ids": ids}
    if kind != "modernbert":
        kwargs["token_type_ids"] = torch.randint(0, 2, ids.shape, generator=generator)
    return kwargs


@pytest.mark.parametrize("train", [True, False], ids=["train-p0", "eval"])
@pytest.mark.parametrize("kind", NORM_KINDS)
def test_norm_and_dropout_fused_match_unpatched(kind, train, monkeypatch):
    """Eval, and train with dropout probability 0: the output and every gradient (the LayerNorm's included) match;
    the fused call gets the LayerNorm's own parameters (the same objects), eps and p."""
    model = NORM_MODELS[kind]().train(train)
    patched, report = patched_copy(model, "reference")
    assert "+ LayerNorm (eps=" in str(report) and "+ dropout (p=0)" in str(report) and "sum only" not in str(report)
    assert sorted(patched.state_dict()) == sorted(model.state_dict())
    calls = record_fused_calls(monkeypatch)
    kwargs = model_inputs(kind, torch.Generator().manual_seed(len(kind)))
    expected, actual = model(**kwargs).last_hidden_state, patched(**kwargs).last_hidden_state
    norm, dropout = norm_and_dropout(patched)
    (call,) = calls
    assert call["norm"] == "layernorm" and call["norm_weight"] is norm.weight and call["norm_bias"] is norm.bias
    assert call["norm_eps"] == norm.eps == (1e-6 if kind == "modernbert" else 1e-7) and call["dropout_p"] == 0
    assert (norm.bias is None) == (kind == "modernbert")  # ModernBERT's default norm_bias=False: a LayerNorm without bias
    torch.testing.assert_close(actual, expected, **TOLERANCE[torch.float32])
    probe = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    (expected * probe).sum().backward()
    (actual * probe).sum().backward()
    assert_same_gradients(model, patched, torch.float32)
    for parameter in (norm.weight, norm.bias):
        assert parameter is None or parameter.grad.abs().max() > 0


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_fused_dropout_in_training_drops_a_plausible_fraction_and_runs_backward(kind, monkeypatch):
    p = 0.25
    model = NORM_MODELS[kind](dropout=p)
    patched, report = patched_copy(model, "reference")
    assert f"+ dropout (p={p:g})" in str(report)
    calls = record_fused_calls(monkeypatch)
    kwargs = model_inputs(kind, torch.Generator().manual_seed(3), shape=(8, 16))
    norm, dropout = norm_and_dropout(patched)
    embeddings = patched.embeddings
    out = embeddings(**kwargs)
    assert calls[-1]["dropout_p"] == p and calls[-1]["norm_weight"] is norm.weight
    dropped = out == 0
    spread = 6 * math.sqrt(p * (1 - p) / out.numel())  # the fraction lies outside but with probability ~1e-9
    assert p - spread < dropped.double().mean().item() < p + spread
    embeddings.eval()
    kept = embeddings(**kwargs).detach() / (1 - p)  # eval: no dropout
    assert calls[-1]["dropout_p"] == 0
    embeddings.train()
    torch.testing.assert_close(out[~dropped], kept[~dropped], rtol=1e-5, atol=1e-5)

    hidden = patched(**kwargs).last_hidden_state
    (hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    for name, parameter in patched.named_parameters():
        if name.startswith("pooler."):  # (BERT's pooler is not in last_hidden_state)
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad.to_dense()).all(), name
    assert norm.weight.grad.abs().max() > 0


def test_layernorm_without_affine_weight_fuses_the_sum_only():
    model = bert_like("bert", torch.float32).eval()
    model.embeddings.LayerNorm = nn.LayerNorm(DIM, eps=1e-7, elementwise_affine=False)
    patched, report = patched_copy(model, "reference")
    assert "learned positions; sum only (its LayerNorm has no elementwise_affine weight; it runs as before)" in str(report)
    kwargs = inputs("bert", torch.Generator().manual_seed(0))
    torch.testing.assert_close(output(patched, kwargs), output(model, kwargs))


def test_hooks_on_the_layernorm_still_run():
    model = bert_like("bert", torch.float32).eval()
    patched, _ = patched_copy(model, "reference")
    seen = []
    patched.embeddings.LayerNorm.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    kwargs = inputs("bert", torch.Generator().manual_seed(0))
    torch.testing.assert_close(output(patched, kwargs), output(model, kwargs))
    assert seen == [(3, 9, DIM)]


def test_blocks_whose_math_differs_are_left_as_is():
    """BigBird drops out before its LayerNorm; ERNIE adds task-type rows the fused sum has no table for."""
    config = dict(vocab_size=VOCAB, hidden_size=DIM, num_attention_heads=2, max_position_embeddings=MAX_POSITIONS,
                  pad_token_id=PAD)
    big_bird = transformers.models.big_bird.modeling_big_bird.BigBirdEmbeddings(transformers.BigBirdConfig(**config))
    ernie = transformers.models.ernie.modeling_ernie.ErnieEmbeddings(transformers.ErnieConfig(use_task_id=True, **config))
    for module, reason in ((big_bird, "but applies dropout then LayerNorm"), (ernie, "task_type_ids")):
        original = type(module)
        with pytest.warns(UserWarning, match="unchanged"):
            report = embedfast.patch_model(nn.Sequential(module))
        assert type(module) is original and reason in str(report), str(report)


@pytest.mark.skipif(not HAS_MODERNBERT, reason="no ModernBERT before 4.48")
def test_modernbert_inputs_embeds_and_a_norm_with_bias():
    model = modernbert(torch.float32, norm_bias=True).eval()
    patched, report = patched_copy(model, "reference")
    assert "no positions; lookup + LayerNorm (eps=1e-06) + dropout (p=0)" in str(report)
    ids = torch.randint(2, VOCAB, (2, 5))
    embeds = model.embeddings.tok_embeddings(ids)
    torch.testing.assert_close(patched.embeddings(inputs_embeds=embeds), model.embeddings(inputs_embeds=embeds))
    torch.testing.assert_close(patched.embeddings(ids), model.embeddings(ids))
    torch.testing.assert_close(patched(ids).last_hidden_state, model(ids).last_hidden_state)
