"""Divergence while every number stays finite: the watch's rules, the rollback they trigger,
the message when rollbacks run out, exact resume across them, and the saved set's warnings."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_prepared
from ddtool.errors import DDToolError
from ddtool.methods import trajectory
from ddtool.methods.divergence import IMAGES_GREW, LOSS_ROSE, LR_AT_FLOOR, DivergenceWatch
from test_methods import context, tiny_mtt


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=6)


def watch(**changes) -> DivergenceWatch:
    settings = dict(lr_floor=1e-5, lr_ceiling=1.0, max_image_scale=10.0, lr_floor_patience=3, loss_window=4,
                    max_loss_rise=1.5)
    return DivergenceWatch(torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                           **{**settings, **changes})


def update(w: DivergenceWatch, images=None, loss=0.5, clamped=False, alpha=0.01):
    images = images if images is not None else torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    return w.check_update(images, torch.tensor(alpha), None, loss, clamped)


def test_images_far_beyond_the_initial_scale_diverge_and_modest_growth_does_not():
    w = watch()
    base = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert update(w, images=3 * base) is None  # healthy sets grow up to ~2x here
    found = update(w, images=50 * base)
    assert found is not None and found.kind == IMAGES_GREW and "std" in str(found)
    one_pixel = base.clone()
    one_pixel[0, 0, 0, 0] = 30.0  # a single spiking pixel is not a diverged set
    assert update(watch(), images=one_pixel) is None


def test_a_step_size_held_at_its_floor_diverges_only_after_the_patience_in_a_row():
    w = watch(lr_floor_patience=3)
    assert update(w, clamped=True) is None and update(w, clamped=True) is None
    assert update(w, clamped=False) is None  # the run of clamped iterations is broken
    assert update(w, clamped=True) is None and update(w, clamped=True) is None
    assert update(w, clamped=True).kind == LR_AT_FLOOR


def test_a_rising_loss_diverges_once_its_window_is_above_one_and_the_lowest_window():
    w = watch(loss_window=4, max_loss_rise=1.5)
    for loss in (0.6, 0.6, 0.6, 0.6):
        assert update(w, loss=loss) is None
    for loss in (0.95, 0.95, 0.95):  # 1.5x the lowest window, but not above 1: matching still helps
        assert update(w, loss=loss) is None
    assert update(w, loss=0.95) is None
    found = None
    for loss in (1.2, 1.2, 1.2, 1.2):
        found = found or update(w, loss=loss)
    assert found is not None and found.kind == LOSS_ROSE
    steady = watch(loss_window=4)
    assert all(update(steady, loss=1.05) is None for _ in range(20))  # high but not rising


def test_the_watch_state_round_trips_and_advice_names_the_settings():
    w = watch(lr_floor_patience=3)
    update(w, clamped=True)
    update(w, loss=0.7)
    update(w, clamped=True)
    copy = watch(lr_floor_patience=3)
    copy.load_state_dict(w.state_dict())
    assert copy.state_dict() == w.state_dict()
    assert update(copy, clamped=True) is None  # the streak continues from 1: 2 in a row
    assert update(copy, clamped=True).kind == LR_AT_FLOOR
    copy.record(update(copy, images=1e4 * torch.randn(20, 1, 8, 8)))
    assert "lr_img" in copy.advice() and copy.kinds == [IMAGES_GREW]


def _growing_images(monkeypatch, calls_to_blow_up):
    """Make the backend's image gradient push the images to a huge but finite scale on the given
    (1-based) calls."""
    real_backend = trajectory.get_backend("exact")
    calls = {"n": 0}

    def blowing_up(unroll, syn):
        calls["n"] += 1
        result = real_backend(unroll, syn)
        if calls_to_blow_up(calls["n"]):
            result.grad_images = -1e6 * torch.sign(syn.images.detach() + 1e-3)
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: blowing_up)


def test_finite_image_blow_up_rolls_back_and_the_run_recovers(tmp_path, data, monkeypatch):
    _growing_images(monkeypatch, lambda n: n == 3)
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    sset = trajectory.MTT(tiny_mtt()).distill(ctx)
    assert any("grew far beyond" in m and "Rolled back" in m for m in messages), messages
    assert sset.images.abs().max() < 20
    assert "health_warnings" not in sset.config


def test_repeated_finite_blow_up_stops_naming_what_diverged_and_what_to_change(tmp_path, data, monkeypatch):
    _growing_images(monkeypatch, lambda n: True)
    with pytest.raises(DDToolError, match=r"(?s)grew far beyond.*lower lr_img"):
        trajectory.MTT(tiny_mtt(max_rollbacks=2)).distill(context(tmp_path, data))


def test_a_run_that_rolls_back_resumes_to_the_uninterrupted_result(tmp_path, data, monkeypatch):
    # iteration 3 blows up in both runs (backend call 3); the second run is killed after its
    # checkpoint at iteration 4 and resumed: it must end where the uninterrupted one did
    config = tiny_mtt(iterations=8)
    _growing_images(monkeypatch, lambda n: n == 3)
    uninterrupted = trajectory.MTT(config).distill(context(tmp_path / "a", data))

    _growing_images(monkeypatch, lambda n: n == 3)
    original = trajectory.append_log
    logged = {"n": 0}

    def killed(path, record):
        original(path, record)
        logged["n"] += 1
        if record["iteration"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(trajectory, "append_log", killed)
    with pytest.raises(KeyboardInterrupt):
        trajectory.MTT(config).distill(context(tmp_path / "b", data))
    monkeypatch.setattr(trajectory, "append_log", original)
    _growing_images(monkeypatch, lambda n: False)  # the resumed process never reaches iteration 3 again
    resumed = trajectory.MTT(config).distill(context(tmp_path / "b", data, resume=True))
    assert torch.equal(resumed.images, uninterrupted.images)
    assert resumed.learned_lr == uninterrupted.learned_lr


def test_a_set_ending_with_its_step_size_at_the_floor_is_saved_with_a_warning(tmp_path, data, monkeypatch):
    real_backend = trajectory.get_backend("exact")

    def pushing_alpha_down(unroll, syn):
        result = real_backend(unroll, syn)
        result.grad_lr = torch.ones_like(result.grad_lr) * 1e6  # every step wants α smaller
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: pushing_alpha_down)
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    # a patience longer than the run: the floor is not judged divergent, only reported
    sset = trajectory.MTT(tiny_mtt(lr_lr=1.0, lr_floor_patience=50)).distill(ctx)
    assert any("floor" in w for w in sset.config["health_warnings"])
    assert any(m.startswith("WARNING") and "floor" in m for m in messages)
