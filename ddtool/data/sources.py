"""Finding a dataset's files and loading them as stored (`RawDataset`).

Search order, first match wins: the `data_root` argument (--data-root), each folder in
$DDTOOL_DATA (os.pathsep-separated), the user cache ($XDG_CACHE_HOME/ddtool/data), then
folders that OS packages install to (Fashion-MNIST: /usr/share/datasets/fashion-mnist, from the
Debian package dataset-fashion-mnist). Under each root the dataset may sit in the root itself or
in its usual folder (fashion-mnist/, FashionMNIST/raw/ as torchvision lays it out, ...).

Nothing is downloaded unless asked (`download=True`), and then only through torchvision, into
the user cache.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ddtool.data.cache import resolve_cache_dir, user_data_dir
from ddtool.data.loaders import CIFAR10, CIFAR100, IDX, IMAGE_FOLDER, SVHN, TINY_IMAGENET, Decoded, Format, describe
from ddtool.data.registry import DatasetSpec, canonical_name, folder_root, get_spec
from ddtool.errors import DatasetNotFoundError, FormatError


@dataclass
class RawDataset:
    """Pixels as stored, before any normalisation."""

    spec: DatasetSpec
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: Path  # the folder it was read from
    # Identifies the files read (paths, sizes, mtimes); keys caches of things derived from
    # them. Empty for data made in memory, which then is never cached.
    fingerprint: str = ""


@dataclass(frozen=True)
class _TorchvisionDownload:
    dataset_class: str  # in torchvision.datasets
    splits: tuple[dict[str, Any], ...]  # constructor arguments, one call per split
    subfolder: str = ""  # of the user data dir, for classes that write into their root directly

    def root(self) -> Path:
        return user_data_dir() / self.subfolder

    def fetch(self, key: str, how_to_get: str) -> None:
        import torchvision.datasets  # only a download needs it

        try:
            for split in self.splits:
                getattr(torchvision.datasets, self.dataset_class)(str(self.root()), download=True, **split)
        except Exception as exc:  # torchvision raises URLError, RuntimeError, OSError, ... when offline
            raise DatasetNotFoundError(
                f"Downloading {key} through torchvision into {self.root()} failed ({exc}). "
                f"Without network: {how_to_get}."
            ) from exc

    def command(self) -> str:
        calls = "; ".join(
            f"d.{self.dataset_class}({str(self.root())!r}, "
            + "".join(f"{k}={v!r}, " for k, v in split.items())
            + "download=True)"
            for split in self.splits
        )
        return f'python -c "import torchvision.datasets as d; {calls}"'


@dataclass(frozen=True)
class _Source:
    format: Format
    subfolders: tuple[str, ...]  # usual folders under a search root (the root itself is tried first)
    how_to_get: str
    download: _TorchvisionDownload | None = None


_TRAIN_TEST = ({"train": True}, {"train": False})

_SOURCES = {
    "fashion-mnist": _Source(
        IDX,
        ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        "install the Debian package (sudo apt-get install dataset-fashion-mnist; the files land in "
        "/usr/share/datasets/fashion-mnist), or get the four .gz files from "
        "https://github.com/zalandoresearch/fashion-mnist",
        _TorchvisionDownload("FashionMNIST", _TRAIN_TEST),
    ),
    "mnist": _Source(
        IDX,
        ("mnist", "MNIST/raw"),
        "get the four .gz files from https://ossci-datasets.s3.amazonaws.com/mnist/ "
        "(a mirror of http://yann.lecun.com/exdb/mnist/)",
        _TorchvisionDownload("MNIST", _TRAIN_TEST),
    ),
    "cifar10": _Source(
        CIFAR10,
        ("cifar-10-batches-py", "cifar10", "cifar-10"),
        "unpack https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (it holds cifar-10-batches-py/)",
        _TorchvisionDownload("CIFAR10", _TRAIN_TEST),
    ),
    "cifar100": _Source(
        CIFAR100,
        ("cifar-100-python", "cifar100", "cifar-100"),
        "unpack https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz (it holds cifar-100-python/)",
        _TorchvisionDownload("CIFAR100", _TRAIN_TEST),
    ),
    "svhn": _Source(
        SVHN,
        ("svhn", "SVHN"),
        "get train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/",
        _TorchvisionDownload("SVHN", ({"split": "train"}, {"split": "test"}), subfolder="svhn"),
    ),
    "tiny-imagenet": _Source(
        TINY_IMAGENET,
        ("tiny-imagenet-200", "tiny-imagenet", "tiny_imagenet"),
        "unzip http://cs231n.stanford.edu/tiny-imagenet-200.zip (it holds tiny-imagenet-200/); "
        "torchvision cannot download it",
    ),
}

# Folders that OS packages install datasets to, searched after the user's own places.
SYSTEM_FOLDERS: dict[str, tuple[Path, ...]] = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),),
}


def _candidates(name: str, data_root: str | os.PathLike | None) -> list[tuple[Path, str]]:
    """(folder, why it is searched) in search order, without repeats."""
    key = canonical_name(name)
    root = folder_root(key)
    if root is not None:
        return [(root, "folder dataset")]
    roots = []
    if data_root is not None:
        roots.append((Path(data_root), "--data-root"))
    roots += [(Path(p), "$DDTOOL_DATA") for p in os.environ.get("DDTOOL_DATA", "").split(os.pathsep) if p]
    roots.append((user_data_dir(), "user cache"))
    found = [
        (folder, why)
        for base, why in roots
        for folder in (base, *(base / sub for sub in _SOURCES[key].subfolders))
    ]
    found += [(folder, "OS package") for folder in SYSTEM_FOLDERS.get(key, ())]
    unique: dict[Path, str] = {}
    for folder, why in found:
        unique.setdefault(folder.expanduser().absolute(), why)
    return list(unique.items())


def search_paths(name: str, data_root: str | os.PathLike | None = None) -> list[Path]:
    """The folders searched for dataset `name`, in order."""
    return [folder for folder, _ in _candidates(name, data_root)]


def _format(key: str) -> Format:
    return IMAGE_FOLDER if folder_root(key) is not None else _SOURCES[key].format


def locate(name: str, data_root: str | os.PathLike | None = None) -> Path | None:
    """The first searched folder that holds all of the dataset's files, or None."""
    fmt = _format(canonical_name(name))
    return next((folder for folder in search_paths(name, data_root) if not fmt.missing(folder)), None)


def load_raw(
    name: str,
    data_root: str | os.PathLike | None = None,
    *,
    download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> RawDataset:
    """Load a dataset as stored. DatasetNotFoundError says where it looked and how to get it.

    `download=True` lets torchvision fetch a missing dataset into the user cache (needs network).
    `cache_dir` holds the decoded tensors of slow formats (default: $DDTOOL_CACHE, else the
    user cache).
    """
    key = canonical_name(name)
    folder = locate(key, data_root)
    source = _SOURCES.get(key)
    if folder is None and download and source is not None and source.download is not None:
        source.download.fetch(key, source.how_to_get)
        folder = locate(key, data_root)
    if folder is None:
        raise DatasetNotFoundError(_not_found_message(key, data_root))
    decoded = _format(key).read(folder, resolve_cache_dir(cache_dir))
    return _checked(_spec_for(key, decoded, folder), decoded, folder)


def _spec_for(key: str, decoded: Decoded, folder: Path) -> DatasetSpec:
    if folder_root(key) is None:
        spec = get_spec(key)
        if decoded.classes is None:
            return spec
        if len(decoded.classes) != spec.num_classes:
            raise FormatError(f"{key} in {folder} names {len(decoded.classes)} classes, not {spec.num_classes}.")
        return dataclasses.replace(spec, classes=decoded.classes)
    # An ImageFolder's spec is what its files are, and what its options file says: flips are
    # allowed, as for natural images, unless it says otherwise (digits, text, ...).
    mean, std = decoded.pixel_stats
    return DatasetSpec(
        name=key,
        channels=decoded.train_images.shape[1],
        image_size=decoded.train_images.shape[2],
        num_classes=len(decoded.classes),
        classes=decoded.classes,
        flip=folder_options(folder)["flip"],
        mean=mean,
        std=std,
    )


# An ImageFolder's options, in a JSON file at its root, with their defaults.
FOLDER_OPTIONS_FILE = "ddtool-dataset.json"
FOLDER_OPTIONS = {"flip": True}  # flip: augmentation may mirror the images left-right


def folder_options(root: Path) -> dict:
    """The options of the ImageFolder at `root`: FOLDER_OPTIONS, changed by its options file."""
    path = Path(root) / FOLDER_OPTIONS_FILE
    if not path.exists():
        return dict(FOLDER_OPTIONS)
    try:
        given = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not a JSON object of dataset options ({exc}).") from None
    if not isinstance(given, dict):
        raise FormatError(f"{path} must hold a JSON object such as {{\"flip\": false}}.")
    unknown = sorted(set(given) - set(FOLDER_OPTIONS))
    if unknown:
        raise FormatError(f"{path}: unknown option {', '.join(unknown)}; the options are "
                          f"{', '.join(sorted(FOLDER_OPTIONS))}.")
    if not isinstance(given.get("flip", True), bool):
        raise FormatError(f"{path}: flip must be true or false, got {given['flip']!r}.")
    return {**FOLDER_OPTIONS, **given}


def _checked(spec: DatasetSpec, decoded: Decoded, folder: Path) -> RawDataset:
    """The RawDataset, after checking the files agree with the spec."""
    expected = (spec.channels, spec.image_size, spec.image_size)
    for split in ("train", "test"):
        images, labels = getattr(decoded, f"{split}_images"), getattr(decoded, f"{split}_labels")
        problem = None
        if images.shape[0] == 0:
            problem = "no images"
        elif tuple(images.shape[1:]) != expected:
            problem = f"images of shape {tuple(images.shape[1:])}, expected {expected}"
        elif labels.shape != (images.shape[0],):
            problem = f"{images.shape[0]} images but {labels.numel()} labels"
        elif labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < spec.num_classes:
            problem = f"labels outside 0..{spec.num_classes - 1}"
        if problem:
            raise FormatError(f"{spec.name} in {folder}: the {split} split has {problem}.")
    return RawDataset(
        spec, decoded.train_images, decoded.train_labels, decoded.test_images, decoded.test_labels,
        source=folder, fingerprint=decoded.fingerprint,
    )


def _not_found_message(key: str, data_root: str | os.PathLike | None) -> str:
    fmt = _format(key)
    needs = ", ".join(describe(names) for names in fmt.required)
    root = folder_root(key)
    if root is not None:
        return (
            f"ImageFolder dataset {root} was not found: it needs {needs} in that folder, "
            "each holding one subfolder of images per class."
        )
    looked = "\n".join(f"  {folder}  ({why}{_partial(fmt, folder)})" for folder, why in _candidates(key, data_root))
    source = _SOURCES[key]
    how = f"To get it: {source.how_to_get}."
    if source.download is not None:
        how += f" Or let torchvision download it into the user cache (needs network): {source.download.command()}"
    return (
        f"Dataset {key} was not found. It needs {needs} in one folder; looked in, in order:\n{looked}\n"
        f"{how}\nPut the files in one of these folders, or pass --data-root or set DDTOOL_DATA to the "
        "folder that holds them."
    )


def _partial(fmt: Format, folder: Path) -> str:
    """What a folder holding part of the dataset lacks (most likely a broken download)."""
    missing = fmt.missing(folder) if folder.is_dir() else []
    return f"; has some files but lacks {', '.join(missing)}" if 0 < len(missing) < len(fmt.required) else ""
