"""DSA: replayable parameters, per-family semantics, gradients, serialisation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ddtool.augment import FAMILIES, DSA, AugParams, DSAConfig
from ddtool.errors import ConfigError

N, C, H, W = 6, 3, 16, 16


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(seed: int = 0, n: int = N, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, C, H, W, generator=gen(seed + 1000), dtype=dtype)


def only(family: str) -> DSA:
    return DSA(DSAConfig(families=(family,)))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_params_give_bitwise_identical_output_and_same_seed_same_params(family):
    dsa = only(family)
    x = images()
    params = dsa.sample(N, H, W, gen(3))
    assert params.family == family and params.n == N
    assert torch.equal(dsa.apply(x, params), dsa.apply(x.clone(), params))
    again = dsa.sample(N, H, W, gen(3))
    assert all(torch.equal(params.values[k], again.values[k]) for k in params.values)
    assert torch.equal(dsa(x, gen(3)), dsa.apply(x, params))


def test_different_generators_give_different_output():
    dsa, x = DSA(), images()
    outputs = [dsa(x, gen(seed)) for seed in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(outputs[i], outputs[j])


def test_one_family_per_call_drawn_uniformly_and_flip_never_drawn_when_off():
    g = gen(7)
    drawn = [DSA().sample(2, H, W, g).family for _ in range(600)]
    counts = {f: drawn.count(f) for f in FAMILIES}
    assert all(60 <= c <= 140 for c in counts.values()), counts  # ~100 each
    no_flip = DSA(DSAConfig(flip=False))
    drawn = {no_flip.sample(2, H, W, g).family for _ in range(300)}
    assert drawn == set(FAMILIES) - {"flip"}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_x_for_every_family(family):
    dsa = only(family)
    x = images().requires_grad_(True)
    weights = torch.randn(N, C, H, W, generator=gen(5))
    (dsa.apply(x, dsa.sample(N, H, W, gen(1))) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()  # every sample receives gradient


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_returns_plain_nchw_strides(family, channels):
    """A channels-last batch (one channel included, whose strides pass is_contiguous) would make
    the network's convolutions answer channels-last and its norm and pooling slow."""
    dsa = only(family)
    x = torch.randn(N, channels, H, W, generator=gen(3))
    out = dsa.apply(x, dsa.sample(N, H, W, gen(1)))
    assert out.stride() == torch.empty(out.shape).stride()


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_and_gradcheck(family):
    dsa = only(family)
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64, generator=gen(2), requires_grad=True)
    params = dsa.sample(2, 6, 6, gen(4))
    assert dsa.apply(x, params).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


def test_crop_is_an_integer_shift_with_zero_fill():
    x = torch.arange(1, N * C * H * W + 1, dtype=torch.float32).view(N, C, H, W)  # no zeros
    shifts = [(0, 0), (2, -1), (-2, 2), (1, 0), (0, -2), (-1, -1)]
    params = AugParams("crop", {"shift_y": torch.tensor([s[0] for s in shifts]),
                                "shift_x": torch.tensor([s[1] for s in shifts])})
    out = DSA().apply(x, params)
    rows, cols = torch.arange(H).view(-1, 1), torch.arange(W).view(1, -1)
    for i, (dy, dx) in enumerate(shifts):
        # out[r, c] = x[r + dy, c + dx]: a roll by (-dy, -dx), with the wrapped band zeroed.
        expected = torch.roll(x[i], shifts=(-dy, -dx), dims=(1, 2))
        inside = (rows + dy >= 0) & (rows + dy < H) & (cols + dx >= 0) & (cols + dx < W)
        assert torch.equal(out[i], expected * inside)
    sampled = only("crop").sample(200, 32, 32, gen(1))
    for key in ("shift_y", "shift_x"):
        v = sampled.values[key]
        assert v.dtype == torch.int64 and v.abs().max() == 4 and v.min() == -4  # 1/8 of 32


def test_cutout_zeroes_exactly_a_square_of_half_the_size():
    dsa, n, side = only("cutout"), 64, 32
    params = dsa.sample(n, side, side, gen(9))
    assert params.values["size"].tolist() == [16, 16]
    out = dsa.apply(torch.ones(n, C, side, side), params)
    assert torch.equal(out[:, :1].expand_as(out), out)  # same hole in every channel
    for i in range(n):
        cy, cx = int(params.values["center_y"][i]), int(params.values["center_x"][i])
        expected = torch.ones(side, side)
        expected[max(cy - 8, 0):cy + 8, max(cx - 8, 0):cx + 8] = 0  # clipped at the border
        assert torch.equal(out[i, 0], expected)
    # A centred hole is a full 16x16 square.
    centred = AugParams("cutout", {"center_y": torch.tensor([16]), "center_x": torch.tensor([16]),
                                   "size": torch.tensor([16, 16])})
    hole = dsa.apply(torch.ones(1, 1, side, side), centred)[0, 0] == 0
    assert hole.sum() == 256 and hole[8:24, 8:24].all()


def test_flip_mirrors_exactly_the_chosen_samples():
    x = images()
    params = only("flip").sample(N, H, W, gen(0))
    out = DSA().apply(x, params)
    for i, flipped in enumerate(params.values["flip"].tolist()):
        assert torch.equal(out[i], x[i].flip(-1) if flipped else x[i])


def test_color_is_per_sample_and_in_the_documented_order():
    dsa = only("color")
    x = images()
    x[1] = x[0]  # identical images must come out differently: parameters are per sample
    params = dsa.sample(N, H, W, gen(2))
    out = dsa.apply(x, params)
    assert not torch.allclose(out[0], out[1])
    v = params.values
    for i in range(N):  # each sample depends on its own parameters only
        y = x[i] + v["brightness"][i]
        y = (y - y.mean(0, keepdim=True)) * v["saturation"][i] + y.mean(0, keepdim=True)
        y = (y - y.mean()) * v["contrast"][i] + y.mean()
        torch.testing.assert_close(out[i], y)
    assert (v["brightness"].abs() <= 0.5).all() and (v["saturation"] >= 0).all() and (v["saturation"] <= 2).all()
    assert (v["contrast"] >= 0.5).all() and (v["contrast"] <= 1.5).all()


@pytest.mark.parametrize("family,key", [("scale", "scale_x"), ("rotate", "angle")])
def test_affine_families_are_identity_at_neutral_parameters(family, key):
    x = images()
    params = only(family).sample(N, H, W, gen(0))
    neutral = AugParams(family, {k: torch.ones_like(v) if family == "scale" else torch.zeros_like(v)
                                 for k, v in params.values.items()})
    torch.testing.assert_close(DSA().apply(x, neutral), x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(DSA().apply(x, params), x)
    limit = np.log(1.2) if family == "scale" else np.radians(15)
    values = params.values[key].abs().log() if family == "scale" else params.values[key]
    assert values.abs().max() <= limit + 1e-6


def test_aug_params_round_trip_through_arrays_pickle_and_hdf5(tmp_path):
    dsa = DSA()
    g = gen(11)
    seen = set()
    while len(seen) < len(FAMILIES):
        params = dsa.sample(N, H, W, g)
        seen.add(params.family)
        arrays = params.to_arrays()
        assert all(isinstance(a, np.ndarray) for a in arrays.values())
        for restored in (AugParams.from_arrays(arrays), pickle.loads(pickle.dumps(params)), params.to("cpu")):
            assert restored.family == params.family
            assert torch.equal(dsa.apply(images(), restored), dsa.apply(images(), params))
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "p.h5", "w") as f:
        for k, a in params.to_arrays().items():
            f.create_dataset(k, data=a)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        restored = AugParams.from_arrays({k: f[k][()] for k in f})
    assert torch.equal(dsa.apply(images(), restored), dsa.apply(images(), params))


def test_identity_and_none_leave_images_alone_and_draw_nothing():
    x = images()
    g = gen(0)
    state = g.get_state()
    off = DSA.identity()
    assert not off.enabled and off.sample(N, H, W, g).family == "none"
    assert torch.equal(g.get_state(), state)
    assert off(x, g) is x and DSA().apply(x, None) is x


def test_config_validation_and_batch_size_check():
    with pytest.raises(ConfigError, match="Unknown DSA families"):
        DSAConfig(families=("colour",))
    with pytest.raises(ConfigError, match="contrast"):
        DSAConfig(contrast=2.0)
    with pytest.raises(ConfigError, match="only 'flip'"):
        DSAConfig(families=("flip",), flip=False)
    assert DSAConfig(families=["crop", "flip"]).families == ("crop", "flip")
    assert DSAConfig.from_dict(DSAConfig(flip=False).to_dict()) == DSAConfig(flip=False)
    with pytest.raises(ValueError, match="params are for"):
        DSA().apply(images(n=3), DSA(DSAConfig(families=("crop",))).sample(4, H, W, gen()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_draws_and_applies_the_same_augmentation(family):
    dsa, x = only(family), images()
    cpu = dsa(x, gen(5))
    cuda = dsa(x.cuda(), gen(5))  # sampled on CPU from the same generator, moved to the GPU
    torch.testing.assert_close(cuda.cpu(), cpu, rtol=1e-5, atol=1e-5)
