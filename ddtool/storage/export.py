"""Export a synthetic set to other formats: "imagefolder" (PNGs, one folder per class, in an
order torchvision's ImageFolder keeps), "npz" and "torch" (a .pt dict).

Images are kept in network space by npz/torch; PNGs hold pixels recovered with
`Preprocessing.invert`, 8-bit (for looking at, and for tools that want pictures) or 16-bit
(the set's whole value range, nothing clipped).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ddtool.errors import ConfigError
from ddtool.files import atomic_directory, atomic_path, save_torch
from ddtool.storage.picture import to_pil, write_png16
from ddtool.storage.synthetic_set import SyntheticSet

EXPORT_FORMATS = ("imagefolder", "npz", "torch")
# the keys of an exported dict that hold the set's preprocessing (read back by the importers)
PREPROCESSING_PREFIX = "preprocessing_"

PathLike = str | os.PathLike


def export_set(sset: SyntheticSet, out: PathLike, fmt: str, *, bit_depth: int = 8) -> Path:
    """Write `sset` to `out` in `fmt` (one of EXPORT_FORMATS); return the path written.

    imagefolder: `out` is a folder (must not exist, or be empty) receiving
        <class folder>/<index>.png per image (index = position in the set, zero-padded) and
        labels.json (classes in order, their folder names, label kind, learned lr, the file of
        each image, and for soft labels the stored label vector of each image). Soft-labelled
        images go to the folder of their argmax class. Folder names are the class index and
        name ("0_T-shirt_top"), "/" and other unsafe characters replaced, so that torchvision's
        ImageFolder, which numbers folders in sorted order, numbers them as the set does.
        `bit_depth` 8: 8-bit PNGs of the [0, 1] pixels (values outside are clipped, as any
        viewer shows them). 16: 16-bit PNGs of the set's whole value range, nothing clipped:
        labels.json's "pixel_range" [low, high] gives pixel = low + png / 65535 * (high - low).
    npz / torch: `out` is a file with images, labels, learned_lr (when known), classes,
        label_kind, label_temperature, dataset, ipc, method and preprocessing_<name> for every
        array of Preprocessing.to_arrays() (mean, std, and zca_* with ZCA), all in network space.
    """
    writers: dict[str, Callable[[SyntheticSet, Path], None]] = {
        "imagefolder": lambda s, o: _export_imagefolder(s, o, bit_depth),
        "npz": _export_npz,
        "torch": _export_torch,
    }
    if fmt not in writers:
        raise ConfigError(f"Unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}.")
    if bit_depth not in (8, 16):
        raise ConfigError(f"PNGs are written with 8 or 16 bits a value, not {bit_depth}.")
    if bit_depth != 8 and fmt != "imagefolder":
        raise ConfigError(f"--bit-depth applies to the imagefolder export; {fmt} keeps the values exactly.")
    out = Path(out)
    writers[fmt](sset, out)
    return out


def left_out_of_export(sset: SyntheticSet) -> list[str]:
    """What a set needs for its own evaluation that no export format holds (the curriculum
    sets' stored views and teacher, without which the kd protocol cannot train on them)."""
    left = []
    logits = sset.extras.get("kd_logits")
    if logits is not None:
        left.append(f"the stored soft labels ({logits.shape[0]} epochs of augmented views)")
    others = sorted(name for name in sset.extras if not name.startswith("kd_"))
    if others:
        left.append(f"the method's arrays {', '.join(others)}")
    if sset.teacher is not None:
        left.append(f"the teacher network ({sset.teacher['arch']})")
    return left


def _export_imagefolder(sset: SyntheticSet, out: Path, bit_depth: int = 8) -> None:
    pixels = sset.preprocessing.invert(sset.images.detach().cpu(), clamp=bit_depth == 8)
    # 16 bits: the set's own range, at least [0, 1], so that nothing is clipped
    low, high = min(0.0, float(pixels.min())), max(1.0, float(pixels.max()))
    folders = class_folder_names(sset.classes)
    classes_of_images = sset.hard_labels().tolist()
    width = len(str(sset.num_images - 1))
    files = []
    with atomic_directory(out) as tmp:
        for folder in folders:
            (tmp / folder).mkdir()
        for index, (image, cls) in enumerate(zip(pixels, classes_of_images)):
            relative = f"{folders[cls]}/{index:0{width}d}.png"
            if bit_depth == 16:
                write_png16(tmp / relative, (image - low) / (high - low))
            else:
                to_pil(image).save(tmp / relative, format="PNG")
            files.append(relative)
        meta: dict[str, Any] = {
            "dataset": sset.dataset,
            "classes": sset.classes,
            "folders": folders,
            "label_kind": sset.label_kind,
            "label_temperature": sset.label_temperature,
            "learned_lr": sset.learned_lr,
            "files": files,
            **({"bit_depth": 16, "pixel_range": [low, high]} if bit_depth == 16 else {"bit_depth": 8}),
        }
        if sset.is_soft:
            meta["soft_labels"] = sset.labels.cpu().tolist()
        (tmp / "labels.json").write_text(json.dumps(meta, indent=1))


def class_folder_names(classes: Sequence[str]) -> list[str]:
    """File-system-safe, unique folder names for the classes, in class order, each led by its
    zero-padded class index ("0_T-shirt_top", ..., "9_Ankle boot"; "07_Horse" among eleven
    classes or more), so that sorting the names, as torchvision's ImageFolder numbers its classes, keeps the
    set's class order.

    "/" (as in Fashion-MNIST's "T-shirt/top"), "\\", control characters and leading dots are
    replaced.
    """
    width = len(str(len(classes) - 1))
    return [f"{index:0{width}d}_" + (re.sub(r"[\x00-\x1f/\\]", "_", name).strip().lstrip(".") or "class")
            for index, name in enumerate(classes)]


def _export_arrays(sset: SyntheticSet) -> dict[str, np.ndarray]:
    """The contents shared by the npz and torch exports, as numpy arrays."""
    arrays = {
        "images": sset.images.detach().cpu().numpy(),
        "labels": sset.labels.cpu().numpy(),
        "classes": np.asarray(sset.classes, dtype=str),
        "label_kind": np.asarray(sset.label_kind),
        "label_temperature": np.float64(sset.label_temperature),
        "dataset": np.asarray(sset.dataset),
        "ipc": np.int64(sset.ipc),
        "method": np.asarray(sset.method),
    }
    if sset.learned_lr is not None:
        arrays["learned_lr"] = np.float64(sset.learned_lr)
    for name, value in sset.preprocessing.to_arrays().items():
        arrays[PREPROCESSING_PREFIX + name] = np.asarray(value)
    return arrays


def _export_npz(sset: SyntheticSet, out: Path) -> None:
    arrays = _export_arrays(sset)
    # A file handle, not a name: np.savez would append ".npz" to the temporary name.
    with atomic_path(out) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def _export_torch(sset: SyntheticSet, out: Path) -> None:
    # Strings stay strings (the class names a list); everything numeric becomes a tensor.
    content = {
        name: (array.tolist() if array.dtype.kind == "U" else torch.from_numpy(np.array(array)))
        for name, array in _export_arrays(sset).items()
    }
    save_torch(content, out)


