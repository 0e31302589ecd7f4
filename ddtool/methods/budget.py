"""Sizing a trajectory-matching run to a wall-clock budget.

The budget bounds what the set costs: the recorded training time of the experts it uses
(cached experts count what they cost when they were trained, so a run makes the same set
whether or not its experts were cached) plus distillation. The rule, measured on this
machine before any work:

- experts: as many as train at once here (at least 2), their epochs E filling EXPERT_SHARE of
  the budget (E at most MAX_EXPERT_EPOCHS; a budget with room beyond that trains more experts,
  a round of them at a time, up to MAX_EXPERTS). Expert speed is timed uncompiled, so compiled
  experts finish early: once they are trained, their recorded cost says how long a round took,
  and further rounds are trained while they fit in the share and leave the iterations the
  unroll needs, or beyond FEW_EXPERTS experts ITERATIONS_BEFORE_MORE_EXPERTS of them
  (`experts_that_fit`; the plan's own count of rounds, before any timing of an iteration,
  applies the share alone);
- matching: start epochs spread over the trajectory in proportion to E (the method's
  `budget_settings`), so longer experts are matched further along. The experts then train only
  as far as a segment reaches (17 of E = 20 epochs for DATM's window at IPC 10) where their
  learning rate does not depend on their length: the epochs beyond would never be read, and the
  ones before are the same (each epoch's batches and augmentation derive from the expert's
  seed and the epoch), so the time saved goes to outer iterations;
- the unroll: N = LONG_UNROLL student steps (where the preset has fewer) when the rest of the
  budget holds LONG_UNROLL_ITERATIONS outer iterations of that length, else the preset's N;
- distillation: as many outer iterations as the rest of the budget holds at the timed speed of
  one, after INIT_SECONDS for loading the experts and initialising, counted again once the
  experts are trained (their estimate is of uncompiled training, so compiled experts leave more
  time than planned, which goes to another round of experts where one fits, else to more
  iterations; after a further round, fewer: `fit_iterations`, so that a schedule over the
  iterations such as DATM's window runs its whole course). Where the experts were trained in
  the run, the outer iteration is timed again before that count (`timed_again`): a timing
  taken while something else was ending on the machine would otherwise size the whole run.
  Once the loop has run PACE_ITERATIONS iterations (after PACE_WARMUP), the iterations are
  counted a last time from their pace (`recounted`): the stand-in timed before them has missed
  the real iteration by up to about 12 % either way, which would end the run early or cut DATM's
  window short. The loop also stops before an iteration that would pass the budget (the
  `budget_s` setting), so a machine slowing down later still ends in time, with its set
  checkpointed and saved.

A budget too small for MIN_EXPERT_EPOCHS-epoch experts and MIN_ITERATIONS iterations is refused,
naming the least that works. The shares were chosen on the validation split
(scripts/sweep_budget.py; docs/budget.md).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ddtool.durations import format_duration, format_step
from ddtool.errors import ConfigError
from ddtool.experts import ExpertStore, estimate_training_time, find_or_plan_store
from ddtool.experts.execution import plan_execution, training_images
from ddtool.methods.base import DistillContext
from ddtool.methods.experts import expert_config_for, experts_wall_clock

# Of the budget, for training experts: on the validation split, 8 experts scored about 1 point
# above 4 at the same stage of DATM's window, while iterations beyond ~100 changed little
# (docs/budget.md).
EXPERT_SHARE = 0.7
MAX_EXPERT_EPOCHS = 20  # longer budgets train more experts instead
MAX_EXPERTS = 20
MIN_EXPERT_EPOCHS = 4
MIN_ITERATIONS = 50
# The unroll a budget gives a run whose distillation holds enough iterations of it: on the
# validation split (DATM, IPC 10, 2 experts x 20 epochs, equal minutes of distillation), N = 30
# scored 83.13 after 200 iterations and N = 20 83.37 after 300, against 81.70 for N = 10 after
# 600, and N = 30 was ahead at every point in time (docs/budget.md).
LONG_UNROLL = 30
LONG_UNROLL_ITERATIONS = 150
# Beyond FEW_EXPERTS, a further round of experts is trained only if this many outer iterations of
# the long unroll still fit after it: on the validation split (IPC 10, the 30-minute shape) 4, 6
# and 8 experts scored alike at 143 iterations, 143, 240 and 311 iterations of 4 experts 85.21,
# 85.79 and 85.87, and 2 experts given the time of 2 more (530 iterations) 84.92 (docs/budget.md).
FEW_EXPERTS = 4
ITERATIONS_BEFORE_MORE_EXPERTS = 300
# The settings a budget sizes: given as well, they are refused (ddtool.run)
SIZED_BY_BUDGET = frozenset({"experts", "expert_train_epochs", "iterations", "syn_steps", "budget_s"})
RETIMED = "budget_retimed.json"  # in the work folder: the outer iteration as timed again after the experts
INIT_SECONDS = 20.0  # loading the experts, initialising the images (correct-only: scoring a pool), saving
# The real iterations a budgeted run's pace is measured over, after the first ones (which pay
# for allocations and first calls), to count its iterations a last time.
PACE_WARMUP = 2
PACE_ITERATIONS = 8
FINAL_SECONDS = 5.0  # after the last iteration: the final set, its checkpoint


@dataclass(frozen=True)
class BudgetPlan:
    seconds: float  # the budget
    config: Any  # the method's configuration sized to it
    experts_s: float  # the experts' cost: recorded (cached) or estimated (to train)
    experts_cached: bool
    iteration_s: float  # one outer iteration, timed here
    workers: int  # experts trained at once

    @property
    def distill_s(self) -> float:
        return self.seconds - self.experts_s

    def describe(self) -> list[str]:
        c = self.config
        experts = (f"{c.experts} experts x {c.expert_train_epochs} epochs, "
                   + (f"cached (recorded {format_duration(self.experts_s)})" if self.experts_cached else
                      f"about {format_duration(self.experts_s)} to train, {self.workers} at a time"))
        return [f"budget {format_duration(self.seconds)} for experts and distillation (evaluation not included): "
                f"{experts}; then {c.iterations} outer iterations of N={c.syn_steps} student steps at about "
                f"{format_step(self.iteration_s)} each "
                f"in the {format_duration(self.distill_s)} left, stopping early if the budget runs out; experts "
                f"that train faster than timed here leave room for more of them, then for more iterations"]


def fit_budget(method, ctx: DistillContext, seconds: float) -> BudgetPlan:
    """`method` (a TrajectoryMatching) with its configuration sized to `seconds` on this machine."""
    base = method.config
    span = base.match_span_epochs
    probe = _sized(method, base, 2, MAX_EXPERT_EPOCHS, 1, seconds)
    expert_config = expert_config_for(probe, ctx)
    images = training_images(expert_config, ctx.data)
    execution = plan_execution(expert_config, ctx.device, images)
    workers = execution.workers
    timing = estimate_training_time(dataclasses.replace(expert_config, epochs=1), ctx.data, ctx.device, 1,
                                    execution=execution)
    epoch_s = images / timing.images_per_second
    final_s = max(timing.seconds_per_expert - epoch_s, 0.0)  # the final accuracy pass

    def experts_cost(experts: int, epochs: int) -> float:
        return math.ceil(experts / workers) * (epochs * epoch_s + final_s)

    experts = max(2, workers)
    share = EXPERT_SHARE * seconds
    epochs = min(MAX_EXPERT_EPOCHS, int((share / math.ceil(experts / workers) - final_s) / epoch_s))
    while (epochs == MAX_EXPERT_EPOCHS and experts + workers <= MAX_EXPERTS
           and experts_cost(experts + workers, epochs) <= share):
        experts += workers
    least_epochs = max(MIN_EXPERT_EPOCHS, span + 2)
    sized = _sized(method, base, experts, max(epochs, least_epochs), 1, seconds)
    iteration_s = type(method)(sized).time_iteration(ctx)
    least = max(experts_cost(experts, least_epochs) / EXPERT_SHARE,
                experts_cost(experts, least_epochs) + MIN_ITERATIONS * iteration_s + INIT_SECONDS)
    if epochs < least_epochs or seconds < least:
        raise ConfigError(
            f"A budget of {format_duration(seconds)} is too small for a useful {method.name} run here: it needs "
            f"{experts} experts of at least {least_epochs} epochs (about {format_step(epoch_s)} an epoch, "
            f"{workers} at a time) and {MIN_ITERATIONS} outer iterations (about {format_step(iteration_s)} each). "
            f"Give at least --budget {math.ceil(least / 60)}m."
        )
    experts_s, cached = experts_cost(experts, sized.expert_train_epochs), False
    path, missing = find_or_plan_store(expert_config_for(sized, ctx))
    if not missing:
        with ExpertStore.open(path, num_experts=experts) as store:
            recorded = experts_wall_clock(store)
        if recorded is not None:
            experts_s, cached = recorded, True
    if base.syn_steps < LONG_UNROLL and (longer_s := long_unroll_s(method, sized, ctx, seconds, experts_s)):
        base, iteration_s = dataclasses.replace(base, syn_steps=LONG_UNROLL), longer_s
    iterations = iterations_left(seconds, experts_s, iteration_s)
    if iterations < MIN_ITERATIONS:
        raise ConfigError(
            f"A budget of {format_duration(seconds)} leaves {format_duration(seconds - experts_s)} after the "
            f"experts ({format_duration(experts_s)}{', as recorded when they were trained' if cached else ''}): "
            f"fewer than {MIN_ITERATIONS} outer iterations of about {format_step(iteration_s)}. Give at least "
            f"--budget {math.ceil((experts_s + MIN_ITERATIONS * iteration_s + INIT_SECONDS) / 60)}m."
        )
    config = _sized(method, base, experts, epochs, iterations, seconds)
    return BudgetPlan(seconds, config, experts_s, cached, iteration_s, workers)


def iterations_left(seconds: float, experts_s: float, iteration_s: float) -> int:
    """Outer iterations of `iteration_s` seconds that fit in `seconds` after the experts' cost and
    the set-up."""
    return int((seconds - experts_s - INIT_SECONDS) / iteration_s)


def long_unroll_s(method, config, ctx: DistillContext, seconds: float, experts_s: float) -> float | None:
    """Seconds an outer iteration of `config` unrolled LONG_UNROLL steps takes here, timed now, if
    `seconds` hold `least_iterations` of them after the experts' cost; else None."""
    longer = dataclasses.replace(config, syn_steps=LONG_UNROLL)
    longer_s = type(method)(longer).time_iteration(ctx)
    return longer_s if iterations_left(seconds, experts_s, longer_s) >= least_iterations(longer) else None


def least_iterations(config) -> int:
    """The outer iterations a budget must hold for `config`'s unroll: LONG_UNROLL_ITERATIONS once
    it is LONG_UNROLL steps or more (what the long unroll was chosen for), else MIN_ITERATIONS."""
    return LONG_UNROLL_ITERATIONS if config.syn_steps >= LONG_UNROLL else MIN_ITERATIONS


def iterations_kept(config, experts: int) -> int:
    """The outer iterations a budgeted run keeps when it grows to `experts` experts: beyond
    FEW_EXPERTS, ITERATIONS_BEFORE_MORE_EXPERTS of a long unroll; else `least_iterations`."""
    if experts > FEW_EXPERTS and config.syn_steps >= LONG_UNROLL:
        return ITERATIONS_BEFORE_MORE_EXPERTS
    return least_iterations(config)


def experts_that_fit(config, experts_s: float, workers: int, iteration_s: float) -> int:
    """How many experts `config`'s budget holds, now that its `config.experts` cost `experts_s`
    (their recorded wall-clock): more rounds of `workers` experts, each costing what a round
    cost so far, while the experts stay within EXPERT_SHARE of the budget and `iterations_kept`
    outer iterations of `iteration_s` still fit after them."""
    rounds = math.ceil(config.experts / workers)
    round_s = experts_s / rounds
    experts = config.experts
    while (experts + workers <= MAX_EXPERTS and experts_s + round_s <= EXPERT_SHARE * config.budget_s
           and config.budget_s - experts_s - round_s
           >= iterations_kept(config, experts + workers) * iteration_s + INIT_SECONDS):
        experts += workers
        experts_s += round_s
    return experts


def timed_again(method, ctx: DistillContext, experts_s: float):
    """(configuration, seconds an outer iteration) after experts trained in this process, minutes
    to hours after the plan timed an iteration: the iteration timed again and the faster of the
    two timings kept, since whatever else ran on the machine during either only ever slowed it.
    A run the plan's timing left at the preset's unroll takes the long one if, timed now, enough
    iterations of it fit after what the experts cost (the rule of `fit_budget`)."""
    c = method.config
    iteration_s = min(method.budget_iteration_s, method.time_iteration(ctx))
    # a budget's unroll is never given, so one shorter than LONG_UNROLL is the plan's choice
    if c.syn_steps < LONG_UNROLL and (longer_s := long_unroll_s(method, c, ctx, c.budget_s, experts_s)):
        return dataclasses.replace(c, syn_steps=LONG_UNROLL), longer_s
    return c, iteration_s


def fit_iterations(method, experts_s: float, iteration_s: float):
    """`method`'s budgeted configuration with its iterations (and what follows them, such as
    DATM's window) counted again from the experts' actual cost: more where they cost less than
    planned, fewer where more of them were trained (`experts_that_fit`) or they took longer, so
    that a schedule over the iterations (DATM's window) runs its whole course in the budget."""
    c = method.config
    return with_iterations(method, max(1, iterations_left(c.budget_s, experts_s, iteration_s)))


class Pace:
    """The outer loop's pace in seconds an iteration, measured over PACE_ITERATIONS iterations
    after the first PACE_WARMUP this process runs (from iteration `first`), checkpoints included."""

    def __init__(self, first: int):
        self.first = first
        self.since: tuple[int, float] | None = None  # (iteration, clock) the measurement starts from

    def after(self, iteration: int, now: float) -> float | None:
        """Given the clock after `iteration`: the pace once it has been measured, else None."""
        if self.since is None:
            if iteration - self.first >= PACE_WARMUP:
                self.since = (iteration, now)
            return None
        done = iteration - self.since[0]
        return (now - self.since[1]) / done if done >= PACE_ITERATIONS else None


def recounted(method, done: int, spent_s: float, pace_s: float) -> int:
    """The outer iterations `method`'s budget holds, counted from the run itself: `done` so far,
    then as many more as the time left holds at `pace_s` seconds each (the real pace, checkpoints
    included), after `spent_s` spent on experts and distillation so far."""
    c = method.config
    return done + max(0, int((c.budget_s - spent_s - FINAL_SECONDS) / pace_s))


def with_iterations(method, iterations: int):
    """`method`'s budgeted configuration over `iterations` outer iterations (and what follows
    them, such as DATM's window)."""
    c = method.config
    if iterations == c.iterations:
        return c
    return dataclasses.replace(c, iterations=iterations, **method.budget_iteration_settings(iterations))


def _sized(method, base, experts: int, epochs: int, iterations: int, seconds: float):
    """`base` sized by a budget: `experts` experts, the start epochs spread over trajectories of
    `epochs` epochs (`budget_settings`), `iterations` outer iterations. The experts train only as
    far as a segment reaches (`last_matched_epoch`) where their learning rate does not depend on
    their length: the same trajectories for less."""
    config = dataclasses.replace(base, experts=experts, expert_train_epochs=epochs, iterations=iterations,
                                 budget_s=float(seconds), **method.budget_settings(epochs, base),
                                 **method.budget_iteration_settings(iterations))
    if config.expert_lr_decay != "none":
        return config
    return dataclasses.replace(config, expert_train_epochs=min(epochs, type(method)(config).last_matched_epoch()))

