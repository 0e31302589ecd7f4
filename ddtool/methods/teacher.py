"""Networks trained on the real training split, cached by configuration; the SRe2L/CDA teacher.

`network_trained_on_real` is the general form of the pattern coresets' feature network uses:
build a network from a derived seed, train it with the shared loop on the training split
(never validation or test), keep its weights in the cache keyed by everything that changes
them, and record its test accuracy once, at the end. `squeeze` is SRe2L's first step on top
of it: a BatchNorm teacher whose running statistics the recover step matches.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ddtool.data import PreparedData
from ddtool.errors import ConfigError
from ddtool.evaluation.kd import sample_views
from ddtool.evaluation.protocols import KDSettings
from ddtool.networks import create_network
from ddtool.paths import cache_root, key_digest
from ddtool.seeding import derive_seed, generator, seeded
from ddtool.files import save_torch
from ddtool.training import accuracy, train_epoch


@dataclass(frozen=True)
class RealTrainingRecipe:
    """How a network is trained on the real training split (SGD with momentum, cosine lr over
    the epochs). `augment` adds the KD views' random-resized crop (area 0.08-1) and flip, as
    published teachers are trained; without it the images are used as they are."""

    arch: str
    options: dict = field(default_factory=dict)  # create_network options (e.g. {"width": 64})
    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    augment: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ConfigError("A network trained on real data needs epochs, batch size and lr above zero.")


@dataclass
class TrainedNetwork:
    network: nn.Module  # frozen, eval mode
    recipe: RealTrainingRecipe
    test_accuracy: float
    cache_key: str  # digest of the configuration that produced it
    train_seconds: float  # how long training took when it was trained (not when loaded)

    def record(self) -> dict:
        """The SyntheticSet.teacher form: {"arch", "options", "state"} (CPU tensors)."""
        state = {name: t.detach().cpu().clone() for name, t in self.network.state_dict().items()}
        return {"arch": self.recipe.arch, "options": dict(self.recipe.options), "state": state}


def _cache_key(data: PreparedData, recipe: RealTrainingRecipe) -> dict:
    return {
        "dataset": data.spec.name,
        "files": data.fingerprint,
        "preprocessing": data.preprocessing.describe(),
        "train_split": hashlib.sha256(data.train_indices.cpu().numpy().tobytes()).hexdigest()[:16],
        "train_images": int(data.train_x.shape[0]),
        "recipe": asdict(recipe),
    }


def untrained_network(data: PreparedData, recipe: RealTrainingRecipe) -> nn.Module:
    """The untrained network of `recipe` (its seed derived from the recipe's), on data's device;
    as fast as the trained one, so plans time stand-ins of it before it exists."""
    spec = data.spec
    with seeded(derive_seed(recipe.seed, "real-network", recipe.arch)):
        net = create_network(recipe.arch, channels=spec.channels, num_classes=spec.num_classes,
                             image_size=spec.image_size, **recipe.options)
    return net.to(data.train_x.device)


def _cached_entry(data: PreparedData, recipe: RealTrainingRecipe,
                  cache: str) -> tuple[dict, str, Path, dict | None]:
    """(key, its digest, cache path, the stored entry when it answers the key; else None).
    A lookup creates no folder (a plan, a dry run, writes nothing); saving the entry does."""
    key = _cache_key(data, recipe)
    digest = key_digest(key)
    path = cache_root() / cache / f"{digest}.pt"
    stored = torch.load(path, map_location=data.train_x.device) if path.exists() else None
    # an entry for another key (a digest collision) or from before train_seconds was kept is retrained
    fits = stored is not None and stored.get("key") == key and "train_seconds" in stored
    return key, digest, path, stored if fits else None


def _train_real(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: RealTrainingRecipe,
                flip: bool, *, epochs: range, progress: bool = False, desc: str = "") -> None:
    """SGD with momentum and a cosine lr over the recipe's epochs, for the epochs in `epochs`
    (all of them, or one to time it): the optimiser and batch order start afresh each call."""
    optimizer = torch.optim.SGD(net.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    batches = generator(recipe.seed, "real-network-batches")
    augment = None
    if recipe.augment:
        crop_flip = KDSettings(cutmix=False)

        def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            return sample_views(x.shape[0], x.shape[2], x.shape[3], crop_flip, flip, gen).render(x)

    for epoch in tqdm(epochs, desc=desc, disable=not progress, leave=False):
        for group in optimizer.param_groups:
            group["lr"] = 0.5 * recipe.lr * (1.0 + math.cos(math.pi * epoch / recipe.epochs))
        train_epoch(net, images, labels, optimizer=optimizer, batch_size=recipe.batch_size,
                    generator=batches, augment=augment)


def real_training_estimate(data: PreparedData, recipe: RealTrainingRecipe, *, cache: str,
                           batches: int = 3) -> float | None:
    """Seconds `network_trained_on_real` should take here to train `recipe`; None when the
    network is in the cache. Times `batches` training batches after a warm-up batch, on a
    throw-away network, and scales to the recipe's epochs (for a plan)."""
    if _cached_entry(data, recipe, cache)[-1] is not None:
        return None
    net = untrained_network(data, recipe)
    n_train = data.train_x.shape[0]
    warm, timed = min(n_train, recipe.batch_size), min(n_train, batches * recipe.batch_size)
    _train_real(net, data.train_x[:warm], data.train_y[:warm], recipe, data.spec.flip, epochs=range(1))
    began = time.perf_counter()
    _train_real(net, data.train_x[:timed], data.train_y[:timed], recipe, data.spec.flip, epochs=range(1))
    accuracy(net, data.train_x[:1], data.train_y[:1])  # waits for the device
    return recipe.epochs * n_train * (time.perf_counter() - began) / timed


def network_trained_on_real(data: PreparedData, recipe: RealTrainingRecipe, *, cache: str, desc: str,
                            progress: bool = True, log: Callable[[str], None] = print,
                            check: Callable[[nn.Module], None] | None = None) -> TrainedNetwork:
    """The network `recipe` trains on data's training split; loaded from cache_dir(cache) when
    it was trained before with the same data, split, preprocessing and recipe. `check(net)`
    runs on the new network before any training (to refuse an unfit architecture early)."""
    net = untrained_network(data, recipe)
    if check is not None:
        check(net)
    key, digest, path, stored = _cached_entry(data, recipe, cache)
    if stored is not None:
        net.load_state_dict(stored["state"])
        log(f"{desc}: loaded from the cache ({path}); test accuracy {100 * stored['test_accuracy']:.2f}%")
        return TrainedNetwork(net.eval().requires_grad_(False), recipe, stored["test_accuracy"], digest,
                              stored["train_seconds"])

    start = time.perf_counter()
    _train_real(net, data.train_x, data.train_y, recipe, data.spec.flip, epochs=range(recipe.epochs),
                progress=progress, desc=desc)
    seconds = time.perf_counter() - start
    test_accuracy = accuracy(net, data.test_x, data.test_y)
    log(f"{desc}: trained {recipe.epochs} epochs on {data.train_x.shape[0]} images in {seconds:.0f} s; "
        f"test accuracy {100 * test_accuracy:.2f}%")
    save_torch({"key": key, "state": net.state_dict(), "test_accuracy": test_accuracy, "train_seconds": seconds},
               path)
    return TrainedNetwork(net.eval().requires_grad_(False), recipe, test_accuracy, digest, seconds)


def batch_norm_layers(network: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The network's BatchNorm layers in module order (the stem's first)."""
    return [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def squeeze(data: PreparedData, recipe: RealTrainingRecipe, *, progress: bool = True,
            log: Callable[[str], None] = print) -> TrainedNetwork:
    """SRe2L's squeeze: the BatchNorm teacher trained on the real training split (cached)."""
    return network_trained_on_real(data, recipe, cache="teachers", desc=f"teacher {recipe.arch}",
                                   progress=progress, log=log,
                                   check=lambda net: require_batch_norm(net, recipe.arch))


def require_batch_norm(net: nn.Module, arch: str) -> None:
    """The ConfigError for a teacher without BatchNorm layers, whose statistics recover matches."""
    if not batch_norm_layers(net):
        raise ConfigError(f"The teacher {arch!r} has no BatchNorm layers, so there are no statistics "
                          "to recover images from; use a BatchNorm network such as convnet-bn or resnet18-bn.")
