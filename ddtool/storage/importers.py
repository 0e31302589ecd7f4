"""Import sets made by other tools: "mtt" (MTT/DATM/FTD tensors saved with torch.save), "dc"
(Dataset Condensation result dicts), "npz" and "torch" (also what `export` writes).

`.pt` files are read with torch.load(weights_only=True): tensors and plain containers only,
never arbitrary pickled code.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ddtool.data.preprocess import Preprocessing
from ddtool.errors import ConfigError, FormatError
from ddtool.storage.export import PREPROCESSING_PREFIX
from ddtool.storage.synthetic_set import SyntheticSet, to_plain

IMPORT_FORMATS = ("mtt", "dc", "npz", "torch")

PathLike = str | os.PathLike


# MTT, DATM and FTD write the un-whitened copy images_zca_<it>.pt only for sets under this many
# images per class (unless run with --force_save), so below it a run with ZCA leaves one at every
# save; at or above it the files cannot tell whether the images are whitened.
MTT_ZCA_COPY_BELOW_IPC = 50


def check_learned_lr(lr: Any) -> float:
    """A learned lr given by the user (`import --lr`): a positive finite number, else ConfigError."""
    try:
        value = float(lr) if not isinstance(lr, bool) else math.nan
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"The learned lr to record (--lr) must be a positive finite number, not {lr!r}: it is "
                          "the step size the evaluation trains the set's networks with (MTT logs it as "
                          "Synthetic_LR; DATM saves it as lr_<it>.pt).")
    return value


def import_set(
    source: PathLike | Sequence[PathLike],
    fmt: str,
    *,
    dataset: str,
    preprocessing: Preprocessing | None = None,
    default_preprocessing: Callable[[], Preprocessing] | None = None,
    zca_preprocessing: Callable[[], Preprocessing] | None = None,
    classes: Sequence[str] | None = None,
    ipc: int | None = None,
    label_kind: str | None = None,
    label_temperature: float | None = None,
    learned_lr: float | None = None,
    experiment: int = 0,
    iteration: int | str | None = None,
) -> SyntheticSet:
    """Build a SyntheticSet from a set made by another tool; bad input raises FormatError.

    source: one file, or for "mtt" a folder or the explicit files.
      mtt: torch.save'd tensors as MTT/DATM/FTD write them: images_<it>.pt (N, C, H, W) in
        network space, labels_<it>.pt (hard ids (N,), or DATM's soft logits (N, K)), optional
        lr_<it>.pt or syn_lr_<it>.pt (a scalar tensor or float), where <it> is an iteration
        number or "best"; FTD's ema_images_<it>.pt / ema_labels_<it>.pt are read alike. In a
        folder, `iteration` picks <it>: "final" (the default, None) the highest number, "best"
        images_best.pt (which MTT/DATM save when the *test* accuracy improves: chosen on the
        test split), or a number; a DATM/FTD folder's "Normal" subfolder is used when the folder
        itself has no images, and a folder of FTD's ema_* files only is read as that EMA set.
        images_zca_<it>.pt is the un-whitened copy ([0, 1] pixels) that these programs write
        beside images_<it>.pt only when the run used ZCA whitening: its presence (in the folder,
        or beside the named images) puts the set in ZCA space (`zca_preprocessing`); a
        contradicting `preprocessing` without ZCA is refused, and so is a set of 50 or more
        images per class with no copy and no `preprocessing` given (the copy is written only
        under 50, so the files cannot tell). Named explicitly, images_zca_<it>.pt stands for
        images_<it>.pt beside it, or, where that is missing, is whitened with the ZCA.
        Explicit files are recognised by the same names.
      dc: a Dataset Condensation result dict {'data': [[images, labels], ...],
        'accs_all_exps': {...}}; `experiment` picks the entry (default 0).
      npz / torch: keys images, labels, classes (optional if `classes` is given), optional
        learned_lr, label_kind, label_temperature and preprocessing_* (what export_set writes).
    dataset: the dataset the images belong to (recorded; the caller builds preprocessing from it).
    preprocessing: the input space of the images (mean/std and ZCA exactly as used when they
        were made). Required unless the file carries it (npz/torch exports) or the callables
        below provide it; when both the file and this are present they must be of one kind
        (both ZCA, or the same mean/std), and the file's is used.
    default_preprocessing: called for the space when neither the file nor `preprocessing` says it.
    zca_preprocessing: called for the ZCA space when MTT/DATM/FTD files show the set is whitened.
    classes: class names; required unless the file carries them.
    ipc: images per class; inferred as N / num_classes when not given.
    label_kind: "logits" or "probs" for soft labels (default: the file's, else "probs" when
        every row is non-negative and sums to 1, one-hot rows included, else "logits", as DATM
        saves logits); hard labels are recognised by their shape.
    label_temperature: of logits (default: the file's, else 1).
    learned_lr: the learned step size to record (MTT saves none); replaces the file's, if any.

    What was decided about the space and the lr, and why, is in config["import_notes"].
    """
    readers: dict[str, Callable[..., dict[str, Any]]] = {
        "mtt": _read_mtt,
        "dc": _read_dc,
        "npz": _read_npz,
        "torch": _read_torch_dict,
    }
    if fmt not in readers:
        raise ConfigError(f"Unknown import format {fmt!r}; choose one of {', '.join(IMPORT_FORMATS)}.")
    if learned_lr is not None:
        learned_lr = check_learned_lr(learned_lr)
    paths = [Path(source)] if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    if not paths:
        raise FormatError(f"No input files were given to import ({fmt}).")
    found = readers[fmt](paths, experiment=experiment, iteration=iteration)
    sources = [str(p) for p in found.pop("sources")]
    where = ", ".join(sources)
    try:
        return _assemble(found, fmt, sources, dataset=dataset, preprocessing=preprocessing,
                         default_preprocessing=default_preprocessing, zca_preprocessing=zca_preprocessing,
                         classes=classes, ipc=ipc, label_kind=label_kind, label_temperature=label_temperature,
                         learned_lr=learned_lr)
    except ConfigError as exc:
        raise FormatError(f"Could not import {where} as a synthetic set ({fmt}): {exc}") from None


def _assemble(found: dict[str, Any], fmt: str, sources: list[str], *, dataset: str,
              preprocessing: Preprocessing | None, default_preprocessing: Callable[[], Preprocessing] | None,
              zca_preprocessing: Callable[[], Preprocessing] | None, classes: Sequence[str] | None,
              ipc: int | None, label_kind: str | None, label_temperature: float | None,
              learned_lr: float | None) -> SyntheticSet:
    """Turn what a reader found into a SyntheticSet, filling in what the caller supplied."""
    where = ", ".join(sources)
    notes: list[str] = list(found.get("notes", []))
    images = _tensor(found["images"], "images", where)  # shape, dtype, NaN: checked by SyntheticSet
    labels = _tensor(found["labels"], "labels", where)
    if label_kind is not None and labels.dim() == 1:
        raise ConfigError(f"its labels are class ids, not soft scores: a soft-label kind ({label_kind}) "
                          "does not apply.")
    labels, kind = _labels_and_kind(labels, label_kind or found.get("label_kind"), where)
    if label_temperature is not None and kind != "logits":
        raise ConfigError(f"its labels are {kind}, not logits: a label temperature does not apply.")

    classes = list(classes) if classes is not None else found.get("classes")
    if classes is None:
        raise ConfigError("the file has no class names; pass the dataset's classes.")
    if ipc is None:
        ipc = found.get("ipc")
    if ipc is None:
        if images.shape[0] % len(classes):
            raise ConfigError(f"{images.shape[0]} images do not divide into {len(classes)} classes; "
                              "give the IPC explicitly.")
        ipc = images.shape[0] // len(classes)

    stored_pre = found.get("preprocessing")
    if stored_pre is not None:
        # the file's own record is exact (its ZCA's matrix and eps); one given only fills in
        if preprocessing is not None:
            _check_same_preprocessing(preprocessing, stored_pre)
        preprocessing = stored_pre
    elif "zca_copies" in found:  # MTT/DATM/FTD: the files may say whether the set is whitened
        preprocessing, said = _mtt_space(found["zca_copies"], preprocessing, zca_preprocessing,
                                         default_preprocessing, int(ipc))
        notes.append(said)
    elif preprocessing is None:
        if default_preprocessing is None:
            raise ConfigError("the file does not record its preprocessing; pass the dataset's "
                              "(mean/std, or the ZCA if the images were made with it).")
        preprocessing = default_preprocessing()
    if found.get("images_are_pixels"):
        # MTT's un-whitened copy: [0, 1] pixels, brought back into the space the run trained in
        images = preprocessing.apply(images.to(torch.float32))

    lr, said = _learned_lr(found.get("learned_lr"), learned_lr, found.get("lr_source"), fmt)
    if said:
        notes.append(said)
    temperature = label_temperature if label_temperature is not None else found.get("label_temperature", 1.0)
    config = {"format": fmt, "sources": sources, **found.get("config", {})}
    if notes:
        config["import_notes"] = notes
    return SyntheticSet(
        images=images,
        labels=labels,
        classes=classes,
        preprocessing=preprocessing,
        dataset=dataset,
        ipc=int(ipc),
        method=f"imported:{fmt}",
        label_kind=kind,
        label_temperature=float(temperature),
        learned_lr=lr,
        config=config,
    )


def _mtt_space(copies: list[Path], given: Preprocessing | None, zca: Callable[[], Preprocessing] | None,
               default: Callable[[], Preprocessing] | None, ipc: int) -> tuple[Preprocessing, str]:
    """The space of MTT/DATM/FTD images, from their un-whitened copies (or their absence) and
    what the caller gave; the second value says which space and why, for the user."""
    if copies:
        names = ", ".join(sorted({p.name for p in copies})[:3]) + (", ..." if len(copies) > 3 else "")
        what = "is the un-whitened copy" if len(copies) == 1 else "are the un-whitened copies"
        evidence = f"{names} in {copies[0].parent} {what} that MTT, DATM and FTD write only for runs with ZCA whitening"
        if given is not None:
            if given.zca is None:
                raise ConfigError(
                    f"{evidence}, so the images are in ZCA-whitened space, but {given.describe()} was given "
                    "(--no-zca). Drop --no-zca (or give --zca): ddtool then whitens with its ZCA of the "
                    "dataset, fitted on the training pixels with eps 0.1 as MTT and DATM fit it. If these files "
                    "were gathered from different runs, keep only the run's own.")
            return given, f"Space: ZCA whitening, as given (--zca); {evidence}."
        if zca is None:
            raise ConfigError(f"{evidence}, so the images are in ZCA-whitened space; pass that space "
                              "(the dataset's ZCA preprocessing, --zca).")
        return zca(), f"Space: ZCA whitening, detected: {evidence}."
    if given is not None:
        return given, f"Space: {given.describe()}, as given ({'--zca' if given.zca is not None else '--no-zca'})."
    if ipc >= MTT_ZCA_COPY_BELOW_IPC:
        raise ConfigError(
            f"whether its images are ZCA-whitened cannot be told from the files: MTT, DATM and FTD write "
            f"the un-whitened copy images_zca_<it>.pt that would show it only for sets under "
            f"{MTT_ZCA_COPY_BELOW_IPC} images per class, and this one has {ipc}. Say which space they are "
            "in: --zca if the run used ZCA whitening (MTT and DATM use it for CIFAR-10 and CIFAR-100), "
            "--no-zca if not; read in the wrong space, a set scores many points below what it is worth.")
    if default is None:
        raise ConfigError("the files do not record their preprocessing; pass the dataset's.")
    chosen = default()
    return chosen, (f"Space: {chosen.describe()}, without ZCA: no images_zca_<it>.pt lies beside the images, "
                    "and MTT, DATM and FTD write one at every save of a ZCA run under "
                    f"{MTT_ZCA_COPY_BELOW_IPC} images per class (give --zca if the run used ZCA and its copies were not kept).")


def _learned_lr(from_file: float | None, given: float | None, source: str | None,
                fmt: str) -> tuple[float | None, str | None]:
    """The lr to record, and what to tell the user about it (None: nothing worth saying)."""
    named = f" ({source})" if source else ""
    if given is None:
        if from_file is None and fmt == "mtt":
            return None, ("Learned lr: none recorded (MTT saves none; it logs it to wandb as Synthetic_LR), so "
                          "the evaluation trains with its protocol's fixed lr; give --lr to record the run's.")
        return from_file, None
    if from_file is None:
        return given, f"Learned lr: {given:.6g}, as given (--lr); the files record none."
    if math.isclose(given, from_file, rel_tol=1e-6):
        return given, f"Learned lr: {given:.6g}, as given (--lr), which agrees with the file's{named}."
    return given, (f"Learned lr: {given:.6g}, as given (--lr), in place of the {from_file:.6g} the file "
                   f"records{named}: the explicit value wins.")


def _labels_and_kind(labels: torch.Tensor, kind: str | None, where: str) -> tuple[torch.Tensor, str]:
    """Hard labels are 1-D class ids (float ids that are whole numbers are accepted, as some
    code stores them so); soft labels are 2-D scores of the kind given or found."""
    if labels.dim() == 1:
        if labels.is_floating_point():
            if not torch.equal(labels, labels.round()):
                raise FormatError(f"The 1-D labels in {where} are not whole class ids.")
            labels = labels.to(torch.int64)
        return labels, "hard"
    if labels.dim() == 2 and labels.is_floating_point():
        kind = kind or ("probs" if _rows_are_distributions(labels) else "logits")
        if kind not in ("logits", "probs"):
            raise ConfigError(f"soft labels must be 'logits' or 'probs', not {kind!r}.")
        return labels, kind
    raise FormatError(f"The labels in {where} must be class ids (N,) or soft scores (N, K); got "
                      f"{labels.dtype} {tuple(labels.shape)}.")


def _rows_are_distributions(scores: torch.Tensor) -> bool:
    """Non-negative rows summing to 1 (one-hot rows included) are probabilities: read as
    logits, a one-hot row would become a target of e/(e + K - 1), 0.23 for ten classes."""
    scores = scores.double()
    return bool((scores >= 0).all()) and torch.allclose(scores.sum(dim=1), torch.ones(len(scores),
                                                                                      dtype=torch.float64), atol=1e-4)


def _check_same_preprocessing(given: Preprocessing, stored: Preprocessing) -> None:
    """The kind of space must agree; two ZCAs may differ in their fit (the file's is used)."""
    if given.zca is None and stored.zca is None:
        same = np.allclose(given.mean, stored.mean) and np.allclose(given.std, stored.std)
    else:
        same = given.zca is not None and stored.zca is not None
    if not same:
        raise ConfigError(
            f"the file was made with {stored.describe()}, but {given.describe()} was given. The "
            "images only make sense in the space they were made in; drop the override or fix it "
            "(e.g. the --zca flag)."
        )


# ---------------------------------------------------------------------- readers
# Every name MTT, DATM and FTD give what they save: <role>_<it>.pt with <it> an iteration number
# or "best" (some forks: best_<it>); FTD's EMA set as ema_images_<it>.pt / ema_labels_<it>.pt;
# the learned lr as lr_<it>.pt (DATM) or syn_lr_<it>.pt; images_zca_<it>.pt the un-whitened copy.
_MTT_NAME = re.compile(r"^(?P<ema>ema_)?(?P<role>images_zca|images|labels|syn_lr|lr)_(?P<it>.+)\.pt$")
_MTT_ROLES = {"images_zca": "zca", "images": "images", "labels": "labels", "syn_lr": "lr", "lr": "lr"}
_MTT_NAMES = ("images_<it>.pt, labels_<it>.pt, lr_<it>.pt or syn_lr_<it>.pt, images_zca_<it>.pt, FTD's "
              "ema_images_<it>.pt and ema_labels_<it>.pt; <it> an iteration number or best")


def _mtt_name(path: Path) -> tuple[str, str, bool] | None:
    """(role, iteration, is FTD's EMA set) of an MTT/DATM/FTD file name, or None."""
    match = _MTT_NAME.match(path.name)
    if not match or (match["role"] == "images" and match["it"].startswith("zca")):
        return None
    role = _MTT_ROLES[match["role"]]
    if match["ema"] and role not in ("images", "labels"):
        return None
    return role, match["it"], bool(match["ema"])


def _read_mtt(paths: list[Path], *, iteration: int | str | None, **_: Any) -> dict[str, Any]:
    notes: list[str] = []
    config: dict[str, Any] = {}
    if len(paths) == 1 and paths[0].is_dir():
        files, chosen, copies, ema = _mtt_files_in_folder(paths[0], iteration)
        config["iteration"] = chosen
    else:
        files, ema, iterations = {}, False, {}
        for path in paths:
            named = _mtt_name(path)
            if named is None:
                raise FormatError(f"{path} is not named like an MTT/DATM/FTD file ({_MTT_NAMES}), so its role is "
                                  "unknown.")
            role, it, ema_file = named
            if role in files:
                raise FormatError(f"Two {role} files were given: {files[role]} and {path}.")
            files[role] = path
            iterations[path] = it
            ema = ema or ema_file
        if len(set(iterations.values())) > 1:
            raise FormatError(
                "The files given are of different iterations of the run ("
                + ", ".join(f"{path.name}: {it}" for path, it in iterations.items())
                + "): the labels and lr of one iteration do not belong to another's images. Give one "
                "iteration's files, or the run's folder with --checkpoint.")
        it = next(iter(iterations.values()))
        if "zca" in files and "images" not in files:
            beside = _first_file(files["zca"].parent, [f"images_{it}.pt", f"ema_images_{it}.pt"])
            if beside is not None:
                files["images"] = beside
                notes.append(f"{files['zca'].name} is the un-whitened copy of {beside.name}, which lies beside "
                             f"it: imported {beside.name}, the images exactly as the run trained them.")
        anchor = files.get("images", files.get("zca"))
        copies = [files["zca"]] if "zca" in files else (_zca_copies(anchor.parent) if anchor else [])
    if "images" not in files and "zca" in files:
        notes.append(f"{files['zca'].name} is an un-whitened copy with no images_<it>.pt beside it: its pixels "
                     "were whitened with ddtool's ZCA of the dataset (fitted as MTT and DATM fit theirs).")
    for role in ("images", "labels"):
        if role not in files and not (role == "images" and "zca" in files):
            raise FormatError(f"The MTT/DATM import needs a {role}_<it>.pt file; none was given "
                              f"(got {', '.join(str(p) for p in paths)}).")
    if ema:
        config["ema"] = True
    image_file = files.get("images", files.get("zca"))
    found: dict[str, Any] = {
        "images": _torch_load(image_file),
        "images_are_pixels": "images" not in files,
        "labels": _torch_load(files["labels"]),
        "sources": [path for role, path in files.items() if role != "zca" or "images" not in files],
        "config": config,
        "zca_copies": copies,
        "notes": notes,
    }
    if "lr" in files:
        found["learned_lr"] = _scalar(_torch_load(files["lr"]), files["lr"])
        found["lr_source"] = files["lr"].name
    return found


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _zca_copies(*folders: Path) -> list[Path]:
    """The un-whitened copies (images_zca_<it>.pt) in the folders: one marks a ZCA run."""
    return sorted({path for folder in folders for path in folder.glob("images_zca_*.pt")
                   if _mtt_name(path) is not None})


def _mtt_files_in_folder(folder: Path, iteration: int | str | None,
                         top: Path | None = None) -> tuple[dict[str, Path], str, list[Path], bool]:
    """The chosen iteration's files, the iteration, the folder's un-whitened copies (also those of
    the run's top folder `top`, where DATM's Normal/ is read) and whether it is FTD's EMA set."""
    plain: dict[str, dict[str, Path]] = {}
    ema: dict[str, dict[str, Path]] = {}
    for path in folder.glob("*.pt"):
        named = _mtt_name(path)
        if named is not None:
            role, it, is_ema = named
            (ema if is_ema else plain).setdefault(it, {})[role] = path
    by_iteration, is_ema = plain, False
    if not any("images" in roles for roles in plain.values()) and any("images" in roles for roles in ema.values()):
        # FTD's ema_logged_files/: ema_images_<it>.pt, with the un-whitened copies named images_zca_<it>.pt
        by_iteration, is_ema = ema, True
        for it, roles in plain.items():
            if "zca" in roles:
                by_iteration.setdefault(it, {}).setdefault("zca", roles["zca"])
    with_images = {it: roles for it, roles in by_iteration.items() if "images" in roles or "zca" in roles}
    if not any("images" in roles for roles in with_images.values()) and (folder / "Normal").is_dir():
        return _mtt_files_in_folder(folder / "Normal", iteration, top=folder)  # DATM/FTD keep the set in Normal/
    if not with_images:
        raise FormatError(f"{folder} holds no images_<it>.pt file: it is not an MTT/DATM/FTD output folder "
                          f"(which hold {_MTT_NAMES}).")
    if iteration is None or iteration == "final":
        # Not "best": MTT/DATM write images_best.pt when the *test* accuracy improves, so taking it
        # would select the set on the test split its evaluation then reports.
        numbered = [it for it in with_images if it.isdigit()]
        if not numbered:
            raise FormatError(
                f"{folder} holds no numbered images_<iteration>.pt, only "
                f"{', '.join(f'images_{it}.pt' for it in sorted(with_images))}. images_best.pt is the set "
                "MTT/DATM kept for its best *test* accuracy (chosen on the test split, so its score is "
                "optimistic); import it only knowingly, with --checkpoint best (iteration=\"best\")."
            )
        chosen = max(numbered, key=int)
    else:
        chosen = str(iteration)
        if chosen not in with_images:
            raise FormatError(f"{folder} has no images_{chosen}.pt; it has iterations "
                              f"{', '.join(sorted(with_images, key=_iteration_order))}.")
    copies = _zca_copies(folder, *([top] if top is not None else []))
    return with_images[chosen], chosen, copies, is_ema


def _iteration_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (-1, name)


def _read_dc(paths: list[Path], *, experiment: int, **_: Any) -> dict[str, Any]:
    path = _single(paths, "dc")
    content = _torch_load(path)
    if not isinstance(content, Mapping) or not isinstance(content.get("data"), (list, tuple)):
        raise FormatError(f"{path} is not a Dataset Condensation result: expected a dict with a 'data' "
                          "list of [images, labels] pairs.")
    data = content["data"]
    if not 0 <= experiment < len(data):
        raise FormatError(f"{path} holds {len(data)} experiments (0..{len(data) - 1}); experiment "
                          f"{experiment} does not exist.")
    entry = data[experiment]
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise FormatError(f"{path}: data[{experiment}] is not an [images, labels] pair.")
    config: dict[str, Any] = {"experiment": experiment, "experiments_in_file": len(data)}
    if content.get("accs_all_exps") is not None:
        try:  # the accuracies the original code measured, kept for reference
            config["published_accuracies"] = to_plain(content["accs_all_exps"], "accs_all_exps")
        except ConfigError:  # something exotic: not worth failing the import for
            pass
    return {"images": entry[0], "labels": entry[1], "sources": [path], "config": config}


def _read_npz(paths: list[Path], **_: Any) -> dict[str, Any]:
    path = _single(paths, "npz")
    _require_file(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            content = {name: npz[name] for name in npz.files}
    except (OSError, ValueError, EOFError) as exc:  # not a zip / pickled objects / truncated
        raise FormatError(f"{path} is not a readable npz file ({type(exc).__name__}: {exc}).") from None
    return _from_export_dict(content, path)


def _read_torch_dict(paths: list[Path], **_: Any) -> dict[str, Any]:
    path = _single(paths, "torch")
    content = _torch_load(path)
    if not isinstance(content, Mapping):
        raise FormatError(f"{path} does not hold a dict of tensors (found {type(content).__name__}).")
    return _from_export_dict(dict(content), path)


def _from_export_dict(content: dict[str, Any], path: Path) -> dict[str, Any]:
    """The keys export_set writes (and the minimal images/labels of foreign npz files)."""
    for key in ("images", "labels"):
        if key not in content:
            raise FormatError(f"{path} lacks the {key!r} entry (it has {', '.join(sorted(content)) or 'none'}).")
    found: dict[str, Any] = {"images": content["images"], "labels": content["labels"], "sources": [path]}
    if "classes" in content:
        found["classes"] = [str(c) for c in np.asarray(content["classes"]).ravel().tolist()]
    if "learned_lr" in content:
        found["learned_lr"] = _scalar(content["learned_lr"], path)
    for key in ("label_kind", "label_temperature", "ipc"):
        if key in content:
            found[key] = _plain(content[key])
    pre = {key[len(PREPROCESSING_PREFIX):]: _numpy(value) for key, value in content.items()
           if key.startswith(PREPROCESSING_PREFIX)}
    if pre:
        found["preprocessing"] = Preprocessing.from_arrays(pre)
    config = {key: _plain(content[key]) for key in ("dataset", "method") if key in content}
    if config:
        found["config"] = {"original": config}
    return found


# ---------------------------------------------------------------------- reading helpers
def _numpy_safe_globals() -> list:
    """numpy scalars inside DC result dicts (the accuracies) pickle as these; they only
    rebuild numbers, so allowing them is safe. The scalar's module is numpy.core in files
    from numpy 1.x and numpy._core from numpy 2, whichever numpy reads them."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    aliases = [(scalar, f"{module}.multiarray.scalar") for module in ("numpy.core", "numpy._core")]
    dtypes = [np.dtype] + [type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"]
    return aliases + dtypes


def _torch_load(path: Path) -> Any:
    _require_file(path)
    # torch < 2.5 has no safe_globals: numpy scalars are then refused (a clear FormatError).
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    allow_numpy = safe_globals(_numpy_safe_globals()) if safe_globals else contextlib.nullcontext()
    try:
        with allow_numpy:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file that is not a tensor file
        raise FormatError(
            f"{path} could not be read with torch.load(weights_only=True) ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). It must be a file written by torch.save "
            "holding tensors, numbers, strings, lists and dicts only; other pickled objects are "
            "refused because loading them could run arbitrary code."
        ) from None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FormatError(f"{path} does not exist (or is not a file).")


def _single(paths: list[Path], fmt: str) -> Path:
    if len(paths) != 1:
        raise FormatError(f"The {fmt} import reads one file; {len(paths)} were given.")
    return paths[0]


def _tensor(value: Any, what: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.array(value))
    raise FormatError(f"The {what} in {where} are not a numeric tensor or array (found {type(value).__name__}).")


def _numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _plain(value: Any) -> Any:
    """A 0-d array/tensor or Python value as a Python scalar or string."""
    array = _numpy(value)
    return array.item() if array.ndim == 0 else array.tolist()


def _scalar(value: Any, path: Path) -> float:
    """A learned lr: saved as a 0-d/1-element tensor (DATM) or a Python float (some forks)."""
    try:
        array = _numpy(value).astype(np.float64)
        if array.size != 1:
            raise ValueError(f"{array.size} values")
        return float(array.reshape(()))
    except (TypeError, ValueError) as exc:
        raise FormatError(f"The learned lr in {path} is not a single number ({exc}).") from None


