"""ddtool.storage: the synthetic-set HDF5 file, atomic writes, import/export, grid picture."""

from __future__ import annotations

import contextlib
import functools
import dataclasses
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import ddtool.storage.h5file as h5file
from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.errors import ConfigError, DDToolError, FormatError
from ddtool.storage import (
    SyntheticSet,
    append_evaluation,
    export_set,
    import_set,
    load_synthetic_set,
    save_grid_png,
    save_synthetic_set,
)
from ddtool.storage.picture import GRID_PADDING

CLASSES = ["T-shirt/top", "Trouser", "Pullover"]
DOC = Path(__file__).resolve().parents[1] / "docs" / "synthetic-set-format.md"


# ---------------------------------------------------------------------- fixtures
@functools.lru_cache(maxsize=None)
def make_preprocessing(channels: int = 3, size: int = 6, zca: bool = False) -> Preprocessing:
    mean, std = tuple(0.3 + 0.1 * c for c in range(channels)), tuple(0.2 + 0.05 * c for c in range(channels))
    return Preprocessing(mean, std, make_zca(channels * size * size) if zca else None)


def make_zca(dim: int) -> ZCA:
    """A well-conditioned whitening transform and its exact inverse. (ZCA.fit's eigendecomposition
    is slow on a busy 2-core machine and not what these tests are about.)"""
    gen = torch.Generator().manual_seed(0)
    matrix = torch.eye(dim, dtype=torch.float64) + 0.02 * torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    mean = 0.1 * torch.randn(dim, generator=gen)
    return ZCA(mean, matrix.float(), torch.linalg.inv(matrix).float(), eps=0.1)


def make_set(label_kind: str = "hard", *, channels: int = 3, size: int = 6, ipc: int = 2, zca: bool = False,
             rich: bool = False, **overrides) -> SyntheticSet:
    """A small valid set; `rich` adds every optional part (lr, config, evaluations, extras, teacher)."""
    gen = torch.Generator().manual_seed(1)
    k = len(CLASSES)
    n = ipc * k
    hard = torch.arange(k).repeat_interleave(ipc)
    labels = {
        "hard": hard,
        "logits": torch.randn(n, k, generator=gen) * 3,
        "probs": torch.softmax(torch.randn(n, k, generator=gen), dim=1),
    }.get(label_kind, hard)
    fields = dict(
        images=torch.randn(n, channels, size, size, generator=gen),
        labels=labels,
        classes=list(CLASSES),
        preprocessing=make_preprocessing(channels, size, zca),
        dataset="fashion-mnist",
        ipc=ipc,
        method="mtt",
        label_kind=label_kind,
        seed=7,
    )
    if rich:
        fields.update(
            learned_lr=0.0123456789,
            label_temperature=2.5 if label_kind == "logits" else 1.0,
            config={"syn_steps": 20, "lr_img": 100.0, "zca": zca, "windows": (0, 4), "note": None},
            evaluations=[
                {"protocol": {"epochs": 300, "lr": "learned", "dsa": True}, "arch": "convnet",
                 "runs": [0.81, 0.8, 0.82], "random_mean": 0.7, "random_runs": np.array([0.69, 0.71]),
                 "device": "cpu", "seconds": 12.5, "tags": ["a", "b"], "teacher_live": False},
            ],
            extras={"view_logits": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                    "crop_seed": np.int64(5)},
            teacher={"arch": "resnet18", "options": {"norm": "batch"},
                     "state": {"conv.weight": torch.randn(4, 3, 3, 3, generator=gen),
                               "bn.num_batches_tracked": torch.tensor(17),
                               "fc.bias": torch.randn(3, generator=gen).to(torch.bfloat16)}},
        )
    fields.update(overrides)
    return SyntheticSet(**fields)


def assert_same_set(a: SyntheticSet, b: SyntheticSet) -> None:
    assert torch.equal(a.images, b.images) and a.images.dtype == b.images.dtype == torch.float32
    assert torch.equal(a.labels, b.labels) and a.labels.dtype == b.labels.dtype
    for name in ("classes", "dataset", "ipc", "method", "label_kind", "label_temperature", "learned_lr",
                 "config", "seed", "evaluations", "created", "ddtool_version"):
        assert getattr(a, name) == getattr(b, name), name
    pa, pb = a.preprocessing.to_arrays(), b.preprocessing.to_arrays()
    assert pa.keys() == pb.keys()
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key])
    assert a.extras.keys() == b.extras.keys()
    for key in a.extras:
        np.testing.assert_array_equal(a.extras[key], b.extras[key])
        assert a.extras[key].dtype == b.extras[key].dtype
    assert (a.teacher is None) == (b.teacher is None)
    if a.teacher is not None:
        assert a.teacher["arch"] == b.teacher["arch"] and a.teacher["options"] == b.teacher["options"]
        assert list(a.teacher["state"]) == list(b.teacher["state"])  # order kept
        for key, value in a.teacher["state"].items():  # bfloat16 comes back as float32, same values
            assert torch.equal(b.teacher["state"][key].to(value.dtype), value), key


# ---------------------------------------------------------------------- the dataclass
def test_label_helpers():
    logits = make_set("logits", label_temperature=2.0)
    assert torch.allclose(logits.soft_targets(), torch.softmax(logits.labels / 2.0, dim=1))
    assert torch.equal(logits.hard_labels(), logits.labels.argmax(dim=1))
    probs = make_set("probs")
    assert torch.equal(probs.soft_targets(), probs.labels)
    hard = make_set()
    assert torch.equal(hard.hard_labels(), hard.labels)
    assert torch.equal(hard.soft_targets().argmax(dim=1), hard.labels)
    assert hard.num_classes == 3 and hard.num_images == 6 and hard.image_shape == (3, 6, 6)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"labels": torch.tensor([0, 0, 1, 1, 2, 3])}, "must lie in"),
        ({"images": torch.randn(9, 3, 6, 6), "labels": torch.zeros(9, dtype=torch.long)}, "must have 6 images"),
        ({"labels": torch.zeros(6, 2), "label_kind": "logits"}, "shape"),
        ({"labels": torch.ones(6, 3), "label_kind": "probs"}, "summing to 1"),
        ({"images": torch.full((6, 3, 6, 6), float("nan"))}, "NaN"),
        ({"images": torch.randn(6, 6, 6)}, "(N, C, H, W)"),
        ({"preprocessing": make_preprocessing(channels=1)}, "channel"),
        ({"label_kind": "soft"}, "label_kind"),
        ({"learned_lr": -0.01}, "positive"),
        ({"config": {1: "x"}}, "keys must be strings"),
        ({"config": {"f": object()}}, "JSON"),
        ({"extras": {"a/b": np.zeros(2)}}, "not a valid name"),
        ({"evaluations": [{"arch": "convnet", "runs": [0.5]}]}, "protocol"),
        ({"teacher": {"arch": "x", "state": {}}}, "teacher"),
    ],
)
def test_validation_rejects(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_set(**overrides)


def test_soft_labels_are_not_tied_to_ipc():
    sset = make_set("logits", ipc=5, images=torch.randn(7, 3, 6, 6), labels=torch.randn(7, 3))
    assert sset.num_images == 7


# ---------------------------------------------------------------------- HDF5 round trip
@pytest.mark.parametrize("label_kind, zca", [("hard", True), ("logits", False), ("probs", True)])
def test_round_trip_is_exact(tmp_path, label_kind, zca):
    sset = make_set(label_kind, zca=zca, rich=True)
    path = save_synthetic_set(tmp_path / "set.h5", sset)
    loaded = load_synthetic_set(path)
    assert_same_set(sset, loaded)
    assert loaded.teacher["state"]["bn.num_batches_tracked"].dtype == torch.int64
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]  # no temporary file left


def test_minimal_set_round_trip_has_no_optional_members(tmp_path):
    sset = make_set()
    save_synthetic_set(tmp_path / "set.h5", sset)
    assert_same_set(sset, load_synthetic_set(tmp_path / "set.h5"))
    with h5py.File(tmp_path / "set.h5", "r") as f:
        assert "learned_lr" not in f and "teacher" not in f
        assert len(f["evaluations"]) == 0 and len(f["extras"]) == 0


def test_readable_with_plain_h5py(tmp_path):
    sset = make_set("logits", zca=True, rich=True)
    path = tmp_path / "set.h5"
    save_synthetic_set(path, sset)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "ddtool.synthetic_set" and f.attrs["schema_version"] == 1
        assert f.attrs["dataset"] == "fashion-mnist" and f.attrs["ipc"] == 2 and f.attrs["seed"] == 7
        assert f.attrs["label_kind"] == "logits" and f.attrs["label_temperature"] == 2.5
        assert f.attrs["num_classes"] == 3 and tuple(f.attrs["image_shape"]) == (3, 6, 6)
        assert json.loads(f.attrs["config"])["syn_steps"] == 20
        assert f["images"].dtype == np.float32 and f["labels"].shape == (6, 3)
        assert list(f["classes"].asstr()[()]) == CLASSES
        assert f["learned_lr"][()] == 0.0123456789
        assert f["preprocessing/zca_matrix"].compression in (None, "gzip")
        record = f["evaluations/000"]
        assert json.loads(record.attrs["protocol"])["epochs"] == 300
        assert record.attrs["arch"] == "convnet"
        np.testing.assert_allclose(record["runs"][()], [0.81, 0.8, 0.82])
        np.testing.assert_allclose(record.attrs["mean"], 0.81)
        assert "timestamp" in record.attrs
        assert f["teacher"].attrs["arch"] == "resnet18" and f["teacher/state/conv.weight"].shape == (4, 3, 3, 3)


def test_documented_plain_h5py_example_runs(tmp_path):
    """The example in docs/synthetic-set-format.md loads, un-whitens and de-normalises."""
    sset = make_set(zca=True, rich=True)
    path = tmp_path / "set.h5"
    save_synthetic_set(path, sset)
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    scope: dict = {}
    exec(code.replace('"set.h5"', repr(str(path))), scope)
    np.testing.assert_allclose(scope["pixels"], sset.preprocessing.invert(sset.images).numpy(), atol=1e-5)
    np.testing.assert_array_equal(scope["y"], sset.labels.numpy())
    assert scope["lr"] == sset.learned_lr


def test_large_arrays_are_compressed(tmp_path):
    sset = make_set(zca=True, size=8)  # ZCA matrices of 192x192 float32 = 144 KiB each
    save_synthetic_set(tmp_path / "set.h5", sset)
    with h5py.File(tmp_path / "set.h5", "r") as f:
        assert f["preprocessing/zca_matrix"].compression == "gzip"
    assert_same_set(sset, load_synthetic_set(tmp_path / "set.h5"))


# ---------------------------------------------------------------------- rejection on read
def _rewrite(path: Path, edit) -> None:
    with h5py.File(path, "r+") as f:
        edit(f)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p.write_text("images,labels\n1,2\n"), "not an HDF5 file"),
        (lambda p: p.unlink() or h5py.File(p, "w").create_dataset("x", data=[1]), "not a ddtool synthetic set"),
        (lambda p: _rewrite(p, lambda f: f.attrs.__setitem__("format", "ddtool.experts")), "a different ddtool file"),
        (lambda p: _rewrite(p, lambda f: f.attrs.__setitem__("schema_version", 2)), "schema version 2"),
        (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "truncated or corrupt"),
        (lambda p: _rewrite(p, lambda f: f.__delitem__("labels")), "lacks labels"),
        (lambda p: _rewrite(p, lambda f: f.attrs.__delitem__("ipc")), "lacks @ipc"),
        (lambda p: p.unlink(), "does not exist"),
        (lambda p: _rewrite(p, lambda f: f.__delitem__("images") or f.create_group("images")), "/images is a group"),
        (lambda p: _rewrite(p, lambda f: f["preprocessing"].__delitem__("std") or f["preprocessing"].create_dataset(
            "std", data=np.zeros(3))), "inconsistent mean/std"),
    ],
    ids=["not-hdf5", "foreign", "other-ddtool", "future-schema", "truncated", "missing-dataset",
         "missing-attr", "missing-file", "group-for-dataset", "zero-std"],
)
def test_load_rejects_bad_files(tmp_path, damage, message):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set(rich=True))
    damage(path)
    with pytest.raises(FormatError, match=re.escape(message)) as info:
        load_synthetic_set(path)
    assert str(path) in str(info.value)


def test_load_rejects_inconsistent_contents(tmp_path):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set())

    def break_labels(f):
        del f["labels"]
        f["labels"] = np.array([0, 1, 2, 3, 4, 5])

    _rewrite(path, break_labels)
    with pytest.raises(FormatError, match="inconsistent synthetic set.*must lie in"):
        load_synthetic_set(path)


def test_load_rejects_misshaped_images(tmp_path):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set())

    def flatten(f):
        images = f["images"][()]
        del f["images"]
        f["images"] = images.reshape(6, -1)

    _rewrite(path, flatten)
    with pytest.raises(FormatError, match=re.escape("float32 (N, C, H, W)")):
        load_synthetic_set(path)


# ---------------------------------------------------------------------- atomicity
def _fail_on_second_array(monkeypatch):
    """Make the writer raise after it has written part of the file."""
    original, calls = h5file._write_array, []

    def flaky(group, name, array):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated crash mid-write")
        original(group, name, array)

    monkeypatch.setattr(h5file, "_write_array", flaky)


def test_writing_through_a_link_updates_the_file_it_names_and_keeps_its_permissions(tmp_path):
    real = tmp_path / "real" / "set.h5"
    save_synthetic_set(real, make_set())
    real.chmod(0o640)
    link = tmp_path / "link.h5"
    link.symlink_to(real)
    append_evaluation(link, {"protocol": {}, "arch": "convnet", "runs": [0.5]})
    assert link.is_symlink() and len(load_synthetic_set(real).evaluations) == 1
    assert real.stat().st_mode & 0o777 == 0o640
    save_synthetic_set(link, make_set(images=torch.zeros(6, 3, 6, 6)))
    assert link.is_symlink() and load_synthetic_set(real).images.abs().max() == 0
    assert real.stat().st_mode & 0o777 == 0o640 and sorted(p.name for p in real.parent.iterdir()) == ["set.h5"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    _fail_on_second_array(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        save_synthetic_set(tmp_path / "set.h5", make_set())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])  # a full disk, a full quota
def test_a_full_disk_is_a_plain_error_and_keeps_the_existing_file(tmp_path, monkeypatch, code):
    import errno

    import ddtool.files as atomic

    target = tmp_path / "set.h5"
    save_synthetic_set(target, make_set(seed=1))
    before = target.read_bytes()
    listed = []

    class FillsUp:  # the temporary file is created, then the disk is full
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(bytes(data)[:100])
            listed.append(sorted(p.name for p in tmp_path.iterdir()))
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        handle = open(path, mode, *args, **kwargs)
        return FillsUp(handle) if "w" in mode else handle  # the lock file is opened "a"

    monkeypatch.setattr(atomic, "open", open_on_a_filling_disk, raising=False)
    with pytest.raises(DDToolError, match="disk is full") as info:
        save_synthetic_set(target, make_set(seed=2))
    assert str(target) in str(info.value) and "\n\n" not in str(info.value)  # one paragraph, naming the file
    # a temporary file was being written when the disk filled up, and is gone now, with the lock
    assert listed == [[f".set.h5.{os.getpid()}.tmp", "set.h5", "set.h5.lock"]]
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]
    assert target.read_bytes() == before  # the set that was there is intact


def test_a_file_too_large_to_build_in_memory_is_written_in_place_after_a_room_check(tmp_path, monkeypatch):
    import collections
    import shutil

    import ddtool.files as atomic

    monkeypatch.setattr(atomic, "IN_MEMORY_MAX_BYTES", 0)  # every file is "large"
    built_in_memory = []
    monkeypatch.setattr(atomic, "write_atomically", lambda *a: built_in_memory.append(a))
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set(rich=True))
    append_evaluation(path, {"protocol": {}, "arch": "convnet", "runs": [0.5]})
    assert built_in_memory == [] and len(load_synthetic_set(path).evaluations) == 2  # rich: one recorded already
    before = path.read_bytes()
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DDToolError, match="disk is full"):
        append_evaluation(path, {"protocol": {}, "arch": "resnet18", "runs": [0.5]})
    with pytest.raises(DDToolError, match="disk is full"):
        save_synthetic_set(tmp_path / "other.h5", make_set())
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["set.h5"]


# Each write in turn, its temporary file a link to /dev/full: the kernel's own ENOSPC. In a
# process of its own, because h5py writing to a full disk crashed the interpreter at exit.
FULL_DISK_WRITES = """
import os, sys
from pathlib import Path
from ddtool.errors import DDToolError
from ddtool.storage import append_evaluation, export_set, load_synthetic_set, save_synthetic_set
from ddtool.files import save_torch

folder = Path(sys.argv[1])
kept = folder / "kept.h5"
sset = load_synthetic_set(kept)
before = kept.read_bytes()
writes = {
    "new.h5": lambda: save_synthetic_set(folder / "new.h5", sset),
    "kept.h5": lambda: append_evaluation(kept, {"protocol": {}, "arch": "convnet", "runs": [0.5]}),
    "set.pt": lambda: export_set(sset, folder / "set.pt", "torch"),
    "state.pt": lambda: save_torch({"x": sset.images}, folder / "state.pt"),
}
for name, write in writes.items():
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.symlink_to("/dev/full")
    try:
        write()
        print(name, "wrote to a full disk without an error")
    except DDToolError as exc:
        left = sorted(p.name for p in folder.iterdir())
        print(name, "disk is full" in str(exc), left == ["kept.h5"], kept.read_bytes() == before)
"""


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_the_kernels_full_disk_error_is_a_message_for_every_writer(tmp_path):
    import subprocess
    import sys

    save_synthetic_set(tmp_path / "kept.h5", make_set(rich=True))
    result = subprocess.run([sys.executable, "-c", FULL_DISK_WRITES, tmp_path], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [f"{name} True True True" for name in ("new.h5", "kept.h5", "set.pt",
                                                                                 "state.pt")], result.stdout


def test_failed_write_keeps_older_file(tmp_path, monkeypatch):
    old = make_set(rich=True)
    save_synthetic_set(tmp_path / "set.h5", old)
    _fail_on_second_array(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated"):
        save_synthetic_set(tmp_path / "set.h5", make_set("logits"))
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]
    assert_same_set(old, load_synthetic_set(tmp_path / "set.h5"))


# ---------------------------------------------------------------------- append_evaluation
def test_append_evaluation(tmp_path):
    path = tmp_path / "set.h5"
    sset = make_set(rich=True)
    save_synthetic_set(path, sset)
    record = {"protocol": {"epochs": 1000, "soft": True}, "arch": "resnet18", "runs": torch.tensor([0.5, 0.7]),
              "device": "cuda", "seconds": 3.0, "full_mean": 0.9}
    assert append_evaluation(path, record) == 1
    assert append_evaluation(path, {"protocol": {}, "arch": "convnet", "runs": [1, 0]}) == 2
    loaded = load_synthetic_set(path)
    assert loaded.evaluations[0] == sset.evaluations[0]
    new = loaded.evaluations[1]
    assert new["runs"] == pytest.approx([0.5, 0.7]) and new["full_mean"] == 0.9 and new["device"] == "cuda"
    assert new["mean"] == pytest.approx(0.6) and new["std"] == pytest.approx(0.1) and new["timestamp"]
    assert loaded.evaluations[2]["arch"] == "convnet"
    assert_same_set(sset, SyntheticSet(**{**loaded.__dict__, "evaluations": loaded.evaluations[:1]}))
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]


def test_failed_append_keeps_file(tmp_path, monkeypatch):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set(rich=True))
    before = path.read_bytes()

    def crash(group, record):
        group.attrs["arch"] = record["arch"]  # part of the record is written, then the crash
        raise RuntimeError("simulated crash mid-append")

    monkeypatch.setattr(h5file, "_write_record", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        append_evaluation(path, {"protocol": {}, "arch": "convnet", "runs": [0.3]})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["set.h5"]


def test_append_evaluation_rejects_bad_record_and_bad_file(tmp_path):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set())
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="runs"):
        append_evaluation(path, {"protocol": {}, "arch": "convnet"})
    assert path.read_bytes() == before
    other = tmp_path / "other.h5"
    h5py.File(other, "w").close()
    with pytest.raises(FormatError, match="not a ddtool synthetic set"):
        append_evaluation(other, {"protocol": {}, "arch": "convnet", "runs": [0.1]})


# ---------------------------------------------------------------------- export / import (our formats)
@pytest.mark.parametrize("fmt, name", [("npz", "set.npz"), ("torch", "set.pt")])
@pytest.mark.parametrize("label_kind", ["hard", "logits"])
def test_export_import_round_trip(tmp_path, fmt, name, label_kind):
    sset = make_set(label_kind, zca=True, rich=True)
    out = export_set(sset, tmp_path / name, fmt)
    assert [p.name for p in tmp_path.iterdir()] == [name]
    back = import_set(out, fmt, dataset="fashion-mnist")  # preprocessing and classes from the file
    assert torch.equal(back.images, sset.images) and torch.equal(back.labels, sset.labels)
    assert back.classes == CLASSES and back.learned_lr == sset.learned_lr and back.ipc == sset.ipc
    assert back.label_kind == label_kind and back.label_temperature == sset.label_temperature
    assert back.method == f"imported:{fmt}" and back.dataset == "fashion-mnist"
    np.testing.assert_array_equal(back.preprocessing.zca.inverse, sset.preprocessing.zca.inverse)
    with pytest.raises(FormatError, match="ZCA"):  # a conflicting --zca flag is caught
        import_set(out, fmt, dataset="fashion-mnist", preprocessing=make_preprocessing())
    # `import --zca` passes a ZCA fitted afresh: the file's own (its matrix, its eps) is the exact one
    refitted = ZCA(torch.zeros(108), torch.eye(108), torch.eye(108), eps=0.5)
    kept = import_set(out, fmt, dataset="fashion-mnist", preprocessing=Preprocessing((0.0,) * 3, (1.0,) * 3, refitted))
    np.testing.assert_array_equal(kept.preprocessing.zca.matrix, sset.preprocessing.zca.matrix)
    assert kept.preprocessing.zca.eps == sset.preprocessing.zca.eps and kept.preprocessing.mean == sset.preprocessing.mean


def test_export_npz_is_plain_numpy(tmp_path):
    sset = make_set(rich=True)
    export_set(sset, tmp_path / "set.npz", "npz")
    with np.load(tmp_path / "set.npz", allow_pickle=False) as npz:
        np.testing.assert_array_equal(npz["images"], sset.images.numpy())
        assert list(npz["classes"]) == CLASSES and float(npz["learned_lr"]) == sset.learned_lr
        np.testing.assert_array_equal(npz["preprocessing_mean"], sset.preprocessing.mean)


# ---------------------------------------------------------------------- import: published layouts
def _save_like_mtt(folder: Path, it: str, images: torch.Tensor, labels: torch.Tensor, lr: float | None):
    """What MTT/DATM's distill.py does: torch.save of the live (grad-requiring) tensors' .cpu()."""
    folder.mkdir(parents=True, exist_ok=True)
    image_syn = images.clone().requires_grad_(True)
    label_syn = labels.clone().requires_grad_(labels.is_floating_point())
    torch.save(image_syn.cpu(), folder / f"images_{it}.pt")
    torch.save(label_syn.cpu(), folder / f"labels_{it}.pt")
    if lr is not None:
        syn_lr = torch.tensor(lr).requires_grad_(True)
        torch.save(syn_lr.detach().cpu(), folder / f"lr_{it}.pt")


def test_import_mtt_folder_with_soft_labels(tmp_path):
    ref = make_set("logits", zca=True)
    run = tmp_path / "logged_files" / "run"
    _save_like_mtt(run / "Normal", "best", ref.images, ref.labels, 0.02)
    _save_like_mtt(run / "Normal", "500", torch.zeros_like(ref.images), ref.labels, 0.03)
    torch.save(torch.full_like(ref.images, 9.0), run / "images_zca_500.pt")  # un-whitened copy: ignored
    sset = import_set(run, "mtt", dataset="cifar10", preprocessing=ref.preprocessing, classes=CLASSES,
                      iteration="best")
    assert torch.equal(sset.images, ref.images) and torch.equal(sset.labels, ref.labels)
    assert not sset.images.requires_grad and not sset.labels.requires_grad
    assert sset.label_kind == "logits" and sset.learned_lr == pytest.approx(0.02) and sset.ipc == 2
    assert sset.method == "imported:mtt" and sset.config["iteration"] == "best"
    other = import_set(run, "mtt", dataset="cifar10", preprocessing=ref.preprocessing, classes=CLASSES,
                       iteration=500)
    assert other.learned_lr == pytest.approx(0.03) and other.images.abs().max() == 0


def test_import_mtt_explicit_hard_label_files(tmp_path):
    ref = make_set()
    _save_like_mtt(tmp_path, "1000", ref.images, ref.labels, None)  # plain MTT saves no lr
    files = [tmp_path / "labels_1000.pt", tmp_path / "images_1000.pt"]
    sset = import_set(files, "mtt", dataset="fashion-mnist", preprocessing=ref.preprocessing, classes=CLASSES)
    assert torch.equal(sset.labels, ref.labels) and sset.label_kind == "hard" and sset.learned_lr is None
    torch.save(0.05, tmp_path / "lr_1000.pt")  # some forks save syn_lr.item(), a Python float
    with_lr = import_set(files + [tmp_path / "lr_1000.pt"], "mtt", dataset="fashion-mnist",
                         preprocessing=ref.preprocessing, classes=CLASSES)
    assert with_lr.learned_lr == 0.05
    with pytest.raises(FormatError, match="needs a labels"):
        import_set(files[1:], "mtt", dataset="fashion-mnist", preprocessing=ref.preprocessing, classes=CLASSES)
    # one iteration's labels do not belong to another's images
    _save_like_mtt(tmp_path, "2000", ref.images, ref.labels, None)
    with pytest.raises(FormatError, match="different iterations.*labels_2000.pt: 2000"):
        import_set([tmp_path / "images_1000.pt", tmp_path / "labels_2000.pt"], "mtt", dataset="fashion-mnist",
                   preprocessing=ref.preprocessing, classes=CLASSES)
    with pytest.raises(FormatError, match="class ids, not soft scores"):
        import_set(files, "mtt", dataset="fashion-mnist", preprocessing=ref.preprocessing, classes=CLASSES,
                   label_kind="probs")


def test_import_dc_dict(tmp_path):
    ref = make_set()
    other = torch.randn_like(ref.images)
    torch.save({"data": [[ref.images.clone(), ref.labels.clone()], [other, ref.labels.clone()]],
                "accs_all_exps": {"ConvNet": [np.float64(0.51), np.float64(0.49)]}}, tmp_path / "res_DC.pt")
    kwargs = dict(dataset="fashion-mnist", preprocessing=ref.preprocessing, classes=CLASSES)
    first = import_set(tmp_path / "res_DC.pt", "dc", **kwargs)
    assert torch.equal(first.images, ref.images) and first.ipc == 2 and first.method == "imported:dc"
    assert first.config["published_accuracies"] == {"ConvNet": [0.51, 0.49]}
    assert torch.equal(import_set(tmp_path / "res_DC.pt", "dc", experiment=1, **kwargs).images, other)
    with pytest.raises(FormatError, match="experiment 2 does not exist"):
        import_set(tmp_path / "res_DC.pt", "dc", experiment=2, **kwargs)


def test_import_npz_from_elsewhere(tmp_path):
    ref = make_set()
    np.savez(tmp_path / "x.npz", images=ref.images.numpy(), labels=ref.labels.numpy().astype(np.float32))
    sset = import_set(tmp_path / "x.npz", "npz", dataset="fashion-mnist", preprocessing=ref.preprocessing,
                      classes=CLASSES)
    assert torch.equal(sset.labels, ref.labels) and sset.label_kind == "hard" and sset.ipc == 2
    # (N, K) labels: one-hot rows and probability rows are probabilities, anything else logits
    kwargs = dict(dataset="fashion-mnist", preprocessing=ref.preprocessing, classes=CLASSES)
    one_hot = torch.nn.functional.one_hot(ref.labels, len(CLASSES)).float()
    for scores, kind in [(one_hot, "probs"), (torch.softmax(torch.randn(6, 3), 1), "probs"),
                         (torch.randn(6, 3), "logits"), (one_hot * 5, "logits")]:
        np.savez(tmp_path / "soft.npz", images=ref.images.numpy(), labels=scores.numpy())
        sset = import_set(tmp_path / "soft.npz", "npz", **kwargs)
        assert sset.label_kind == kind and torch.equal(sset.labels, scores)
    assert torch.allclose(sset.soft_targets(), torch.softmax(one_hot * 5, 1))
    np.savez(tmp_path / "soft.npz", images=ref.images.numpy(), labels=one_hot.numpy())
    forced = import_set(tmp_path / "soft.npz", "npz", label_kind="logits", **kwargs)  # the caller knows better
    assert forced.label_kind == "logits"
    with pytest.raises(FormatError, match="probs, not logits: a label temperature does not apply"):
        import_set(tmp_path / "soft.npz", "npz", label_temperature=2.0, **kwargs)


class NotATensor:  # pickled into a .pt file: weights_only loading must refuse it
    pass


@pytest.mark.parametrize(
    "write, fmt, message",
    [
        (None, "npz", "does not exist"),
        (lambda p, s: np.savez(p, images=s.images.numpy()), "npz", "lacks the 'labels'"),
        (lambda p, s: np.savez(p, images=np.full((6, 3, 6, 6), np.nan, np.float32), labels=s.labels.numpy()),
         "npz", "NaN"),
        (lambda p, s: np.savez(p, images=s.images.numpy()[:, 0], labels=s.labels.numpy()), "npz", "(N, C, H, W)"),
        (lambda p, s: np.savez(p, images=s.images.numpy(), labels=s.labels.numpy() + 5), "npz", "must lie in"),
        (lambda p, s: np.savez(p, images=s.images.numpy()[:5], labels=s.labels.numpy()[:5]), "npz",
         "do not divide"),
        (lambda p, s: p.write_text("hello"), "npz", "not a readable npz"),
        (lambda p, s: torch.save({"images": NotATensor()}, p), "torch", "weights_only"),
        (lambda p, s: p.write_text("hello"), "mtt", "weights_only"),
        (lambda p, s: torch.save({"accs_all_exps": {}}, p), "dc", "not a Dataset Condensation result"),
    ],
    ids=["missing", "no-labels", "nan", "3d-images", "label-range", "indivisible", "garbage", "pickle",
         "mtt-garbage", "dc-shape"],
)
def test_import_rejects_bad_input(tmp_path, write, fmt, message):
    ref = make_set()
    path = tmp_path / ("input.npz" if fmt == "npz" else "images_100.pt")
    if write is not None:
        write(path, ref)
    if fmt == "mtt":
        torch.save(ref.labels, tmp_path / "labels_100.pt")
    with pytest.raises(FormatError, match=re.escape(message)) as info:
        import_set(path if fmt != "mtt" else tmp_path, fmt, dataset="fashion-mnist",
                   preprocessing=ref.preprocessing, classes=CLASSES)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------- pictures
@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB")])
def test_imagefolder_export(tmp_path, channels, mode):
    sset = make_set(channels=channels, ipc=3, zca=channels == 3, rich=True)
    out = export_set(sset, tmp_path / "folder", "imagefolder")
    meta = json.loads((out / "labels.json").read_text())
    assert meta["classes"] == CLASSES and meta["folders"][0] == "0_T-shirt_top"
    pixels = sset.preprocessing.invert(sset.images)
    for folder in meta["folders"]:
        assert len(list((out / folder).glob("*.png"))) == 3
    for index, relative in enumerate(meta["files"]):
        with Image.open(out / relative) as image:
            assert image.mode == mode
            decoded = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        decoded = decoded[None] if channels == 1 else decoded.permute(2, 0, 1)
        assert (decoded - pixels[index]).abs().max() <= 1 / 255
    with pytest.raises(DDToolError, match="not an empty folder"):
        export_set(sset, out, "imagefolder")


def test_torchvision_reads_an_exported_imagefolder_in_the_sets_class_order(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    classes = ["zebra", "Ankle boot", "T-shirt/top"]  # alphabetically the other way round
    sset = make_set(channels=1, ipc=2)
    sset = dataclasses.replace(sset, classes=classes)
    out = export_set(sset, tmp_path / "folder", "imagefolder")
    read = torchvision.datasets.ImageFolder(str(out))
    assert read.classes == json.loads((out / "labels.json").read_text())["folders"]
    assert [label for _, label in read.samples] == sset.hard_labels().tolist()


def _read_png16(path) -> np.ndarray:
    """A 16-bit PNG with unfiltered rows, decoded by hand (H, W, C) (PIL reads 16-bit RGB as 8-bit)."""
    import struct
    import zlib

    data, chunks, at = path.read_bytes(), {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks[kind] = chunks.get(kind, b"") + data[at + 8:at + 8 + length]
        at += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {0: 1, 2: 3, 6: 4}[colour]
    assert depth == 16
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 2 * width * channels
    rows = [raw[r * stride:(r + 1) * stride] for r in range(height)]
    assert all(row[0] == 0 for row in rows)  # unfiltered
    return np.frombuffer(b"".join(row[1:] for row in rows), dtype=">u2").reshape(height, width, channels)


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_export_in_16_bits_keeps_values_outside_the_8_bit_range(tmp_path, channels):
    sset = make_set(channels=channels, ipc=2)
    sset = dataclasses.replace(sset, images=sset.images * 3)  # de-normalised well outside [0, 1]
    pixels = sset.preprocessing.invert(sset.images, clamp=False)
    assert pixels.min() < 0 and pixels.max() > 1
    out = export_set(sset, tmp_path / "folder", "imagefolder", bit_depth=16)
    meta = json.loads((out / "labels.json").read_text())
    low, high = meta["pixel_range"]
    assert meta["bit_depth"] == 16 and low == pytest.approx(float(pixels.min())) and high == pytest.approx(
        float(pixels.max()))
    for index, relative in enumerate(meta["files"]):
        decoded = low + _read_png16(out / relative).astype(np.float64) / 65535 * (high - low)
        np.testing.assert_allclose(decoded, pixels[index].permute(1, 2, 0).double().numpy(),
                                   atol=(high - low) / 65535)
    if channels == 1:  # and what PIL reads is the same
        with Image.open(out / meta["files"][0]) as image:
            assert image.mode == "I;16"
            np.testing.assert_array_equal(np.asarray(image), _read_png16(out / meta["files"][0])[:, :, 0])
    with pytest.raises(ConfigError, match="--bit-depth applies to the imagefolder"):
        export_set(sset, tmp_path / "x.npz", "npz", bit_depth=16)


def test_imagefolder_export_soft_labels(tmp_path):
    sset = make_set("probs")
    out = export_set(sset, tmp_path / "folder", "imagefolder")
    meta = json.loads((out / "labels.json").read_text())
    np.testing.assert_allclose(meta["soft_labels"], sset.labels.numpy(), rtol=1e-6)
    argmax = sset.labels.argmax(dim=1).tolist()
    assert [meta["folders"].index(f.split("/")[0]) for f in meta["files"]] == argmax
    assert sum(len(list((out / f).glob("*.png"))) for f in meta["folders"]) == sset.num_images


def test_grid_png(tmp_path):
    sset = make_set(ipc=4, zca=True)
    path = save_grid_png(sset, tmp_path / "grid.png", max_per_class=3)
    size, pad = 6, GRID_PADDING
    with Image.open(path) as image:
        assert image.size == (3 * (size + pad) + pad, 3 * (size + pad) + pad) and image.mode == "RGB"
        grid = np.asarray(image, dtype=np.float32) / 255
    # Top-left tile = first image of class 0, un-whitened and de-normalised (not rescaled).
    first = sset.preprocessing.invert(sset.images[:1])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(grid[pad:pad + size, pad:pad + size], first, atol=1 / 255)
    gray = save_grid_png(make_set(channels=1), tmp_path / "gray.png")
    with Image.open(gray) as image:
        assert image.mode == "L" and image.size == (2 * (size + pad) + pad, 3 * (size + pad) + pad)


def test_grid_png_scaled_with_class_names(tmp_path):
    from ddtool.storage.picture import auto_grid_scale

    sset = make_set(ipc=2, channels=1)
    pad, scale = GRID_PADDING, 4
    plain = np.asarray(Image.open(save_grid_png(sset, tmp_path / "plain.png")), dtype=np.float32)
    with Image.open(save_grid_png(sset, tmp_path / "named.png", scale=scale, class_names=True)) as image:
        named = np.asarray(image, dtype=np.float32)
    margin = named.shape[1] - plain.shape[1] * scale
    assert named.shape[0] == plain.shape[0] * scale and margin > 0
    # every pixel of the plain grid, enlarged to scale x scale, right of the names' column
    np.testing.assert_array_equal(named[:, margin:], plain.repeat(scale, axis=0).repeat(scale, axis=1))
    # each row's name is written in its row of the column (dark pixels on white)
    rows = np.split(named[pad * scale:, :margin], sset.num_classes)
    assert all((row < 128).any() for row in rows)
    assert auto_grid_scale(28) == 3 and auto_grid_scale(8) == 8 and auto_grid_scale(64) == 1
    with pytest.raises(ConfigError, match="scale"):
        save_grid_png(sset, tmp_path / "bad.png", scale=0)


# ---------------------------------------------------------------------- appends that race, files that change
def test_appends_from_two_writers_at_once_both_land(tmp_path, monkeypatch):
    import threading

    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set())
    # Both appends read the file before either writes it back, unless the lock keeps the second
    # out until the first is done (then the first waits here in vain, and goes on).
    both_reading = threading.Barrier(2, timeout=2)
    real_atomic_h5 = h5file.atomic_h5

    @contextlib.contextmanager
    def read_together(target, **options):
        with real_atomic_h5(target, **options) as f:
            with contextlib.suppress(threading.BrokenBarrierError):
                both_reading.wait()
            yield f

    monkeypatch.setattr(h5file, "atomic_h5", read_together)
    # each writer its own temporary file, as two processes have (atomic_path names it by pid)
    monkeypatch.setattr(os, "getpid", threading.get_ident)
    failures = []

    def append(arch):
        try:
            append_evaluation(path, {"protocol": {}, "arch": arch, "runs": [0.5]})
        except Exception as exc:  # reported below, not lost in the thread
            failures.append(exc)

    writers = [threading.Thread(target=append, args=(arch,)) for arch in ("convnet", "resnet18")]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert not failures
    assert sorted(e["arch"] for e in load_synthetic_set(path).evaluations) == ["convnet", "resnet18"]
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]  # the lock file went with the append


def test_saving_over_a_set_waits_for_an_append_in_progress(tmp_path):
    """A set saved over one being recorded into would otherwise be lost under the append's
    rename, or get the old set's record: the save takes the append's lock."""
    import threading

    from ddtool.files import exclusive_lock

    path = tmp_path / "set.h5"
    old = make_set()
    save_synthetic_set(path, old)
    new = make_set(images=torch.zeros(6, 3, 6, 6))
    with exclusive_lock(tmp_path / "set.h5.lock"):  # as append_evaluation holds it
        saver = threading.Thread(target=save_synthetic_set, args=(path, new))
        saver.start()
        saver.join(timeout=2)
        assert saver.is_alive()  # waiting for the lock
        assert load_synthetic_set(path).content_digest() == old.content_digest()
    saver.join(timeout=60)
    assert not saver.is_alive()
    assert load_synthetic_set(path).content_digest() == new.content_digest()
    assert [p.name for p in tmp_path.iterdir()] == ["set.h5"]


def test_an_append_into_a_file_whose_set_changed_is_refused(tmp_path):
    path = tmp_path / "set.h5"
    evaluated = make_set()
    save_synthetic_set(path, evaluated)
    digest = evaluated.content_digest()
    assert load_synthetic_set(path).content_digest() == digest  # the file's set is the one in memory
    # provenance and records are not what was measured; images, labels and the lr are
    assert make_set(method="random", seed=3).content_digest() == digest
    assert make_set(learned_lr=0.1).content_digest() != digest
    record = {"protocol": {}, "arch": "convnet", "runs": [0.5]}
    assert append_evaluation(path, record, expected_content=digest) == 0

    replaced = make_set(images=torch.zeros(6, 3, 6, 6))  # another set saved over it meanwhile
    save_synthetic_set(path, replaced)
    before = path.read_bytes()
    with pytest.raises(DDToolError, match="changed while it was being evaluated") as info:
        append_evaluation(path, record, expected_content=digest)
    assert str(path) in str(info.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["set.h5"]


def test_a_lock_file_removed_by_its_holder_is_not_shared_by_two_waiters(tmp_path, monkeypatch):
    import fcntl
    import threading

    from ddtool import files as atomic

    lock = tmp_path / "set.h5.lock"
    holder = open(lock, "a")  # the first holder, which will remove the file as it leaves
    fcntl.flock(holder, fcntl.LOCK_EX)
    opened = threading.Event()
    real_open = atomic._open_lock

    def open_and_tell(path):
        handle = real_open(path)
        opened.set()
        return handle

    monkeypatch.setattr(atomic, "_open_lock", open_and_tell)
    entered, leave_new = [], threading.Event()

    def waiter():  # opened the old file, waits on it
        with atomic.exclusive_lock(lock, remove=True):
            entered.append("waiter")

    def newcomer():  # arrives after the removal: locks the path's new file
        with atomic.exclusive_lock(lock, remove=True):
            entered.append("newcomer")
            leave_new.wait(timeout=30)

    first = threading.Thread(target=waiter)
    first.start()
    assert opened.wait(timeout=30)
    lock.unlink()  # what exclusive_lock(remove=True) does before it lets go
    second = threading.Thread(target=newcomer)
    second.start()
    while "newcomer" not in entered and second.is_alive():
        second.join(timeout=0.01)
    fcntl.flock(holder, fcntl.LOCK_UN)
    holder.close()
    first.join(timeout=0.5)
    assert entered == ["newcomer"] and first.is_alive()  # the waiter retried on the new file: it waits
    leave_new.set()
    for thread in (first, second):
        thread.join(timeout=30)
    assert entered == ["newcomer", "waiter"] and not lock.exists()


# ---------------------------------------------------------------------- folders that cannot be written
def test_a_refused_write_is_a_ddtool_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    from ddtool import files as atomic

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DDToolError, match=re.escape(str(blocker / "set.h5"))):
        save_synthetic_set(blocker / "set.h5", make_set())  # its "folder" is a file

    def refuse(source, target):
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(atomic.os, "replace", refuse)
    with pytest.raises(DDToolError, match="Permission denied") as info:
        save_synthetic_set(tmp_path / "set.h5", make_set())
    assert str(tmp_path / "set.h5") in str(info.value) and list(tmp_path.iterdir()) == [blocker]
    monkeypatch.undo()

    # torch.save reports a refused file as a RuntimeError: the folder is checked before
    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)
    with pytest.raises(DDToolError, match="Could not write"):
        export_set(make_set(), tmp_path / "set.pt", "torch")
    assert list(tmp_path.iterdir()) == [blocker]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_ddtool_error(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    save_synthetic_set(folder / "set.h5", make_set())
    folder.chmod(0o555)
    try:
        with pytest.raises(DDToolError, match="Could not write"):
            save_synthetic_set(folder / "other.h5", make_set())
        with pytest.raises(DDToolError, match="Could not write"):
            append_evaluation(folder / "set.h5", {"protocol": {}, "arch": "convnet", "runs": [0.5]})
    finally:
        folder.chmod(0o755)


# ---------------------------------------------------------------------- import: which iteration
def test_import_mtt_folder_takes_the_final_iteration_not_the_test_selected_best(tmp_path):
    ref = make_set()
    run = tmp_path / "logged_files" / "CIFAR10" / "run"
    # as MTT writes them: every few hundred iterations, and images_best.pt when *test* accuracy
    # improved. 900 and 1000: as strings "900" sorts after "1000", so only a numeric order
    # finds the final iteration.
    _save_like_mtt(run, "900", torch.ones_like(ref.images), ref.labels, 0.01)
    _save_like_mtt(run, "best", torch.full_like(ref.images, 2.0), ref.labels, 0.02)
    _save_like_mtt(run, "1000", ref.images, ref.labels, 0.05)
    kwargs = dict(dataset="cifar10", preprocessing=ref.preprocessing, classes=CLASSES)
    final = import_set(run, "mtt", **kwargs)
    assert torch.equal(final.images, ref.images) and final.learned_lr == pytest.approx(0.05)
    assert final.config["iteration"] == "1000"
    assert import_set(run, "mtt", iteration="final", **kwargs).config["iteration"] == "1000"
    best = import_set(run, "mtt", iteration="best", **kwargs)
    assert best.config["iteration"] == "best" and best.images.max() == 2.0
    earlier = import_set(run, "mtt", iteration=900, **kwargs)
    assert earlier.learned_lr == pytest.approx(0.01) and earlier.config["iteration"] == "900"

    only_best = tmp_path / "only-best"
    _save_like_mtt(only_best, "best", ref.images, ref.labels, 0.02)
    with pytest.raises(FormatError, match="--checkpoint best") as info:
        import_set(only_best, "mtt", **kwargs)
    assert "test" in str(info.value)
    assert import_set(only_best, "mtt", iteration="best", **kwargs).config["iteration"] == "best"
