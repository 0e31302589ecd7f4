"""Networks: registry, shapes on every input geometry, parameter counts, the flat-parameter view."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from ddtool.errors import ConfigError
from ddtool.networks import ParamLayout, create_network, format_arch, list_networks, network_options, same_network
from ddtool.networks.instance_norm import InstanceNorm

GEOMETRIES = [(1, 28), (3, 32), (3, 64)]  # (channels, image side): MNIST, CIFAR, Tiny ImageNet


# One name per distinct structure; the remaining aliases only change a width/depth/norm option
# and are checked at 32px (keeps the file fast: ResNet-18 at 64px is the slow case on CPU).
STRUCTURES = ["convnet", "convnet-bn", "convnet-mp", "convnet-np", "convnetd5", "alexnet", "vgg11",
              "vgg11-bn", "resnet18", "resnet18-bn", "resnet18-ap", "lenet", "mlp"]


def _check_forward(name, channels, size):
    net = create_network(name, channels=channels, num_classes=7, image_size=size)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        logits = net(x)
        assert net.embed(x).shape[0] == 2
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("channels,size", GEOMETRIES)
@pytest.mark.parametrize("name", STRUCTURES)
def test_forward_shape_on_every_geometry(name, channels, size):
    _check_forward(name, channels, size)


@pytest.mark.parametrize("name", sorted(set(list_networks()) - set(STRUCTURES)))
def test_every_alias_builds_and_runs(name):
    _check_forward(name, 3, 32)


def test_convnet_has_published_parameter_count():
    net = create_network("convnet", channels=3, num_classes=10, image_size=32)
    assert sum(p.numel() for p in net.parameters()) == 320_010
    assert ParamLayout.from_module(net).total == 320_010


def test_convnet_28px_has_the_32px_head_and_depth_follows_image_size():
    mnist = create_network("convnet", channels=1, num_classes=10, image_size=28)
    cifar = create_network("convnet", channels=1, num_classes=10, image_size=32)
    assert mnist.classifier.in_features == cifar.classifier.in_features == 128 * 4 * 4
    assert mnist.features[0].conv.padding == (3, 3)
    assert len(create_network("convnet", channels=3, num_classes=10, image_size=64).features) == 4
    assert len(create_network("convnet", channels=3, num_classes=10, image_size=128).features) == 5
    assert create_network("convnet", channels=3, num_classes=10, image_size=64).classifier.in_features == 128 * 16


@pytest.mark.parametrize("norm,kind,groups", [
    ("instance", InstanceNorm, 128), ("layer", nn.GroupNorm, 1), ("group", nn.GroupNorm, 4),
    ("batch", nn.BatchNorm2d, None), ("none", nn.Identity, None),
])
def test_convnet_norms(norm, kind, groups):
    net = create_network("convnet", channels=3, num_classes=10, image_size=32, norm=norm)
    layer = net.features[0].norm
    assert type(layer) is kind
    if groups is not None:
        assert layer.num_groups == groups and layer.affine


def test_aliases_pin_options():
    assert type(create_network("convnet-bn", channels=3, num_classes=10, image_size=32).features[0].norm) is nn.BatchNorm2d
    assert len(create_network("convnetd4", channels=3, num_classes=10, image_size=32).features) == 4
    assert "norm" not in network_options("convnet-bn") and "width" in network_options("convnet-bn")
    bn = create_network("resnet18-bn-ap", channels=3, num_classes=10, image_size=32)
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in bn.modules())
    with pytest.raises(ConfigError, match="fixes norm"):
        create_network("convnet-bn", channels=3, num_classes=10, image_size=32, norm="none")


def test_same_network_sees_through_aliases_and_spelled_out_defaults():
    assert same_network("convnetw32", "convnet:width=32")
    assert same_network("convnet", "convnet:width=128")  # the default width spelled out
    assert not same_network("convnet", "convnet:width=32")
    assert not same_network("convnet", "convnet-bn")
    with pytest.raises(ConfigError):
        same_network("convnet", "no-such-net")


def test_unknown_names_and_options_are_config_errors():
    with pytest.raises(ConfigError, match="convnet.*resnet18"):
        create_network("resnet1000", channels=3, num_classes=10, image_size=32)
    with pytest.raises(ConfigError, match="Accepted options: width, depth, norm, pooling"):
        create_network("convnet", channels=3, num_classes=10, image_size=32, widht=64)
    with pytest.raises(ConfigError, match="norm"):
        create_network("convnet", channels=3, num_classes=10, image_size=32, norm="weird")
    with pytest.raises(ConfigError, match="vanishes"):
        create_network("vgg11", channels=3, num_classes=10, image_size=16)


def test_generator_makes_initialisation_reproducible_and_leaves_global_rng_alone():
    def build(seed):
        return create_network("convnetw32", channels=3, num_classes=10, image_size=32,
                              generator=torch.Generator().manual_seed(seed))

    state = torch.get_rng_state()
    a, b, c = build(0), build(0), build(1)
    assert torch.equal(torch.get_rng_state(), state)
    flat = [ParamLayout.from_module(n).flatten(n) for n in (a, b, c)]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])



# ------------------------------------------------------------------ option values

def _build(name, **options):
    return create_network(name, channels=3, num_classes=10, image_size=32, **options)


# (network, option, text as on a command line, what the message says is expected)
BAD_TEXT = [
    ("convnet", "width", "abc", "a whole number >= 1"),
    ("convnet", "width", "", "a whole number >= 1"),
    ("convnet", "width", "1.5", "a whole number >= 1"),
    ("convnet", "width", "32.0", "a whole number >= 1"),
    ("convnet", "width", "0", "a whole number >= 1"),
    ("convnet", "width", "-8", "a whole number >= 1"),
    ("convnet", "depth", "0", "a whole number >= 1"),
    ("convnet", "depth", "none", "a whole number >= 1"),
    ("convnet", "norm", "instancenorm", "one of instance, batch, layer, group, none"),
    ("convnet", "norm", "", "one of instance, batch, layer, group, none"),
    ("convnet", "pooling", "median", "one of avg, max, none"),
    ("convnet-bn", "width", "wide", "a whole number >= 1"),
    ("convnetd4", "depth", "four", "a whole number >= 1"),  # a pinned option is type-checked too
    ("mlp", "width", "1e3", "a whole number >= 1"),
    ("resnet18", "downsample", "maxpool", "one of stride, avgpool"),
    ("vgg11", "norm", "2", "one of instance, batch, layer, group, none"),
]


@pytest.mark.parametrize("network,option,text,expected", BAD_TEXT)
def test_bad_option_text_in_a_spec_is_a_config_error_naming_option_value_and_expectation(network, option, text,
                                                                                       expected):
    from ddtool.networks import parse_arch

    message = re.escape(f"Network option {option} of {network} must be {expected}, not {text!r}.")
    spec = f"{network}:{option}={text}"
    with pytest.raises(ConfigError, match=message):
        parse_arch(spec)  # refused where the spec is read, before any network is built
    with pytest.raises(ConfigError, match=message):
        _build(spec)
    with pytest.raises(ConfigError, match=message):
        same_network(spec, network)


@pytest.mark.parametrize("option,value", [
    ("width", "abc"), ("width", 1.5), ("width", 32.0), ("width", True), ("width", 0), ("width", -1),
    ("width", None), ("depth", 0), ("depth", "3x"), ("norm", 1), ("norm", "Batch"), ("pooling", None),
])
def test_bad_option_values_given_as_arguments_are_config_errors(option, value):
    with pytest.raises(ConfigError, match=re.escape(f"Network option {option} of convnet must be ")
                       + r".*" + re.escape(f", not {value!r}.")):
        _build("convnet", **{option: value})


def test_option_text_converts_to_the_same_options_as_typed_values():
    from ddtool.networks import check_network_options, parse_arch

    typed = {"width": 8, "depth": 2, "norm": "batch", "pooling": "max"}
    text = {"width": "8", "depth": " 2", "norm": "batch", "pooling": "max"}
    assert check_network_options("convnet", text) == check_network_options("convnet", typed) == typed
    assert parse_arch("convnet:width=8,depth=2,norm=batch,pooling=max") == ("convnet", typed)
    assert parse_arch("convnet: width = 08 ,") == ("convnet", {"width": 8})
    assert type(parse_arch("convnet:width=8")[1]["width"]) is int
    assert check_network_options("convnet", {"width": np.int64(8), "depth": None}) == {"width": 8, "depth": None}
    assert type(check_network_options("convnet", {"width": np.int64(8)})["width"]) is int
    assert check_network_options("convnetw32", {"width": "32"}) == {"width": 32}  # the pinned value, as text
    with pytest.raises(ConfigError, match="fixes width=32; got width=64"):
        check_network_options("convnetw32", {"width": "64"})
    with pytest.raises(ConfigError, match="has no option 'widht'. Accepted options: width, depth, norm, pooling"):
        check_network_options("convnet", {"widht": "8"})
    # the same network either way; valid specs keep their canonical form
    from_text = ParamLayout.from_module(_build("convnet:width=8,depth=2,norm=batch,pooling=max"))
    assert from_text == ParamLayout.from_module(_build("convnet", **typed))
    assert format_arch(*parse_arch("convnet:width=8,norm=batch")) == "convnet:norm=batch,width=8"
    assert same_network("convnet:width=32", "convnetw32")


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry, so networks registered by a test vanish after it."""
    from ddtool.networks import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry


def test_every_declared_type_converts_text_and_refuses_what_does_not_fit(scratch_registry):
    from ddtool.networks import check_network_options, parse_arch
    from ddtool.networks.registry import Choice, Flag, Real, Text, Whole

    @scratch_registry.register_network("toy", options={
        "size": Whole(min=1, max=4), "rate": Real(min=0.0), "bias": Flag(), "label": Text(),
        "mode": Choice(("a", "b")),
    })
    def toy(*, channels, num_classes, image_size, size=2, rate=0.5, bias=False, label="x", mode="a"):
        return nn.Linear(channels * image_size * image_size * size, num_classes, bias=bias)

    assert parse_arch("toy:size=4,rate=1e-3,bias=yes,label=12,mode=b") == (
        "toy", {"size": 4, "rate": 0.001, "bias": True, "label": "12", "mode": "b"})
    options = check_network_options("toy", {"rate": "2", "bias": "0", "label": "abc"})
    assert options == {"rate": 2.0, "bias": False, "label": "abc"}
    assert type(options["rate"]) is float and type(options["bias"]) is bool
    assert check_network_options("toy", {"rate": 2, "bias": True}) == {"rate": 2.0, "bias": True}
    assert create_network("toy:bias=true", channels=1, num_classes=2, image_size=2).bias is not None
    for option, value, expected in [
        ("size", "5", "a whole number from 1 to 4"), ("size", 2.0, "a whole number from 1 to 4"),
        ("rate", "abc", "a number >= 0.0"), ("rate", "-1", "a number >= 0.0"), ("rate", "nan", "a number >= 0.0"),
        ("rate", "", "a number >= 0.0"), ("rate", True, "a number >= 0.0"),
        ("bias", "maybe", "true or false"), ("bias", 1, "true or false"), ("bias", "", "true or false"),
        ("label", "", "a non-empty text"), ("label", 3, "a non-empty text"),
        ("mode", "c", "one of a, b"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(f"option {option} of toy must be {expected}, not {value!r}.")):
            check_network_options("toy", {option: value})


def test_registration_requires_a_fitting_type_for_every_option(scratch_registry):
    from ddtool.networks.registry import Choice, Whole

    def net(*, channels, num_classes, image_size, width=8, norm="none"):
        return nn.Identity()

    with pytest.raises(TypeError, match="declare one type per option"):
        scratch_registry.register_network("undeclared", options={"width": Whole(min=1)})(net)
    with pytest.raises(TypeError, match="default norm='none' is not one of batch"):
        scratch_registry.register_network("misfit", options={"width": Whole(min=1), "norm": Choice(("batch",))})(net)
    scratch_registry.register_network("fits", options={"width": Whole(min=1), "norm": Choice(("none", "batch"))})(net)
    with pytest.raises(ValueError, match="width of fits-0 must be a whole number >= 1, not 0"):
        scratch_registry.register_alias("fits-0", "fits", width=0)
    with pytest.raises(ValueError, match="no options"):
        scratch_registry.register_alias("fits-x", "fits", depth=3)


# ------------------------------------------------------------------ ParamLayout

def _small(name="convnet", **options):
    torch.manual_seed(0)
    return create_network(name, channels=3, num_classes=5, image_size=16, width=8, depth=2, **options)


def test_layout_records_parameters_in_order_and_round_trips():
    net = _small()
    layout = ParamLayout.from_module(net)
    assert layout.names == tuple(n for n, _ in net.named_parameters())
    assert layout.total == sum(p.numel() for p in net.parameters())
    assert ParamLayout.from_dict(layout.to_dict()) == layout
    flat = layout.flatten(net)
    assert flat.dtype == torch.float32 and not flat.requires_grad
    other = _small()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    layout.load_(other, flat)
    assert torch.equal(layout.flatten(other), flat)
    flat.add_(1.0)  # flatten copies: the module is not aliased
    assert not torch.equal(layout.flatten(net), flat)
    with pytest.raises(ValueError, match="layout mismatch"):
        layout.flatten(_small(norm="none"))


def test_unflatten_returns_views_of_the_flat_vector():
    layout = ParamLayout.from_module(_small())
    flat = torch.arange(layout.total, dtype=torch.float32)
    parts = layout.unflatten(flat)
    for (name, shape), offset in zip(zip(layout.names, layout.shapes), layout.offsets):
        assert parts[name].shape == shape
        assert parts[name]._base is flat or parts[name]._base is flat._base
        assert parts[name].reshape(-1)[0] == offset


@pytest.mark.parametrize("name,options", [("convnet", {}), ("convnet", {"norm": "batch"})])
def test_functional_forward_matches_module_forward_and_gradients(name, options):
    net = _small(name, **options)
    layout = ParamLayout.from_module(net)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 3])
    buffers_before = [b.clone() for b in net.buffers()]

    flat = layout.flatten(net).requires_grad_(True)
    loss_f = nn.functional.cross_entropy(layout.functional_forward(net, flat, x), y)
    (grad_flat,) = torch.autograd.grad(loss_f, flat)
    for before, after in zip(buffers_before, net.buffers()):
        assert torch.equal(before, after)  # private buffer copies: the module is untouched

    loss_m = nn.functional.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss_m, list(net.parameters()))
    torch.testing.assert_close(loss_f, loss_m, rtol=0, atol=0)
    torch.testing.assert_close(grad_flat, torch.cat([g.reshape(-1) for g in grads]), rtol=1e-6, atol=1e-7)


def test_functional_forward_in_float64_and_double_backward():
    net = _small().to(torch.float64)
    layout = ParamLayout.from_module(net)
    flat = layout.flatten(net)
    assert flat.dtype == torch.float64
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    flat.requires_grad_(True)
    out = layout.functional_forward(net, flat, x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    # d/dx of a parameter gradient (the matching engine's need): must not raise, must be non-zero.
    (g,) = torch.autograd.grad(out.square().sum(), flat, create_graph=True)
    (gx,) = torch.autograd.grad(g.square().sum(), x)
    assert gx.abs().sum() > 0
    # A float32 module run with float64 parameters (buffers follow the flat dtype).
    bn = _small(norm="batch")
    out64 = ParamLayout.from_module(bn).functional_forward(
        bn, ParamLayout.from_module(bn).flatten(bn, torch.float64), x.detach())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, bn.double()(x.detach()))  # the same network, in float64


def test_functional_forward_under_vmap():
    net = _small()
    layout = ParamLayout.from_module(net)
    flats = torch.stack([layout.flatten(net), layout.flatten(net) * 0.5])
    x = torch.randn(2, 3, 16, 16)
    batched = torch.vmap(lambda f: layout.functional_forward(net, f, x))(flats)
    for i in range(2):
        torch.testing.assert_close(batched[i], layout.functional_forward(net, flats[i], x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_functional_forward_on_cuda():
    net = _small()
    layout = ParamLayout.from_module(net)
    x = torch.randn(4, 3, 16, 16)
    expected = net(x)
    net.cuda()
    out = layout.functional_forward(net, layout.flatten(net), x.cuda())
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


# --- 2x2 average pooling (ddtool/networks/pooling.py) -------------------------------------------

def test_fast_pooling_equals_avg_pool2d_to_the_second_derivative():
    """Forward, backward and the backward's backward (what bptt and exact use) equal PyTorch's."""
    from ddtool.networks.pooling import avg_pool_2x2

    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 6, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 4, 4, 3, dtype=torch.float64)
    results = []
    for pool in (avg_pool_2x2, lambda t: nn.functional.avg_pool2d(t, 2)):
        y = pool(x)
        # a loss whose gradient in x depends on x, so the second derivative is not zero
        (g,) = torch.autograd.grad((weights * y).pow(2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad((g * x).sum(), x)
        results.append((y, g, h))
    for fast, reference in zip(*results):
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(avg_pool_2x2, (x,))
    assert torch.autograd.gradgradcheck(avg_pool_2x2, (x,))


@pytest.mark.parametrize("shape", [(2, 3, 7, 6), (2, 3, 6, 5), (2, 3, 3, 3)])
def test_fast_pooling_floors_odd_sides_like_avg_pool2d(shape):
    from ddtool.networks.pooling import avg_pool_2x2

    x = torch.randn(shape)
    torch.testing.assert_close(avg_pool_2x2(x), nn.functional.avg_pool2d(x, 2))
    x_last = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(avg_pool_2x2(x_last), nn.functional.avg_pool2d(x_last, 2))


def test_fast_pooling_under_vmap():
    from ddtool.networks.pooling import avg_pool_2x2

    x = torch.randn(5, 2, 3, 4, 4)
    torch.testing.assert_close(torch.vmap(avg_pool_2x2)(x), nn.functional.avg_pool2d(x.view(10, 3, 4, 4), 2).view(5, 2, 3, 2, 2))


# --- instance norm with a closed-form second derivative (ddtool/networks/instance_norm.py) --------

def test_instance_norm_equals_group_norm_to_the_third_derivative():
    """Values, gradients, the gradient's gradient (bptt, exact) and one order more, in float64."""
    from ddtool.networks.instance_norm import instance_norm

    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.3 * torch.randn(4, dtype=torch.float64)).requires_grad_(True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    mix = torch.randn(3, 4, 5, 6, dtype=torch.float64)

    def derivatives(norm):
        y = norm(x, w, b)
        first = torch.autograd.grad((mix * y).tanh().sum(), [x, w, b], create_graph=True)
        gx, gw, gb = first
        second = torch.autograd.grad((gx * mix).pow(2).sum() + (gw * gw.exp()).sum() + (gb * gb * w).sum(),
                                     [x, w, b], create_graph=True)
        third = torch.autograd.grad(sum((d * d).sum() for d in second), [x, w, b])
        return [y, *first, *second, *third]

    fast = derivatives(lambda x, w, b: instance_norm(x, w, b, 1e-5))
    reference = derivatives(lambda x, w, b: nn.functional.group_norm(x, 4, w, b, 1e-5))
    for a, r in zip(fast, reference):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda x, w, b: instance_norm(x, w, b, 1e-5), (x, w, b))


def test_instance_norm_module_keeps_group_norm_parameters_and_falls_back_off_the_fast_path():
    from ddtool.networks.instance_norm import InstanceNorm

    norm = InstanceNorm(6)
    assert isinstance(norm, nn.GroupNorm) and [n for n, _ in norm.named_parameters()] == ["weight", "bias"]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 6, 4, 4)
    reference = nn.functional.group_norm(x, 6, norm.weight, norm.bias, norm.eps)
    torch.testing.assert_close(norm(x), reference)
    x_last = x.contiguous(memory_format=torch.channels_last)  # not the fast path's layout
    torch.testing.assert_close(norm(x_last), reference)
