"""From a dataset name to tensors in network space: validation split, normalisation, ZCA.

Also the per-class index helpers the distillation methods use to pick real images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddtool.data.cache import digest, load_or_build, resolve_cache_dir, slug
from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.data.registry import DatasetSpec
from ddtool.data.sources import RawDataset, load_raw
from ddtool.device import resolve_device
from ddtool.errors import ConfigError, DDToolError
from ddtool.seeding import generator

# Default validation split: 500 images per class where every class has at least 5000
# (MNIST, Fashion-MNIST, CIFAR-10), else a tenth of each class.
_LARGE_CLASS = 5000
_LARGE_CLASS_VAL = 500
# Images converted to float at a time, to bound the temporaries beside the float result.
_CHUNK = 8192


@dataclass
class PreparedData:
    """Everything on one device, in network space."""

    spec: DatasetSpec
    preprocessing: Preprocessing
    train_x: torch.Tensor  # float32 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    val_x: torch.Tensor  # (0, C, H, W) when there is no validation split
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_indices: torch.Tensor  # into the raw training set: the images that form train_x
    val_indices: torch.Tensor  # into the raw training set: the images that form val_x
    source: Path | None = None  # the folder the data was read from
    fingerprint: str = ""  # of the files read (RawDataset.fingerprint); "" for data made in memory
    _content: str | None = field(default=None, init=False, repr=False, compare=False)

    def content_digest(self) -> str:
        """A hash of the training and test tensors (images in network space, labels), computed
        once: what cached results are keyed by, so images replaced on disk (same names, same
        counts) or a ZCA fitted otherwise are other data. The file fingerprint would not do:
        it changes with a file's path or time, as on every new machine, while the data does not."""
        if self._content is None:
            content = hashlib.sha256()
            for tensor in (self.train_x, self.train_y, self.test_x, self.test_y):
                for chunk in tensor.detach().split(_CHUNK):  # bounds the copy off a GPU
                    content.update(chunk.cpu().contiguous().numpy().tobytes())
            self._content = content.hexdigest()[:16]
        return self._content


def class_indices(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    """For each class, the ascending indices of its images (on the labels' device)."""
    cpu = labels.cpu()
    counts = torch.bincount(cpu, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"labels reach {int(cpu.max())}, beyond {num_classes} classes")
    order = torch.argsort(cpu, stable=True)
    return [part.to(labels.device) for part in order.split(counts.tolist())]


def check_ipc_fits(per_class: list[torch.Tensor], ipc: int) -> None:
    """Refuse an IPC larger than the smallest class (`per_class`: class_indices of a split)."""
    for label, indices in enumerate(per_class):
        if len(indices) < ipc:
            raise DDToolError(
                f"Cannot take {ipc} images per class: class {label} has only {len(indices)} "
                "training images. Use a smaller IPC."
            )


def sample_per_class(labels: torch.Tensor, num_classes: int, ipc: int, generator: torch.Generator) -> torch.Tensor:
    """`ipc` random image indices per class, class-major (all of class 0, then class 1, ...).

    Drawn on CPU with `generator`, then moved to the labels' device.
    """
    per_class = class_indices(labels.cpu(), num_classes)
    check_ipc_fits(per_class, ipc)
    chosen = [indices[torch.randperm(len(indices), generator=generator)[:ipc]] for indices in per_class]
    return torch.cat(chosen).to(labels.device)


def stratified_split(
    labels: torch.Tensor, num_classes: int, val_per_class: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices), both ascending, drawing `val_per_class` images of
    each class for validation; fixed by `seed`. None = the default rule (see _LARGE_CLASS)."""
    per_class = class_indices(labels.cpu(), num_classes)
    counts = [len(indices) for indices in per_class]
    if val_per_class is None:
        large = min(counts) >= _LARGE_CLASS
        take = [_LARGE_CLASS_VAL if large else n // 10 for n in counts]
    else:
        if val_per_class < 0:
            raise ConfigError(f"val_per_class must be 0 or more, not {val_per_class}.")
        for label, n in enumerate(counts):
            if val_per_class > 0 and n <= val_per_class:
                raise ConfigError(
                    f"val_per_class={val_per_class} would leave class {label} ({n} training images) "
                    "with none to train on."
                )
        take = [val_per_class] * num_classes
    gen = generator(seed, "validation-split")
    val = torch.cat([idx[torch.randperm(len(idx), generator=gen)[:k]] for idx, k in zip(per_class, take)])
    in_train = torch.ones(len(labels), dtype=torch.bool)
    in_train[val] = False
    return in_train.nonzero().squeeze(1), val.sort().values


def prepare(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    zca: bool = False,
    zca_eps: float = 0.1,
    val_per_class: int | None = None,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    preprocessing: Preprocessing | None = None,
) -> PreparedData:
    """Load dataset `name` (see load_raw) and bring it into network space (see prepare_raw)."""
    raw = load_raw(name, data_root, download=download, cache_dir=cache_dir)
    return prepare_raw(
        raw, zca=zca, zca_eps=zca_eps, val_per_class=val_per_class, split_seed=split_seed,
        device=device, cache_dir=cache_dir, preprocessing=preprocessing,
    )


def prepare_raw(
    raw: RawDataset,
    *,
    zca: bool = False,
    zca_eps: float = 0.1,
    val_per_class: int | None = None,
    split_seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
) -> PreparedData:
    """Split off validation images and bring them, the training and the test images into
    network space: normalised with the spec's mean/std or, with `zca`, instead whitened with a
    ZCA fitted on the training part's [0, 1] pixels (never on validation or test images).

    The ZCA is cached in `cache_dir` (default $DDTOOL_CACHE, else the user cache) per dataset
    files, split and eps, so it is fitted once. Everything is computed on CPU, so every device
    sees the same numbers, then moved to `device`.

    A given `preprocessing` (the one a synthetic set carries) replaces the spec's normalisation
    and any fitting, so the real data lands in exactly the space the set was made in.
    """
    spec = raw.spec
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    train_idx, val_idx = stratified_split(raw.train_labels, spec.num_classes, val_per_class, split_seed)

    train_u8 = raw.train_images[train_idx]
    if preprocessing is not None:
        if len(preprocessing.mean) != spec.channels:
            raise ConfigError(f"The given preprocessing is for {len(preprocessing.mean)}-channel images, "
                              f"but {spec.name} has {spec.channels} channels.")
        preprocessing = _on_device(preprocessing, torch.device("cpu"))
        train_x = _network_space(train_u8, preprocessing)
    elif zca:
        # ZCA replaces the mean/std normalisation: fitted on [0, 1] pixels, as MTT and DATM fit
        # it (their eps is relative to the pixels' covariance, 25x smaller than a normalised one's)
        pixels = Preprocessing.identity(spec.channels)
        train_x = _network_space(train_u8, pixels)
        whitening = _fit_zca(raw, train_x, train_idx, zca_eps, (val_per_class, split_seed), cache_dir)
        preprocessing = Preprocessing(pixels.mean, pixels.std, whitening)
        _network_space(train_u8, preprocessing, out=train_x)  # overwrite: no second float copy
    else:
        preprocessing = Preprocessing(spec.mean, spec.std)
        train_x = _network_space(train_u8, preprocessing)

    return PreparedData(
        spec=spec,
        preprocessing=_on_device(preprocessing, target),
        train_x=train_x.to(target),
        train_y=raw.train_labels[train_idx].to(target),
        val_x=_network_space(raw.train_images[val_idx], preprocessing).to(target),
        val_y=raw.train_labels[val_idx].to(target),
        test_x=_network_space(raw.test_images, preprocessing).to(target),
        test_y=raw.test_labels.to(target),
        train_indices=train_idx,
        val_indices=val_idx,
        source=raw.source,
        fingerprint=raw.fingerprint,
    )


def _on_device(preprocessing: Preprocessing, device: torch.device) -> Preprocessing:
    """The same transform with its ZCA tensors on `device`, so apply/invert there copy nothing."""
    if preprocessing.zca is None:
        return preprocessing
    return Preprocessing(preprocessing.mean, preprocessing.std, preprocessing.zca.to(device))


def _network_space(
    images: torch.Tensor, preprocessing: Preprocessing, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 images -> float32 network space, chunk by chunk into one result tensor."""
    if out is None:
        out = torch.empty(images.shape, dtype=torch.float32)
    for start in range(0, images.shape[0], _CHUNK):
        pixels = images[start:start + _CHUNK].to(torch.float32).div_(255.0)
        out[start:start + _CHUNK] = preprocessing.apply(pixels)
    return out


def _fit_zca(
    raw: RawDataset,
    train_x: torch.Tensor,
    train_idx: torch.Tensor,
    eps: float,
    split_request: tuple[int | None, int],
    cache_dir: str | os.PathLike | None,
) -> ZCA:
    """ZCA.fit(train_x, eps), loaded from the cache when fitted before on the same files,
    split and eps. Data made in memory (no fingerprint) is fitted every time."""
    if not raw.fingerprint:
        return ZCA.fit(train_x, eps)

    def fit() -> dict:
        fitted = ZCA.fit(train_x, eps)
        return {"mean": fitted.mean, "matrix": fitted.matrix, "inverse": fitted.inverse, "eps": fitted.eps}

    spec = raw.spec
    # One cache entry per (dataset, split request, eps); a new version of the files replaces it.
    what = f"{slug(spec.name)}-{digest(split_request, float(eps))[:8]}"
    split = hashlib.sha256(train_idx.numpy().tobytes()).hexdigest()
    version = digest(raw.fingerprint, "fitted on [0, 1] pixels", split)
    stored = load_or_build(resolve_cache_dir(cache_dir) / "zca", what, version, fit)
    return ZCA(stored["mean"], stored["matrix"], stored["inverse"], float(stored["eps"]))
