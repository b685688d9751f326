"""Every registered model builds, runs forward and gives (B, num_classes); bad arguments raise."""
import pytest
import torch

from sparsegrow.experiments.models import MODELS, build_model

# Small settings so the contract test stays fast; a model not listed is built with its defaults.
SMALL = {"wrn": dict(depth=10, width=1), "resnet": dict(depth=8, width=4), "cnn": dict(channels=(4, 8), hidden=16)}
SHAPES = [(1, 28, 28), (1, 32, 32), (3, 32, 32), (1, 8, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", MODELS.names())
def test_forward_gives_logits(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, 7, **SMALL.get(name, {}))
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    out.sum().backward()  # every parameter is reached by the loss
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODELS.names())
def test_classifier_is_a_linear_with_bias(name):
    model = build_model(name, (1, 28, 28), 10, **SMALL.get(name, {}))
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.bias is not None


def n_params(name, shape, num_classes, **kwargs):
    with torch.device("meta"):  # no memory, no init cost
        model = build_model(name, shape, num_classes, **kwargs)
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_literature():
    assert n_params("lenet300100", (1, 28, 28), 10) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert n_params("mlp", (1, 28, 28), 10) == n_params("lenet300100", (1, 28, 28), 10)
    assert n_params("set_mlp", (1, 28, 28), 10) == 785 * 1000 + 2 * 1001 * 1000 + 1001 * 10
    # WRN-28-10 on CIFAR-10: 36.5M in Zagoruyko & Komodakis (36,479,194 in their code).
    assert n_params("wrn", (3, 32, 32), 10, depth=28, width=10) == 36_479_194
    # ResNet-20: 0.27M (269,722 with the paper's parameter-free shortcuts) + 2 projections with BN.
    assert n_params("resnet", (3, 32, 32), 10) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_conv_followed_by_bn_has_no_bias():
    model = build_model("wrn", (3, 32, 32), 10, depth=10, width=1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    model = build_model("resnet", (3, 32, 32), 10, depth=8, width=4)
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_wrn_dropout_is_active_only_in_training():
    torch.manual_seed(0)
    model = build_model("wrn", (3, 32, 32), 10, depth=10, width=1, dropout=0.5)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "name, kwargs, words",
    [
        ("wrn", dict(depth=27), ["27", "6n+4"]),
        ("wrn", dict(depth=4), ["4", "6n+4"]),
        ("wrn", dict(width=0), ["width=0", "positive"]),
        ("wrn", dict(dropout=1.5), ["1.5", "dropout"]),
        ("resnet", dict(depth=21), ["21", "6n+2"]),
        ("mlp", dict(hidden=(300, -1)), ["-1", "positive"]),
        ("cnn", dict(channels=(32,)), ["channels", "two positive ints"]),
        ("wrn", dict(depht=28), ["depht", "depth, width, dropout"]),
        ("lenet300100", dict(hidden=(10,)), ["hidden", "none"]),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(name, kwargs, words):
    with pytest.raises(ValueError) as err:
        build_model(name, (3, 32, 32), 10, **kwargs)
    for word in words:
        assert word in str(err.value)


def test_unknown_model_names_the_allowed_ones():
    with pytest.raises(ValueError, match="wrn"):
        build_model("vgg", (3, 32, 32), 10)


def test_bad_input_shape_raises():
    with pytest.raises(ValueError, match="input_shape"):
        build_model("cnn", (1, 2, 2), 10)
    with pytest.raises(ValueError, match="input_shape"):
        build_model("mlp", (28, 28), 10)


def test_mlp_hands_dense_layers_a_row_major_input_and_sparse_layers_the_view():
    # a truly sparse layer returns (B, N) as the transpose of a contiguous (N, B); a dense layer
    # reading that view ran MKL's GEMM 6x slower at 10⁶ wide (benchmarks/bench_readout_layout.py)
    from sparsegrow.layers.sparse_linear import SparseLinear
    torch.manual_seed(0)
    model = build_model("mlp", (1, 4, 4), 3, hidden=[8, 6, 5])
    model.hidden[0] = SparseLinear(16, 8, torch.arange(0, 128, 3))
    model.hidden[1] = SparseLinear(8, 6, torch.arange(0, 48, 2))  # reads hidden.0's view
    seen = {}
    for name, m in (("sparse", model.hidden[1]), ("dense", model.hidden[2])):
        m.register_forward_pre_hook(lambda mod, inp, name=name: seen.__setitem__(name, inp[0]))
    x = torch.randn(7, 1, 4, 4)
    out = model(x)
    assert not seen["sparse"].is_contiguous()  # the view, passed on without a copy
    assert seen["dense"].is_contiguous()  # a row-major copy of hidden.1's view
    h = x.flatten(1)
    for layer in model.hidden:
        h = torch.relu(layer(h))
    torch.testing.assert_close(out, model.classifier(h))  # same numbers as the plain composition
