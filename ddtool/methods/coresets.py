"""Baselines every distilled set is read against: a random real subset, herding and k-center.

Herding and k-center select real images in the feature space of a network trained on the
real training split (cached, so it is trained once per dataset and setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddtool.data import PreparedData, class_indices, sample_per_class
from ddtool.errors import ConfigError
from ddtool.methods.base import DistillContext, Method, register_method
from ddtool.methods.settings import setting
from ddtool.durations import format_duration
from ddtool.methods.teacher import RealTrainingRecipe, network_trained_on_real, real_training_estimate
from ddtool.networks import network_options
from ddtool.seeding import generator
from ddtool.storage import SyntheticSet


FEATURE_CACHE = "feature-networks"  # the cache folder of herding's and k-center's networks


@dataclass(frozen=True)
class RandomConfig:
    pass


@register_method("random")
class RandomSubset(Method):
    """`ipc` real images per class, drawn uniformly at random: the baseline of every table."""

    config_class = RandomConfig
    presets = {"default": RandomConfig()}

    def distill(self, ctx: DistillContext) -> SyntheticSet:
        data = ctx.data
        idx = sample_per_class(data.train_y, data.spec.num_classes, ctx.ipc, generator(ctx.seed, "random"))
        return self.make_set(ctx, data.train_x[idx], data.train_y[idx])


@dataclass(frozen=True)
class FeatureSelectionConfig:
    # The network trained on the real training split in whose feature space images are selected (cached).
    feature_arch: str = setting("convnet", "the feature network, in whose feature space images are selected")
    feature_width: int = setting(64, "the feature network's width, for networks with a width option")
    feature_epochs: int = setting(2, "epochs the feature network trains on the real training split")
    feature_lr: float = setting(0.01, "the feature network's learning rate")
    feature_batch_size: int = setting(256, "the feature network's minibatch size")

    def __post_init__(self) -> None:
        if self.feature_epochs < 1 or self.feature_width < 1:
            raise ConfigError("feature_epochs and feature_width must be positive.")


class _FeatureSelection(Method):
    """Shared by herding and k-center: embed each class, pick `ipc` images per class."""

    config_class = FeatureSelectionConfig
    presets = {"default": FeatureSelectionConfig()}

    def plan(self, ctx: DistillContext) -> list[str]:
        c = self.config
        seconds = real_training_estimate(ctx.data, feature_recipe(c, ctx.seed), cache=FEATURE_CACHE)
        return [f"{self.name}: a {c.feature_arch} feature network, {c.feature_epochs} epochs on "
                f"{ctx.data.train_x.shape[0]} images ("
                + ("found in the cache" if seconds is None else
                   f"about {format_duration(seconds)} to train, timed here; cached for later runs")
                + f"), then select {ctx.ipc} per class in its feature space"]

    def select(self, features: torch.Tensor, ipc: int) -> torch.Tensor:
        raise NotImplementedError

    def distill(self, ctx: DistillContext) -> SyntheticSet:
        data = ctx.data
        net = feature_network(data, self.config, seed=ctx.seed, progress=ctx.progress)
        chosen = []
        for c, idx in enumerate(class_indices(data.train_y, data.spec.num_classes)):
            if idx.numel() < ctx.ipc:
                raise ConfigError(f"Class {data.spec.classes[c]!r} has {idx.numel()} training images; "
                                  f"IPC {ctx.ipc} is too many.")
            features = embed(net, data.train_x[idx])
            chosen.append(idx[self.select(features, ctx.ipc)])
        picked = torch.cat(chosen)
        return self.make_set(ctx, data.train_x[picked], data.train_y[picked])


@register_method("herding")
class Herding(_FeatureSelection):
    """Welling's herding: greedily add the image that brings the running mean of the selected
    features closest to the class mean."""

    def select(self, features: torch.Tensor, ipc: int) -> torch.Tensor:
        mean = features.mean(dim=0)
        selected: list[int] = []
        total = torch.zeros_like(mean)
        available = torch.ones(features.shape[0], dtype=torch.bool, device=features.device)
        for k in range(1, ipc + 1):
            # distance of the new running mean (total + f) / k to the class mean, for every f
            gap = ((total + features) / k - mean).norm(dim=1)
            gap[~available] = float("inf")
            pick = int(gap.argmin())
            selected.append(pick)
            available[pick] = False
            total += features[pick]
        return torch.tensor(selected, dtype=torch.long)


@register_method("kcenter")
class KCenter(_FeatureSelection):
    """Greedy k-center (farthest-first traversal), starting from the image nearest the class mean."""

    def select(self, features: torch.Tensor, ipc: int) -> torch.Tensor:
        first = int((features - features.mean(dim=0)).norm(dim=1).argmin())
        selected = [first]
        nearest = (features - features[first]).norm(dim=1)
        for _ in range(ipc - 1):
            pick = int(nearest.argmax())
            selected.append(pick)
            nearest = torch.minimum(nearest, (features - features[pick]).norm(dim=1))
        return torch.tensor(selected, dtype=torch.long)


@torch.no_grad()
def embed(net: torch.nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Penultimate-layer features (the input of the network's linear head)."""
    net.eval()
    return torch.cat([net.embed(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])


def feature_recipe(config: FeatureSelectionConfig, seed: int) -> RealTrainingRecipe:
    options = {"width": config.feature_width} if "width" in network_options(config.feature_arch) else {}
    return RealTrainingRecipe(arch=config.feature_arch, options=options, epochs=config.feature_epochs,
                              lr=config.feature_lr, batch_size=config.feature_batch_size, seed=seed)


def feature_network(data: PreparedData, config: FeatureSelectionConfig, *, seed: int, progress: bool) -> torch.nn.Module:
    """A network trained on the real training split (cached), whose embedding ranks images."""
    return network_trained_on_real(data, feature_recipe(config, seed), cache=FEATURE_CACHE, desc="feature network",
                                   progress=progress, log=lambda message: None).network
