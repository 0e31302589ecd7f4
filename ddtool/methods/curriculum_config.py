"""SRe2L's and CDA's configuration: one typed dataclass, checked once when it is made, and the
named presets (Fashion-MNIST for a CPU and a GPU; the published ImageNet-1K and Tiny ImageNet
settings as far as they translate)."""

from __future__ import annotations

from dataclasses import dataclass

from ddtool.errors import ConfigError
from ddtool.evaluation.protocols import get_protocol
from ddtool.methods.base import require_finite
from ddtool.methods.settings import setting
from ddtool.methods.teacher import RealTrainingRecipe
from ddtool.networks import network_options

CROP_SCHEDULES = ("constant", "step", "linear", "cosine")
BATCHINGS = ("mixed", "classwise")
RELABEL_MODES = ("stored", "live")


@dataclass(frozen=True)
class CurriculumConfig:
    # Squeeze: the BatchNorm teacher (trained once per configuration, then cached).
    teacher_arch: str = setting("convnet-bn", "the BatchNorm teacher network, squeezed from the real training split")
    teacher_width: int = setting(128, "the teacher's width, for networks with a width option (the convnet family); "
                                      "else ignored")
    teacher_epochs: int = setting(10, "epochs the teacher trains on the real training split")
    teacher_lr: float = setting(0.01, "the teacher's learning rate")
    teacher_weight_decay: float = setting(5e-4, "the teacher's weight decay")
    teacher_batch_size: int = setting(256, "the teacher's minibatch size")
    teacher_augment: bool = setting(False, "random-resized crop + flip while training the teacher")
    teacher_seed: int = setting(0, "which teacher: the teacher is shared by runs of any seed, this picks it")
    student: str = setting("convnet", "the network evaluation trains on the set by default ('name:key=value' form)")
    # Recover.
    iterations: int = setting(1000, "recover iterations (Adam, cosine to 0 over them)")
    lr: float = setting(0.25, "the images' Adam learning rate in recover (cosine to 0 over the iterations)")
    beta1: float = setting(0.5, "recover's Adam beta1")
    beta2: float = setting(0.9, "recover's Adam beta2")
    r_bn: float = setting(0.01, "weight of the BatchNorm statistics term")
    first_bn_multiplier: float = setting(10.0, "extra weight of the first BatchNorm layer")
    crop_schedule: str = setting("constant", "the crop's lower area bound over recover: constant (SRe2L) | step | "
                                             "linear | cosine (CDA)")
    crop_scale_start: float = setting(1.0, "CDA: the crop's lower area bound at iteration 0")
    crop_scale_end: float = setting(0.08, "the crop's lower area bound after milestone × iterations (SRe2L: always)")
    milestone: float = setting(1.0, "fraction of the iterations over which the crop's bound decreases")
    roll_fraction: float = setting(0.125, "random circular shift of up to this fraction of the side, per batch")
    batching: str = setting("mixed", "mixed: one image of every class per batch | classwise")
    classes_per_batch: int = setting(0, "mixed batches: classes per batch (0: all)")
    parallel_batches: int = setting(0, "batches optimised in one forward pass (0: all)")
    checkpoint_every: int = setting(100, "recover iterations between checkpoints (what --resume continues from)")
    # Relabel.
    relabel: str = setting("stored", "stored: per-view teacher logits in the file | live: the teacher runs at "
                                     "evaluation")
    relabel_protocol: str = setting("kd", "the KD protocol whose views (crop, flip, CutMix) are stored")
    relabel_epochs: int = setting(0, "epochs of stored views (0: the protocol's epochs)")

    def __post_init__(self) -> None:
        require_finite(self)
        for name in ("teacher_epochs", "teacher_batch_size", "iterations", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)}).")
        for name in ("teacher_width", "classes_per_batch", "parallel_batches", "relabel_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more (got {getattr(self, name)}).")
        if min(self.lr, self.teacher_lr) <= 0 or self.r_bn < 0 or self.first_bn_multiplier < 0:
            raise ConfigError("lr and teacher_lr must be positive; r_bn and first_bn_multiplier non-negative.")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("Adam's betas must lie in [0, 1).")
        if self.crop_schedule not in CROP_SCHEDULES:
            raise ConfigError(f"crop_schedule must be one of {', '.join(CROP_SCHEDULES)} "
                              f"(got {self.crop_schedule!r}).")
        if not 0 < self.crop_scale_end <= self.crop_scale_start <= 1:
            raise ConfigError("Need 0 < crop_scale_end <= crop_scale_start <= 1.")
        if not 0 < self.milestone <= 1:
            raise ConfigError(f"milestone must be in (0, 1] (got {self.milestone}).")
        if self.crop_schedule == "step" and self.milestone == 1:
            # the step falls at milestone * iterations: at 1 it never comes, and the whole run
            # would recover on whole images only
            raise ConfigError("crop_schedule=step drops the crop bound at milestone * iterations: set a milestone "
                              "below 1 (e.g. --set milestone=0.5).")
        if not 0 <= self.roll_fraction <= 0.5:
            raise ConfigError(f"roll_fraction must be in [0, 0.5] (got {self.roll_fraction}).")
        if self.batching not in BATCHINGS:
            raise ConfigError(f"batching must be one of {', '.join(BATCHINGS)} (got {self.batching!r}).")
        if self.relabel not in RELABEL_MODES:
            raise ConfigError(f"relabel must be one of {', '.join(RELABEL_MODES)} (got {self.relabel!r}).")
        if get_protocol(self.relabel_protocol).kd is None:
            raise ConfigError(f"relabel_protocol {self.relabel_protocol!r} is not a knowledge-distillation protocol.")

    def unused_settings(self) -> dict[str, str]:
        """{setting: why} for the settings the chosen teacher ignores (build_config refuses them
        when given explicitly)."""
        if "width" in network_options(self.teacher_arch):
            return {}
        return {"teacher_width": f"teacher network {self.teacher_arch!r} has no width option"}

    def teacher_recipe(self) -> RealTrainingRecipe:
        options = {"width": self.teacher_width} if self.teacher_width and "width" in network_options(
            self.teacher_arch) else {}
        return RealTrainingRecipe(arch=self.teacher_arch, options=options, epochs=self.teacher_epochs,
                                  lr=self.teacher_lr, weight_decay=self.teacher_weight_decay,
                                  batch_size=self.teacher_batch_size, augment=self.teacher_augment,
                                  seed=self.teacher_seed)


# Fashion-MNIST on a 2-core CPU: a small BatchNorm ConvNet teacher (2 epochs, ~5 min on a
# loaded machine, cached) and 300 recover iterations; stored views for 100 epochs (the KD
# evaluation the table runs; longer evaluations replay them cyclically).
FASHION_CPU = CurriculumConfig(teacher_width=32, teacher_epochs=2, teacher_lr=0.05, iterations=300,
                               checkpoint_every=50, relabel_epochs=100, student="convnet:width=32")
# A GPU-sized Fashion-MNIST setting: full-width teacher, published iteration counts.
FASHION_GPU = CurriculumConfig(teacher_width=128, teacher_epochs=20, teacher_lr=0.05, iterations=1000,
                               checkpoint_every=200)
# Published settings by name, as far as they translate (docs/methods.md §7):
# ImageNet-1K: ResNet-18 teacher (theirs is torchvision's pretrained 224px network; ours is
# ddtool's small-image resnet18-bn trained here), batches of 100 classes, lr 0.25, r_bn 0.01,
# jitter 32 px of 224 (roll_fraction 1/7), 1K iterations (SRe2L) / 4K (CDA), FKD-style stored
# relabel for 300 epochs. Tiny ImageNet: batches of 100 classes, lr 0.1, r_bn 1.0, 4K
# iterations, relabel for 100 epochs under "kd-tiny".
IMAGENET = dict(teacher_arch="resnet18-bn", teacher_epochs=90, teacher_lr=0.1, teacher_weight_decay=1e-4,
                teacher_augment=True, classes_per_batch=100, parallel_batches=1, lr=0.25, r_bn=0.01,
                roll_fraction=32 / 224, relabel_epochs=300)
TINY_IMAGENET = dict(teacher_arch="resnet18-bn", teacher_epochs=50, teacher_lr=0.2, teacher_weight_decay=1e-4,
                     teacher_augment=True, classes_per_batch=100, parallel_batches=2, lr=0.1, r_bn=1.0,
                     iterations=4000, relabel_protocol="kd-tiny", relabel_epochs=100)
CDA_CURRICULUM = dict(crop_schedule="cosine", milestone=1.0)
