"""TextClassifier on a tiny random BERT: exact JVPs, dynamic padding, builders, errors."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import forwardonly
from forwardonly.autodiff import (
    ForwardModeError,
    directional_derivatives,
    streamed_directional_derivative,
)
from forwardonly.models import attention as attention_module
from forwardonly.models import build_model
from forwardonly.models import text as text_module
from forwardonly.models.text import MissingTextExtra, TextClassifier, load_tokenizer

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-8, "atol": 1e-8}
PAD = 0


def tiny_bert(**overrides):
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=PAD, **overrides)
    text_module._transformers()  # registers the "forwardonly" attention
    config._attn_implementation = "forwardonly"
    return transformers.BertModel(config, add_pooling_layer=False)


def tiny_classifier(dtype=torch.float64):
    return TextClassifier(tiny_bert(), 2, pad_id=PAD, seed=0).to(dtype)


def batch():
    """(3, 9) ids right-padded to different lengths, and labels."""
    ids = torch.randint(1, 50, (3, 9))
    ids[0, 4:] = PAD
    ids[1, 7:] = PAD
    ids[2, 8:] = PAD
    return ids, torch.tensor([0, 1, 1])


def test_jvp_through_encoder_equals_autograd(monkeypatch):
    model = tiny_classifier()
    assert model.encoder.config._attn_implementation == "forwardonly"
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return attention_module._Attention.apply(*args[:4], kwargs["scale"])

    monkeypatch.setattr(attention_module, "dot_product_attention", counting)
    ids, y = batch()
    named = dict(model.named_parameters())
    k = 3
    tangents = {id(p): torch.randn(k, *p.shape, dtype=p.dtype) for p in named.values()}
    loss, d = directional_derivatives(model, F.cross_entropy, ids, y,
                                      lambda p: tangents[id(p)], k)  # vmap(jvp) over K
    assert len(calls) == 2  # the two layers' attention ran through forwardonly's rule

    grads = torch.autograd.grad(F.cross_entropy(model(ids), y), list(named.values()))
    expected = torch.stack([sum((g * tangents[id(p)][i]).sum()
                                for g, p in zip(grads, named.values(), strict=True))
                            for i in range(k)])
    torch.testing.assert_close(d, expected, **TOL)
    torch.testing.assert_close(loss, F.cross_entropy(model(ids), y), **TOL)


@pytest.mark.parametrize("by_rows", [False, True])
def test_streamed_jvp_through_encoder_equals_autograd(by_rows):
    """One direction, each module's tangents drawn while it runs (the embedding's as the
    looked-up rows): the autograd directional derivative, float64."""
    model = tiny_classifier()
    for p in model.encoder.encoder.layer[0].parameters():
        p.requires_grad_(False)  # frozen parameters stay plain
    ids, y = batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    tangents = {id(p): torch.randn(1, *p.shape, dtype=p.dtype) for p in trainable}
    drawn = []

    def tangent(p):
        drawn.append(id(p))
        return tangents[id(p)]

    def rows(p, index):
        return tangents[id(p)][0][index]

    loss, d = streamed_directional_derivative(model, F.cross_entropy, ids, y, tangent,
                                              rows if by_rows else None)
    grads = torch.autograd.grad(F.cross_entropy(model(ids), y), trainable)
    expected = sum((g * tangents[id(p)][0]).sum() for g, p in zip(grads, trainable, strict=True))
    torch.testing.assert_close(d, expected.reshape(1), **TOL)
    torch.testing.assert_close(loss, F.cross_entropy(model(ids), y), **TOL)
    word = model.encoder.embeddings.word_embeddings.weight
    assert (id(word) in drawn) is not by_rows  # rows only: the whole tangent never drawn
    assert all(type(p) is torch.nn.Parameter for p in model.parameters())  # restored


def test_streamed_jvp_refuses_a_parameter_used_outside_its_module():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(3, 3)
            self.extra = torch.nn.Linear(3, 2)

        def forward(self, x):  # reads extra's weight without running extra
            return F.linear(self.inner(x), self.extra.weight)

    model = Tied().double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ForwardModeError, match="extra.weight"):
        streamed_directional_derivative(model, F.cross_entropy, x, y,
                                        lambda p: torch.ones(1, *p.shape, dtype=p.dtype))


def test_dynamic_padding():
    model = tiny_classifier()
    ids, _ = batch()
    with torch.no_grad():
        out = model(ids)
        wider = model(torch.cat([ids, torch.full((3, 5), PAD)], dim=1))
        alone = torch.cat([model(row[row != PAD].unsqueeze(0)) for row in ids])
        assert model.features(ids).shape == (3, 16)
    torch.testing.assert_close(wider, out, **TOL)
    torch.testing.assert_close(alone, out, **TOL)


@pytest.mark.parametrize("options", [
    {"distribution": "gaussian"}, {"distribution": "lowrank", "direction_rank": 2},
    {"distribution": "rademacher", "exact_head": True}])
def test_fg_w_in_place_is_sgd_on_its_estimate(options, monkeypatch):
    """The in-place step (streamed tangents, embedding rows, chunked update) moves θ by
    exactly −lr·g of the step that fills .grad from the same seed."""
    from forwardonly.autodiff import forward_mode

    streamed = []
    real = forward_mode.streamed_jvp

    def spy(*args, **kwargs):
        streamed.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(forward_mode, "streamed_jvp", spy)
    monkeypatch.setattr("forwardonly.estimators.forward_gradient.streamed_jvp", spy)
    ids, y = batch()
    lr = 0.1
    models = []
    for _ in range(2):  # the same random BERT twice
        torch.manual_seed(0)
        models.append(tiny_classifier())
    one, two = models
    est = forwardonly.make_estimator("fg-w", one, F.cross_entropy, seed=3, **options)
    est.step(ids, y)
    expected = [p.detach() - lr * p.grad for p in one.parameters()]
    forwardonly.make_estimator("fg-w", two, F.cross_entropy, seed=3, **options).sgd_step(
        ids, y, lr)
    assert streamed
    for want, got in zip(expected, two.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert got.grad is None or options.get("exact_head")


def test_estimators_step_on_the_tiny_model():
    model = tiny_classifier(torch.float32)
    model.train()
    assert not model.encoder.training  # dropout stays off
    ids, y = batch()
    for name, options in [("fg-w", {"directions": 2}), ("zo", {}), ("bp", {})]:
        model.zero_grad(set_to_none=False)
        stats = forwardonly.make_estimator(name, model, F.cross_entropy, **options).step(ids, y)
        assert torch.isfinite(torch.tensor(stats["loss"]))
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.head.weight.grad.abs().sum() > 0


def test_hf_builder_on_a_saved_directory(tmp_path):
    tiny_bert(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.2).save_pretrained(tmp_path)
    model = build_model("hf", (9,), 3, model_path=str(tmp_path), seed=4)
    again = build_model("hf", (9,), 3, model_path=str(tmp_path), seed=4)
    config = model.encoder.config
    assert config._attn_implementation == "forwardonly"
    assert config.hidden_dropout_prob == 0.0 and config.attention_probs_dropout_prob == 0.0
    assert model.pad_id == PAD
    torch.testing.assert_close(model.head.weight, again.head.weight)  # the head from the seed
    ids, _ = batch()
    model.train()
    assert model(ids).shape == (3, 3)


def test_bad_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="needs model_path"):
        build_model("hf", (9,), 2)
    with pytest.raises(ValueError, match="not a directory"):
        build_model("hf", (9,), 2, model_path=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=f"{tmp_path}.*no config.json"):
        build_model("hf", (9,), 2, model_path=str(tmp_path))
    with pytest.raises(ValueError, match="model_path"):
        load_tokenizer("hf", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="text model must be one of"):
        load_tokenizer("mlp", None)


def test_missing_text_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingTextExtra, match=r"pip install 'forwardonly\[text\]'"):
        load_tokenizer("minilm", None)
    monkeypatch.setitem(sys.modules, text_module.MINILM_PACKAGE, None)
    with pytest.raises(ValueError, match=r"pip install 'forwardonly\[text\]'"):
        build_model("minilm", (9,), 2)


def test_registering_the_models_does_not_import_transformers():
    code = ("import sys, forwardonly; from forwardonly.models import MODELS; "
            "assert {'minilm', 'hf'} <= set(MODELS); assert 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_minilm_offline():
    tokenizer = load_tokenizer("minilm", None)
    model = build_model("minilm", (64,), 2, seed=0)
    assert model.encoder.config._attn_implementation == "forwardonly"
    assert sum(p.numel() for p in model.parameters()) == 22_566_146  # no pooler
    sentences = ["a gripping, funny film", "dull and lifeless",
                 "the best movie of the year", "meh"]
    ids = tokenizer(sentences, padding="max_length", max_length=32, truncation=True,
                    return_tensors="pt")["input_ids"]
    assert tokenizer.pad_token_id == model.pad_id
    model.train()
    stats = forwardonly.make_estimator("fg-w", model, F.cross_entropy).step(
        ids, torch.tensor([1, 0, 1, 0]))
    with torch.no_grad():
        out = model(ids)
    assert out.shape == (4, 2) and torch.isfinite(out).all()
    assert torch.isfinite(torch.tensor(stats["loss"]))
