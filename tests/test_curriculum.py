"""SRe2L / CDA on tiny data: the crop curriculum, the BatchNorm-matching loss, the clamp,
reproducibility, resume, and the stored relabel through the file format."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from conftest import tiny_prepared
from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.errors import ConfigError, DDToolError
from ddtool.evaluation.kd import StoredSoftLabels, teacher_logits, teacher_network
from ddtool.methods import curriculum
from ddtool.methods.base import DistillContext, build_config, get_method_class
from ddtool.paths import cache_root
from ddtool.methods.curriculum import (
    BatchNormMatching, Recover, crop_scale_lower_bound, pixel_range_clamp_, recover_batches,
)
from ddtool.storage import load_synthetic_set, save_synthetic_set

TINY = dict(teacher_width=8, teacher_epochs=1, teacher_batch_size=32, iterations=4, checkpoint_every=2,
            relabel_epochs=2)


def context(tmp_path, data, *, ipc=2, seed=0, resume=False, work="run"):
    return DistillContext(data=data, ipc=ipc, seed=seed, device=torch.device("cpu"), work_dir=tmp_path / work,
                          resume=resume, progress=False, log=lambda message: None)


def distill(method, tmp_path, data, *, seed=0, resume=False, work="run", **overrides):
    cls = get_method_class(method)
    return cls(build_config(cls, "fashion-cpu", {**TINY, **overrides})).distill(
        context(tmp_path, data, seed=seed, resume=resume, work=work))


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=5)


# ---------------------------------------------------------------------------- the curriculum
def test_crop_lower_bound_of_each_schedule_at_chosen_iterations():
    def bound(schedule, it, milestone=0.5):
        return crop_scale_lower_bound(it, 100, schedule=schedule, start=1.0, end=0.08, milestone=milestone)

    # SRe2L: the hard bound throughout.
    assert [bound("constant", it) for it in (0, 25, 99)] == [0.08, 0.08, 0.08]
    # step: easy until the milestone (iteration 50 of 100), hard from there on.
    assert [bound("step", it) for it in (0, 49, 50, 99)] == [1.0, 1.0, 0.08, 0.08]
    # linear: 1.0 - 0.92 * it / 50 until 50, then flat.
    assert bound("linear", 0) == 1.0
    assert bound("linear", 25) == pytest.approx(0.54, abs=1e-12)
    assert bound("linear", 40) == pytest.approx(1.0 - 0.92 * 0.8, abs=1e-12)
    assert [bound("linear", it) for it in (50, 80)] == [0.08, 0.08]
    # cosine: 0.08 + 0.92 * (1 + cos(pi * it / 50)) / 2 until 50, then flat.
    assert bound("cosine", 0) == 1.0
    assert bound("cosine", 25) == pytest.approx(0.54, abs=1e-12)
    assert bound("cosine", 10) == pytest.approx(0.08 + 0.46 * (1 + math.cos(math.pi / 5)), abs=1e-12)
    assert bound("cosine", 50) == 0.08
    # milestone 1 (the released CDA runs): the bound reaches 0.08 only at the end.
    assert bound("cosine", 50, milestone=1.0) == pytest.approx(0.54, abs=1e-12)


def test_recover_batches_mixed_and_classwise():
    mixed = recover_batches(4, 3, "mixed")
    assert [b.tolist() for b in mixed] == [[0, 1, 2, 3]] * 3
    assert [b.tolist() for b in recover_batches(4, 2, "mixed", classes_per_batch=2)] == [[0, 1], [2, 3]] * 2
    assert [b.tolist() for b in recover_batches(3, 2, "classwise")] == [[0, 0], [1, 1], [2, 2]]


# ---------------------------------------------------------------------------- the loss
def one_bn_network() -> nn.Module:
    net = nn.Sequential(nn.Conv2d(1, 2, kernel_size=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 3)).double()
    f64 = torch.float64
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.5, -0.5], dtype=f64).view(2, 1, 1, 1))
        net[0].bias.copy_(torch.tensor([0.2, 0.1], dtype=f64))
        net[1].running_mean.copy_(torch.tensor([0.1, -0.2], dtype=f64))
        net[1].running_var.copy_(torch.tensor([1.5, 0.5], dtype=f64))
    return net.eval()


def hand_bn_distance(x: np.ndarray, multiplier: float) -> float:
    """‖μ − μ_BN‖₂ + ‖σ² − σ²_BN‖₂ of the conv output, by hand (float64)."""
    weight, bias = np.array([1.5, -0.5]), np.array([0.2, 0.1])
    running_mean, running_var = np.array([0.1, -0.2]), np.array([1.5, 0.5])
    means, variances = [], []
    for c in range(2):
        y = weight[c] * x[:, 0] + bias[c]  # 1x1 conv of channel c
        means.append(y.mean())
        variances.append(((y - y.mean()) ** 2).mean())  # biased, as BatchNorm normalises
    return multiplier * (np.linalg.norm(np.array(means) - running_mean)
                         + np.linalg.norm(np.array(variances) - running_var))


def test_batchnorm_matching_loss_equals_a_hand_computation():
    net = one_bn_network()
    x = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with BatchNormMatching(net, first_multiplier=10.0) as matching:
        net(x)
        whole = matching.distances()
        # Two batches in one forward pass: each measured on its own images.
        matching.set_batches(torch.tensor([0, 0, 1, 1]), 2)
        net(x)
        split = matching.distances()
    assert whole.shape == (1,)
    assert whole.item() == pytest.approx(hand_bn_distance(x.numpy(), 10.0), rel=1e-10)
    assert split.tolist() == pytest.approx([hand_bn_distance(x[:2].numpy(), 10.0),
                                            hand_bn_distance(x[2:].numpy(), 10.0)], rel=1e-10)
    net(x)  # hooks removed on exit: nothing measured any more
    assert matching._per_layer == []


def test_batchnorm_matching_weights_only_the_first_layer():
    net = nn.Sequential(nn.BatchNorm2d(1), nn.BatchNorm2d(1)).eval()
    x = torch.full((2, 1, 2, 2), 3.0)  # first input: mean 3, var 0; the second sees BN(x), constant too
    with BatchNormMatching(net, first_multiplier=10.0) as matching:
        net(x)
        total = matching.distances()[0].item()
    second_input = (3.0 - 0.0) / math.sqrt(1.0 + net[0].eps)  # eval BN with running stats (0, 1)
    assert total == pytest.approx(10.0 * (3.0 + 1.0) + (second_input + 1.0), rel=1e-6)


def test_teacher_without_batchnorm_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match="BatchNorm"):
        BatchNormMatching(nn.Sequential(nn.Conv2d(1, 1, 1)))
    # the plan refuses it first, with the networks that would do, before timing anything
    cls = get_method_class("cda")
    with pytest.raises(ConfigError, match="'convnet' has no BatchNorm layers.*convnet-bn"):
        cls(build_config(cls, "fashion-cpu", {**TINY, "teacher_arch": "convnet"})).plan(context(tmp_path, data))


# ---------------------------------------------------------------------------- the clamp
def test_clamp_keeps_pixels_in_range_and_leaves_valid_images_alone():
    pre = Preprocessing((0.3, 0.5), (0.2, 0.25))
    x = 10 * torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    pixels = x * torch.tensor([0.2, 0.25]).view(1, 2, 1, 1) + torch.tensor([0.3, 0.5]).view(1, 2, 1, 1)
    pixel_range_clamp_(x, pre)
    pixels = x * torch.tensor([0.2, 0.25]).view(1, 2, 1, 1) + torch.tensor([0.3, 0.5]).view(1, 2, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert (pixels.amin() < 1e-5) and (pixels.amax() > 1 - 1e-5)  # the bounds are reached, not shrunk
    valid = pre.apply(torch.rand(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(pixel_range_clamp_(valid.clone(), pre), valid)


def test_clamp_with_zca_goes_through_pixel_space():
    dim = 1 * 3 * 3
    matrix = torch.eye(dim) + 0.05 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(3))
    pre = Preprocessing((0.4,), (0.3,), ZCA(torch.zeros(dim), matrix, torch.linalg.inv(matrix), eps=0.1))
    x = 5 * torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(4))
    pixel_range_clamp_(x, pre)
    unclamped = pre.zca.invert(x) * 0.3 + 0.4
    assert unclamped.min() >= -1e-4 and unclamped.max() <= 1 + 1e-4


# ---------------------------------------------------------------------------- the methods
def test_method_names_match_their_crop_schedules():
    sre2l, cda = get_method_class("sre2l"), get_method_class("cda")
    assert sre2l.default_protocol == cda.default_protocol == "kd"
    assert build_config(sre2l, None, {}).crop_schedule == "constant"
    assert build_config(cda, None, {}).crop_schedule == "cosine"
    with pytest.raises(ConfigError, match="cda"):
        sre2l(build_config(sre2l, None, {"crop_schedule": "linear"}))
    with pytest.raises(ConfigError, match="crop_schedule"):
        build_config(cda, None, {"crop_schedule": "exponential"})
    with pytest.raises(ConfigError, match="milestone"):
        build_config(cda, None, {"milestone": 0.0})
    # a step at the last iteration never comes: the run would never see a local crop
    with pytest.raises(ConfigError, match="milestone below 1"):
        build_config(cda, None, {"crop_schedule": "step"})
    assert build_config(cda, None, {"crop_schedule": "step", "milestone": 0.5}).milestone == 0.5


@pytest.fixture(scope="module")
def cda_set(tmp_path_factory, data):
    # Module fixtures run before conftest's per-test cache isolation: isolate this one too.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DDTOOL_CACHE", str(tmp_path_factory.mktemp("cache")))
        return distill("cda", tmp_path_factory.mktemp("cda"), data, seed=3)


def test_a_seed_repeats_a_recover_run_bit_for_bit(tmp_path, data, cda_set):
    again = distill("cda", tmp_path, data, seed=3)  # its teacher is retrained in this test's cache: also repeatable
    assert torch.equal(again.images, cda_set.images)
    assert again.extras.keys() == cda_set.extras.keys()
    assert all(np.array_equal(again.extras[k], cda_set.extras[k]) for k in cda_set.extras)
    other = distill("cda", tmp_path, data, seed=4, work="other")
    assert not torch.equal(other.images, cda_set.images)


def test_set_holds_hard_labels_teacher_and_in_range_images(data, cda_set):
    assert cda_set.label_kind == "hard"
    assert cda_set.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert cda_set.teacher["arch"] == "convnet-bn" and cda_set.teacher["options"] == {"width": 8}
    assert 0.0 <= cda_set.config["teacher_test_accuracy"] <= 1.0
    pixels = cda_set.images * data.preprocessing.std[0] + data.preprocessing.mean[0]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_stored_relabel_round_trips_and_replays_the_same_teacher_logits(tmp_path, cda_set):
    path = tmp_path / "cda.h5"
    save_synthetic_set(path, cda_set)
    loaded = load_synthetic_set(path)
    assert loaded.extras.keys() == cda_set.extras.keys()
    for name, array in cda_set.extras.items():
        assert loaded.extras[name].dtype == array.dtype and np.array_equal(loaded.extras[name], array)
    stored = StoredSoftLabels.from_extras(loaded.extras)
    assert stored.epochs == TINY["relabel_epochs"] and stored.logits.dtype == torch.float16
    channels, size, _ = loaded.image_shape
    teacher = teacher_network(loaded.teacher, channels=channels, num_classes=10, image_size=size)
    for epoch in range(stored.epochs):
        replayed = teacher_logits(teacher, stored.views(epoch).render(loaded.images)).to(torch.float16)
        assert torch.allclose(replayed.float(), stored.logits[epoch].float(), atol=1e-2, rtol=1e-3)


def test_live_relabel_keeps_only_the_teacher(tmp_path, data):
    sset = distill("sre2l", tmp_path, data, relabel="live", iterations=2)
    assert sset.extras == {} and sset.teacher is not None


def test_resume_after_an_interruption_gives_the_uninterrupted_result(tmp_path, data, monkeypatch):
    # Two rounds of one batch each; the interruption hits round 1 after its checkpoint at iteration 2.
    settings = dict(parallel_batches=1, iterations=4, checkpoint_every=2, relabel="live")
    reference = distill("cda", tmp_path, data, seed=5, work="reference", **settings)
    calls = {"n": 0}
    original = Recover.lr_at

    def interrupt(self, iteration):
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # round 0 (4 iterations) done, round 1 starting its 3rd iteration
            raise KeyboardInterrupt
        return original(self, iteration)

    monkeypatch.setattr(Recover, "lr_at", interrupt)
    with pytest.raises(KeyboardInterrupt):
        distill("cda", tmp_path, data, seed=5, work="interrupted", **settings)
    # A resume that threw the checkpoint away and started over would give the same images (the
    # run is deterministic): count the iterations it runs, which must be round 1's last two only.
    resumed_iterations = []

    def counting(self, iteration):
        resumed_iterations.append(iteration)
        return original(self, iteration)

    monkeypatch.setattr(Recover, "lr_at", counting)
    messages = []
    cls = get_method_class("cda")
    ctx = context(tmp_path, data, seed=5, resume=True, work="interrupted")
    ctx.log = messages.append
    resumed = cls(build_config(cls, "fashion-cpu", {**TINY, **settings})).distill(ctx)
    monkeypatch.setattr(Recover, "lr_at", original)
    assert resumed_iterations == [2, 3]
    assert "Resuming recover after 1 finished round(s), at iteration 2 of the next." in messages, messages
    assert torch.equal(resumed.images, reference.images)
    with pytest.raises(DDToolError, match="another configuration"):
        distill("cda", tmp_path, data, seed=6, work="interrupted", resume=True, **settings)


def test_plan_names_the_three_steps(tmp_path, data):
    cls = get_method_class("cda")
    lines = cls(build_config(cls, "fashion-cpu", {})).plan(context(tmp_path, data))
    text = "\n".join(lines)
    assert "squeeze" in text and "recover" in text and "relabel" in text and "cosine" in text
    assert curriculum.FASHION_CPU.relabel == "stored"


def test_plan_times_each_step_without_training_or_changing_the_run(tmp_path, data, cda_set):
    cls = get_method_class("cda")
    method = cls(build_config(cls, "fashion-cpu", TINY))
    ctx = context(tmp_path, data, seed=3)
    _, squeeze_line, recover_line, relabel_line = method.plan(ctx)
    assert "about" in squeeze_line and "timed here" in squeeze_line
    assert re.search(r"about \d+s \(\d\S* s an iteration, timed here\)", recover_line), recover_line
    assert re.search(r"stored in the set: about \d+s$", relabel_line), relabel_line
    per_iteration, per_relabel_epoch = method.time_phases(ctx)
    assert per_iteration > 0 and per_relabel_epoch > 0
    # timing trains no teacher, writes nothing and draws from no generator of the run
    assert not (cache_root() / "teachers").exists() and not ctx.work_dir.exists()
    made = method.distill(ctx)
    assert torch.equal(made.images, cda_set.images)
    assert all(np.array_equal(made.extras[k], cda_set.extras[k]) for k in cda_set.extras)
    assert method.plan(ctx)[1].endswith("found in the cache")
