"""Methods end to end on tiny data: coresets, MTT/TESLA outer loop, resume, rollback."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import pytest
import torch

from conftest import tiny_prepared
from ddtool.errors import ConfigError, DDToolError
from ddtool.methods import datm, trajectory, trajectory_config, trajectory_costs
from ddtool.methods.base import DistillContext, build_config, get_method_class, resolve_preset, run_fingerprint
from ddtool.methods.coresets import Herding, KCenter


def context(tmp_path, data, ipc=1, seed=0, resume=False):
    return DistillContext(data=data, ipc=ipc, seed=seed, device=torch.device("cpu"), work_dir=tmp_path / "run",
                          resume=resume, progress=False, log=lambda m: None)


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=6)


def tiny_mtt(**overrides):
    values = dict(width=8, experts=2, expert_train_epochs=3, expert_batch_size=16, syn_steps=3, match_span_epochs=1,
                  max_start_epoch=2, iterations=6, checkpoint_every=2, lr_img=10.0, lr_lr=1e-4, lr_init=0.01)
    return trajectory_config.TrajectoryConfig(**{**values, **overrides})


@pytest.mark.parametrize("method", ["random", "herding", "kcenter"])
def test_coresets_pick_real_images_class_by_class(tmp_path, data, method):
    cls = get_method_class(method)
    sset = cls(build_config(cls, None, {"feature_width": 8, "feature_epochs": 1} if method != "random" else {})) \
        .distill(context(tmp_path, data, ipc=2))
    assert sset.images.shape == (20, 1, 8, 8)
    assert sset.labels.tolist() == [c for c in range(10) for _ in range(2)]
    # every chosen image is a real training image of its class
    for image, label in zip(sset.images, sset.labels):
        match = (data.train_x == image).flatten(1).all(dim=1)
        assert match.any() and int(data.train_y[match.nonzero()[0, 0]]) == int(label)


def test_feature_selection_plan_times_the_feature_network_until_it_is_cached(tmp_path, data):
    cls = get_method_class("herding")
    method = cls(build_config(cls, None, {"feature_width": 8, "feature_epochs": 1}))
    ctx = context(tmp_path, data, ipc=2)
    assert re.search(r"about \d+s to train, timed here", method.plan(ctx)[0]), method.plan(ctx)
    method.distill(ctx)
    assert "(found in the cache)" in method.plan(ctx)[0]


def test_herding_and_kcenter_selection_rules_on_hand_features():
    features = torch.tensor([[0.0, 0.0], [10.0, 0.0], [1.0, 1.0], [-1.0, -1.0], [0.0, 9.0]])
    # mean = (2, 1.8); herding first takes the point closest to it, (1, 1)
    assert Herding.select(None, features, 1).tolist() == [2]
    # k-center starts at the point nearest the mean, then the farthest from it: (10, 0)
    assert KCenter.select(None, features, 2).tolist() == [2, 1]
    # next farthest from {(1,1), (10,0)} is (0, 9)
    assert KCenter.select(None, features, 3).tolist() == [2, 1, 4]


def test_herding_compensates_instead_of_taking_the_nearest_to_the_mean():
    # 1-d features with mean 24 / 6 = 4. Herding picks f minimising |(total + f) / k - 4|:
    # k=1: f nearest 4 -> 4.0 (index 3); k=2: nearest 8 - 4 = 4 -> 3.5 (index 5, gap 0.25);
    # k=3: nearest 12 - 7.5 = 4.5 -> 5.5 (index 1, gap 1/3; 3.0 would give 0.5).
    # The three features nearest the mean are 4.0, 3.5 and 3.0 (indices 3, 5, 2) instead.
    features = torch.tensor([[0.0], [5.5], [3.0], [4.0], [8.0], [3.5]])
    assert Herding.select(None, features, 3).tolist() == [3, 5, 1]


def test_ipc_larger_than_a_class_is_a_clear_error(tmp_path, data):
    cls = get_method_class("random")
    with pytest.raises(DDToolError, match="per class"):
        cls(build_config(cls, None, {})).distill(context(tmp_path, data, ipc=50))


def test_unknown_method_and_setting_are_config_errors():
    with pytest.raises(ConfigError, match="Unknown method"):
        get_method_class("nope")
    with pytest.raises(ConfigError, match="no setting"):
        build_config(get_method_class("mtt"), None, {"ee": 2})
    with pytest.raises(ConfigError, match="lower max_start_epoch to at most 2, or raise expert_train_epochs to 4"):
        tiny_mtt(max_start_epoch=3, match_span_epochs=2, expert_train_epochs=3)
    # a span longer than the experts: no start epoch fits it, so the span is what to lower
    with pytest.raises(ConfigError, match="lower match_span_epochs to at most 3 with max_start_epoch=1, or raise "
                                          "expert_train_epochs to 6"):
        tiny_mtt(max_start_epoch=2, match_span_epochs=5, expert_train_epochs=3)
    with pytest.raises(ConfigError, match="lower max_start_epoch_final to at most 2, or raise expert_train_epochs"):
        datm.DATMConfig(**{**dataclasses.asdict(tiny_mtt()), "labels": "learned", "max_start_epoch": 1, "max_start_epoch_final": 4,
                           "match_span_epochs": 2, "expert_train_epochs": 3})
    # caught at the boundary, not deep in the loop (an empty minibatch, NaN soft labels)
    for bad, match in (({"batch_syn": -1}, "batch_syn"), ({"eval_every": -1}, "eval_every"),
                       ({"soft_label_temperature": 0.0}, "soft_label_temperature"), ({"lr_label": 0.0}, "lr_label"),
                       # a NaN rate would roll back every iteration and save the starting set as a result
                       ({"lr_img": float("nan")}, "finite numbers; these are not: lr_img"), ({"lr_init": float("inf")}, "lr_init"),
                       ({"max_rollbacks": -1}, "max_rollbacks")):
        with pytest.raises(ConfigError, match=match):
            tiny_mtt(**bad)
    from ddtool.methods.base import parse_overrides

    for text in ("lr_img=nan", "lr_img=inf", "lr_img=-inf"):
        with pytest.raises(ConfigError, match="expected a finite number"):
            parse_overrides(get_method_class("mtt").config_class, (text,))
    with pytest.raises(ConfigError, match="expected a whole number"):
        parse_overrides(get_method_class("mtt").config_class, ("iterations=many",))
    with pytest.raises(ConfigError, match="this method has no settings"):
        parse_overrides(get_method_class("random").config_class, ("foo=1",))


def test_width_and_depth_reach_only_the_networks_that_take_them():
    # the presets set width=32 for the convnet; `--set arch=resnet18` must not pass it to a
    # network without a width (it failed at expert training), and the set records the network
    assert tiny_mtt(arch="resnet18").arch_options() == {}
    assert tiny_mtt(arch="convnet", depth=2).arch_options() == {"width": 8, "depth": 2}
    assert trajectory.MTT(tiny_mtt(arch="vgg11")).student_arch() == "vgg11"
    with pytest.raises(ConfigError, match="Unknown network 'nonet'"):
        tiny_mtt(arch="nonet")
    with pytest.raises(ConfigError, match="name the network alone"):
        tiny_mtt(arch="convnet:width=64")
    with pytest.raises(ConfigError, match="'convnetd4' has no depth option; drop depth=3"):
        tiny_mtt(arch="convnetd4", depth=3)


def test_a_width_the_user_gives_a_network_without_one_is_refused():
    # every preset carries a width, ignored by networks without one; the user's own is refused,
    # not silently dropped (--set arch=resnet18 --set width=64 trained the same ResNet)
    from ddtool.methods.base import parse_overrides

    def config(method: str, *pairs: str):
        cls = get_method_class(method)
        return build_config(cls, "fashion-cpu", parse_overrides(cls.config_class, pairs), ipc=10)

    assert config("mtt", "arch=resnet18").arch_options() == {}  # the preset's width=32 is not the user's
    assert config("mtt", "arch=convnet", "width=64").arch_options() == {"width": 64}
    with pytest.raises(ConfigError, match="network 'resnet18' has no width option: drop width=64"):
        config("datm", "arch=resnet18", "width=64")
    assert config("cda", "teacher_arch=resnet18-bn").teacher_recipe().options == {}
    with pytest.raises(ConfigError, match="teacher network 'resnet18-bn' has no width option: drop teacher_width=64"):
        config("sre2l", "teacher_arch=resnet18-bn", "teacher_width=64")


def test_last_start_epoch_may_end_on_the_experts_last_epoch():
    # Start epochs are [0, max): max 3 with 2 matched epochs reaches epoch 4 at most, which
    # 4-epoch experts hold (the config check agrees with the store's).
    tiny_mtt(max_start_epoch=3, match_span_epochs=2, expert_train_epochs=4)
    with pytest.raises(ConfigError, match="at least 5 epochs"):
        tiny_mtt(max_start_epoch=4, match_span_epochs=2, expert_train_epochs=4)


def test_mtt_distills_and_saves_learned_lr(tmp_path, data):
    sset = trajectory.MTT(tiny_mtt()).distill(context(tmp_path, data))
    assert sset.images.shape == (10, 1, 8, 8) and sset.label_kind == "hard"
    assert sset.learned_lr is not None and sset.learned_lr != 0.01  # α was learned
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == list(range(1, 7))
    assert all(0 <= r["start_epoch"] < 2 for r in log)


def test_learned_lr_is_kept_positive(tmp_path, data):
    sset = trajectory.MTT(tiny_mtt(lr_lr=10.0, max_lr_growth=1e9)).distill(context(tmp_path, data))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r["lr_clamped"] for r in log)
    floor = 0.01 * 1e-3 * (1 - 1e-6)  # float32 rounding of the floor
    assert all(r["lr"] >= floor for r in log) and sset.learned_lr >= floor


def test_tesla_uses_the_target_experts_soft_labels(tmp_path, data, monkeypatch):
    from ddtool.methods.experts import expert_config_for, open_experts
    from ddtool.networks import ParamLayout, create_network

    real_backend = trajectory.get_backend("exact")
    seen = []

    def spy(unroll, syn):
        seen.append((syn.images.detach().clone(), syn.fixed_targets.clone()))
        return real_backend(unroll, syn)

    monkeypatch.setattr(trajectory, "get_backend", lambda name: spy)
    temperature = 2.0  # not 1, so that a missing division by T shows
    config = tiny_mtt(labels="expert_soft", iterations=2, soft_label_temperature=temperature)
    ctx = context(tmp_path, data)
    trajectory.TESLA(config).distill(ctx)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(seen) == len(log) == 2
    # recomputed independently from the stored experts: each iteration's own expert, at its
    # target epoch (start + M) for the labels and at its start epoch for the contrast
    net = create_network("convnet", channels=1, num_classes=10, image_size=8, width=8)
    layout = ParamLayout.from_module(net)
    with open_experts(expert_config_for(config, ctx), ctx) as store, torch.no_grad():
        for (images, targets), record in zip(seen, log):
            expert, start = record["expert"], record["start_epoch"]

            def soft(epoch):
                return torch.softmax(layout.functional_forward(net, store.params(expert, epoch), images) / temperature, 1)
            torch.testing.assert_close(targets, soft(start + config.match_span_epochs), rtol=1e-5, atol=1e-6)
            assert not torch.allclose(targets, soft(start), rtol=1e-3, atol=1e-4)
            assert not torch.allclose(targets, torch.softmax(  # T applied, not ignored
                layout.functional_forward(net, store.params(expert, start + config.match_span_epochs), images), 1),
                rtol=1e-3, atol=1e-4)


def test_tesla_saves_the_experts_soft_labels_it_was_distilled_for(tmp_path, data):
    from ddtool.methods.experts import expert_config_for, open_experts
    from ddtool.networks import ParamLayout, create_network

    config = tiny_mtt(labels="expert_soft", iterations=2)
    ctx = context(tmp_path, data)
    sset = trajectory.TESLA(config).distill(ctx)
    assert sset.label_kind == "logits" and sset.labels.shape == (10, 10)
    # recomputed independently: the experts' mean logits at the last target epoch (1 + 1 here)
    net = create_network("convnet", channels=1, num_classes=10, image_size=8, width=8)
    layout = ParamLayout.from_module(net)
    with open_experts(expert_config_for(config, ctx), ctx) as store:
        logits = torch.stack([layout.functional_forward(net, store.params(e, 2), sset.images)
                              for e in range(store.num_experts)]).mean(0)
    torch.testing.assert_close(sset.labels, logits.detach(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sset.soft_targets().max(1).values, torch.ones(10))  # soft, not one-hot


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path, data, monkeypatch):
    config = tiny_mtt()
    first = context(tmp_path / "a", data)
    uninterrupted = trajectory.MTT(config).distill(first)

    calls = {"n": 0}
    original = trajectory.append_log

    def killed_after_iteration_5(path, record):
        original(path, record)
        calls["n"] += 1
        if calls["n"] == 5:  # checkpoint was written at iteration 4: iteration 5 is lost
            raise KeyboardInterrupt

    monkeypatch.setattr(trajectory, "append_log", killed_after_iteration_5)
    with pytest.raises(KeyboardInterrupt):
        trajectory.MTT(config).distill(context(tmp_path / "b", data))
    monkeypatch.setattr(trajectory, "append_log", original)
    checkpointed = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)["elapsed"]
    second = context(tmp_path / "b", data, resume=True)
    resumed = trajectory.MTT(config).distill(second)
    assert torch.equal(resumed.images, uninterrupted.images)
    assert resumed.learned_lr == uninterrupted.learned_lr

    def logged(folder):
        return [json.loads(line) for line in (folder / "run" / "log.jsonl").read_text().splitlines()]
    # one record per iteration, as uninterrupted: iteration 5's first try is not counted twice
    assert [r["iteration"] for r in logged(tmp_path / "b")] == list(range(1, config.iterations + 1))
    assert [r["loss"] for r in logged(tmp_path / "b")] == [r["loss"] for r in logged(tmp_path / "a")]
    # the time the killed process spent on iterations 1-4 is counted in the resumed set's time
    assert first.resumed_s == 0.0
    assert checkpointed > 0 and second.resumed_s == checkpointed


def test_injected_nan_triggers_rollback_and_a_finite_result(tmp_path, data, monkeypatch):
    real_backend = trajectory.get_backend("exact")
    calls = {"n": 0}

    def poisoned(unroll, syn):
        calls["n"] += 1
        result = real_backend(unroll, syn)
        if calls["n"] == 3:
            result.grad_images = torch.full_like(result.grad_images, float("nan"))
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: poisoned)
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    sset = trajectory.MTT(tiny_mtt()).distill(ctx)
    assert any("Rolled back to iteration 2" in m for m in messages), messages
    assert torch.isfinite(sset.images).all()


@pytest.mark.parametrize("poison, reason", [
    # α₀ = 0.01, lr_lr = 1e-4: a gradient of -1e6 takes α to 100, beyond max_lr_growth (100) x α₀
    ("grad_lr", "the learned step size exploded"),
    # finite, but lr_img (10) x 1e38 overflows float32: the images become -inf after the step
    ("grad_images", "the synthetic images or labels became NaN/inf"),
])
def test_an_update_that_diverges_after_its_step_is_rolled_back(tmp_path, data, monkeypatch, poison, reason):
    real_backend = trajectory.get_backend("exact")
    calls = {"n": 0}

    def exploding(unroll, syn):
        calls["n"] += 1
        result = real_backend(unroll, syn)
        if calls["n"] == 3:  # after the checkpoint of iteration 2
            value = -1e6 if poison == "grad_lr" else 1e38
            setattr(result, poison, torch.full_like(getattr(result, poison), value))
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: exploding)
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    config = tiny_mtt()
    sset = trajectory.MTT(config).distill(ctx)
    # the gradients were finite, so only the check after the step can have caught it
    rollbacks = [m for m in messages if "Rolled back" in m]
    assert len(rollbacks) == 1 and rollbacks[0].startswith(f"Iteration 3: {reason}"), messages
    assert "Rolled back to iteration 2" in rollbacks[0]
    assert torch.isfinite(sset.images).all()
    assert 0 < sset.learned_lr <= config.lr_init * config.max_lr_growth
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert all(r["lr"] <= config.lr_init * config.max_lr_growth for r in log)


def _poison_iterations(monkeypatch, iterations):
    """Make the backend's image gradient NaN on the given (1-based) backend calls."""
    real_backend = trajectory.get_backend("exact")
    calls = {"n": 0}

    def poisoned(unroll, syn):
        calls["n"] += 1
        result = real_backend(unroll, syn)
        if calls["n"] in iterations:
            result.grad_images = torch.full_like(result.grad_images, float("nan"))
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: poisoned)


def test_each_rollback_to_one_checkpoint_halves_the_rates_again(tmp_path, data, monkeypatch):
    _poison_iterations(monkeypatch, {3, 4})  # both roll back to the checkpoint of iteration 2
    rates = []
    real_rollback = trajectory.MTT._rollback

    def recording(self, *args):
        state, *_, optimizers = real_rollback(self, *args)
        rates.append((state.lr_scale, {k: o.param_groups[0]["lr"] for k, o in optimizers.items()}))
        return (state, *_, optimizers)

    monkeypatch.setattr(trajectory.MTT, "_rollback", recording)
    config = tiny_mtt()
    sset = trajectory.MTT(config).distill(context(tmp_path, data))
    assert [scale for scale, _ in rates] == [0.5, 0.25]
    for scale, groups in rates:
        assert groups == pytest.approx({"images": config.lr_img * scale, "lr": config.lr_lr * scale})
    assert torch.isfinite(sset.images).all()


def test_a_rollback_keeps_the_best_set_validated_after_its_checkpoint(tmp_path, data, monkeypatch):
    # validation at iteration 3, checkpoints at 2, 4, 6; iteration 4 diverges and returns to 2,
    # so no later validation happens: the set validated at 3 is the one saved
    _poison_iterations(monkeypatch, {4})
    sset = trajectory.MTT(tiny_mtt(eval_every=3, iterations=5, eval_epochs=2)).distill(context(tmp_path, data))
    assert sset.config["selected_iteration"] == 3


def test_repeated_divergence_stops_with_a_clear_error(tmp_path, data, monkeypatch):
    real_backend = trajectory.get_backend("exact")

    def always_nan(unroll, syn):
        result = real_backend(unroll, syn)
        result.loss = float("nan")
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: always_nan)
    with pytest.raises(DDToolError, match="diverged"):
        trajectory.MTT(tiny_mtt(max_rollbacks=2)).distill(context(tmp_path, data))


def _validated_run(tmp_path, data, monkeypatch, scores=None):
    """A tiny MTT run validated at iterations 3 and 6: (the set, {iteration: logged score},
    {iteration: the images validated there}). `scores` replaces the validation training's results."""
    validated = {}
    real_validate = trajectory.TrajectoryMatching._validate

    def recording(self, ctx, state, relabel):
        validated[state.iteration] = self.images_to_save(state).clone()
        return real_validate(self, ctx, state, relabel)

    monkeypatch.setattr(trajectory.TrajectoryMatching, "_validate", recording)
    if scores is not None:
        given = iter(scores)
        monkeypatch.setattr(trajectory, "train_fresh_network", lambda *args, **kwargs: next(given))
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    sset = trajectory.MTT(tiny_mtt(eval_every=3, eval_epochs=2)).distill(ctx)
    logged = {}
    for m in messages:
        found = re.fullmatch(r"Iteration (\d+): validation accuracy ([\d.]+)%", m)
        if found:
            logged[int(found[1])] = float(found[2])
    assert sorted(logged) == sorted(validated) == [3, 6], messages
    return sset, logged, validated


def test_validation_picks_the_saved_iteration(tmp_path, data, monkeypatch):
    sset, logged, validated = _validated_run(tmp_path, data, monkeypatch)
    best = max(logged, key=lambda it: (logged[it], -it))  # the highest score; on a tie, the first
    assert sset.config["selected_iteration"] == best
    assert torch.equal(sset.images, validated[best])
    assert not torch.equal(validated[3], validated[6])  # else the images could not tell the iterations apart


# The real scores above pick one of the two iterations; these fix the scores so that an earlier
# best, a later best and a tie (which keeps the first) are each exercised.
@pytest.mark.parametrize("scores, best", [((0.5, 0.3), 3), ((0.3, 0.5), 6), ((0.4, 0.4), 3)])
def test_validation_keeps_the_first_best_scored_iteration(tmp_path, data, monkeypatch, scores, best):
    sset, logged, validated = _validated_run(tmp_path, data, monkeypatch, scores)
    assert logged == {3: 100 * scores[0], 6: 100 * scores[1]}
    assert sset.config["selected_iteration"] == best
    assert torch.equal(sset.images, validated[best])


@pytest.mark.parametrize("setting, steps, epochs, max_start, batch_syn, zca, lr_img, lr_lr, lr_init, depth", [
    # methods.md §2, row by row: N, M, T⁺, batch_syn (0: all), ZCA, lr_img, lr_lr, α₀; Tiny is ConvNetD4
    ("cifar10-ipc1", 50, 2, 2, 0, True, 100, 1e-7, 0.01, 0),
    ("cifar10-ipc10", 30, 2, 20, 0, True, 100, 1e-5, 0.001, 0),
    ("cifar10-ipc50", 30, 2, 40, 0, False, 1000, 1e-5, 0.001, 0),
    ("cifar100-ipc1", 20, 3, 20, 0, True, 1000, 1e-5, 0.01, 0),
    ("cifar100-ipc10", 20, 2, 20, 0, False, 1000, 1e-5, 0.01, 0),
    ("cifar100-ipc50", 80, 2, 40, 125, True, 1000, 1e-5, 0.01, 0),
    ("tiny-ipc1", 10, 2, 10, 0, False, 1e4, 1e-4, 0.01, 4),
    ("tiny-ipc10", 20, 2, 40, 200, False, 1e4, 1e-4, 0.01, 4),
    ("tiny-ipc50", 20, 2, 40, 300, False, 1e4, 1e-4, 0.01, 4)])
def test_mtt_published_presets_carry_the_published_settings(setting, steps, epochs, max_start, batch_syn, zca,
                                                             lr_img, lr_lr, lr_init, depth):
    for cls, labels in ((trajectory.MTT, "hard"), (trajectory.TESLA, "expert_soft")):
        c = cls.presets[f"mtt-{setting}"]
        assert (c.syn_steps, c.match_span_epochs, c.max_start_epoch, c.batch_syn, c.zca, c.lr_img, c.lr_lr, c.lr_init) == (
            steps, epochs, max_start, batch_syn, zca, lr_img, lr_lr, lr_init), cls.name
        # the rest of §1-2: 5000 outer iterations on 50-epoch experts (SGD lr 0.01, batch 256) of a
        # ConvNet (depth 3, the default at 32 px; ConvNetD4 on Tiny), start epochs from 0
        assert (c.iterations, c.expert_train_epochs, c.expert_lr, c.expert_batch_size, c.arch, c.depth,
                c.min_start_epoch) == (5000, 50, 0.01, 256, "convnet", depth, 0), cls.name
        assert c.labels == labels, cls.name  # TESLA: the same settings with the target expert's soft labels


def test_every_tesla_preset_uses_soft_labels():
    assert all(cfg.labels == "expert_soft" for cfg in trajectory.TESLA.presets.values())


@pytest.mark.parametrize("method", ["mtt", "tesla", "datm", "ftd"])
def test_fashion_presets_resolve_to_their_ipc_variant(method):
    cls = get_method_class(method)
    # at IPC 50 mtt and ftd start over the whole 20-epoch trajectory, tesla (the family default)
    # below 16, datm's window grows from [0, 8) to the whole trajectory
    table = {"mtt": trajectory_config.MTT_IPC_CHANGES, "ftd": trajectory_config.MTT_IPC_CHANGES,
             "datm": datm.DATM_IPC_CHANGES}.get(method, trajectory_config.FASHION_IPC_CHANGES)
    ipc50 = build_config(cls, None, {}, ipc=50)
    assert ipc50.expert_train_epochs == 20
    assert ipc50.max_start_epoch == {"mtt": 19, "tesla": 16, "datm": 8, "ftd": 19}[method]
    # at IPC 10 mtt and ftd match 20-epoch experts below 16 and datm's window starts at [0, 4);
    # tesla keeps the base preset's 6-epoch experts (its labels come from the target-epoch expert)
    ipc10 = build_config(cls, None, {}, ipc=10)
    assert (ipc10.expert_train_epochs, ipc10.max_start_epoch) == {"mtt": (20, 16), "tesla": (6, 4), "datm": (20, 4),
                                                                  "ftd": (20, 16)}[method]
    for ipc, sizes in table.items():
        for size, changes in sizes.items():
            named = resolve_preset(cls, f"fashion-{size}", ipc)
            assert named == f"fashion-{size}-ipc{ipc}"
            base, variant = cls.presets[f"fashion-{size}"], build_config(cls, f"fashion-{size}", {}, ipc=ipc)
            # the variant is the method's own preset with only the per-IPC settings changed
            differ = {f.name for f in dataclasses.fields(base) if getattr(base, f.name) != getattr(variant, f.name)}
            assert differ <= set(changes) and all(getattr(variant, k) == v for k, v in changes.items())
        assert resolve_preset(cls, None, ipc) == f"fashion-cpu-ipc{ipc}"  # the default preset too
    assert resolve_preset(cls, None, 20) == "fashion-cpu"  # no variant: the preset itself
    assert resolve_preset(cls, "fashion-cpu-ipc1", 50) == "fashion-cpu-ipc1"  # a full name is used as given
    assert build_config(cls, None, {"iterations": 7}, ipc=1).iterations == 7  # overrides apply on top
    if method in ("datm", "ftd"):  # the method's own settings survive in its variants
        assert type(build_config(cls, None, {}, ipc=1)) is cls.config_class


def test_a_method_revision_gives_its_runs_new_work_folders(monkeypatch):
    """After a fix that changes what a method computes, --resume must not continue a
    checkpoint the old code made: the revision is part of the run's folder name."""
    configs = {name: build_config(get_method_class(name), None, {}) for name in ("mtt", "datm")}

    def folders():
        return {name: run_fingerprint(name, config, "fashion-mnist", 10, 0) for name, config in configs.items()}

    before = folders()
    assert folders() == before  # the same settings find the same folder
    monkeypatch.setattr(get_method_class("datm"), "revision", get_method_class("datm").revision + 1)
    after = folders()
    assert after["datm"] != before["datm"] and after["mtt"] == before["mtt"]


def test_expert_side_settings_reach_the_expert_store(tmp_path, data):
    from ddtool.experts import ExpertConfig
    from ddtool.methods.base import parse_overrides
    from ddtool.methods.experts import expert_config_for

    ctx = context(tmp_path, data)
    cls = get_method_class("mtt")
    plain = expert_config_for(build_config(cls, None, {}), ctx)
    settings = ("expert_optimizer=gsam", "expert_gsam_alpha=1.0", "expert_rho=0.05", "expert_adaptive=false",
                "expert_lr_decay=cosine", "expert_ast_loss_scaling=true", "expert_ast_input_grad_penalty=2")
    chosen = expert_config_for(build_config(cls, None, parse_overrides(cls.config_class, settings)), ctx)
    assert (chosen.optimizer, chosen.gsam_alpha, chosen.rho, chosen.adaptive, chosen.lr_decay) == \
        ("gsam", 1.0, 0.05, False, "cosine")
    assert chosen.ast_loss_scaling is True and chosen.ast_input_grad_penalty == 2.0
    assert chosen.fingerprint() != plain.fingerprint()
    # the defaults are the expert buffer's own: stores trained before these settings existed are still found
    defaults = {f.name: getattr(plain, f.name) for f in dataclasses.fields(ExpertConfig)
                if f.name not in ("lr_decay", "rho", "gsam_alpha", "adaptive", "ast_loss_scaling",
                                  "ast_input_grad_penalty")}
    assert ExpertConfig(**defaults).fingerprint() == plain.fingerprint()
    with pytest.raises(ConfigError, match="lr decay"):
        expert_config_for(build_config(cls, None, {"expert_lr_decay": "linear"}), ctx)


def test_inner_minibatches_cover_each_permutation_without_repeats():
    method = trajectory.MTT(tiny_mtt(syn_steps=9, batch_syn=3))
    steps = method._inner_steps(torch.Size([10, 1, 8, 8]), torch.Generator().manual_seed(0), None)
    # 10 images in batches of 3: 3, 3, 3, then the permutation's last image alone, then a new one
    assert [s.batch.numel() for s in steps] == [3, 3, 3, 1, 3, 3, 3, 1, 3]
    for first in (0, 4):
        assert sorted(torch.cat([s.batch for s in steps[first:first + 4]]).tolist()) == list(range(10))
    # a batch that divides the set: whole permutations, as the shipped sets were made
    even = trajectory.MTT(tiny_mtt(syn_steps=4, batch_syn=5))._inner_steps(
        torch.Size([10, 1, 8, 8]), torch.Generator().manual_seed(0), None)
    g = torch.Generator().manual_seed(0)
    expected = torch.cat([torch.randperm(10, generator=g), torch.randperm(10, generator=g)])
    assert torch.equal(torch.cat([s.batch for s in even]), expected)


def test_run_fingerprints_stay_put_when_settings_are_added():
    # a run interrupted by older code is found by --resume only if its work folder keeps its
    # name: these are the names ddtool gave these runs before expert_precision existed
    for method, fingerprint in (("mtt", "c98d750bad9431ad"), ("datm", "0fd0d87c53e63708")):
        config = build_config(get_method_class(method), None, {}, ipc=10)
        assert run_fingerprint(method, config, "fashion-mnist", 10, 0) == fingerprint
        bf16 = dataclasses.replace(config, expert_precision="bf16")
        assert run_fingerprint(method, bf16, "fashion-mnist", 10, 0) != fingerprint


def test_the_auto_backend_takes_bptt_where_its_graph_fits_and_the_set_records_the_choice(tmp_path, data,
                                                                                     monkeypatch):
    used = []
    real = trajectory.get_backend
    monkeypatch.setattr(trajectory, "get_backend", lambda name: used.append(name) or real(name))
    method = trajectory.MTT(tiny_mtt(iterations=2))
    assert method.config.backend == "auto"
    ctx = context(tmp_path, data)
    chosen = method.choose_backend(ctx)
    assert chosen.name == "bptt" and "fits" in chosen.describe()
    sset = method.distill(ctx)
    assert used == ["bptt"] and sset.config["backend"] == "bptt"  # what computed it, not "auto"
    # the measured graph, N times over, against a quarter of the memory installed
    need = 3 * trajectory_costs.bptt_step_bytes(method.config, ctx)
    assert need > 0
    monkeypatch.setattr(trajectory_costs, "device_memory", lambda device: 4 * need - 4)
    tight = trajectory.MTT(tiny_mtt(iterations=2))
    assert tight.choose_backend(ctx).name == "exact"
    assert "would pass a quarter" in tight.choose_backend(ctx).reason
    # an explicit backend is used as it is; auto runs keep the fingerprint of the exact runs they replace
    assert trajectory.MTT(tiny_mtt(backend="exact")).choose_backend(ctx).name == "exact"
    assert run_fingerprint("mtt", tiny_mtt(), "fashion-mnist", 1, 0) == \
        run_fingerprint("mtt", tiny_mtt(backend="exact"), "fashion-mnist", 1, 0)


def test_an_outer_iterations_timing_is_not_taken_from_one_slow_segment(tmp_path, data, monkeypatch):
    # a warm-up, then three timed segments of which the first ran beside something else (10x
    # slower): the budget sizes the run by the typical one, not by the outlier or the mean. The
    # pauses dwarf the tiny segment's own work (a few ms idle, up to ~0.07 s on a busy machine)
    durations = iter([0.0, 1.0, 0.1, 0.1])
    real = trajectory_costs.get_backend

    def slow_backend(name):
        backend = real(name)

        def run(unroll, syn):
            result = backend(unroll, syn)
            time.sleep(next(durations))
            return result
        return run

    monkeypatch.setattr(trajectory_costs, "get_backend", slow_backend)
    config = tiny_mtt(syn_steps=3)
    ctx = context(tmp_path, data)
    seconds = trajectory_costs.time_outer_iteration(config, ctx, "bptt", trajectory.MTT(config)._inner_steps)
    assert 0.1 <= seconds < 0.3  # 1 s would mean the slow segment was taken, 0.4 the mean
    assert next(durations, None) is None  # every timing was made
