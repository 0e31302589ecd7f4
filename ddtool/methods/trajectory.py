"""Trajectory matching (MTT and TESLA) over the shared engine.

The outer loop is the same for every method of the family; a method differs in its
configuration (presets) and in a few hooks: which start epochs to sample, how images and
labels start, whether an update is kept, what happens after it and which images are saved.
DATM (methods/datm.py) and FTD (methods/ftd.py) subclass `TrajectoryMatching` and override
those hooks; AST's options are configuration fields every method of the family honours.

Reproducibility: each outer iteration draws from its own generator derived from
(seed, iteration), so a resumed run draws exactly what an uninterrupted one would. With
`segments_per_iteration` S > 1, segment s > 0 draws from (seed, iteration, s); segment 0
keeps the single-segment stream.

Under torchrun, segment s of every iteration is matched on rank s % world and the segments'
gradients are summed over ranks with all_reduce, so every rank holds the same mean and makes
the same update and the same decisions (divergence, DATM's gate, FTD's average); rank 0
alone writes the checkpoint, the log and the validation scores.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ddtool import distributed
from ddtool.augment import DSA, DSAConfig
from ddtool.data import sample_per_class
from ddtool.errors import ConfigError, DDToolError
from ddtool.evaluation import get_protocol, train_fresh_network
from ddtool.files import write_atomically
from ddtool.experts import ExpertStore
from ddtool.matching import InnerStep, MatchResult, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.matching.engine import Forward
from ddtool.methods.base import DistillContext, Method, register_method
from ddtool.methods.budget import (
    RETIMED, Pace, experts_that_fit, fit_iterations, recounted, timed_again, with_iterations,
)
from ddtool.methods.divergence import Divergence, DivergenceWatch
from ddtool.durations import format_duration, format_step
from ddtool.methods.experts import describe_expert_plan, expert_config_for, experts_wall_clock, open_experts
from ddtool.methods.initialisation import representative_indices
from ddtool.methods.matching_state import MatchingState, append_log, keep_log_until, load_checkpoint, save_checkpoint
from ddtool.methods.trajectory_costs import BackendChoice, choose_backend, time_outer_iteration
from ddtool.methods.trajectory_config import (
    FASHION_CPU, FASHION_GPU, PUBLISHED_MTT, MTT_IPC_CHANGES, TrajectoryConfig, start_epochs_below,
    with_ipc_variants,
)
from ddtool.networks import ParamLayout, create_network, format_arch, network_options
from ddtool.networks.convnet import describe_depth
from ddtool.seeding import derive_seed, generator, seeded
from ddtool.storage import SyntheticSet

Relabel = Callable[[torch.Tensor], torch.Tensor]  # images -> label logits


@dataclass
class Segment:
    """One (expert, start epoch) segment of an outer iteration, and the generator that drew it
    (the unroll's minibatches and augmentations continue from it)."""

    expert: int
    start_epoch: int
    rng: torch.Generator


class TrajectoryMatching(Method):
    """MTT: match N student steps on the synthetic set to M expert epochs."""

    config_class = TrajectoryConfig
    default_protocol = "mtt"
    default_preset = "fashion-cpu"
    checkpoint_name = "checkpoint.pt"
    presets = with_ipc_variants({"fashion-cpu": FASHION_CPU, "fashion-gpu": FASHION_GPU,
                                 **{f"mtt-{k}": v for k, v in PUBLISHED_MTT.items()}})

    def student_arch(self) -> str:
        return format_arch(self.config.arch, self.config.arch_options())

    @property
    def whitens(self) -> bool:
        return self.config.zca

    # ---- hooks for the methods built on this loop -------------------------------------------
    def start_epoch_range(self, iteration: int) -> tuple[int, int]:
        """Start epochs are drawn uniformly from [low, high)."""
        return self.config.min_start_epoch, self.config.max_start_epoch

    def initialise(self, ctx: DistillContext, experts: ExpertStore, forward: Forward
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(images, their hard labels, learnable label logits or None), class-major."""
        c, data = self.config, ctx.data
        if c.init == "kmeans":
            idx = representative_indices(data, experts, forward, ctx.ipc, pool_per_class=c.init_pool_per_class,
                                         generator=generator(ctx.seed, "init"))
        else:
            idx = sample_per_class(data.train_y, data.spec.num_classes, ctx.ipc, generator(ctx.seed, "init"))
        images = data.train_x[idx].detach().clone()
        if c.init == "noise":
            images = torch.randn(images.shape, generator=generator(ctx.seed, "noise")).to(images.device)
        hard = data.train_y[idx]
        logits = F.one_hot(hard, data.spec.num_classes).float() * 3.0 if c.labels == "learned" else None
        return images, hard, logits

    def fixed_targets(self, state: MatchingState, forward: Forward, target_params: torch.Tensor) -> torch.Tensor:
        if self.config.labels == "expert_soft":
            # TESLA: the target-epoch expert's soft predictions on the current images.
            with torch.no_grad():
                logits = forward(target_params, state.images.detach())
            return F.softmax(logits / self.config.soft_label_temperature, dim=1)
        return state.hard_labels

    def skip_reason(self, result: MatchResult) -> str | None:
        """A reason to leave this iteration's update out (DATM's loss gate), or None."""
        return None

    def on_start(self, state: MatchingState) -> None:
        """Called once on a fresh (not resumed) run, before the first iteration."""
        if self.config.ema_decay:
            # Published FTD starts the average at the initial real images; with bias correction
            # it starts at zero so that only distilled iterates are averaged.
            state.extra["ema"] = state.images.detach().clone() * (0.0 if self.config.ema_bias_correction else 1.0)
            state.extra["ema_updates"] = 0

    def after_update(self, state: MatchingState) -> None:
        """Called after every applied update (skipped or rolled-back ones do not count)."""
        decay = self.config.ema_decay
        if decay:
            state.extra["ema"].mul_(decay).add_(state.images.detach(), alpha=1 - decay)
            state.extra["ema_updates"] += 1

    def images_to_save(self, state: MatchingState) -> torch.Tensor:
        """The images a run's result holds: the moving average when one is kept, else the iterate."""
        c = self.config
        if not c.ema_decay:
            return state.images.detach()
        ema, updates = state.extra["ema"], state.extra["ema_updates"]
        if c.ema_bias_correction:
            return ema / (1 - c.ema_decay ** updates) if updates else state.images.detach().clone()
        return ema.clone()

    # ---- the loop --------------------------------------------------------------------------
    fits_budget = True
    splits_over_processes = True
    # What a budget's sizing timed already (ddtool.run), so that the plan states the same figures.
    timed_iteration_s: float | None = None
    timed_experts_s: float | None = None
    # a budgeted run's timed outer iteration, by which its iterations are counted again once the
    # experts' actual cost is known (ddtool.methods.budget.fit_iterations)
    budget_iteration_s: float | None = None
    budget_workers: int = 1  # experts the budget's sizing expects to train at once here
    # Per IPC, settings a budgeted run takes unless they are given (--set): chosen for the
    # budget's sizing on the validation split (docs/budget.md).
    budget_recipes: dict[int, dict] = {}
    # The settings `budget_settings` and `budget_iteration_settings` size: refused beside a budget
    # (ddtool.run), which would otherwise replace them; the shares place the start epochs instead.
    budget_sized_settings = frozenset({"max_start_epoch"})

    def budget_settings(self, epochs: int, base: TrajectoryConfig) -> dict:
        """The matching settings of a budgeted run on `epochs`-epoch experts: start epochs below
        `budget_start_share` of the trajectory, in proportion to its length."""
        return {"max_start_epoch": start_epochs_below(base.budget_start_share, epochs, base.match_span_epochs)}

    def budget_iteration_settings(self, iterations: int) -> dict:
        """The settings a budgeted run's count of outer iterations decides (none here)."""
        return {}

    def last_matched_epoch(self) -> int:
        """The last expert epoch a segment reaches over the whole run: experts need train no further."""
        c = self.config
        return self.start_epoch_range(c.iterations)[1] - 1 + c.match_span_epochs

    def describe_start_epochs(self) -> str:
        low, high = self.start_epoch_range(0)
        return f"start epochs [{low}, {high})"

    def plan(self, ctx: DistillContext) -> list[str]:
        c = self.config
        lines = [
            f"{self.name}: {ctx.ipc} image{'s' if ctx.ipc != 1 else ''}/class of {ctx.data.spec.name} "
            f"({ctx.ipc * ctx.data.spec.num_classes} images), "
            f"{self.student_arch()}, {c.iterations} iterations of N={c.syn_steps} student steps against "
            f"M={c.match_span_epochs} expert epochs, {self.describe_start_epochs()}, "
            f"backend {self.choose_backend(ctx).describe()}, labels {c.labels}, init {c.init}"
            + (f", {c.segments_per_iteration} segments per iteration" if c.segments_per_iteration > 1 else "")
            + (f", saves the images' moving average (decay {c.ema_decay}"
               f"{', bias-corrected' if c.ema_bias_correction else ''})" if c.ema_decay else ""),
        ]
        if "depth" in network_options(c.arch) and not c.depth:
            lines.append(f"network: {describe_depth(ctx.data.spec.image_size)}, for the experts, the student and the "
                         "evaluation (--set depth=N to choose)")
        if c.augment:
            lines.append(f"augmentation: DSA {'with' if ctx.data.spec.flip else 'without'} left-right flips (the "
                         "dataset's setting; `ddtool datasets NAME` says where it comes from)")
        lines += describe_expert_plan(expert_config_for(c, ctx), ctx, self.timed_experts_s)
        per_iteration = self.timed_iteration_s or self.time_iteration(ctx)
        world = distributed.world_size()
        lines.append(f"distillation: about {format_duration(per_iteration * c.iterations)} ({c.iterations} iterations "
                     f"at {format_step(per_iteration)}{f' on each of {world} processes' if world > 1 else ''}, timed here)"
                     + (f", plus a validation every {c.eval_every} iterations" if c.eval_every else ""))
        return lines

    def choose_backend(self, ctx: DistillContext) -> BackendChoice:
        """The gradient backend this run uses (see trajectory_costs.choose_backend), chosen once
        per IPC and device."""
        cached = getattr(self, "_backend_choice", None)
        if cached is None or cached[0] != (ctx.ipc, ctx.device, self.config):  # a budget may change N
            self._backend_choice = ((ctx.ipc, ctx.device, self.config), choose_backend(self.config, ctx))
        return self._backend_choice[1]

    def time_iteration(self, ctx: DistillContext, steps: int = 3) -> float:
        """Seconds an outer iteration should take here (see trajectory_costs.time_outer_iteration)."""
        return time_outer_iteration(self.config, ctx, self.choose_backend(ctx).name, self._inner_steps, steps)

    def distill(self, ctx: DistillContext) -> SyntheticSet:
        self._check_segments_split()
        if not distributed.is_main():
            # The other ranks compute the same state as rank 0: one voice is enough.
            ctx = dataclasses.replace(ctx, log=lambda message: None, progress=False)
        data, device = ctx.data, ctx.device
        experts = self._experts_within_budget(ctx)
        c = self.config
        distill_started = time.perf_counter()
        spec = data.spec
        net, layout = self._student_network(ctx, experts)

        def forward(flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return layout.functional_forward(net, flat, x)

        relabel = self._expert_labeller(experts, forward, device) if c.labels == "expert_soft" else None
        if distributed.is_main():
            ctx.work_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = ctx.work_dir / self.checkpoint_name
        state = self._starting_state(ctx, experts, forward, checkpoint)
        if state.budget_iterations is not None:  # counted by the interrupted run: counted alike
            self.config = c = with_iterations(self, state.budget_iterations)
        resumed_after = state.elapsed

        def spent_s() -> float:
            """What the budget has paid so far: the experts' recorded cost and this run's distillation."""
            return (ctx.experts_s or 0.0) + resumed_after + time.perf_counter() - distill_started
        watch = self._divergence_watch(state)
        images, lr, label_logits, optimizers = self._learnables(state)

        chosen = self.choose_backend(ctx)
        ctx.log(f"Gradient backend: {chosen.describe()}.")
        backend = get_backend(chosen.name)
        dsa = DSA(DSAConfig(flip=spec.flip)) if c.augment else None
        last_good = state.snapshot(images, lr, label_logits, optimizers)
        log_path = ctx.work_dir / "log.jsonl"
        if distributed.is_main() and log_path.exists():
            # A fresh run starts a new log; a resumed one runs again the iterations after its
            # checkpoint, so their records from the interrupted process go.
            keep_log_until(log_path, state.iteration)
        my_segments = distributed.indices_of_this_rank(c.segments_per_iteration)
        bar = tqdm(total=c.iterations, initial=state.iteration, desc=self.name, unit="it", disable=not ctx.progress)
        it = state.iteration
        last_seconds = 0.0
        # a budgeted run counts its iterations a last time from its own pace, unless it did already
        pace = Pace(it) if c.budget_s and self.budget_iteration_s and state.budget_iterations is None else None
        while it < c.iterations:
            if state.budget_spent or (c.budget_s and self._budget_spent(spent_s(), last_seconds)):
                ctx.log(f"Budget of {format_duration(c.budget_s)} reached: stopping after {it} of {c.iterations} "
                        "iterations.")
                state.budget_spent = True
                self._save_checkpoint(checkpoint, state, optimizers, watch)
                break
            started = time.perf_counter()
            segments = self._draw_segments(ctx.seed, it, experts)
            result = self._mean_over_segments(
                [self._segment_gradients(segments[s], experts, forward, layout, backend, dsa, state)
                 for s in my_segments])
            diverged, skipped, lr_clamped = self._update(result, images, lr, label_logits, optimizers, watch)
            if diverged:
                elapsed = state.elapsed + time.perf_counter() - started
                watch.record(diverged)
                counted = state.budget_iterations  # a count made after the state rolled back to stays
                state, images, lr, label_logits, optimizers = self._rollback(ctx, last_good, state, it, diverged, watch)
                it += 1
                state.iteration, state.elapsed, state.budget_iterations = it, elapsed, counted
                bar.update(1)
                continue
            it += 1
            state.iteration = it
            state.images, state.lr, state.label_logits = images, lr, label_logits
            state.elapsed += time.perf_counter() - started
            if not skipped:
                self.after_update(state)
            if distributed.is_main():
                expert, start_epoch = [s.expert for s in segments], [s.start_epoch for s in segments]
                if len(segments) == 1:  # one segment logs plain numbers, as always; several, a list entry each
                    expert, start_epoch = expert[0], start_epoch[0]
                append_log(log_path, {"iteration": it, "loss": result.loss, "target_loss": result.target_loss,
                                      "lr": float(lr.detach()), "lr_clamped": lr_clamped, "skipped": skipped,
                                      "expert": expert, "start_epoch": start_epoch,
                                      "seconds": time.perf_counter() - started})
            if pace is not None and (pace_s := pace.after(it, time.perf_counter())) is not None:
                # before the checkpoint, which keeps the count
                self._count_iterations_again(ctx, state, spent_s(), pace_s)
                c, pace = self.config, None
                bar.total = c.iterations
                bar.refresh()
            if c.eval_every and it % c.eval_every == 0:
                self._validate(ctx, state, relabel)
            if it % c.checkpoint_every == 0 or it == c.iterations:
                self._save_checkpoint(checkpoint, state, optimizers, watch)
                last_good = state.snapshot(images, lr, label_logits, optimizers)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{float(lr.detach()):.2e}")
            bar.update(1)
            last_seconds = time.perf_counter() - started
        bar.close()
        sset = self._final_set(ctx, state, relabel, watch)
        ctx.resumed_s = resumed_after  # what earlier, interrupted processes spent on this run
        sset.config["backend"] = chosen.name  # the one that computed it, "auto" resolved
        return sset

    # ---- pieces of the loop -----------------------------------------------------------------
    def _starting_state(self, ctx: DistillContext, experts: ExpertStore, forward, checkpoint) -> MatchingState:
        """The checkpoint's state under --resume (where there is one), else the initial set."""
        c, device = self.config, ctx.device
        state = load_checkpoint(checkpoint, device) if ctx.resume else None
        if state is not None:
            ctx.log(f"Resuming from {checkpoint} at iteration {state.iteration}.")
            return state
        images, hard, logits = self.initialise(ctx, experts, forward)
        state = MatchingState(iteration=0, images=images.to(device), hard_labels=hard.to(device),
                              lr=torch.tensor(c.lr_init, device=device),
                              label_logits=logits.to(device) if logits is not None else None, optimizer_states={})
        self.on_start(state)
        return state

    def _update(self, result, images, lr, label_logits, optimizers: dict, watch) -> tuple:
        """One outer step from the iteration's gradients, unless they diverged or the method
        skips them: (divergence or None, skip reason or None, whether α hit its floor)."""
        c = self.config
        diverged = watch.check_gradients(result.loss, [result.grad_images, result.grad_lr] + (
            [result.grad_label_logits] if result.grad_label_logits is not None else []))
        skipped = None if diverged else self.skip_reason(result)
        if diverged or skipped:
            return diverged, skipped, False
        images.grad, lr.grad = result.grad_images, result.grad_lr.reshape(lr.shape)
        if label_logits is not None:
            label_logits.grad = result.grad_label_logits
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            lr_clamped = bool(lr < c.lr_init * c.min_lr_factor)
            lr.clamp_(min=c.lr_init * c.min_lr_factor)
        return watch.check_update(images, lr, label_logits, result.loss, lr_clamped), None, lr_clamped

    def _experts_within_budget(self, ctx: DistillContext):
        """The run's experts, trained or found. Under a budget, experts that cost less than their
        share make room for more of them, and the iterations are counted again from what the
        experts cost (self.config changes accordingly)."""
        c = self.config
        experts = open_experts(expert_config_for(c, ctx), ctx)
        ctx.experts_s = experts_wall_clock(experts)
        if not (c.budget_s and self.budget_iteration_s and ctx.experts_s is not None):
            return experts
        self._time_again_after_experts(ctx)
        c = self.config
        wanted = experts_that_fit(c, ctx.experts_s, self.budget_workers, self.budget_iteration_s)
        if wanted > c.experts:
            ctx.log(f"The {c.experts} experts cost {format_duration(ctx.experts_s)}, less than the budget's share "
                    f"for them: {wanted - c.experts} more fit.")
            self.config = dataclasses.replace(c, experts=wanted)
            experts.close()
            experts = open_experts(expert_config_for(self.config, ctx), ctx)
            ctx.experts_s = experts_wall_clock(experts)
        self.config = fit_iterations(self, ctx.experts_s, self.budget_iteration_s)
        if self.config.iterations != c.iterations:
            ctx.log(f"The experts cost {format_duration(ctx.experts_s)}: the budget holds "
                    f"{self.config.iterations} outer iterations (planned: {c.iterations}).")
        return experts

    def _time_again_after_experts(self, ctx: DistillContext) -> None:
        """A budgeted run whose experts trained here times its outer iteration again
        (budget.timed_again), which may lengthen the unroll; the figures are kept in the work
        folder, and a resumed run takes them from there, so that it counts its iterations as the
        interrupted one did. A run on cached experts keeps the plan's timing, taken moments ago."""
        path = ctx.work_dir / RETIMED
        if ctx.resume and path.exists():
            figures = json.loads(path.read_text())
        elif ctx.experts_trained_s:
            config, iteration_s = distributed.decided_by_rank_zero(lambda: timed_again(self, ctx, ctx.experts_s))
            figures = {"syn_steps": config.syn_steps, "iteration_s": iteration_s}
            if distributed.is_main():
                ctx.work_dir.mkdir(parents=True, exist_ok=True)
                write_atomically(path, json.dumps(figures).encode())
        else:
            if distributed.is_main():
                path.unlink(missing_ok=True)  # an earlier run's, which a later --resume must not take
            return
        planned_steps, planned_s = self.config.syn_steps, self.budget_iteration_s
        self.config = dataclasses.replace(self.config, syn_steps=figures["syn_steps"])
        self.budget_iteration_s = figures["iteration_s"]
        ctx.log(f"An outer iteration timed again after the experts: {format_step(self.budget_iteration_s)} at "
                f"N={self.config.syn_steps} (planned: {format_step(planned_s)} at N={planned_steps}).")

    def _count_iterations_again(self, ctx: DistillContext, state: MatchingState, spent_s: float,
                                pace_s: float) -> None:
        """A budgeted run's iterations counted a last time, from the pace of its own (budget.recounted),
        decided by rank 0 for all; the checkpoint keeps the count for a resumed run."""
        c = self.config
        iterations = distributed.broadcast_object(recounted(self, state.iteration, spent_s, pace_s))
        state.budget_iterations = iterations
        if iterations != c.iterations:
            ctx.log(f"Outer iterations take {format_step(pace_s)} here (timed before the run: "
                    f"{format_step(self.budget_iteration_s)}): the budget holds {iterations} of them "
                    f"(counted before: {c.iterations}).")
            self.config = with_iterations(self, iterations)

    @staticmethod
    def _save_checkpoint(path, state: MatchingState, optimizers: dict, watch) -> None:
        """The run as it stands, optimizers and divergence watch included (rank 0 writes it)."""
        state.optimizer_states = {k: o.state_dict() for k, o in optimizers.items()}
        state.divergence_watch = watch.state_dict()
        if distributed.is_main():
            save_checkpoint(path, state)

    def _budget_spent(self, spent_s: float, next_iteration: float) -> bool:
        """Whether another outer iteration (taking about `next_iteration` seconds, the last one's)
        would pass the budget, `spent_s` spent so far (the experts' recorded time included).
        Decided by rank 0 for all, so every process stops at the same iteration."""
        return bool(distributed.broadcast_object(spent_s + next_iteration > self.config.budget_s))

    def _draw_segments(self, seed: int, iteration: int, experts: ExpertStore) -> list[Segment]:
        """All of this iteration's segments, each from its own generator. Every rank draws all of
        them (two integers each) so that rank 0 can log what the others match."""
        c = self.config
        low, high = self.start_epoch_range(iteration)
        segments = []
        for index in range(c.segments_per_iteration):
            # Segment 0 keeps the single-segment stream: one segment per iteration draws what it always did.
            rng = generator(seed, "iteration", iteration) if index == 0 else generator(seed, "iteration", iteration,
                                                                                        index)
            expert, start_epoch = experts.sample_segment(rng, high, c.match_span_epochs, min_start=low)
            segments.append(Segment(expert, start_epoch, rng))
        return segments

    def _segment_gradients(self, segment: Segment, experts: ExpertStore, forward: Forward, layout: ParamLayout,
                           backend: Callable[[Unroll, SyntheticBatch], MatchResult], dsa: DSA | None,
                           state: MatchingState) -> MatchResult:
        """The matching loss of one segment and its gradients for the images, labels and α."""
        images = state.images
        unroll = self._unroll(experts, segment.expert, segment.start_epoch, forward, layout, images.shape,
                              segment.rng, dsa, images.device)
        syn = SyntheticBatch(images=images, lr=state.lr, label_logits=state.label_logits,
                             fixed_targets=None if state.label_logits is not None else
                             self.fixed_targets(state, forward, unroll.targets[0].params),
                             label_temperature=self.config.soft_label_temperature)
        return backend(unroll, syn)

    def _mean_over_segments(self, results: list[MatchResult]) -> MatchResult:
        """The mean over all the iteration's segments, given this rank's `results`: summed here,
        summed over the ranks (all_reduce), divided by the number of segments. Every rank gets
        the same numbers; with two ranks they are also those of one process (a + b = b + a)."""
        first = results[0]
        grad_images, grad_lr = first.grad_images.clone(), first.grad_lr.clone()
        grad_labels = first.grad_label_logits.clone() if first.grad_label_logits is not None else None
        losses = torch.tensor([first.loss, first.target_loss], dtype=torch.float64, device=grad_images.device)
        for r in results[1:]:
            grad_images += r.grad_images
            grad_lr += r.grad_lr
            if grad_labels is not None:
                grad_labels += r.grad_label_logits
            losses += torch.tensor([r.loss, r.target_loss], dtype=torch.float64, device=grad_images.device)
        distributed.all_reduce_sum_([t for t in (grad_images, grad_lr, grad_labels, losses) if t is not None])
        count = self.config.segments_per_iteration
        return MatchResult(loss=float(losses[0]) / count, grad_images=grad_images / count, grad_lr=grad_lr / count,
                           grad_label_logits=grad_labels / count if grad_labels is not None else None,
                           # per-target terms are one segment's breakdown; a mean of them would mean little
                           terms=first.terms if count == 1 else [], target_loss=float(losses[1]) / count)

    def _unroll(self, experts: ExpertStore, expert: int, start_epoch: int, forward: Forward, layout: ParamLayout,
                shape: torch.Size, rng: torch.Generator, dsa: DSA | None, device: torch.device) -> Unroll:
        """The student's unroll for one segment, with AST's options applied."""
        c = self.config
        expert_start = experts.params(expert, start_epoch).to(device)
        final = experts.params(expert, start_epoch + c.match_span_epochs).to(device)
        targets = [MatchTarget(step=c.syn_steps, params=final, normaliser=(expert_start - final).pow(2).sum())]
        if c.ast_intermediate_weight:
            for m in range(1, c.match_span_epochs):
                middle = experts.params(expert, start_epoch + m).to(device)
                targets.append(MatchTarget(step=max(1, round(c.syn_steps * m / c.match_span_epochs)), params=middle,
                                           normaliser=(expert_start - middle).pow(2).sum(),
                                           weight=c.ast_intermediate_weight))
        start = expert_start
        if c.ast_weight_perturbation:
            start = perturb_conv_weights(expert_start, layout, c.ast_weight_perturbation, rng)
        scale = 1.0 + c.ast_balanced_loss * start_epoch / c.max_start_epoch
        return Unroll(forward=forward, start=start, steps=self._inner_steps(shape, rng, dsa), targets=targets,
                      augmenter=dsa, momentum=c.ast_inner_momentum, inner_loss_scale=scale)

    def _check_segments_split(self) -> None:
        c, world = self.config, distributed.world_size()
        if c.segments_per_iteration % world:
            raise ConfigError(
                f"segments_per_iteration={c.segments_per_iteration} cannot be split evenly over {world} processes. "
                f"Each outer iteration matches that many segments, segment s on process s mod {world}; set it to a "
                f"multiple of {world} (--set segments_per_iteration={world} * k). The result depends only on it, "
                "not on the number of processes."
            )

    def _student_network(self, ctx: DistillContext, experts: ExpertStore) -> tuple[torch.nn.Module, ParamLayout]:
        """The network whose weights the experts' trajectories hold (seeded: its buffers and
        layout are what matter; its weights come from the experts)."""
        c, spec = self.config, ctx.data.spec
        with seeded(derive_seed(ctx.seed, "student")):
            net = create_network(c.arch, channels=spec.channels, num_classes=spec.num_classes,
                                 image_size=spec.image_size, **c.arch_options()).to(ctx.device)
        layout = ParamLayout.from_module(net)
        if layout.total != experts.layout.total:
            raise DDToolError(f"The experts have {experts.layout.total} parameters but a {c.arch} with "
                              f"{c.arch_options()} has {layout.total}: they were trained for another architecture.")
        return net, layout

    def _learnables(self, state: MatchingState, rates_from_scale: bool = False) -> tuple:
        """The state's images, α and label logits as leaves to learn, and their optimizers with
        the state's momentum (where it has any); `rates_from_scale`: their learning rates those
        of the state's lr_scale rather than the saved ones."""
        images = state.images.requires_grad_(True)
        lr = state.lr.requires_grad_(True)
        label_logits = state.label_logits.requires_grad_(True) if state.label_logits is not None else None
        optimizers = self._optimizers(images, lr, label_logits, state.lr_scale)
        if state.optimizer_states:
            for name, opt in optimizers.items():
                rates = [group["lr"] for group in opt.param_groups]
                opt.load_state_dict(state.optimizer_states[name])
                if rates_from_scale:
                    for group, rate in zip(opt.param_groups, rates):
                        group["lr"] = rate
        return images, lr, label_logits, optimizers

    def _optimizers(self, images, lr, label_logits, lr_scale: float) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        optimizers = {
            "images": torch.optim.SGD([images], lr=c.lr_img * lr_scale, momentum=c.img_momentum),
            "lr": torch.optim.SGD([lr], lr=c.lr_lr * lr_scale, momentum=c.lr_momentum),
        }
        if label_logits is not None:
            optimizers["labels"] = torch.optim.SGD([label_logits], lr=c.lr_label * lr_scale, momentum=c.label_momentum)
        return optimizers

    def _inner_steps(self, shape: torch.Size, rng: torch.Generator, dsa: DSA | None) -> list[InnerStep]:
        """Minibatches walk through fresh permutations of the set, each cut into batches (the last
        shorter when batch_syn does not divide the set, so no batch holds an image twice); each
        step its own DSA draw."""
        c = self.config
        n_images, height, width = shape[0], shape[2], shape[3]
        batch = min(c.batch_syn or n_images, n_images)
        chunks: list[torch.Tensor] = []
        steps = []
        for _ in range(c.syn_steps):
            if not chunks:
                chunks = list(torch.randperm(n_images, generator=rng).split(batch))
            idx = chunks.pop(0)
            aug = dsa.sample(idx.numel(), height, width, rng) if dsa is not None else None
            steps.append(InnerStep(batch=idx, augmentation=aug))
        return steps

    def _divergence_watch(self, state: MatchingState) -> DivergenceWatch:
        """The watch over this run, judging from `state` on (a checkpoint's carries its memory)."""
        c = self.config
        watch = DivergenceWatch(state.images, lr_floor=c.lr_init * c.min_lr_factor,
                                lr_ceiling=c.lr_init * c.max_lr_growth, max_image_scale=c.max_image_scale,
                                lr_floor_patience=c.lr_floor_patience, loss_window=c.loss_window,
                                max_loss_rise=c.max_loss_rise)
        if state.divergence_watch:
            watch.load_state_dict(state.divergence_watch)
        return watch

    def _rollback(self, ctx: DistillContext, last_good: MatchingState, current: MatchingState, it: int,
                  why: Divergence, watch: DivergenceWatch):
        """Return to the last good state with halved outer learning rates; give up after a few.

        The best validated set so far survives: it may have been scored after the checkpoint
        rolled back to, and it was a finite, validated set."""
        state = last_good.clone()
        state.best_val, state.best = current.best_val, copy.deepcopy(current.best)
        state.rollbacks = last_good.rollbacks + 1
        last_good.rollbacks = state.rollbacks
        state.lr_scale = last_good.lr_scale * 0.5
        last_good.lr_scale = state.lr_scale
        if state.rollbacks > self.config.max_rollbacks:
            raise DDToolError(
                f"Distillation diverged {state.rollbacks} times, the last at iteration {it + 1}: {why}. Stopping rather "
                f"than saving a broken set. To try: {watch.advice()} (--set key=value).")
        ctx.log(f"Iteration {it + 1}: {why}. Rolled back to iteration {last_good.iteration} and halved the outer "
                f"learning rates (rollback {state.rollbacks} of at most {self.config.max_rollbacks}).")
        # the saved state brings its momentum and the rates of its time, which may already be
        # halved once or more: the rates come from the scale, which counts every rollback
        images, lr, label_logits, optimizers = self._learnables(state, rates_from_scale=True)
        state.images, state.lr, state.label_logits = images, lr, label_logits
        return state, images, lr, label_logits, optimizers

    def _validate(self, ctx: DistillContext, state: MatchingState, relabel: Relabel | None) -> None:
        """Score the current set on the validation split; remember the best for saving."""
        data = ctx.data
        if data.val_x.shape[0] == 0:
            return
        score = None
        if distributed.is_main():  # few networks to train: rank 0 trains them, the others wait for the score
            protocol = get_protocol(self.default_protocol)
            images, targets = self.images_to_save(state), self._eval_targets(state, relabel)
            scores = [train_fresh_network(images, targets, data, protocol=protocol, lr=float(state.lr.detach()),
                                          arch=self.student_arch(), seed=derive_seed(ctx.seed, "validation",
                                                                                     state.iteration, *run),
                                          epochs=self.config.eval_epochs, held_out=(data.val_x, data.val_y))
                      # network 0 keeps the seed a single validation network always had
                      for run in [()] + [(n,) for n in range(1, self.config.eval_networks)]]
            score = sum(scores) / len(scores)
        score = distributed.broadcast_object(score)  # so every rank keeps the same best state
        ctx.log(f"Iteration {state.iteration}: validation accuracy {100 * score:.2f}%")
        if score > state.best_val:
            state.best_val = score
            state.best = {"iteration": state.iteration, "images": self.images_to_save(state).clone(),
                          "lr": state.lr.detach().clone(),
                          "label_logits": state.label_logits.detach().clone() if state.label_logits is not None else None}

    def _eval_targets(self, state: MatchingState, relabel: Relabel | None) -> torch.Tensor:
        labels, kind = self._labels(self.images_to_save(state), state.label_logits, state.hard_labels, relabel)
        return F.softmax(labels.detach() / self.config.soft_label_temperature, dim=1) if kind == "logits" else labels

    @staticmethod
    def _labels(images: torch.Tensor, label_logits: torch.Tensor | None, hard: torch.Tensor,
                relabel: Relabel | None) -> tuple[torch.Tensor, str]:
        """The labels a set of these images carries: learned logits, the experts' logits (TESLA),
        or the hard class ids; and their kind."""
        if label_logits is not None:
            return label_logits, "logits"
        if relabel is not None:
            return relabel(images), "logits"
        return hard, "hard"

    def _expert_labeller(self, experts: ExpertStore, forward: Forward, device: torch.device) -> Relabel:
        """TESLA's labels for the saved set. During matching each segment's target expert labels
        the images; a saved set needs one labelling, and its student must train on the labels the
        images were distilled for: the experts' mean logits at the last target epoch."""
        c = self.config
        epoch = self.start_epoch_range(c.iterations)[1] - 1 + c.match_span_epochs
        params = [experts.params(e, epoch).to(device) for e in range(experts.num_experts)]

        def relabel(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return torch.stack([forward(p, images) for p in params]).mean(dim=0)
        return relabel

    def _final_set(self, ctx: DistillContext, state: MatchingState, relabel: Relabel | None,
                   watch: DivergenceWatch) -> SyntheticSet:
        chosen = state.best if state.best is not None else {
            "iteration": state.iteration, "images": self.images_to_save(state), "lr": state.lr,
            "label_logits": state.label_logits}
        labels, kind = self._labels(chosen["images"], chosen["label_logits"], state.hard_labels, relabel)
        sset = self.make_set(ctx, chosen["images"], labels, label_kind=kind, learned_lr=float(chosen["lr"].detach()),
                             label_temperature=self.config.soft_label_temperature)
        sset.config["selected_iteration"] = chosen["iteration"]
        warnings = self._health_warnings(chosen["images"], float(chosen["lr"].detach()), watch)
        if warnings:
            # saved, since it is what the run made, but marked: `ddtool info` and evaluate show it
            sset.config["health_warnings"] = warnings
            for warning in warnings:
                ctx.log(f"WARNING: {warning}")
        return sset

    def _health_warnings(self, images: torch.Tensor, alpha: float, watch: DivergenceWatch) -> list[str]:
        """What is wrong with a set about to be saved, in words (none for a healthy set): the
        signs of divergence the loop checks, on the set itself."""
        warnings = []
        grown = watch.image_growth(images)
        if grown is not None:
            warnings.append(f"{grown}; the set is unlikely to train a network. To try: lower lr_img.")
        if alpha <= watch.lr_floor * (1 + 1e-6):
            warnings.append(f"the learned step size ends at its floor ({alpha:.3g}): the matching found no useful "
                            "step. To try: lower lr_img or lr_lr, or raise lr_init.")
        return warnings

def perturb_conv_weights(params: torch.Tensor, layout: ParamLayout, scale: float,
                         generator: torch.Generator) -> torch.Tensor:
    """AST's weight perturbation: each convolution weight tensor (4-d) of the start parameters
    gets Gaussian noise of `scale` times that tensor's own standard deviation."""
    perturbed = params.clone()
    views = layout.unflatten(perturbed)
    for name, shape in zip(layout.names, layout.shapes):
        if len(shape) == 4:
            weight = views[name]
            noise = torch.randn(weight.shape, generator=generator).to(weight)
            weight.add_(scale * weight.std() * noise)
    return perturbed


@register_method("mtt")
class MTT(TrajectoryMatching):
    presets = with_ipc_variants(TrajectoryMatching.presets, MTT_IPC_CHANGES)


@register_method("tesla")
class TESLA(TrajectoryMatching):
    """TESLA: constant-memory matching with the target expert's soft labels.

    The gradient is exact by default (bptt where its graph fits, else the adjoint sweep, whose
    memory is that of TESLA's rule); `backend="tesla"` reproduces the published first-order rule.
    """

    presets = {name: dataclasses.replace(cfg, labels="expert_soft")
               for name, cfg in TrajectoryMatching.presets.items()}

