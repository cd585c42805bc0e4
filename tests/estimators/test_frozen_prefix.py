"""zo's frozen prefix: recorded on a step's first evaluation, replayed on the next ones, with
bit for bit the result of running it every time."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forwardonly import make_estimator
from forwardonly.estimators.frozen_prefix import FrozenPrefix

transformers = pytest.importorskip("transformers")

PAD = 0
LAST = "encoder.encoder.layer.2."


def tiny_classifier(dtype=torch.float64, layers=3, **overrides):
    """A random BERT of ``layers`` layers with a linear head, its last layer and head trainable."""
    from forwardonly.models import text as text_module
    from forwardonly.models.text import TextClassifier

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, pad_token_id=PAD, **overrides)
    text_module._transformers()  # registers the "forwardonly" attention
    config._attn_implementation = "forwardonly"
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    model = TextClassifier(encoder, 2, pad_id=PAD, seed=0).to(dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith((f"encoder.encoder.layer.{layers - 1}.", "head.")))
    return model


def text_batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (4, 9), generator=gen)
    ids[0, 5:] = PAD
    ids[2, 7:] = PAD
    return ids, torch.tensor([0, 1, 1, 0])


def mlp(dtype=torch.float64):
    """Linear-ReLU-Linear-ReLU-Linear with only the last layer trainable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 3)).to(dtype)
    for p in model[:4].parameters():
        p.requires_grad_(False)
    return model


def mlp_batch(dtype=torch.float64):
    gen = torch.Generator().manual_seed(2)
    return torch.randn(6, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen)


def count_calls(module):
    """Count the real runs of ``module``'s forward (an instance attribute, which the prefix
    saves and restores around its own)."""
    calls = [0]
    forward = module.forward

    def counting(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counting
    return calls


def run_steps(model, x, y, *, in_place=False, steps=2, method="zo", **options):
    """Two steps of ``method`` on a copy of ``model``: the stats, the trainable parameters'
    ``.grad`` (or values, in place) after each step."""
    model = copy.deepcopy(model)
    est = make_estimator(method, model, F.cross_entropy, seed=5, **options)
    out = []
    for _ in range(steps):
        stats = est.step(x, y) if not in_place else est.sgd_step(x, y, lr=0.1)
        tensors = [(p if in_place else p.grad).detach().clone()
                   for p in model.parameters() if p.requires_grad]
        out.append((stats, tensors))
    return out


def assert_identical(a, b):
    for (stats_a, ts_a), (stats_b, ts_b) in zip(a, b, strict=True):
        assert stats_a == stats_b
        assert all(torch.equal(s, t) for s, t in zip(ts_a, ts_b, strict=True))


BERT_OPTIONS = [
    {},
    {"exact_head": True},
    {"directions": 2},
    {"directions": 2, "exact_head": True, "distribution": "lowrank"},
    {"micro_batch": 3, "reuse_prefix": True},
    {"micro_batch": 2, "exact_head": True, "directions": 2, "reuse_prefix": True},
]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("options", BERT_OPTIONS)
def test_reuse_is_bit_identical_on_a_tiny_bert(options, in_place):
    model, (x, y) = tiny_classifier(), text_batch()
    reuse = options.get("reuse_prefix", True)
    options = {k: v for k, v in options.items() if k != "reuse_prefix"}
    assert_identical(run_steps(model, x, y, in_place=in_place, reuse_prefix=reuse, **options),
                     run_steps(model, x, y, in_place=in_place, reuse_prefix=False, **options))


@pytest.mark.parametrize("method", ["zo", "zo-sign"])
@pytest.mark.parametrize("options", [{}, {"directions": 2}, {"micro_batch": 4,
                                                              "reuse_prefix": True}])
def test_reuse_is_bit_identical_on_an_mlp(method, options, device):
    model, (x, y) = mlp(torch.float32), mlp_batch(torch.float32)
    model, x, y = model.to(device), x.to(device), y.to(device)
    reuse = options.get("reuse_prefix", True)
    options = {k: v for k, v in options.items() if k != "reuse_prefix"}
    assert_identical(run_steps(model, x, y, method=method, reuse_prefix=reuse, **options),
                     run_steps(model, x, y, method=method, reuse_prefix=False, **options))


def test_the_prefix_is_the_maximal_frozen_modules_that_run_first():
    model, (x, _) = tiny_classifier(), text_batch()
    # the exact head is trainable but not perturbed: only the last layer is
    perturbed = [p for n, p in model.named_parameters() if n.startswith(LAST)]
    prefix = FrozenPrefix(model, perturbed)
    with torch.no_grad(), prefix.evaluation(0):
        model(x)
    assert prefix.recorded(0) == ["encoder.embeddings", "encoder.encoder.layer.0",
                                  "encoder.encoder.layer.1"]
    seq = mlp()
    prefix = FrozenPrefix(seq, [seq[4].weight, seq[4].bias])
    with torch.no_grad(), prefix.evaluation("piece"):
        seq(mlp_batch()[0])
    assert prefix.recorded("piece") == ["0", "2"]  # the ReLUs hold nothing: they run again


@pytest.mark.parametrize(("options", "runs"), [
    ({"exact_head": True}, 1),  # θ records; θ + εz and θ − εz replay
    ({"directions": 2}, 1),
    ({"exact_head": True, "micro_batch": 2, "reuse_prefix": True}, 2),  # once per piece
    ({"exact_head": True, "micro_batch": 2}, 6),  # "auto": not with micro-batches
    ({"exact_head": True, "reuse_prefix": False}, 3),
])
@pytest.mark.parametrize("in_place", [False, True])
def test_frozen_layers_run_once_per_step(options, runs, in_place):
    model, (x, y) = tiny_classifier(), text_batch()
    first = count_calls(model.encoder.encoder.layer[0])
    last = count_calls(model.encoder.encoder.layer[2])
    est = make_estimator("zo", model, F.cross_entropy, **options)
    step = (lambda: est.sgd_step(x, y, lr=0.1)) if in_place else (lambda: est.step(x, y))
    step()
    assert first[0] == runs
    evaluations = 2 * est.directions + (est.exact_head is not None)
    assert last[0] == evaluations * (2 if "micro_batch" in options else 1)
    step()  # a new step records again
    assert first[0] == 2 * runs
    assert est._prefix is None  # the recording went with the step


def test_mlp_prefix_runs_once_per_step():
    model, (x, y) = mlp(), mlp_batch()
    calls = [count_calls(layer) for layer in model]
    make_estimator("zo", model, F.cross_entropy, directions=3).step(x, y)
    assert [c[0] for c in calls] == [1, 6, 1, 6, 6]


def test_active_dropout_is_not_replayed():
    model = tiny_classifier(hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.0)
    x, y = text_batch()
    model.encoder.train()  # TextClassifier keeps its encoder in eval mode; not here
    perturbed = [p for n, p in model.named_parameters() if n.startswith(LAST)]
    prefix = FrozenPrefix(model, perturbed)
    with torch.no_grad(), prefix.evaluation(0):
        model(x)
    assert prefix.recorded(0) == []
    options = {"exact_head": True, "directions": 2}
    assert_identical(run_steps(model, x, y, **options),
                     run_steps(model, x, y, reuse_prefix=False, **options))
    first = count_calls(model.encoder.encoder.layer[0])
    make_estimator("zo", model, F.cross_entropy, **options).step(x, y)
    assert first[0] == 5
    # dropout in the embeddings only: the layers after them replay (the embeddings draw the
    # same mask at every evaluation, which is reseeded)
    for m in model.encoder.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    model.encoder.embeddings.dropout.p = 0.2
    with torch.no_grad(), prefix.evaluation(1):
        model(x)
    assert prefix.recorded(1) == ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    assert_identical(run_steps(model, x, y, **options),
                     run_steps(model, x, y, reuse_prefix=False, **options))


def test_nothing_to_do_when_every_parameter_is_perturbed_or_the_first_module_is():
    model, (x, _) = tiny_classifier(), text_batch()
    assert FrozenPrefix(model, list(model.parameters()))._frozen == []  # nothing wrapped
    assert FrozenPrefix(model, [])._frozen == []  # nothing perturbed
    seq, (x, _) = mlp(), mlp_batch()
    for p in seq.parameters():
        p.requires_grad_(True)
    assert FrozenPrefix(seq, list(seq.parameters()))._frozen == []
    prefix = FrozenPrefix(seq, list(seq[0].parameters()))  # layer 0 runs first
    assert prefix._frozen == [seq[2], seq[4]]
    with torch.no_grad():
        with prefix.evaluation(0):
            out = seq(x)
        assert prefix.recorded(0) == []
        with prefix.evaluation(0):  # nothing wrapped
            assert not any("forward" in vars(m) for m in seq.modules())
            assert torch.equal(seq(x), out)
    assert prefix.replayed == 0
    assert not any("forward" in vars(m) for m in seq.modules())


def test_a_module_called_twice_and_after_the_perturbed_one():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(4, 4)
            self.t = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):  # f twice before t, once after
            return self.out(self.f(self.t(self.f(self.f(x)))))

    torch.manual_seed(0)
    model = Shared().double()
    for p in [*model.f.parameters(), *model.out.parameters()]:
        p.requires_grad_(False)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert_identical(run_steps(model, x, y), run_steps(model, x, y, reuse_prefix=False))
    calls = count_calls(model.f)
    make_estimator("zo", model, F.cross_entropy).step(x, y)
    assert calls[0] == 3 + 1  # the first evaluation: all three; the second: the last only


def test_a_parameter_read_outside_its_module_turns_reuse_off():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.extra = nn.Linear(3, 3)
            self.after = nn.Linear(3, 2)

        def forward(self, x):  # reads extra's weight without running extra
            return self.after(F.linear(self.inner(x), self.extra.weight))

    torch.manual_seed(0)
    model = Tied().double()
    for p in [*model.inner.parameters(), *model.after.parameters()]:
        p.requires_grad_(False)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1])
    prefix = FrozenPrefix(model, [model.extra.weight, model.extra.bias])
    with torch.no_grad(), prefix.evaluation(0):
        model(x)
    assert prefix.recorded(0) == []  # `after` would have been recorded as part of the prefix
    assert_identical(run_steps(model, x, y), run_steps(model, x, y, reuse_prefix=False))


def test_an_output_modified_in_place_later_is_not_replayed():
    class Scale(nn.Module):  # trainable, and scales its input in place
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, h):
            return h.mul_(self.s)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 2)).double()
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert_identical(run_steps(model, x, y), run_steps(model, x, y, reuse_prefix=False))
    calls = count_calls(model[0])
    make_estimator("zo", model, F.cross_entropy).step(x, y)
    assert calls[0] == 2  # its recorded output was scaled in place: it runs again


def test_no_recording_with_autograd_on_or_different_inputs():
    model, (x, _) = mlp(), mlp_batch()
    prefix = FrozenPrefix(model, [model[4].weight])
    with prefix.evaluation(0):  # grad mode: outputs would carry a graph
        model(x)
    assert prefix.recorded(0) == []
    with torch.no_grad():
        expected = model(x + 1)
        with prefix.evaluation(1):
            model(x)
        calls = count_calls(model[0])
        with prefix.evaluation(1):
            other = model(x + 1)  # not the recorded batch: runs
        assert calls[0] == 1 and prefix.replayed == 0
        assert torch.equal(other, expected)
        with prefix.evaluation(1):
            model(x.clone())  # equal values, another tensor: replayed
        assert calls[0] == 1 and prefix.replayed == 2


def test_reuse_prefix_option_is_checked():
    model = mlp()
    with pytest.raises(ValueError, match="reuse_prefix"):
        make_estimator("zo", model, F.cross_entropy, reuse_prefix="yes")
    assert make_estimator("zo", model, F.cross_entropy).reuses_prefix()
    assert not make_estimator("zo", model, F.cross_entropy, micro_batch=2).reuses_prefix()
    assert make_estimator("zo", model, F.cross_entropy, micro_batch=2,
                          reuse_prefix=True).reuses_prefix()
