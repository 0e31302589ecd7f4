"""Importing what the published MTT, DATM and FTD code writes: their file names, their ZCA copies,
a learned lr given by hand; and the refusal of a one-class folder dataset.

Every file is written here as those programs write it: torch.save of the live tensors' .cpu()
(images_<it>.pt, labels_<it>.pt, DATM's lr_<it>.pt, and, for ZCA runs under 50 images per class,
images_zca_<it>.pt = the ZCA's inverse of the images, i.e. [0, 1] pixels).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddtool import data
from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.errors import ConfigError, FormatError
from ddtool.storage import import_set, load_synthetic_set
from ddtool.storage.importers import check_learned_lr

CLASSES = ["a", "b", "c"]
SHAPE = (1, 4, 4)  # a 16-dimensional ZCA: quick to fit


def _zca_space() -> Preprocessing:
    pixels = torch.rand(200, *SHAPE, generator=torch.Generator().manual_seed(0))
    return Preprocessing((0.0,) * SHAPE[0], (1.0,) * SHAPE[0], ZCA.fit(pixels, eps=0.1))


PLAIN = Preprocessing((0.5,), (0.25,))
WHITE = _zca_space()


def _images(ipc: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(CLASSES) * ipc, *SHAPE, generator=g), torch.arange(len(CLASSES)).repeat_interleave(ipc)


def save_like_mtt(folder: Path, it: str, images: torch.Tensor, labels: torch.Tensor, *, lr: float | None = None,
                  zca: Preprocessing | None = None, lr_name: str = "lr", prefix: str = "") -> None:
    """distill.py's saving: the images and labels of iteration `it`; DATM also the lr; with ZCA
    (under 50 IPC) the un-whitened copy, zca_trans.inverse_transform(images)."""
    folder.mkdir(parents=True, exist_ok=True)
    image_syn = images.clone().requires_grad_(True)
    torch.save(image_syn.cpu(), folder / f"{prefix}images_{it}.pt")
    torch.save(labels.clone().cpu(), folder / f"{prefix}labels_{it}.pt")
    if lr is not None:
        torch.save(torch.tensor(lr).requires_grad_(True).detach().cpu(), folder / f"{lr_name}_{it}.pt")
    if zca is not None:
        torch.save(zca.zca.invert(image_syn.detach()).cpu(), folder / f"images_zca_{it}.pt")


def _never() -> Preprocessing:
    raise AssertionError("this space must not be asked for")


def load(source, **kwargs):
    kwargs.setdefault("dataset", "tiny")
    kwargs.setdefault("classes", CLASSES)
    kwargs.setdefault("default_preprocessing", lambda: PLAIN)
    kwargs.setdefault("zca_preprocessing", lambda: WHITE)
    return import_set(source, "mtt", **kwargs)


def notes(sset) -> str:
    return " ".join(sset.config.get("import_notes", []))


# ---------------------------------------------------------------------- ZCA copies
def test_a_folder_with_zca_copies_is_imported_in_zca_space_without_flags(tmp_path):
    images, labels = _images()
    run = tmp_path / "logged_files" / "CIFAR10" / "run"
    save_like_mtt(run, "900", images + 1, labels, zca=WHITE)
    save_like_mtt(run, "1000", images, labels, zca=WHITE)
    sset = load(run, default_preprocessing=_never)
    assert sset.preprocessing.zca is not None and torch.equal(sset.images, images)
    assert sset.config["iteration"] == "1000"
    assert "ZCA whitening, detected" in notes(sset) and "images_zca_1000.pt" in notes(sset)
    assert all("images_zca" not in s for s in sset.config["sources"])  # the copy is not what was read
    # --zca agrees; --no-zca contradicts the files and is refused, with the fix
    assert load(run, preprocessing=WHITE).preprocessing.zca is not None
    with pytest.raises(FormatError) as info:
        load(run, preprocessing=PLAIN)
    message = " ".join(str(info.value).split())
    assert "only for runs with ZCA whitening" in message and "Drop --no-zca" in message and "\n" not in str(info.value)


def test_the_copy_marks_best_too_and_datm_normal_folders(tmp_path):
    images, labels = _images()
    run = tmp_path / "datm-run"
    save_like_mtt(run / "Normal", "500", images + 1, labels, lr=0.03, zca=WHITE)
    save_like_mtt(run / "Normal", "best", images, labels, lr=0.02)  # DATM writes no images_zca_best.pt
    best = load(run, iteration="best", default_preprocessing=_never)
    assert best.preprocessing.zca is not None and torch.equal(best.images, images)
    assert best.learned_lr == pytest.approx(0.02)


def test_explicit_files_with_a_copy_beside_them_are_in_zca_space(tmp_path):
    images, labels = _images()
    save_like_mtt(tmp_path, "1000", images, labels, zca=WHITE)
    sset = load([tmp_path / "images_1000.pt", tmp_path / "labels_1000.pt"], default_preprocessing=_never)
    assert sset.preprocessing.zca is not None and torch.equal(sset.images, images)


def test_no_copy_under_50_ipc_is_plain_and_said_so(tmp_path):
    images, labels = _images()
    save_like_mtt(tmp_path, "1000", images, labels)
    sset = load(tmp_path, zca_preprocessing=_never)
    assert sset.preprocessing.zca is None and sset.preprocessing.mean == PLAIN.mean
    assert "without ZCA" in notes(sset) and "--zca" in notes(sset)


def test_no_copy_at_50_ipc_cannot_be_told_and_is_refused_unless_given(tmp_path):
    images, labels = _images(ipc=50)
    save_like_mtt(tmp_path, "1000", images, labels)  # MTT writes no copy at 50 IPC, ZCA or not
    with pytest.raises(FormatError) as info:
        load(tmp_path, zca_preprocessing=_never, default_preprocessing=_never)
    message = " ".join(str(info.value).split())
    assert "cannot be told" in message and "--zca" in message and "--no-zca" in message and "has 50" in message
    assert load(tmp_path, preprocessing=WHITE).preprocessing.zca is not None
    assert load(tmp_path, preprocessing=PLAIN).preprocessing.zca is None


# ---------------------------------------------------------------------- file names
@pytest.mark.parametrize("names, expected_lr", [
    (["images_best.pt", "labels_best.pt"], None),  # MTT's test-selected set
    (["images_best.pt", "labels_best.pt", "lr_best.pt"], 0.02),  # DATM
    (["images_1000.pt", "labels_1000.pt", "syn_lr_1000.pt"], 0.02),
    (["images_best.pt", "labels_best.pt", "syn_lr_best.pt"], 0.02),
    (["ema_images_1000.pt", "ema_labels_1000.pt"], None),  # FTD's EMA set
    (["images_zca_1000.pt", "labels_1000.pt"], None),  # the copy named: images_1000.pt beside it is read
    (["images_zca_best.pt", "labels_best.pt", "lr_best.pt"], 0.02),
])
def test_every_name_the_published_code_writes_is_accepted(tmp_path, names, expected_lr):
    images, labels = _images()
    for it in ("1000", "best"):
        save_like_mtt(tmp_path, it, images, labels, lr=0.02, zca=WHITE)
        save_like_mtt(tmp_path, it, images, labels, lr=0.02, lr_name="syn_lr")
        save_like_mtt(tmp_path, it, images, labels, prefix="ema_")
    sset = load([tmp_path / name for name in names])
    assert torch.equal(sset.images, images) and torch.equal(sset.labels, labels)
    assert sset.preprocessing.zca is not None  # the copies lie beside every one of them
    assert sset.learned_lr == (pytest.approx(expected_lr) if expected_lr else None)
    if names[0].startswith("images_zca"):
        assert f"imported images_{names[0][11:-3]}.pt" in notes(sset)
    if names[0].startswith("ema_"):
        assert sset.config["ema"] is True


def test_a_named_copy_alone_is_whitened_back(tmp_path):
    images, labels = _images()
    save_like_mtt(tmp_path, "1000", images, labels, zca=WHITE)
    (tmp_path / "images_1000.pt").unlink()  # only the copy was kept
    sset = load([tmp_path / "images_zca_1000.pt", tmp_path / "labels_1000.pt"], default_preprocessing=_never)
    assert sset.preprocessing.zca is not None
    assert torch.allclose(sset.images, images, atol=1e-4)  # whitening undoes the inverse
    assert "whitened" in notes(sset)
    with pytest.raises(FormatError, match="--no-zca"):  # pixels are not in a mean/std space
        load([tmp_path / "images_zca_1000.pt", tmp_path / "labels_1000.pt"], preprocessing=PLAIN)


def test_an_ftd_ema_folder_is_read_with_its_copies(tmp_path):
    images, labels = _images()
    ema = tmp_path / "ema_logged_files" / "CIFAR10" / "run"
    save_like_mtt(ema, "1000", images, labels, prefix="ema_")
    torch.save(WHITE.zca.invert(images), ema / "images_zca_1000.pt")  # FTD names the EMA copy so
    sset = load(ema, default_preprocessing=_never)
    assert torch.equal(sset.images, images) and sset.config["ema"] is True and sset.preprocessing.zca is not None


def test_a_name_not_written_by_the_published_code_is_refused_listing_the_names(tmp_path):
    images, labels = _images()
    save_like_mtt(tmp_path, "1000", images, labels)
    torch.save(images, tmp_path / "synthetic.pt")
    with pytest.raises(FormatError, match="images_zca_<it>.pt") as info:
        load([tmp_path / "synthetic.pt", tmp_path / "labels_1000.pt"])
    assert "syn_lr_<it>.pt" in str(info.value)


# ---------------------------------------------------------------------- learned lr
def test_a_given_lr_is_recorded_and_wins_over_the_files(tmp_path):
    images, labels = _images()
    save_like_mtt(tmp_path / "mtt", "1000", images, labels)  # MTT saves no lr
    plain = load(tmp_path / "mtt")
    assert plain.learned_lr is None and "give --lr" in notes(plain)
    given = load(tmp_path / "mtt", learned_lr=0.0123)
    assert given.learned_lr == 0.0123 and "as given (--lr)" in notes(given)

    save_like_mtt(tmp_path / "datm", "1000", images, labels, lr=0.03)
    kept = load(tmp_path / "datm")
    assert kept.learned_lr == pytest.approx(0.03)
    replaced = load(tmp_path / "datm", learned_lr=0.05)
    assert replaced.learned_lr == 0.05
    assert "in place of the 0.03" in notes(replaced) and "lr_1000.pt" in notes(replaced)
    agreeing = load(tmp_path / "datm", learned_lr=0.03)  # the file's float32 0.03 is the same lr
    assert "agrees" in notes(agreeing)


@pytest.mark.parametrize("bad", [0.0, -0.01, math.nan, math.inf, True, "x"])
def test_a_learned_lr_that_is_not_a_positive_finite_number_is_refused(tmp_path, bad):
    with pytest.raises(ConfigError, match="positive finite number"):
        check_learned_lr(bad)
    images, labels = _images()
    save_like_mtt(tmp_path, "1000", images, labels)
    with pytest.raises(ConfigError, match="--lr"):
        load(tmp_path, learned_lr=bad)


# ---------------------------------------------------------------------- one-class folders
def _image_folder(root: Path, classes: list[str]) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_a_one_class_folder_dataset_is_refused_where_it_is_loaded(tmp_path):
    _image_folder(tmp_path / "cats", ["cat"])
    with pytest.raises(FormatError, match="single class folder \\(cat\\).*meaningless.*at least two classes"):
        data.load_raw(f"folder:{tmp_path / 'cats'}")
    with pytest.raises(FormatError, match="single class folder"):
        data.get_spec(f"folder:{tmp_path / 'cats'}")
    _image_folder(tmp_path / "pets", ["cat", "dog"])
    assert data.load_raw(f"folder:{tmp_path / 'pets'}").spec.num_classes == 2


# ---------------------------------------------------------------------- through the command line
def ddtool(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ddtool", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ), cwd=cwd, timeout=600)


def refused(result, *phrases):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    said = " ".join(result.stderr.split())
    for phrase in phrases:
        assert phrase in said, result.stderr
    return said


def test_cli_imports_an_mtt_zca_run_right_without_flags_and_records_lr(tmp_path, fashion_root):
    from ddtool.data import get_spec, prepare

    spec = get_spec("fashion-mnist")
    # the space MTT trains in: the ZCA of the training pixels (here the tiny Fashion-MNIST's)
    white = prepare("fashion-mnist", fashion_root, zca=True, val_per_class=0).preprocessing
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(2)
    run = tmp_path / "logged_files" / "FashionMNIST" / "run"
    save_like_mtt(run, "1000", images, labels, zca=white)
    out = tmp_path / "mtt.h5"
    done = ddtool("import", run, "--format", "mtt", "-d", "fashion-mnist", "--data-root", fashion_root,
                  "--lr", "0.0217", "-o", out)
    assert done.returncode == 0, done.stdout + done.stderr
    said = " ".join(done.stdout.split())
    assert "ZCA whitening, detected" in said and "images_zca_1000.pt" in said
    assert "Learned lr: 0.0217, as given (--lr); the files record none" in said
    sset = load_synthetic_set(out)
    assert sset.preprocessing.zca is not None and sset.learned_lr == 0.0217 and torch.equal(sset.images, images)
    assert sset.classes == list(spec.classes)

    # the copy named explicitly: accepted, and the images beside it are what is imported
    named = ddtool("import", run / "images_zca_1000.pt", run / "labels_1000.pt", "--format", "mtt",
                   "-d", "fashion-mnist", "--data-root", fashion_root, "-o", tmp_path / "named.h5")
    assert named.returncode == 0, named.stdout + named.stderr
    assert torch.equal(load_synthetic_set(tmp_path / "named.h5").images, images)
    assert load_synthetic_set(tmp_path / "named.h5").preprocessing.zca is not None


def test_cli_refuses_contradictions_and_bad_lr_without_writing(tmp_path, fashion_root):
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(20, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(2)
    run = tmp_path / "run"
    save_like_mtt(run, "1000", images, labels)
    torch.save(images.clone(), run / "images_zca_1000.pt")  # a copy: the run used ZCA
    out = tmp_path / "x.h5"
    refused(ddtool("import", run, "--format", "mtt", "-d", "fashion-mnist", "--data-root", fashion_root,
                   "--no-zca", "-o", out), "images_zca_1000.pt", "Drop --no-zca")
    refused(ddtool("import", run, "--format", "mtt", "--lr", "-0.01", "-o", out), "positive finite number")
    assert not out.exists() and not list(tmp_path.glob("*.h5*"))

    # 50 images a class and no copy: which space cannot be told; --no-zca settles it
    big = tmp_path / "big"
    save_like_mtt(big, "1000", torch.randn(500, 1, 28, 28, generator=g), torch.arange(10).repeat_interleave(50))
    refused(ddtool("import", big, "--format", "mtt", "-d", "fashion-mnist", "--data-root", fashion_root, "-o", out),
            "cannot be told", "--zca", "--no-zca")
    assert not out.exists()
    done = ddtool("import", big, "--format", "mtt", "-d", "fashion-mnist", "--data-root", fashion_root,
                  "--no-zca", "-o", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "as given (--no-zca)" in " ".join(done.stdout.split())
    assert load_synthetic_set(out).preprocessing.zca is None


def test_cli_refuses_a_one_class_folder_dataset(tmp_path):
    _image_folder(tmp_path / "cats", ["cat"])
    refused(ddtool("distill", "--method", "random", "--ipc", 1, "--dataset", f"folder:{tmp_path / 'cats'}",
                   "--dry-run", cwd=tmp_path), "single class folder (cat)", "at least two classes")
