"""SRe2L and CDA: squeeze a BatchNorm teacher, recover images from it, relabel them with it.
Their settings and presets: methods/curriculum_config.py.

docs/methods.md §7. Squeeze (ddtool.methods.teacher): a BatchNorm network trained on the real
training split. Recover: images start as noise in network space and are optimised with Adam
so that the frozen teacher (eval mode) classifies random-resized crops of them as their
class while the batch statistics at every BatchNorm layer match the layer's running
statistics. Relabel (ddtool.evaluation.kd): the teacher's soft labels on augmented views,
stored with the set or produced live at evaluation.

CDA (curriculum data augmentation) is SRe2L with a scheduled lower bound of the crop's area
fraction: from `crop_scale_start` (1.0: whole images, easy) down to `crop_scale_end` (0.08:
small local crops, hard) over the first `milestone` of the iterations, then flat. SRe2L keeps
it at crop_scale_end throughout ("constant").

Batches: "mixed" (published) makes each batch one image of every class (ipc batches; with
classes_per_batch, the classes are split into chunks of that many); "classwise" makes each
batch the ipc images of one class. Batches are independent problems (their images only meet
in a BatchNorm statistic of their own batch), so several are stacked into one forward pass
(`parallel_batches`) with per-batch statistics and per-batch random draws; that gives the
same optimisation as running them one after the other, only faster.

Reproducibility: every batch draws its noise and its augmentation from its own generator
derived from (seed, batch index), so a seed repeats a CPU run bit for bit, and a resumed run
(checkpoints hold the generators' states) continues exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ddtool.data import Preprocessing
from ddtool.errors import ConfigError, DDToolError
from ddtool.augment.crops import random_resized_crop_boxes, resized_crop
from ddtool.evaluation.kd import record_soft_labels
from ddtool.evaluation.protocols import get_protocol
from ddtool.methods.base import DistillContext, Method, register_method
from ddtool.methods.curriculum_config import (
    CDA_CURRICULUM, CROP_SCHEDULES, FASHION_CPU, FASHION_GPU, IMAGENET, TINY_IMAGENET, CurriculumConfig,
)
from ddtool.durations import format_duration, format_step
from ddtool.methods.teacher import (TrainedNetwork, batch_norm_layers, real_training_estimate,
                                     require_batch_norm, squeeze, untrained_network)
from ddtool.seeding import generator
from ddtool.storage import SyntheticSet
from ddtool.files import save_torch

CHECKPOINT_NAME = "recover.pt"


# ---------------------------------------------------------------------------- the curriculum
def crop_scale_lower_bound(iteration: int, iterations: int, *, schedule: str, start: float = 1.0,
                           end: float = 0.08, milestone: float = 1.0) -> float:
    """The random-resized crop's lower area bound at `iteration` (0-based) of `iterations`.

    constant: `end` throughout (SRe2L). step: `start` before milestone * iterations, then `end`.
    linear / cosine: from `start` at iteration 0 to `end` at milestone * iterations, then flat.
    """
    if schedule == "constant":
        return end
    span = milestone * iterations
    if iteration >= span:
        return end
    progress = iteration / span
    if schedule == "step":
        return start
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"Unknown crop schedule {schedule!r}; choose one of {', '.join(CROP_SCHEDULES)}.")


# ---------------------------------------------------------------------------- the loss
class BatchNormMatching:
    """Forward hooks on every BatchNorm layer of a frozen teacher that measure, per batch,
    ||mu_l(x) - running_mean_l||_2 + ||var_l(x) - running_var_l||_2 over the layer's input.

    Statistics are per channel over (images of the batch, positions), with the biased
    variance (the one BatchNorm normalises with). Several batches may share one forward pass:
    `batch_of` says which batch each image belongs to. Use as a context manager (the hooks
    are removed on exit); `distances()` returns the weighted sum over layers per batch, the
    first layer weighted by `first_multiplier`, and forgets the pass.
    """

    def __init__(self, teacher: nn.Module, first_multiplier: float = 10.0):
        self.layers = batch_norm_layers(teacher)
        if not self.layers:
            raise ConfigError("The teacher has no BatchNorm layers to match.")
        self.weights = [first_multiplier] + [1.0] * (len(self.layers) - 1)
        self.batch_of: torch.Tensor | None = None
        self.num_batches = 1
        self._per_layer: list[torch.Tensor] = []
        self._handles: list = []

    def __enter__(self) -> "BatchNormMatching":
        self._handles = [layer.register_forward_hook(self._measure) for layer in self.layers]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def set_batches(self, batch_of: torch.Tensor, num_batches: int) -> None:
        self.batch_of, self.num_batches = batch_of, num_batches

    def _measure(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0]
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)
        batch_of = self.batch_of if self.batch_of is not None else torch.zeros(n, dtype=torch.long)
        batch_of = batch_of.to(x.device)
        counts = torch.bincount(batch_of, minlength=self.num_batches).to(x.dtype) * x.shape[2]
        sums = x.new_zeros(self.num_batches, c).index_add_(0, batch_of, x.sum(dim=2))
        mean = sums / counts[:, None]
        centred = x - mean[batch_of][:, :, None]
        var = x.new_zeros(self.num_batches, c).index_add_(0, batch_of, centred.square().sum(dim=2)) / counts[:, None]
        self._per_layer.append(torch.linalg.vector_norm(mean - module.running_mean, dim=1)
                               + torch.linalg.vector_norm(var - module.running_var, dim=1))

    def distances(self) -> torch.Tensor:
        """(num_batches,) sum over layers of the weighted distances of the last forward pass."""
        if len(self._per_layer) != len(self.layers):
            raise RuntimeError(f"expected one measurement per BatchNorm layer ({len(self.layers)}), "
                               f"got {len(self._per_layer)}: run exactly one forward pass first")
        total = sum(w * d for w, d in zip(self.weights, self._per_layer))
        self._per_layer = []
        return total


def pixel_range_clamp_(x: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Clamp network-space images in place to what [0, 1] pixels map to: per channel
    [(0 - mean) / std, (1 - mean) / std]; with ZCA (no per-channel box), a round trip
    through pixel space (invert clamps to [0, 1])."""
    with torch.no_grad():
        if preprocessing.zca is None:
            mean = torch.tensor(preprocessing.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(preprocessing.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x.copy_(torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std))
        else:
            x.copy_(preprocessing.apply(preprocessing.invert(x)))
    return x


def roll_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circular shift of each image by its own (dy, dx) pixels (torch.roll per image), differentiable."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] - dy.to(x.device)[:, None]) % h
    cols = (torch.arange(w, device=x.device)[None, :] - dx.to(x.device)[:, None]) % w
    x = x.gather(2, rows[:, None, :, None].expand(n, c, h, w))
    return x.gather(3, cols[:, None, None, :].expand(n, c, h, w))


# ---------------------------------------------------------------------------- recover
def recover_batches(num_classes: int, ipc: int, batching: str, classes_per_batch: int = 0) -> list[torch.Tensor]:
    """The class of each image of each recover batch (lists of int64 tensors)."""
    if batching == "classwise":
        return [torch.full((ipc,), c, dtype=torch.long) for c in range(num_classes)]
    chunk = classes_per_batch or num_classes
    classes = torch.arange(num_classes)
    return [part.clone() for _ in range(ipc) for part in classes.split(chunk)]


def recover_rounds(num_batches: int, parallel_batches: int) -> list[list[int]]:
    """The batch indices recovered together in each round (parallel_batches 0: all at once)."""
    per_round = parallel_batches or num_batches
    return [list(range(i, min(i + per_round, num_batches))) for i in range(0, num_batches, per_round)]


def round_inputs(batches: list[torch.Tensor], members: list[int]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """A round's (images per batch, class of each image, batch of each image)."""
    sizes = [batches[b].numel() for b in members]
    labels = torch.cat([batches[b] for b in members])
    return sizes, labels, torch.repeat_interleave(torch.arange(len(members)), torch.tensor(sizes))


@dataclass
class RecoverState:
    """The round of batches being recovered; a checkpoint is this plus the finished rounds."""

    round: int
    iteration: int  # iterations completed in this round
    images: torch.Tensor  # the round's images (leaf, network space)
    optimizer: dict  # Adam's state_dict ({} before the first step)
    generators: list[torch.Tensor]  # each batch's generator state


class Recover:
    """The recover step over all batches, round by round (`parallel_batches` batches at a time)."""

    def __init__(self, teacher: nn.Module, config: CurriculumConfig, preprocessing: Preprocessing, *,
                 image_shape: tuple[int, int, int], allow_flip: bool, device: torch.device):
        self.teacher = teacher
        self.config = config
        self.preprocessing = preprocessing
        self.image_shape = image_shape
        self.allow_flip = allow_flip
        self.device = device

    def lr_at(self, iteration: int) -> float:
        return 0.5 * self.config.lr * (1.0 + math.cos(math.pi * iteration / self.config.iterations))

    def crop_bound_at(self, iteration: int) -> float:
        c = self.config
        return crop_scale_lower_bound(iteration, c.iterations, schedule=c.crop_schedule, start=c.crop_scale_start,
                                      end=c.crop_scale_end, milestone=c.milestone)

    def initial_images(self, generators: list[torch.Generator], sizes: list[int]) -> torch.Tensor:
        noise = [torch.randn(n, *self.image_shape, generator=g) for g, n in zip(generators, sizes)]
        return pixel_range_clamp_(torch.cat(noise).to(self.device), self.preprocessing).requires_grad_(True)

    def make_optimizer(self, images: torch.Tensor) -> torch.optim.Adam:
        return torch.optim.Adam([images], lr=self.config.lr, betas=(self.config.beta1, self.config.beta2))

    def augment(self, images: torch.Tensor, generators: list[torch.Generator], sizes: list[int],
                crop_min: float) -> torch.Tensor:
        """Per batch: one random roll; per image: a random-resized crop (area in [crop_min, 1])
        and a flip (drawn always, applied only where the dataset allows it)."""
        _, h, w = self.image_shape
        max_dy, max_dx = round(self.config.roll_fraction * h), round(self.config.roll_fraction * w)
        dy, dx, boxes, flips = [], [], [], []
        for g, n in zip(generators, sizes):
            dy.append(torch.randint(-max_dy, max_dy + 1, (1,), generator=g).expand(n))
            dx.append(torch.randint(-max_dx, max_dx + 1, (1,), generator=g).expand(n))
            boxes.append(random_resized_crop_boxes(n, h, w, (crop_min, 1.0), g))
            flips.append(torch.rand(n, generator=g) < 0.5)
        flip = torch.cat(flips) if self.allow_flip else None
        rolled = roll_images(images, torch.cat(dy), torch.cat(dx))
        return resized_crop(rolled, torch.cat(boxes), flip)

    def run_round(self, state: RecoverState, labels: torch.Tensor, batch_of: torch.Tensor, sizes: list[int],
                  generators: list[torch.Generator], *, save, progress: bool,
                  log: Callable[[str], None] = print) -> torch.Tensor:
        c = self.config
        images = state.images
        optimizer = self.make_optimizer(images)
        if state.optimizer:
            optimizer.load_state_dict(state.optimizer)
        labels, batch_of = labels.to(self.device), batch_of.to(self.device)
        num_batches = len(sizes)
        counts = torch.tensor(sizes, dtype=torch.float32, device=self.device)
        with BatchNormMatching(self.teacher, c.first_bn_multiplier) as matching, \
                tqdm(total=c.iterations, initial=state.iteration, desc=f"recover round {state.round + 1}",
                     disable=not progress, leave=False) as bar:
            matching.set_batches(batch_of, num_batches)
            for it in range(state.iteration, c.iterations):
                for group in optimizer.param_groups:
                    group["lr"] = self.lr_at(it)
                views = self.augment(images, generators, sizes, self.crop_bound_at(it))
                logits = self.teacher(views)
                ce = torch.zeros(num_batches, device=self.device).index_add_(
                    0, batch_of, F.cross_entropy(logits, labels, reduction="none")) / counts
                bn = matching.distances()
                # Batches are independent: the sum's gradient for a batch's images is its own loss's.
                loss = (ce + c.r_bn * bn).sum()
                if not torch.isfinite(loss):
                    raise DDToolError(f"The recover loss became {float(loss)} at iteration {it + 1}; lower lr "
                                      f"(now {c.lr}) or r_bn (now {c.r_bn}).")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                pixel_range_clamp_(images, self.preprocessing)
                bar.update(1)
                if it + 1 == c.iterations:
                    hits = (logits.argmax(dim=1) == labels).float().mean()
                    log(f"recover round {state.round + 1}, last iteration: CE {ce.mean().item():.3f}, BN distance "
                        f"{bn.mean().item():.3f} per batch, teacher right on {hits.item():.0%} of the views")
                if (it + 1) % c.checkpoint_every == 0 and it + 1 < c.iterations:
                    state.iteration, state.optimizer = it + 1, optimizer.state_dict()
                    state.generators = [g.get_state() for g in generators]
                    save(state)
        return images.detach()


def _checkpoint_identity(config: CurriculumConfig, ctx: DistillContext) -> dict:
    return {"config": dataclasses.asdict(config), "ipc": ctx.ipc, "seed": ctx.seed, "dataset": ctx.data.spec.name}


# ---------------------------------------------------------------------------- the methods


@register_method("sre2l")
class SRe2L(Method):
    """Squeeze, recover, relabel (Yin et al. 2023)."""

    config_class = CurriculumConfig
    default_protocol = "kd"
    makes_teacher = True

    @property
    def teacher_labels_live(self) -> bool:
        return self.config.relabel == "live"

    def student_arch(self) -> str:
        return self.config.student
    default_preset = "fashion-cpu"
    presets = {
        "fashion-cpu": FASHION_CPU,
        "fashion-gpu": FASHION_GPU,
        "imagenet": CurriculumConfig(iterations=1000, **IMAGENET),
        "tiny": CurriculumConfig(**TINY_IMAGENET),
    }
    # The crop schedules a method name stands for (a scheduled one is CDA, not SRe2L).
    schedules: ClassVar[tuple[str, ...]] = ("constant",)
    draws_real_images = False  # recovered from noise
    checkpoint_name = CHECKPOINT_NAME

    def __init__(self, config: CurriculumConfig):
        super().__init__(config)
        if config.crop_schedule not in self.schedules:
            raise ConfigError(f"Method {self.name!r} uses crop_schedule {' or '.join(self.schedules)}, not "
                              f"{config.crop_schedule!r} (a scheduled crop bound is CDA: --method cda).")

    def plan(self, ctx: DistillContext) -> list[str]:
        c, data = self.config, ctx.data
        batches = recover_batches(data.spec.num_classes, ctx.ipc, c.batching, c.classes_per_batch)
        rounds = recover_rounds(len(batches), c.parallel_batches)
        protocol = get_protocol(c.relabel_protocol)
        epochs = c.relabel_epochs or protocol.epochs
        n = ctx.ipc * data.spec.num_classes
        bound = (f"crop lower bound {c.crop_scale_end}" if c.crop_schedule == "constant" else
                 f"crop lower bound {c.crop_scale_start} -> {c.crop_scale_end} ({c.crop_schedule}, "
                 f"milestone {c.milestone})")
        per_iteration, per_relabel_epoch = self.time_phases(ctx)  # first: it refuses a teacher without BatchNorm
        teacher_seconds = real_training_estimate(data, c.teacher_recipe(), cache="teachers")
        # an iteration costs about its images: later rounds may be smaller than the first, timed one
        recover_seconds = per_iteration * c.iterations * n / sum(batches[b].numel() for b in rounds[0])
        return [
            f"{self.name}: {ctx.ipc} image{'s' if ctx.ipc != 1 else ''} per class of {data.spec.name}",
            f"squeeze: {c.teacher_arch} teacher, {c.teacher_epochs} epochs on {data.train_x.shape[0]} training images, "
            + ("found in the cache" if teacher_seconds is None else
               f"about {format_duration(teacher_seconds)} (timed here; cached for later runs)"),
            f"recover: {len(batches)} {c.batching} batches in {len(rounds)} round{'s' if len(rounds) != 1 else ''} "
            f"x {c.iterations} iterations, {bound}: about {format_duration(recover_seconds)} "
            f"({format_step(per_iteration)} an iteration, timed here)",
            "relabel: " + (f"teacher logits on {epochs} epochs x {n} views ({c.relabel_protocol} views), stored in "
                           f"the set: about {format_duration(per_relabel_epoch * epochs)}" if c.relabel == "stored" else
                           "the teacher is saved with the set and runs live at evaluation"),
        ]

    def time_phases(self, ctx: DistillContext, steps: int = 3) -> tuple[float, float]:
        """Seconds (an iteration of the first recover round, an epoch of relabel views) should
        take on this device: `steps` iterations after a warm-up one, and one epoch of views,
        against an untrained stand-in of the teacher (as fast as the trained one), so a plan
        can say them before the teacher exists."""
        c, data = self.config, ctx.data
        spec = data.spec
        teacher = untrained_network(data, c.teacher_recipe()).to(ctx.device).eval().requires_grad_(False)
        require_batch_norm(teacher, c.teacher_arch)
        batches = recover_batches(spec.num_classes, ctx.ipc, c.batching, c.classes_per_batch)
        members = recover_rounds(len(batches), c.parallel_batches)[0]
        sizes, labels, batch_of = round_inputs(batches, members)

        def recover_for(iterations: int) -> float:
            timing = dataclasses.replace(c, iterations=iterations, checkpoint_every=iterations)
            recover = Recover(teacher, timing, data.preprocessing, image_shape=tuple(data.train_x.shape[1:]),
                              allow_flip=spec.flip, device=ctx.device)
            generators = [generator(ctx.seed, "timing", b) for b in members]
            state = RecoverState(round=0, iteration=0, images=recover.initial_images(generators, sizes),
                                 optimizer={}, generators=[])
            began = time.perf_counter()
            images = recover.run_round(state, labels, batch_of, sizes, generators, save=lambda state: None,
                                       progress=False, log=lambda message: None)
            float(images[0, 0, 0, 0])  # waits for the device
            return time.perf_counter() - began

        recover_for(1)  # warm-up: first calls allocate and pick kernels
        per_iteration = recover_for(steps) / steps
        if c.relabel != "stored":
            return per_iteration, 0.0
        images = torch.randn(ctx.ipc * spec.num_classes, *data.train_x.shape[1:],
                             generator=generator(ctx.seed, "timing")).to(ctx.device)
        began = time.perf_counter()
        record_soft_labels(teacher, images, epochs=1, settings=get_protocol(c.relabel_protocol).kd,
                           allow_flip=spec.flip, generator=generator(ctx.seed, "timing"))  # ends on the CPU
        return per_iteration, time.perf_counter() - began

    def distill(self, ctx: DistillContext) -> SyntheticSet:
        c, data = self.config, ctx.data
        teacher = squeeze(data, c.teacher_recipe(), progress=ctx.progress, log=ctx.log)
        teacher.network.to(ctx.device)
        images, labels = self.recover(ctx, teacher)
        order = torch.argsort(labels, stable=True)  # class-major, as every ddtool set
        images, labels = images[order], labels[order]
        extras: dict = {}
        if c.relabel == "stored":
            protocol = get_protocol(c.relabel_protocol)
            stored = record_soft_labels(teacher.network, images.to(ctx.device),
                                        epochs=c.relabel_epochs or protocol.epochs, settings=protocol.kd,
                                        allow_flip=data.spec.flip, generator=generator(ctx.seed, "relabel"))
            extras = stored.to_extras()
        sset = self.make_set(ctx, images, labels, extras=extras, teacher=teacher.record())
        sset.config["teacher_test_accuracy"] = teacher.test_accuracy
        sset.config["teacher_cache_key"] = teacher.cache_key
        sset.config["teacher_train_seconds"] = teacher.train_seconds
        return sset

    def recover(self, ctx: DistillContext, teacher: TrainedNetwork) -> tuple[torch.Tensor, torch.Tensor]:
        """All batches, recovered round by round; (images, labels) on CPU in batch order."""
        c, data = self.config, ctx.data
        spec = data.spec
        batches = recover_batches(spec.num_classes, ctx.ipc, c.batching, c.classes_per_batch)
        rounds = recover_rounds(len(batches), c.parallel_batches)
        recover = Recover(teacher.network, c, data.preprocessing, image_shape=tuple(data.train_x.shape[1:]),
                          allow_flip=spec.flip, device=ctx.device)
        checkpoint = ctx.work_dir / CHECKPOINT_NAME
        identity = _checkpoint_identity(c, ctx)
        done, current = self._resume(ctx, checkpoint, identity)

        def save(state: RecoverState | None) -> None:
            current = None if state is None else {
                "round": state.round, "iteration": state.iteration, "images": state.images.detach().cpu(),
                "optimizer": state.optimizer, "generators": state.generators}
            save_torch({"identity": identity, "done": done, "current": current}, checkpoint)

        for r in range(len(done), len(rounds)):
            members = rounds[r]
            sizes, labels, batch_of = round_inputs(batches, members)
            generators = [generator(ctx.seed, "recover-batch", b) for b in members]
            if current is not None and current.round == r:  # resuming inside this round
                for g, saved in zip(generators, current.generators):
                    g.set_state(saved)
                current.images = current.images.to(ctx.device).requires_grad_(True)
            else:
                current = RecoverState(round=r, iteration=0, images=recover.initial_images(generators, sizes),
                                       optimizer={}, generators=[])
            images = recover.run_round(current, labels, batch_of, sizes, generators, save=save,
                                       progress=ctx.progress, log=ctx.log)
            done.append(images.cpu())
            current = None
            save(None)
        labels = torch.cat([batches[b] for members in rounds for b in members])
        return torch.cat(done), labels

    def _resume(self, ctx: DistillContext, checkpoint, identity: dict) -> tuple[list[torch.Tensor],
                                                                                RecoverState | None]:
        """(images of finished rounds, the round in progress) from the checkpoint when resuming."""
        if not (ctx.resume and checkpoint.exists()):
            return [], None
        saved = torch.load(checkpoint, map_location="cpu")
        if saved.get("identity") != identity:
            raise DDToolError(f"The checkpoint {checkpoint} belongs to another configuration, IPC, seed or "
                              "dataset; start without --resume or use another work folder.")
        current = saved["current"]
        ctx.log(f"Resuming recover after {len(saved['done'])} finished round(s)"
                + (f", at iteration {current['iteration']} of the next." if current else "."))
        return saved["done"], None if current is None else RecoverState(**current)


@register_method("cda")
class CDA(SRe2L):
    """SRe2L with a curriculum on the crop's lower area bound (Yin & Shen 2023)."""

    presets = {
        "fashion-cpu": dataclasses.replace(FASHION_CPU, **CDA_CURRICULUM),
        "fashion-gpu": dataclasses.replace(FASHION_GPU, **CDA_CURRICULUM),
        "imagenet": CurriculumConfig(iterations=4000, **IMAGENET, **CDA_CURRICULUM),
        "tiny": CurriculumConfig(**TINY_IMAGENET, **CDA_CURRICULUM),
    }
    schedules = ("step", "linear", "cosine")
