"""Wall-clock budgets: durations, the experts' recorded cost, a set's timings, sizing a run to a
budget and stopping it in time."""

from __future__ import annotations

import dataclasses
import json

import h5py
import pytest
import torch
from conftest import tiny_prepared

from ddtool.durations import parse_duration
from ddtool.errors import ConfigError
from ddtool.experts import ExpertConfig, ExpertStore, read_manifest, run_buffer, train_expert
from ddtool.experts.manifest import ExpertRecord
from ddtool.methods import budget, datm, trajectory, trajectory_config
from ddtool.methods.base import DistillContext
from ddtool.methods.experts import expert_config_for
from ddtool.storage import load_synthetic_set, save_synthetic_set


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=6)


def context(tmp_path, data, resume=False):
    return DistillContext(data=data, ipc=1, seed=0, device=torch.device("cpu"), work_dir=tmp_path / "run",
                          resume=resume, progress=False, log=lambda m: None)


def tiny(**changes) -> trajectory_config.TrajectoryConfig:
    base = dict(width=8, experts=2, expert_train_epochs=3, syn_steps=2, match_span_epochs=1, max_start_epoch=2,
                iterations=40, checkpoint_every=5, lr_img=10.0)
    return trajectory_config.TrajectoryConfig(**{**base, **changes})


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("1h30m", 5400), ("1.5h", 5400), ("90s", 90),
                                           ("45", 2700), (" 2 h 5 m ", 7500), ("1d", 86400), (120, 120)])
def test_durations_read_as_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "30x", "m30", "0m", "-5m", "1h-5m", "inf", 0, -3.0])
def test_unreadable_or_empty_durations_are_refused(text):
    with pytest.raises(ConfigError, match="duration"):
        parse_duration(text)


def test_experts_record_their_wall_clock_and_old_records_read_as_unknown(tmp_path, data):
    config = ExpertConfig(arch="convnet", arch_options={"width": 8}, experts=2, epochs=2, batch_size=16)
    path = tmp_path / "store.h5"
    run_buffer(config, path, data, "cpu", progress=False)
    records = read_manifest(path).experts
    assert [r.side_by_side for r in records] == [1, 1]
    assert all(r.seconds > 0 and r.share_of_wall_clock() == r.seconds for r in records)
    with ExpertStore.open(path) as store:
        assert store.record(1).seconds == records[1].seconds
    # a manifest written before experts recorded their time
    old = {k: v for k, v in dataclasses.asdict(records[0]).items() if k not in ("seconds", "side_by_side")}
    assert ExpertRecord(**old).share_of_wall_clock() is None
    assert ExpertRecord(**{**old, "seconds": 90.0, "side_by_side": 3}).share_of_wall_clock() == 30.0


def test_a_set_reports_its_experts_and_distillation_time_and_keeps_it_on_disk(tmp_path, data):
    config = tiny(iterations=3)
    ctx = context(tmp_path, data)
    sset = trajectory.MTT(config).distill(ctx)
    with ExpertStore.open(_store_of(config, ctx)) as store:
        recorded = sum(store.record(i).seconds for i in range(config.experts))
    assert ctx.experts_s == pytest.approx(recorded) and ctx.experts_trained_s >= recorded
    sset.timings = {"experts_s": 1.5, "distill_s": 2.0, "total_s": 3.5, "hardware": "test CPU"}
    save_synthetic_set(tmp_path / "s.h5", sset)
    assert load_synthetic_set(tmp_path / "s.h5").timings == sset.timings
    with h5py.File(tmp_path / "s.h5", "r") as f:  # plain h5py reads it as JSON text
        assert json.loads(f.attrs["timings"])["total_s"] == 3.5
    sset.timings = None
    save_synthetic_set(tmp_path / "t.h5", sset)
    assert load_synthetic_set(tmp_path / "t.h5").timings is None


def _store_of(config, ctx):
    from ddtool.experts import find_or_plan_store

    return find_or_plan_store(expert_config_for(config, ctx))[0]


class FakeClock:
    """time.perf_counter for the trajectory module: each reading one second later."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


def test_the_outer_loop_stops_before_passing_its_budget_and_resumes_no_further(tmp_path, data, monkeypatch):
    ctx = context(tmp_path, data)
    trajectory.MTT(tiny(iterations=1)).distill(ctx)  # trains the experts (their recorded time is real)
    experts_s = ctx.experts_s
    config = tiny(budget_s=experts_s + 30.0)
    monkeypatch.setattr(trajectory, "time", FakeClock())
    ctx = context(tmp_path / "b", data)
    sset = trajectory.MTT(config).distill(ctx)
    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()]
    done = len(log)
    assert 0 < done < config.iterations
    spent = ctx.experts_s + sum(r["seconds"] for r in log)
    assert spent <= config.budget_s
    checkpoint = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["iteration"] == done  # the stop is checkpointed
    # --resume finds the budget spent and saves the same set without another iteration
    again = trajectory.MTT(config).distill(context(tmp_path / "b", data, resume=True))
    assert torch.equal(again.images, sset.images)
    assert len((tmp_path / "b" / "run" / "log.jsonl").read_text().splitlines()) == done


def test_a_budget_sizes_experts_iterations_and_start_epochs_or_names_the_least_that_works(tmp_path, data):
    ctx = context(tmp_path, data)
    method = datm.DATM(datm.DATMConfig(**{**dataclasses.asdict(tiny()), "labels": "learned"}))
    plan = budget.fit_budget(method, ctx, 3600)
    c = plan.config
    assert c.budget_s == 3600 and 2 <= c.experts <= budget.MAX_EXPERTS
    # the window grows from a fifth of a 20-epoch trajectory to four fifths, over all the iterations
    assert (c.max_start_epoch, c.max_start_epoch_final, c.window_grow_iterations) == (4, 16, c.iterations)
    # and the experts train only as far as a segment reaches: start epochs below 16, 1 epoch matched
    assert c.expert_train_epochs == 16
    assert c.iterations >= budget.MIN_ITERATIONS
    assert plan.experts_s + budget.INIT_SECONDS + c.iterations * plan.iteration_s <= 3600
    assert "budget 1h 00m" in plan.describe()[0]
    with pytest.raises(ConfigError, match=r"too small .* Give at least --budget \d+m"):
        budget.fit_budget(method, ctx, 5)
    # MTT spreads its start epochs over four fifths of the experts
    mtt = budget.fit_budget(trajectory.MTT(tiny()), ctx, 3600).config
    assert mtt.max_start_epoch == 16 and mtt.expert_train_epochs == 16
    # experts whose learning rate follows their length train it all: shortened, they would differ
    decayed = budget.fit_budget(trajectory.MTT(tiny(expert_lr_decay="cosine")), ctx, 3600).config
    assert decayed.max_start_epoch == 16 and decayed.expert_train_epochs == budget.MAX_EXPERT_EPOCHS
    # the shares place the window on whatever trajectory the budget gives, and the experts follow it
    shares = dict(budget_start_share=0.6, budget_window_start_share=0.3)
    earlier = budget.fit_budget(datm.DATM(dataclasses.replace(method.config, **shares)), ctx, 3600).config
    assert (earlier.max_start_epoch, earlier.max_start_epoch_final, earlier.expert_train_epochs) == (6, 12, 12)
    assert budget.fit_budget(trajectory.MTT(tiny(budget_start_share=0.5)), ctx, 3600).config.max_start_epoch == 10
    with pytest.raises(ConfigError, match="budget_window_start_share must be in"):
        dataclasses.replace(method.config, budget_window_start_share=0.9)


@pytest.mark.parametrize("method", [trajectory.MTT(tiny()),
                                    datm.DATM(datm.DATMConfig(**{**dataclasses.asdict(tiny()), "labels": "learned"}))])
def test_the_settings_a_method_says_its_budget_sizes_are_those_its_budget_hooks_set(method):
    # ddtool.run refuses these beside --budget: a key the hooks set but the list missed would be
    # replaced silently again
    sized = method.budget_settings(20, method.config).keys() | method.budget_iteration_settings(100).keys()
    assert sized == type(method).budget_sized_settings


def test_experts_trained_fewer_epochs_follow_the_same_trajectory_as_far_as_they_go(data):
    config = ExpertConfig(dataset="fashion-mnist", arch="convnet", arch_options={"width": 4}, epochs=3,
                          batch_size=64, train_subset=256)
    longer = train_expert(config, 0, data).params
    shorter = train_expert(dataclasses.replace(config, epochs=2), 0, data).params
    assert torch.equal(shorter, longer[:3]) and not torch.equal(longer[2], longer[3])


def test_a_budget_lengthens_the_unroll_where_enough_iterations_of_it_fit(tmp_path, data, monkeypatch):
    # an outer iteration costs a tenth of a second per student step here
    monkeypatch.setattr(trajectory.TrajectoryMatching, "time_iteration", lambda self, ctx: 0.1 * self.config.syn_steps)
    ctx = context(tmp_path, data)
    roomy = budget.fit_budget(trajectory.MTT(tiny()), ctx, 3600)
    assert roomy.config.syn_steps == budget.LONG_UNROLL and roomy.iteration_s == pytest.approx(3.0)
    assert f"N={budget.LONG_UNROLL} student steps" in roomy.describe()[0]
    assert roomy.config.iterations >= budget.LONG_UNROLL_ITERATIONS
    # where fewer than LONG_UNROLL_ITERATIONS long ones fit (3 s each), the preset's unroll stays
    short = budget.fit_budget(trajectory.MTT(tiny()), ctx, 200)
    assert (200 - short.experts_s - budget.INIT_SECONDS) / 3.0 < budget.LONG_UNROLL_ITERATIONS
    assert short.config.syn_steps == tiny().syn_steps and short.config.iterations >= budget.MIN_ITERATIONS
    # a preset that unrolls as long or longer keeps its own
    assert budget.fit_budget(trajectory.MTT(tiny(syn_steps=40)), ctx, 3600).config.syn_steps == 40
    # sized by the budget, the unroll is not a setting to give beside it
    assert "syn_steps" in budget.SIZED_BY_BUDGET


def test_a_resumed_budgeted_run_keeps_the_sizing_of_the_run_it_continues(tmp_path, fashion_root):
    from ddtool.run import BUDGET_PLAN, prepare_distill

    common = dict(ipc=1, data_root=fashion_root, settings={"width": 8}, budget="10m", progress=False)
    fresh = prepare_distill("mtt", **common)
    assert fresh.config.budget_s == 600 and not fresh.budget_reused
    # the interrupted run was sized on a slower machine than this one
    fresh.work_dir.mkdir(parents=True)
    (fresh.work_dir / BUDGET_PLAN).write_text(json.dumps({**dataclasses.asdict(fresh.config), "iterations": 77}))
    resumed = prepare_distill("mtt", resume=True, **common)
    assert resumed.work_dir == fresh.work_dir and resumed.budget_reused and resumed.config.iterations == 77
    assert resumed.method.budget_iteration_s is None  # a plan file of old: its iterations are not counted again
    (fresh.work_dir / BUDGET_PLAN).write_text(json.dumps({"config": {**dataclasses.asdict(fresh.config),
                                                                     "iterations": 78}, "iteration_s": 4.5}))
    resumed = prepare_distill("mtt", resume=True, **common)
    assert resumed.config.iterations == 78 and resumed.method.budget_iteration_s == 4.5
    assert any("the interrupted run's (--resume)" in line for line in resumed.plan())
    # without --resume the run is sized afresh
    again = prepare_distill("mtt", **common)
    assert not again.budget_reused and again.config.iterations != 77


def test_iterations_are_counted_again_from_what_the_experts_actually_cost(tmp_path, data):
    config = datm.DATMConfig(**{**dataclasses.asdict(tiny(experts=2, expert_train_epochs=20, iterations=100,
                                                          budget_s=1000.0)), "labels": "learned"})
    method = datm.DATM(config)
    # planned 100 iterations; the experts took 500 s: (1000 - 500 - INIT_SECONDS) / 2 s each
    grown = budget.fit_iterations(method, 500.0, 2.0)
    assert grown.iterations == int((1000 - 500 - budget.INIT_SECONDS) / 2.0) > 100
    assert grown.window_grow_iterations == grown.iterations  # DATM's window still spans every iteration
    assert (grown.experts, grown.expert_train_epochs) == (2, 20)
    # more experts than planned (or slower ones): fewer iterations, and the window grows over those
    fewer = budget.fit_iterations(method, 900.0, 2.0)
    assert fewer.iterations == int((1000 - 900 - budget.INIT_SECONDS) / 2.0) < 100
    assert fewer.window_grow_iterations == fewer.iterations
    assert budget.fit_iterations(method, 2000.0, 2.0).iterations == 1  # nothing left: the loop stops at once

    # inside a run: a budgeted MTT whose experts cost less than planned runs the iterations that fit
    ctx = context(tmp_path, data)
    trajectory.MTT(tiny(iterations=1)).distill(ctx)  # train the experts, so their recorded cost is known
    mtt = trajectory.MTT(tiny(iterations=3, budget_s=ctx.experts_s + budget.INIT_SECONDS + 1000.0))
    mtt.budget_iteration_s = 200.0  # five such iterations fit
    messages = []
    ctx = context(tmp_path / "b", data)
    ctx.log = messages.append
    sset = mtt.distill(ctx)
    assert sset.config["iterations"] == 5 and mtt.config.iterations == 5
    assert any("holds 5 outer iterations (planned: 3)" in m for m in messages)


def test_iterations_are_counted_a_last_time_from_the_runs_own_pace_and_a_resume_keeps_that(tmp_path, data,
                                                                                            monkeypatch):
    monkeypatch.setattr(budget, "MAX_EXPERTS", 2)  # cheap experts would make room for more of them
    ctx = context(tmp_path, data)
    trajectory.MTT(tiny(iterations=1)).distill(ctx)  # train the experts, so their recorded cost is known
    config = datm.DATMConfig(**{**dataclasses.asdict(tiny(iterations=100,
                                                          budget_s=ctx.experts_s + budget.INIT_SECONDS + 100.0)),
                                "labels": "learned", "correct_only_init": False, "max_start_epoch": 1,
                                "max_start_epoch_final": 2})

    def run(folder, resume=False, kill_at=None):
        method = datm.DATM(config)
        method.budget_iteration_s = 1.0  # timed before the run: 100 iterations fit
        # every clock reading one second later: an iteration takes several "seconds", not one
        monkeypatch.setattr(trajectory, "time", FakeClock())
        messages = []
        run_ctx = context(folder, data, resume=resume)
        run_ctx.log = messages.append
        if kill_at is not None:
            original = trajectory.append_log

            def killed(path, record):
                original(path, record)
                if record["iteration"] == kill_at:
                    raise KeyboardInterrupt
            monkeypatch.setattr(trajectory, "append_log", killed)
        return method.distill(run_ctx), method, messages

    sset, method, messages = run(tmp_path / "a")
    counted = sset.config["iterations"]
    warm, paced = budget.PACE_WARMUP, budget.PACE_ITERATIONS
    assert warm + paced < counted < 100, (counted, messages)
    assert any(f"the budget holds {counted} of them (counted before: 100)" in m for m in messages), (counted, messages)
    log = [json.loads(line) for line in (tmp_path / "a" / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == counted  # all of them ran: none stopped by the budget, none left over
    assert sset.config["window_grow_iterations"] == counted  # DATM's window runs its whole course
    assert method.start_epoch_range(counted)[1] == config.max_start_epoch_final

    # killed after the count, --resume counts as the run it continues (no new count) and ends alike
    original = trajectory.append_log
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_at=warm + paced + 3)
    monkeypatch.setattr(trajectory, "append_log", original)
    monkeypatch.setattr(trajectory, "recounted", lambda *a: pytest.fail("counted again"))
    resumed, _, _ = run(tmp_path / "b", resume=True)
    assert resumed.config["iterations"] == counted and torch.equal(resumed.images, sset.images)


def test_experts_that_train_faster_than_timed_make_room_for_more_rounds_of_them(tmp_path, data, monkeypatch):
    config = tiny(experts=2, budget_s=1000.0)
    # a round of 2 cost 200 s: the share (700 s) holds two more rounds, not a third
    assert budget.experts_that_fit(config, 200.0, 2, 2.0) == 6
    assert budget.experts_that_fit(config, 200.0, 1, 2.0) == 7  # one at a time: rounds of 100 s each
    # a round always leaves the least number of iterations their time (50 x 10 s + 20 s here)
    assert budget.experts_that_fit(config, 200.0, 2, 10.0) == 4
    assert budget.experts_that_fit(config, 690.0, 2, 2.0) == 2
    # a run given the long unroll keeps the 150 iterations it was chosen for up to 4 experts, and
    # 300 beyond: of 3 s, 150 fit after a second round (600 s left), 300 not after a third
    # (400 s left); of 1.2 s they do, of 1.4 s not
    long = dataclasses.replace(config, syn_steps=budget.LONG_UNROLL)
    assert (budget.FEW_EXPERTS, budget.ITERATIONS_BEFORE_MORE_EXPERTS) == (4, 300)
    assert budget.experts_that_fit(config, 200.0, 2, 3.0) == 6
    assert budget.experts_that_fit(long, 200.0, 2, 3.0) == 4
    assert budget.experts_that_fit(long, 200.0, 2, 1.2) == 6
    assert budget.experts_that_fit(long, 200.0, 2, 1.4) == 4

    # inside a run: one expert was planned; the budget's share holds a second, trained before matching
    monkeypatch.setattr(budget, "INIT_SECONDS", 0.0)
    monkeypatch.setattr(budget, "MIN_ITERATIONS", 1)
    ctx = context(tmp_path, data)
    trajectory.MTT(tiny(iterations=1, experts=1)).distill(ctx)
    one = ctx.experts_s
    mtt = trajectory.MTT(tiny(iterations=3, experts=1, budget_s=2.5 * one / budget.EXPERT_SHARE))
    mtt.budget_iteration_s, mtt.budget_workers = 1e-3, 1
    messages = []
    ctx = context(tmp_path / "b", data)
    ctx.log = messages.append
    sset = mtt.distill(ctx)
    assert sset.config["experts"] == 2 and any("1 more fit" in m for m in messages), messages
    assert ctx.experts_s > one


def test_a_run_that_trained_its_experts_times_its_iteration_again_and_its_resume_keeps_that(tmp_path, data,
                                                                                             monkeypatch):
    monkeypatch.setattr(budget, "INIT_SECONDS", 0.0)
    monkeypatch.setattr(budget, "LONG_UNROLL", 4)  # tiny stand-ins for 30 steps and 150 iterations
    monkeypatch.setattr(budget, "LONG_UNROLL_ITERATIONS", 30)
    monkeypatch.setattr(budget, "MAX_EXPERTS", 2)
    monkeypatch.setattr(budget, "PACE_ITERATIONS", 10**6)  # no count from the (fast) real iterations here
    seconds_at = {2: 1.0, 4: 2.0}  # an iteration of N = 2 or 4 steps, timed after the experts
    monkeypatch.setattr(trajectory.MTT, "time_iteration", lambda self, ctx, steps=3: seconds_at[self.config.syn_steps])

    # the rule: the faster of the plan's timing and the new one; the long unroll where it now fits
    planned = trajectory.MTT(tiny(syn_steps=2, budget_s=100.0))
    planned.budget_iteration_s = 9.0  # the plan's timing, taken while something else ran
    config, iteration_s = budget.timed_again(planned, None, experts_s=30.0)
    assert (config.syn_steps, iteration_s) == (4, 2.0)  # (100 - 30) / 2 = 35 iterations of N = 4 fit
    config, iteration_s = budget.timed_again(planned, None, experts_s=50.0)
    assert (config.syn_steps, iteration_s) == (2, 1.0)  # 25 of them would not: N = 2, timed faster now
    planned.budget_iteration_s = 0.5
    assert budget.timed_again(planned, None, experts_s=50.0)[1] == 0.5  # the plan's, when it was faster

    # inside a run that trains its experts (a buffer of its own): it unrolls 4 steps, as many as fit
    config = tiny(syn_steps=2, iterations=3, expert_seed=7, budget_s=100.0)
    mtt = trajectory.MTT(config)
    mtt.budget_iteration_s = 9.0
    messages = []
    ctx = context(tmp_path, data)
    ctx.log = messages.append
    sset = mtt.distill(ctx)
    assert ctx.experts_trained_s > 0 and sset.config["syn_steps"] == 4
    assert sset.config["iterations"] == int((100.0 - ctx.experts_s) / 2.0)
    assert any("timed again after the experts: 2 s at N=4 (planned: 9 s at N=2)" in m for m in messages), messages
    assert json.loads((tmp_path / "run" / budget.RETIMED).read_text()) == {"syn_steps": 4, "iteration_s": 2.0}

    # --resume (its experts now cached) takes the figures from the work folder, not a new timing
    monkeypatch.setattr(trajectory.MTT, "time_iteration", lambda self, ctx, steps=3: pytest.fail("timed again"))
    resumed = trajectory.MTT(config)
    resumed.budget_iteration_s = 9.0
    again = resumed.distill(context(tmp_path, data, resume=True))
    assert again.config["iterations"] == sset.config["iterations"] and torch.equal(again.images, sset.images)
    # a fresh run on cached experts keeps the plan's timing and drops the figures of the last
    fresh = trajectory.MTT(dataclasses.replace(config, iterations=1))
    fresh.budget_iteration_s = 50.0
    fresh.distill(context(tmp_path, data))
    assert fresh.config.syn_steps == 2 and not (tmp_path / "run" / budget.RETIMED).exists()


def test_a_budgeted_datm_run_at_ipc_10_takes_the_budgets_recipe_unless_told_otherwise(fashion_root, monkeypatch):
    from ddtool import run as runs
    from ddtool.run import prepare_distill

    common = dict(data_root=fashion_root, budget="10m", progress=False)
    run = prepare_distill("datm", ipc=10, settings={"width": 8}, **common)
    assert run.config.ast_inner_momentum == 0.5 and run.budget_recipe == {"ast_inner_momentum": 0.5}
    assert any("also takes ast_inner_momentum=0.5" in line for line in run.plan())
    # a setting given wins; another IPC, or no budget, runs the preset's (the sizing, which
    # changes none of this, skipped for speed)
    monkeypatch.setattr(runs, "_size_to_budget", lambda run, seconds: None)
    told = prepare_distill("datm", ipc=10, settings={"width": 8, "ast_inner_momentum": 0.0}, **common)
    assert told.config.ast_inner_momentum == 0.0 and told.budget_recipe == {}
    assert prepare_distill("datm", ipc=1, settings={"width": 8}, **common).config.ast_inner_momentum == 0.0
    preset = prepare_distill("datm", ipc=10, data_root=fashion_root, preset="fashion-cpu", settings={"width": 8})
    assert preset.budget is None and preset.config.ast_inner_momentum == 0.0
    assert prepare_distill("mtt", ipc=10, settings={"width": 8}, **common).config.ast_inner_momentum == 0.0
