"""One reader per dataset format: which files a folder must hold, and how to read them.

Readers return the images as stored (uint8, (N, C, H, W)) with int64 labels; checking them
against the dataset's spec is ddtool.data.sources' job. Formats that are slow to decode (JPEG
and PNG folders) are decoded once and cached as tensors (see ddtool.data.cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ddtool.data.cache import digest, fingerprint, load_or_build, slug
from ddtool.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    image_size,
    read_idx,
    read_images,
    read_mat,
    read_pickle_dict,
)
from ddtool.errors import FormatError


@dataclass
class Decoded:
    train_images: torch.Tensor  # uint8 (N, C, H, W)
    train_labels: torch.Tensor  # int64 (N,)
    test_images: torch.Tensor
    test_labels: torch.Tensor
    fingerprint: str  # identifies the files read (see ddtool.data.cache.fingerprint)
    classes: tuple[str, ...] | None = None  # class names, when the files carry them
    # Per-channel mean/std of the training pixels in [0, 1] (image folders; an ImageFolder's
    # spec is computed from them).
    pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None


@dataclass(frozen=True)
class Format:
    """What a folder must hold to be a dataset of this format, and how to read it."""

    # One entry per file (or folder) the dataset needs: the names it may have, preferred first.
    required: tuple[tuple[str, ...], ...]
    read: Callable[[Path, Path], Decoded]  # (dataset folder, cache dir) -> Decoded

    def missing(self, folder: Path) -> list[str]:
        """The required entries absent from `folder`, for people: "a" or "a (or b)"."""
        return [describe(names) for names in self.required if _pick(folder, names) is None]


def describe(names: Sequence[str]) -> str:
    return names[0] + "".join(f" (or {other})" for other in names[1:])


def _pick(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).exists()), None)


def _need(folder: Path, names: Sequence[str]) -> Path:
    path = _pick(folder, names)
    if path is None:  # only reachable if files vanish between locating and reading
        raise FormatError(f"{folder} lacks {' or '.join(names)}.")
    return path


def _tensor(array: np.ndarray, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    # Arrays read from bytes are read-only views; torch needs memory it may write.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(dtype)


# --- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------

def _idx_names(split: str, kind: str) -> tuple[str, str]:
    stem = f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    return stem, stem + ".gz"  # torchvision keeps both; the plain file reads faster


def _read_idx_dataset(folder: Path, cache_dir: Path) -> Decoded:
    def split(name: str) -> tuple[Path, Path, torch.Tensor, torch.Tensor]:
        images_file = _need(folder, _idx_names(name, "images"))
        labels_file = _need(folder, _idx_names(name, "labels"))
        images = read_idx(images_file, IDX_IMAGES_MAGIC)[:, None]  # (N, 1, H, W)
        labels = read_idx(labels_file, IDX_LABELS_MAGIC)
        return images_file, labels_file, _tensor(images), _tensor(labels, torch.int64)

    *train_files, train_x, train_y = split("train")
    *test_files, test_x, test_y = split("t10k")
    return Decoded(train_x, train_y, test_x, test_y, fingerprint(train_files + test_files))


IDX = Format(
    required=tuple(_idx_names(split, kind) for split in ("train", "t10k") for kind in ("images", "labels")),
    read=_read_idx_dataset,
)


# --- CIFAR-10 / CIFAR-100 (pickled dicts of numpy arrays) -----------------------------------

def _cifar_format(
    train_files: tuple[str, ...], test_file: str, meta_file: str, label_key: bytes, names_key: bytes
) -> Format:
    def read_batches(folder: Path, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            record = read_pickle_dict(folder / name, (b"data", label_key))
            data = np.asarray(record[b"data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise FormatError(f"{folder / name}: data has shape {data.shape}, expected (N, 3072).")
            images.append(data.reshape(-1, 3, 32, 32))  # rows are R plane, G plane, B plane
            labels.append(np.asarray(record[label_key], dtype=np.int64))
        return _tensor(np.concatenate(images)), _tensor(np.concatenate(labels), torch.int64)

    def read(folder: Path, cache_dir: Path) -> Decoded:
        train_x, train_y = read_batches(folder, train_files)
        test_x, test_y = read_batches(folder, (test_file,))
        meta = read_pickle_dict(folder / meta_file, (names_key,))
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key])
        files = [folder / name for name in (*train_files, test_file, meta_file)]
        return Decoded(train_x, train_y, test_x, test_y, fingerprint(files), classes)

    return Format(required=tuple((name,) for name in (*train_files, test_file, meta_file)), read=read)


CIFAR10 = _cifar_format(
    tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", b"labels", b"label_names"
)
CIFAR100 = _cifar_format(("train",), "test", "meta", b"fine_labels", b"fine_label_names")


# --- SVHN (MATLAB files) --------------------------------------------------------------------

_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _read_svhn(folder: Path, cache_dir: Path) -> Decoded:
    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        record = read_mat(folder / name, ("X", "y"))
        images = record["X"]
        if images.ndim != 4 or images.shape[2] != 3:
            raise FormatError(f"{folder / name}: X has shape {images.shape}, expected (32, 32, 3, N).")
        # SVHN stores digit 0 as label 10; % 10 maps it back and leaves 1-9 alone.
        labels = np.asarray(record["y"]).reshape(-1).astype(np.int64) % 10
        return _tensor(images.transpose(3, 2, 0, 1)), _tensor(labels, torch.int64)  # HWCN -> NCHW

    train_x, train_y = split(_SVHN_FILES[0])
    test_x, test_y = split(_SVHN_FILES[1])
    return Decoded(train_x, train_y, test_x, test_y, fingerprint(folder / name for name in _SVHN_FILES))


SVHN = Format(required=tuple((name,) for name in _SVHN_FILES), read=_read_svhn)


# --- image folders (Tiny ImageNet, ImageFolder) ---------------------------------------------

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


# Bumped when decoding changes what an image becomes, so that older decodes are not reused
# (2: 16-bit greyscale rescaled instead of clipped at 255).
_DECODER_REVISION = 2


def _decode_cached(
    source: Path,
    cache_dir: Path,
    train: list[tuple[Path, int]],
    test: list[tuple[Path, int]],
    size: int,
    classes: tuple[str, ...],
    *,
    metadata: Sequence[Path] = (),
    allow_gray: bool,
) -> Decoded:
    """Decode (path, label) lists of images, once: later calls load the cached tensors.

    The cache is keyed by every image's path, size and mtime plus the `metadata` files that
    assign labels, so any change to the folder re-decodes it. With `allow_gray`, a folder of
    grayscale images only is kept as one channel.
    """
    version = digest(fingerprint([p for p, _ in train] + [p for p, _ in test] + list(metadata)), size, allow_gray,
                     _DECODER_REVISION)

    def build() -> dict:
        train_x, train_gray = read_images([p for p, _ in train], size, f"decoding {source.name} train")
        test_x, test_gray = read_images([p for p, _ in test], size, f"decoding {source.name} test")
        if allow_gray and train_gray and test_gray:
            train_x, test_x = train_x[:, :1], test_x[:, :1]
        train_images = _tensor(train_x)
        mean, std = _pixel_stats(train_images)
        return {
            "train_images": train_images,
            "train_labels": torch.tensor([label for _, label in train], dtype=torch.int64),
            "test_images": _tensor(test_x),
            "test_labels": torch.tensor([label for _, label in test], dtype=torch.int64),
            "mean": mean,
            "std": std,
        }

    what = f"{slug(source.name)}-{digest(str(source))[:8]}"
    data = load_or_build(cache_dir / "decoded", what, version, build)
    return Decoded(
        data["train_images"], data["train_labels"], data["test_images"], data["test_labels"],
        fingerprint=version, classes=classes, pixel_stats=(tuple(data["mean"]), tuple(data["std"])),
    )


def _pixel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of uint8 images as [0, 1] values, in float64 chunk by chunk."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0.0).sqrt()
    return mean.tolist(), std.tolist()


def _read_lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path} is not a text file ({exc}).") from exc


def _read_tiny_imagenet(folder: Path, cache_dir: Path) -> Decoded:
    # Labels number the WordNet ids in sorted order, as ImageFolder-based code (MTT, DATM) does,
    # so that label ids agree with sets distilled elsewhere.
    wnids = sorted(line.strip() for line in _read_lines(folder / "wnids.txt"))
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    train = [(p, label) for wnid, label in label_of.items() for p in _images_under(folder / "train" / wnid)]

    # The official test split has no labels; the labelled val split serves as the test split.
    annotations = folder / "val" / "val_annotations.txt"
    test = []
    for line in _read_lines(annotations):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise FormatError(f"{annotations}: line {line!r} does not name an image and a known wnid.")
        test.append((folder / "val" / "images" / fields[0], label_of[fields[1]]))

    classes = _wordnet_names(folder / "words.txt", wnids)
    metadata = [folder / "wnids.txt", annotations]
    return _decode_cached(folder, cache_dir, train, test, 64, classes, metadata=metadata, allow_gray=False)


def _wordnet_names(words_file: Path, wnids: list[str]) -> tuple[str, ...]:
    """The first synonym of each wnid ("goldfish, Carassius auratus" -> "goldfish"); the wnid
    itself when words.txt is absent or lacks it."""
    words = {}
    if words_file.is_file():
        for line in _read_lines(words_file):
            wnid, _, names = line.partition("\t")
            words[wnid.strip()] = names.split(",")[0].strip()
    return tuple(words.get(wnid) or wnid for wnid in wnids)


TINY_IMAGENET = Format(
    required=(("wnids.txt",), ("train",), ("val/val_annotations.txt",)),
    read=_read_tiny_imagenet,
)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _read_image_folder(root: Path, cache_dir: Path) -> Decoded:
    """root/train/<class>/... and root/test/<class>/... (or val/); classes = sorted folder names.

    All images take the size of the first training image (square; see read_images), and one
    channel if every image is grayscale, else three. A single class folder is refused.
    """
    test_dir = _need(root, ("test", "val"))
    classes = _class_folders(root / "train")
    if not classes:
        raise FormatError(f"{root / 'train'} holds no class folders (one subfolder per class).")
    train = []
    for label, name in enumerate(classes):
        images = _images_under(root / "train" / name)
        if not images:
            raise FormatError(f"Class folder {root / 'train' / name} holds no images.")
        train += [(p, label) for p in images]
    unknown = sorted(set(_class_folders(test_dir)) - set(classes))
    if unknown:
        raise FormatError(f"{test_dir} has class folders that train/ lacks: {', '.join(unknown)}.")
    test = [(p, label) for label, name in enumerate(classes) for p in _images_under(test_dir / name)]
    if not test:  # every evaluation would score 0 images and report 0%
        raise FormatError(f"{test_dir} holds no images in class folders; put them in "
                          f"{test_dir}/<class>/ under the class names of train/.")
    if len(classes) == 1:  # every network would predict it: no set could be told from another
        raise FormatError(
            f"{root / 'train'} holds a single class folder ({classes[0]}): distilling one class is meaningless, "
            "since every network trained on it predicts that class and scores 100% on its test images. A "
            "folder dataset needs at least two classes: add a subfolder of images for each other class, "
            f"under {root / 'train'} and under {test_dir}.")

    width, height = image_size(train[0][0])
    return _decode_cached(root, cache_dir, train, test, min(width, height), tuple(classes), allow_gray=True)


IMAGE_FOLDER = Format(required=(("train",), ("test", "val")), read=_read_image_folder)
