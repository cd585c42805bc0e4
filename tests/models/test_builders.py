"""Every registered model: builds for the data sets' shapes, maps (B, C, H, W) to (B, classes),
has the parameters its architecture implies, initialises deterministically, and rejects bad
arguments with a message naming the problem. LocalMixer's internals: ``test_local_mixer.py``."""

import pytest
import torch

import forwardonly  # noqa: F401  (registers every model)
from forwardonly.models import MODELS, build_model
from forwardonly.models.local_mixer import PAPER_PARAMS, PRESETS, local_mixer

# Small options per registered model, so every shape below builds in milliseconds.
SMALL = {
    "mlp": {"widths": [16, 8]},
    "cnn": {"channels": [4, 8]},
    "local-mixer": {"preset": "tiny"},
    "ff-mlp": {"widths": [16, 16]},
}
SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_is_tested_here():
    assert set(MODELS) == set(SMALL) | {"minilm", "hf"}  # text models: tests/models/test_text.py


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("name", sorted(SMALL))
def test_builds_for_every_data_set_shape_and_gives_one_score_per_class(name, shape):
    model = build_model(name, shape, 10, **SMALL[name])
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_defaults_build_for_mnist(name):
    model = build_model(name, (1, 28, 28), 10)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_an_empty_batch_gives_no_scores(name):
    if name == "ff-mlp":  # FFNet.flatten reshapes to (0, -1), which torch cannot infer
        pytest.xfail("ff-mlp cannot flatten an empty batch")
    model = build_model(name, (1, 8, 8), 10, **SMALL[name])
    assert model(torch.rand(0, 1, 8, 8)).shape == (0, 10)


# -- parameter counts --------------------------------------------------------------------------
def test_mlp_parameter_count():
    model = build_model("mlp", (1, 28, 28), 10, widths=[256, 128])
    assert n_params(model) == (784 * 256 + 256) + (256 * 128 + 128) + (128 * 10 + 10)
    assert n_params(build_model("mlp", (1, 8, 8), 10, widths=[])) == 64 * 10 + 10  # linear


def test_cnn_parameter_count():
    model = build_model("cnn", (3, 32, 32), 10, channels=[16, 32])
    convs = (3 * 16 * 9 + 16) + (16 * 32 * 9 + 32)
    assert n_params(model) == convs + 32 * 8 * 8 * 10 + 10  # two poolings: 32 -> 8
    # odd sizes round down at each pooling: 28 -> 14 -> 7 -> 3
    odd = build_model("cnn", (1, 28, 28), 10, channels=[4, 4, 4])
    assert odd[-1].in_features == 4 * 3 * 3


def local_mixer_params(in_shape, classes, blocks, patches, channels, groups):
    """Parameter count of a LocalMixer from its description in ``models/local_mixer.py``."""
    c_in, h, w = in_shape
    p, c, g = patches * patches, channels, groups
    patch_dim = c_in * (h // patches) * (w // patches)
    group = c * c // g + c
    first = (patch_dim * c + c) + group
    later = (p * p + p) + (c * c + c) + group  # token mixing, channel dense, grouped dense
    heads = (blocks + 1) * (c * classes + classes)  # one per block and the final head
    return first + (blocks - 1) * later + heads


PRESET_SHAPES = {"tiny": (1, 8, 8), "S/1/1": (1, 28, 28), "M/1/16": (1, 28, 28),
                 "M/8/16": (3, 32, 32), "L/8/64": (3, 32, 32)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_local_mixer_presets_have_the_parameters_of_their_architecture(preset):
    shape = PRESET_SHAPES[preset]
    model = local_mixer(shape, 10, preset)
    assert n_params(model) == local_mixer_params(shape, 10, **PRESETS[preset])
    if preset in PAPER_PARAMS:  # Table 2, three significant figures
        assert n_params(model) == pytest.approx(PAPER_PARAMS[preset], rel=0.005)


def test_ff_mlp_parameter_count():
    model = build_model("ff-mlp", (1, 8, 8), 10, widths=[16, 12, 8])
    layers = (64 * 16 + 16) + (16 * 12 + 12) + (12 * 8 + 8)
    readout = (12 + 8) * 10 + 10  # supervised: the head reads all layers but the first
    assert n_params(model) == layers + readout


# -- initialisation ------------------------------------------------------------------------------
def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("name", ["local-mixer", "ff-mlp"])
def test_seeded_models_depend_on_their_seed_only(name):
    torch.manual_seed(1)
    a = params(build_model(name, (1, 8, 8), 10, **SMALL[name], seed=5))
    torch.manual_seed(2)  # the global generator plays no part
    b = params(build_model(name, (1, 8, 8), 10, **SMALL[name], seed=5))
    c = params(build_model(name, (1, 8, 8), 10, **SMALL[name], seed=6))
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_unseeded_models_draw_from_the_global_generator(name):
    # torch's default layer init: the training loop seeds the global generator first
    torch.manual_seed(3)
    a = params(build_model(name, (1, 8, 8), 10, **SMALL[name]))
    torch.manual_seed(3)
    b = params(build_model(name, (1, 8, 8), 10, **SMALL[name]))
    c = params(build_model(name, (1, 8, 8), 10, **SMALL[name]))
    assert same(a, b)
    assert not same(a, c)


def test_mlp_layers_and_activations():
    model = build_model("mlp", (2, 3, 3), 4, widths=[5], activation="tanh")
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "Tanh", "Linear"]
    assert model[1].in_features == 2 * 3 * 3
    for act in ("relu", "gelu", "tanh", "sigmoid", "silu", "leaky_relu"):
        build_model("mlp", (1, 8, 8), 10, widths=[4], activation=act)


# -- bad arguments -------------------------------------------------------------------------------
def test_unknown_model_names_the_valid_ones():
    with pytest.raises(ValueError, match="model must be one of 'cnn', 'ff-mlp', 'hf', "
                                         "'local-mixer', 'minilm', 'mlp', got 'resnet'"):
        build_model("resnet", (1, 8, 8), 10)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match="model 'mlp' takes the options widths, activation; "
                                         "got unknown width"):
        build_model("mlp", (1, 8, 8), 10, width=3)
    with pytest.raises(ValueError, match="model 'local-mixer' takes the options preset, blocks,"
                                         ".*got unknown channels"):
        build_model("local-mixer", (1, 8, 8), 10, preset="tiny", channels=8)


@pytest.mark.parametrize("name", ["mlp", "cnn", "local-mixer"])
def test_sizes_are_checked(name):
    options = SMALL[name]
    for classes in (0, -1, 2.5):
        with pytest.raises(ValueError, match=f"num_classes must be a positive integer, got "
                                             f"{classes}"):
            build_model(name, (1, 8, 8), classes, **options)
    with pytest.raises(ValueError, match=r"in_shape must be positive sizes, got \(1, 0, 8\)"):
        build_model(name, (1, 0, 8), 10, **options)


@pytest.mark.parametrize("name", ["cnn", "local-mixer"])
def test_image_models_need_channels_height_and_width(name):
    for shape in ((8, 8), (1, 8, 8, 1)):
        with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\) of one image"):
            build_model(name, shape, 10, **SMALL[name])


def test_mlp_flattens_any_shape():
    model = build_model("mlp", (5,), 3, widths=[4])
    assert model(torch.rand(2, 5)).shape == (2, 3)
    assert model[1].in_features == 5


def test_bad_layer_options():
    with pytest.raises(ValueError, match=r"widths must be positive integers, got \[16, 0\]"):
        build_model("mlp", (1, 8, 8), 10, widths=[16, 0])
    with pytest.raises(ValueError, match=r"widths must be positive integers, got \[2.5\]"):
        build_model("mlp", (1, 8, 8), 10, widths=[2.5])
    with pytest.raises(ValueError, match="activation must be one of 'relu', .* got 'relu6'"):
        build_model("mlp", (1, 8, 8), 10, activation="relu6")
    with pytest.raises(ValueError, match="channels must be a non-empty list"):
        build_model("cnn", (1, 8, 8), 10, channels=[])
    with pytest.raises(ValueError, match="input 4×4 is too small for 3 pooling blocks"):
        build_model("cnn", (1, 4, 4), 10, channels=[4, 4, 4])
    with pytest.raises(ValueError, match="blocks must be a positive integer, got 0"):
        build_model("local-mixer", (1, 8, 8), 10, preset="tiny", blocks=0)
    with pytest.raises(ValueError, match="widths must name at least one hidden layer"):
        build_model("ff-mlp", (1, 8, 8), 10, widths=[])
    with pytest.raises(ValueError, match="Forward-Forward needs at least 2 classes, got 1"):
        build_model("ff-mlp", (1, 8, 8), 1, widths=[8])
