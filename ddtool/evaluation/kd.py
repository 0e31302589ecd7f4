"""Knowledge-distillation evaluation: a student learns a teacher's soft labels on augmented views.

The protocol of SRe2L/CDA (docs/methods.md §7): every epoch each image of the set is seen as one
*view* (a random-resized crop, maybe flipped, maybe with a CutMix box of another image's
view pasted in) and the student is trained with KL(teacher/T || student/T) * T^2 toward the
teacher's logits on that same view. The teacher's logits come from one of two sources:

- stored (`StoredSoftLabels`): the relabel step ran the teacher on E epochs of views and
  kept, per view, its logits (float16) and the integer parameters that regenerate the view;
  the student replays them (epoch e uses stored epoch e mod E). This is what the published
  FKD-style relabelling saves to disk; it needs no teacher at evaluation time.
- live (`LiveTeacher`): views are drawn afresh each epoch and the teacher runs on them.

Both paths render an epoch's views and label them *before* handing (views, logits) to the
shared `train_epoch`, so the student sees exactly what was labelled and both modes train
identically. A view is a pure function of its parameters and of the set's images, so stored
views replay bit for bit on the device that recorded them.

The views' geometry (crop and CutMix boxes, the differentiable crop) is ddtool.augment.crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ddtool.augment.crops import cutmix_boxes, random_resized_crop_boxes, resized_crop
from ddtool.errors import ConfigError
from ddtool.evaluation.protocols import KDSettings, Protocol
from ddtool.networks import create_network
from ddtool.training import train_epoch, widened

# Names of the SyntheticSet.extras arrays that hold stored soft labels (docs/synthetic-set-format.md).
EXTRA_LOGITS = "kd_logits"  # float16 (E, N, K): the teacher's logits on view (epoch e, image i)
EXTRA_CROP = "kd_crop"  # int16 (E, N, 4): crop box (top, left, height, width) in pixels
EXTRA_FLIP = "kd_flip"  # uint8 (E, N): 1 = the crop is mirrored left-right
EXTRA_PARTNER = "kd_partner"  # int32 (E, N): CutMix only: the image whose view is pasted in
EXTRA_BOX = "kd_box"  # int16 (E, N, 4): CutMix only: pasted box (top, left, bottom, right)
VIEW_EXTRAS = (EXTRA_LOGITS, EXTRA_CROP, EXTRA_FLIP, EXTRA_PARTNER, EXTRA_BOX)

# Teacher forward passes label this many views at once (bounds memory, not results).
LABEL_BATCH = 512
# Live labelling renders and labels at most this many views at a time, so the whole-dataset
# reference does not hold a second copy of a large training split.
LIVE_CHUNK = 8192


@dataclass(frozen=True)
class Views:
    """One view per image: everything needed to render it again from the images.

    crop: int64 (n, 4) (top, left, height, width); flip: bool (n,);
    partner/box: CutMix (None when off): view `partner[i]` is pasted into view i over box[i]
    (top, left, bottom, right). Partners index the same n images.
    """

    crop: torch.Tensor
    flip: torch.Tensor
    partner: torch.Tensor | None = None
    box: torch.Tensor | None = None

    def render(self, images: torch.Tensor) -> torch.Tensor:
        views = resized_crop(images, self.crop, self.flip)
        if self.partner is None:
            return views
        _, _, height, width = images.shape
        box = self.box.to(images.device)
        rows = torch.arange(height, device=images.device).view(1, height, 1)
        cols = torch.arange(width, device=images.device).view(1, 1, width)
        inside = ((rows >= box[:, 0, None, None]) & (rows < box[:, 2, None, None])
                  & (cols >= box[:, 1, None, None]) & (cols < box[:, 3, None, None]))
        return torch.where(inside.unsqueeze(1), views[self.partner.to(images.device)], views)


def sample_views(n: int, height: int, width: int, settings: KDSettings, allow_flip: bool,
                 generator: torch.Generator) -> Views:
    """Draw one view per image under `settings` (on CPU, from `generator`). `allow_flip` is the
    dataset's DatasetSpec.flip: digits are never mirrored whatever the protocol says."""
    if settings.crop:
        crop = random_resized_crop_boxes(n, height, width, (settings.crop_scale_min, 1.0), generator)
    else:
        crop = torch.tensor([[0, 0, height, width]], dtype=torch.int64).expand(n, 4).clone()
    flip = torch.rand(n, generator=generator) < 0.5
    if not (settings.flip and allow_flip):
        flip = torch.zeros_like(flip)
    if not settings.cutmix:
        return Views(crop, flip)
    partner = torch.randperm(n, generator=generator)
    return Views(crop, flip, partner, cutmix_boxes(n, height, width, generator))


# ---------------------------------------------------------------------------- soft labels
@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: torch.Tensor, batch_size: int = LABEL_BATCH) -> torch.Tensor:
    """The teacher's logits in eval mode (running BatchNorm statistics), in batches."""
    teacher.eval()
    return torch.cat([teacher(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])


@dataclass(frozen=True)
class LiveTeacher:
    """The teacher runs during evaluation, on views drawn afresh every epoch."""

    network: nn.Module
    mode = "live"

    def to(self, device: torch.device | str) -> "LiveTeacher":
        return LiveTeacher(self.network.to(device))


@dataclass(frozen=True)
class StoredSoftLabels:
    """E epochs of recorded views of N images and the teacher's logits on each."""

    logits: torch.Tensor  # float16 (E, N, K)
    crop: torch.Tensor  # int (E, N, 4)
    flip: torch.Tensor  # bool (E, N)
    partner: torch.Tensor | None = None  # int (E, N)
    box: torch.Tensor | None = None  # int (E, N, 4)
    mode = "stored"

    @property
    def epochs(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.logits.shape[1])

    def views(self, epoch: int) -> Views:
        pick = (lambda t: None if t is None else t[epoch].to(torch.int64))
        return Views(pick(self.crop), self.flip[epoch].bool(), pick(self.partner), pick(self.box))

    def to(self, device: torch.device | str) -> "StoredSoftLabels":
        move = (lambda t: None if t is None else t.to(device))
        return StoredSoftLabels(move(self.logits), move(self.crop), move(self.flip), move(self.partner),
                                move(self.box))

    def to_extras(self) -> dict[str, np.ndarray]:
        """Compact arrays for SyntheticSet.extras (integers fit int16: images under 32768 px)."""
        extras = {EXTRA_LOGITS: self.logits.cpu().to(torch.float16).numpy(),
                  EXTRA_CROP: self.crop.cpu().numpy().astype(np.int16),
                  EXTRA_FLIP: self.flip.cpu().numpy().astype(np.uint8)}
        if self.partner is not None:
            extras[EXTRA_PARTNER] = self.partner.cpu().numpy().astype(np.int32)
            extras[EXTRA_BOX] = self.box.cpu().numpy().astype(np.int16)
        return extras

    @classmethod
    def from_extras(cls, extras: dict[str, np.ndarray]) -> "StoredSoftLabels | None":
        """The stored labels of a set, or None when it has none. ConfigError if they are
        incomplete or their shapes disagree."""
        if EXTRA_LOGITS not in extras:
            return None
        missing = [k for k in (EXTRA_CROP, EXTRA_FLIP) if k not in extras]
        if (EXTRA_PARTNER in extras) != (EXTRA_BOX in extras):
            missing.append(EXTRA_BOX if EXTRA_PARTNER in extras else EXTRA_PARTNER)
        if missing:
            raise ConfigError(f"The set's stored soft labels lack {', '.join(missing)}; relabel the set.")
        logits = torch.from_numpy(np.asarray(extras[EXTRA_LOGITS]))
        crop = torch.from_numpy(np.asarray(extras[EXTRA_CROP]).astype(np.int64))
        flip = torch.from_numpy(np.asarray(extras[EXTRA_FLIP]).astype(bool))
        partner = box = None
        if EXTRA_PARTNER in extras:
            partner = torch.from_numpy(np.asarray(extras[EXTRA_PARTNER]).astype(np.int64))
            box = torch.from_numpy(np.asarray(extras[EXTRA_BOX]).astype(np.int64))
        e, n = logits.shape[:2] if logits.dim() == 3 else (0, 0)
        shapes_ok = (logits.dim() == 3 and tuple(crop.shape) == (e, n, 4) and tuple(flip.shape) == (e, n)
                     and (partner is None or (tuple(partner.shape) == (e, n) and tuple(box.shape) == (e, n, 4))))
        if not shapes_ok or e == 0:
            raise ConfigError("The set's stored soft labels have inconsistent shapes; relabel the set.")
        return cls(logits, crop, flip, partner, box)


LabelSource = Union[LiveTeacher, StoredSoftLabels]


def record_soft_labels(teacher: nn.Module, images: torch.Tensor, *, epochs: int, settings: KDSettings,
                       allow_flip: bool, generator: torch.Generator) -> StoredSoftLabels:
    """Relabel: draw `epochs` epochs of views of `images` and store the teacher's logits on each."""
    if epochs < 1:
        raise ConfigError(f"Soft labels need at least one epoch of views, not {epochs}.")
    n, _, height, width = images.shape
    drawn = [sample_views(n, height, width, settings, allow_flip, generator) for _ in range(epochs)]
    logits = torch.stack([teacher_logits(teacher, v.render(images)).to(torch.float16).cpu() for v in drawn])
    stack = (lambda name: None if getattr(drawn[0], name) is None else torch.stack([getattr(v, name) for v in drawn]))
    return StoredSoftLabels(logits, stack("crop"), stack("flip"), stack("partner"), stack("box"))


def matched_labels(teacher: LiveTeacher, images: torch.Tensor, like: LabelSource, *, settings: KDSettings,
                   allow_flip: bool, generator: torch.Generator) -> LabelSource:
    """Labels for other images (the random baseline's) in the same mode as `like`: live, or
    stored for the same number of epochs of views."""
    if isinstance(like, LiveTeacher):
        return teacher
    return record_soft_labels(teacher.network, images, epochs=like.epochs, settings=settings,
                              allow_flip=allow_flip, generator=generator)


# ---------------------------------------------------------------------------- teachers in sets
def teacher_network(record: dict, *, channels: int, num_classes: int, image_size: int,
                    device: torch.device | str = "cpu") -> nn.Module:
    """The network of a SyntheticSet.teacher record, frozen, in eval mode."""
    net = create_network(record["arch"], channels=channels, num_classes=num_classes, image_size=image_size,
                         **record["options"])
    net.load_state_dict(record["state"])
    return net.to(device).eval().requires_grad_(False)


def set_teacher(sset, device: torch.device | str) -> LiveTeacher | None:
    """The teacher a set carries, ready to run, or None."""
    if sset.teacher is None:
        return None
    channels, image_size, _ = sset.image_shape
    return LiveTeacher(teacher_network(sset.teacher, channels=channels, num_classes=sset.num_classes,
                                       image_size=image_size, device=device))


def set_label_source(sset, device: torch.device | str) -> LabelSource:
    """Where a set's soft labels come from: its stored views if it has them, else its teacher."""
    stored = StoredSoftLabels.from_extras(sset.extras)
    if stored is not None:
        if stored.num_images != sset.num_images:
            raise ConfigError(f"The set has {sset.num_images} images but soft labels for {stored.num_images}.")
        return stored.to(device)
    teacher = set_teacher(sset, device)
    if teacher is None:
        raise ConfigError(
            f"This {sset.method} set has neither stored soft labels nor a teacher, so it cannot be "
            "evaluated under a knowledge-distillation protocol; choose another protocol (e.g. classic).")
    return teacher


# ---------------------------------------------------------------------------- the student
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch.

    The T^2 factor keeps the gradient's size independent of T (Hinton et al.)."""
    t = float(temperature)
    # float32 even when the student's forward pass ran under bf16 autocast
    return F.kl_div(F.log_softmax(widened(student_logits) / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


def _optimizer(student: nn.Module, protocol: Protocol, lr: float) -> torch.optim.Optimizer:
    if protocol.kd.optimizer == "adamw":
        return torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=protocol.weight_decay)
    return torch.optim.SGD(student.parameters(), lr=lr, momentum=protocol.momentum,
                           weight_decay=protocol.weight_decay)


def epoch_lr(protocol: Protocol, lr: float, epoch: int, epochs: int) -> float:
    """The lr of `epoch` (0-based): cosine from lr towards 0, or step decay at lr_decay_at."""
    if protocol.kd.schedule == "cosine":
        return 0.5 * lr * (1.0 + math.cos(math.pi * epoch / epochs))
    return lr * (protocol.lr_decay if epoch >= int(round(protocol.lr_decay_at * epochs)) else 1.0)


def fit_student(student: nn.Module, images: torch.Tensor, labels: LabelSource, *, protocol: Protocol, lr: float,
                epochs: int, batch_size: int, seed_generator: Callable[[str], torch.Generator], allow_flip: bool,
                on_epoch: Callable[[], None] | None = None) -> None:
    """Train `student` for `epochs` epochs on views of `images` toward the soft labels.

    seed_generator(name) gives the run's derived generators ("batches": minibatch order,
    "views": live views), so one run seed fixes everything.
    """
    settings = protocol.kd
    if settings is None:
        raise ConfigError(f"Protocol {protocol.name!r} is not a knowledge-distillation protocol.")
    if isinstance(labels, StoredSoftLabels) and labels.num_images != images.shape[0]:
        raise ConfigError(f"{images.shape[0]} images but stored soft labels for {labels.num_images}.")
    optimizer = _optimizer(student, protocol, lr)
    batches, view_gen = seed_generator("batches"), seed_generator("views")
    n, _, height, width = images.shape

    def loss_fn(model: nn.Module, x: torch.Tensor, target_logits: torch.Tensor):
        logits = model(x)
        return kd_loss(logits, target_logits, settings.temperature), logits

    for epoch in range(epochs):
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr(protocol, lr, epoch, epochs)
        if isinstance(labels, StoredSoftLabels):
            stored_epoch = epoch % labels.epochs
            views = labels.views(stored_epoch).render(images)
            train_epoch(student, views, labels.logits[stored_epoch].float(), optimizer=optimizer,
                        batch_size=batch_size, generator=batches, loss_fn=loss_fn, precision=protocol.precision)
        else:
            # A random split into chunks; each chunk's views are drawn, labelled, then trained on.
            order = torch.randperm(n, generator=view_gen).to(images.device)
            for chunk in order.split(LIVE_CHUNK):
                drawn = sample_views(chunk.numel(), height, width, settings, allow_flip, view_gen)
                views = drawn.render(images[chunk])
                train_epoch(student, views, teacher_logits(labels.network, views), optimizer=optimizer,
                            batch_size=batch_size, generator=batches, loss_fn=loss_fn, precision=protocol.precision)
        if on_epoch is not None:
            on_epoch()
