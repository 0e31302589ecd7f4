"""How a trajectory method gets its experts: find a cached store by configuration, or train
the missing experts (saying so, with an estimate), then check the store fits the run."""

from __future__ import annotations

import time

from ddtool.experts import (
    ExpertConfig,
    ExpertStore,
    estimate_training_time,
    find_or_plan_store,
    for_data,
    run_buffer,
)
from ddtool.durations import format_duration
from ddtool.experts.execution import UNCOMPILED_NOTE, plan_execution, training_images
from ddtool.methods.base import DistillContext


def expert_config_for(config, ctx: DistillContext) -> ExpertConfig:
    """The expert buffer a TrajectoryConfig needs on the run's data (experts.plan.for_data)."""
    return for_data(ExpertConfig(
        dataset=ctx.data.spec.name,
        arch=config.arch,
        arch_options=config.arch_options(),
        zca=config.zca,
        experts=config.experts,
        epochs=config.expert_train_epochs,
        batch_size=config.expert_batch_size,
        lr=config.expert_lr,
        momentum=config.expert_momentum,
        weight_decay=config.expert_weight_decay,
        optimizer=config.expert_optimizer,
        lr_decay=config.expert_lr_decay,
        rho=config.expert_rho,
        gsam_alpha=config.expert_gsam_alpha,
        adaptive=config.expert_adaptive,
        ast_loss_scaling=config.expert_ast_loss_scaling,
        ast_input_grad_penalty=config.expert_ast_input_grad_penalty,
        seed=config.expert_seed,
        precision=config.expert_precision,
    ), ctx.data)


def describe_expert_plan(expert_config: ExpertConfig, ctx: DistillContext,
                         timed_seconds: float | None = None) -> list[str]:
    """The plan's line for a run's experts: found in the cache, or what training them takes
    (timed here, or `timed_seconds` when a budget's sizing timed it already)."""
    path, missing = find_or_plan_store(expert_config)
    line = f"experts: {expert_config.experts} x {expert_config.epochs} epochs of {expert_config.describe()}"
    if not missing:
        return [line + f", found in {path}"]
    execution = plan_execution(expert_config, ctx.device, training_images(expert_config, ctx.data))
    note = UNCOMPILED_NOTE if execution.compile else ""
    if timed_seconds is not None:
        took = f"about {format_duration(timed_seconds)}{note}"
    else:
        estimate = estimate_training_time(expert_config, ctx.data, ctx.device, len(missing), execution=execution)
        took = (f"about {format_duration(estimate.total_seconds)} at {estimate.images_per_second:.0f} images/s an "
                f"expert{note}")
    return [line + f"; {len(missing)} to train first, {execution.describe()} ({took}), cached in {path}"]


def open_experts(expert_config: ExpertConfig, ctx: DistillContext) -> ExpertStore:
    path, missing = find_or_plan_store(expert_config)
    if missing:
        ctx.log(f"Training {len(missing)} expert(s) into {path} (resumable; reused by later runs).")
        started = time.perf_counter()
        run_buffer(expert_config, path, ctx.data, ctx.device, progress=ctx.progress)
        ctx.experts_trained_s += time.perf_counter() - started
    store = ExpertStore.open(path, num_experts=expert_config.experts)
    store.check_compatible(ctx.data.spec.name, expert_config.arch, expert_config.arch_options,
                           ctx.data.preprocessing)
    return store


def experts_wall_clock(store: ExpertStore) -> float | None:
    """What the store's experts (those this run uses) cost to train, in seconds of a machine's
    wall-clock as recorded when they were trained; None if one was trained before stores
    recorded it."""
    shares = [store.record(i).share_of_wall_clock() for i in range(store.num_experts)]
    return None if any(share is None for share in shares) else sum(shares)
