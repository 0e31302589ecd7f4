"""ddtool.data: loaders on small files written here in each real format, search order, splits,
normalisation and ZCA (with its cache)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddtool.data as data
from ddtool.data import formats, loaders, sources
from ddtool.data.preprocess import ZCA, Preprocessing
from ddtool.errors import ConfigError, DatasetNotFoundError, DDToolError, FormatError

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the user's datasets, caches or the Debian folder, unless it asks."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("DDTOOL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DDTOOL_DATA", raising=False)
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion-mnist", (tmp_path / "debian",))


# --- writers of the real formats ----------------------------------------------------------

def labels_for(n: int, num_classes: int = 10) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_idx_dataset(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = labels_for(n)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", images, formats.IDX_IMAGES_MAGIC)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", labels, formats.IDX_LABELS_MAGIC)
        arrays[split] = (images, labels)
    return arrays


def write_cifar(folder: Path, hundred: bool = False) -> dict[str, np.ndarray]:
    """CIFAR's python layout: pickled dicts with bytes keys, as Python 2 wrote them."""
    rng = np.random.default_rng(1)
    num_classes = 100 if hundred else 10
    label_key = b"fine_labels" if hundred else b"labels"
    files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    written = {}
    for name in files + ["test" if hundred else "test_batch"]:
        rows = rng.integers(0, 256, (num_classes if hundred else 4, 3072), dtype=np.uint8)
        labels = [i % num_classes for i in range(len(rows))]
        record = {b"data": rows, label_key: labels, b"batch_label": b"x"}
        if hundred:
            record[b"coarse_labels"] = [0] * len(rows)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
        written[name] = rows
    names_key, meta = (b"fine_label_names", "meta") if hundred else (b"label_names", "batches.meta")
    names = [f"class{i}".encode() for i in range(num_classes)]
    (folder / meta).write_bytes(pickle.dumps({names_key: names}, protocol=2))
    return written


def write_image(path: Path, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


# --- registry -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "alias, key",
    [("fmnist", "fashion-mnist"), ("Fashion_MNIST", "fashion-mnist"), ("FashionMNIST", "fashion-mnist"),
     ("CIFAR-10", "cifar10"), ("cifar_100", "cifar100"), ("SVHN", "svhn"), ("tiny-imagenet-200", "tiny-imagenet")],
)
def test_aliases_resolve_case_insensitively(alias, key):
    assert data.get_spec(alias).name == key


def test_registry_specs():
    specs = {spec.name: spec for spec in data.list_specs()}
    assert data.list_specs()[0].name == data.DEFAULT_DATASET == "fashion-mnist"
    fashion = specs["fashion-mnist"]
    assert (fashion.channels, fashion.image_size, fashion.num_classes, fashion.flip) == (1, 28, 10, True)
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[-1] == "Ankle boot"
    assert not specs["mnist"].flip and not specs["svhn"].flip
    assert len(specs["cifar100"].classes) == 100 and specs["tiny-imagenet"].image_size == 64
    with pytest.raises(ConfigError, match="fashion-mnist.*mnist.*cifar10.*tiny-imagenet.*folder:"):
        data.get_spec("imagenet-1k")


# --- loaders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader(tmp_path, gz):
    arrays = write_idx_dataset(tmp_path / "digits", gz=gz)
    raw = data.load_raw("mnist", data_root=tmp_path / "digits")
    assert raw.source == (tmp_path / "digits").absolute()
    assert raw.train_images.dtype == torch.uint8 and raw.train_images.shape == (40, 1, 28, 28)
    assert raw.train_labels.dtype == torch.int64
    assert np.array_equal(raw.train_images[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(raw.test_labels.numpy(), arrays["t10k"][1])
    assert raw.spec.classes == tuple("0123456789") and raw.fingerprint


def test_corrupt_idx_files_name_the_file(tmp_path):
    folder = tmp_path / "fashion-mnist"
    write_idx_dataset(folder, gz=True)
    images = folder / "train-images-idx3-ubyte.gz"

    images.write_bytes(images.read_bytes()[:-50])  # truncated download
    with pytest.raises(FormatError, match=str(images)):
        data.load_raw("fashion-mnist", tmp_path)

    write_idx(images, np.zeros((3, 28, 28), np.uint8), formats.IDX_LABELS_MAGIC)  # wrong magic
    with pytest.raises(FormatError, match="magic number 0x00000801, expected 0x00000803"):
        data.load_raw("fashion-mnist", tmp_path)

    raw_file = tmp_path / "short-idx"
    raw_file.write_bytes(struct.pack(">IIII", formats.IDX_IMAGES_MAGIC, 5, 28, 28) + bytes(100))
    with pytest.raises(FormatError, match="truncated"):
        formats.read_idx(raw_file, formats.IDX_IMAGES_MAGIC)

    write_idx(images, np.zeros((39, 28, 28), np.uint8), formats.IDX_IMAGES_MAGIC)  # 39 images, 40 labels
    with pytest.raises(FormatError, match="39 images but 40 labels"):
        data.load_raw("fashion-mnist", tmp_path)


def test_cifar10_loader(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    raw = data.load_raw("cifar-10", tmp_path)
    assert raw.train_images.shape == (20, 3, 32, 32) and raw.test_images.shape == (4, 3, 32, 32)
    # A row holds the red plane, then green, then blue, each row-major.
    row = written["data_batch_1"][1]
    assert raw.train_images[1, 2, 3, 4] == row[2 * 1024 + 3 * 32 + 4]
    assert raw.train_labels.tolist()[:5] == [0, 1, 2, 3, 0]
    # every batch, in order (the batches share their labels, so only the pixels tell them apart)
    batches = np.concatenate([written[f"data_batch_{i}"] for i in range(1, 6)])
    assert np.array_equal(raw.train_images.numpy().reshape(20, 3072), batches)
    assert np.array_equal(raw.test_images.numpy().reshape(4, 3072), written["test_batch"])
    assert raw.spec.classes == tuple(f"class{i}" for i in range(10))  # from batches.meta


def test_cifar100_loader_uses_fine_labels(tmp_path):
    write_cifar(tmp_path / "cifar-100-python", hundred=True)
    raw = data.load_raw("cifar100", tmp_path)
    assert raw.train_images.shape == (100, 3, 32, 32)
    assert raw.train_labels.tolist() == list(range(100))
    assert raw.spec.classes[99] == "class99"


def test_cifar_refuses_corrupt_and_foreign_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(FormatError, match="data_batch_3"):
        data.load_raw("cifar10", tmp_path)
    batch.write_bytes(pickle.dumps({b"data": os.getcwd, b"labels": []}))  # a pickle naming a function
    with pytest.raises(FormatError, match="refusing to load"):
        data.load_raw("cifar10", tmp_path)


def test_svhn_loader(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="SVHN's .mat files need scipy")
    rng = np.random.default_rng(2)
    folder = tmp_path / "svhn"
    folder.mkdir()
    x = rng.integers(0, 256, (32, 32, 3, 12), dtype=np.uint8)  # SVHN stores (H, W, C, N)
    y = (np.arange(12) % 10 + 1).astype(np.uint8).reshape(-1, 1)  # labels 1..10, 10 = digit 0
    for name in ("train_32x32.mat", "test_32x32.mat"):
        scipy_io.savemat(folder / name, {"X": x, "y": y})
    raw = data.load_raw("svhn", tmp_path)
    assert raw.train_images.shape == (12, 3, 32, 32)
    assert raw.train_images[5, 1, 7, 9] == x[7, 9, 1, 5]
    assert raw.train_labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]
    test_file = folder / "test_32x32.mat"
    test_file.write_bytes(test_file.read_bytes()[:300])
    with pytest.raises(FormatError, match="test_32x32.mat"):
        data.load_raw("svhn", tmp_path)


def write_tiny_imagenet(folder: Path) -> list[str]:
    wnids = [f"n{9999 - i:08d}" for i in range(200)]  # written unsorted, as the real file is
    (folder / "val" / "images").mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {w}, synonym\n" for w in wnids))
    for i, wnid in enumerate(wnids):
        write_image(folder / "train" / wnid / "images" / f"{wnid}_0.JPEG", (64, 64), "L" if i == 0 else "RGB", i)
    (folder / "train" / wnids[0] / f"{wnids[0]}_boxes.txt").write_text("ignored\n")
    annotations = []
    for i, wnid in enumerate(wnids[:3]):
        write_image(folder / "val" / "images" / f"val_{i}.JPEG", (64, 64), seed=100 + i)
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return wnids


def test_tiny_imagenet_loader_and_decode_cache(tmp_path, monkeypatch):
    wnids = write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    raw = data.load_raw("tiny", tmp_path)
    order = sorted(wnids)
    assert raw.train_images.shape == (200, 3, 64, 64) and raw.test_images.shape == (3, 3, 64, 64)
    assert raw.spec.classes[0] == f"thing {order[0]}"  # first synonym from words.txt
    # Labels number the sorted wnids; val/ (annotated) is the test split.
    assert raw.test_labels.tolist() == [order.index(w) for w in wnids[:3]]
    assert raw.train_labels.tolist() == list(range(200))

    # The second load reads the decoded tensors from the cache, not the JPEGs.
    assert len(list((tmp_path / "cache" / "decoded").glob("*.pt"))) == 1
    monkeypatch.setattr(loaders, "read_images", lambda *a, **k: pytest.fail("decoded again"))
    again = data.load_raw("tiny-imagenet", tmp_path)
    assert torch.equal(again.train_images, raw.train_images) and again.fingerprint == raw.fingerprint


def test_image_folder(tmp_path):
    root = tmp_path / "shapes"
    first = write_image(root / "train" / "circle" / "a.png", (16, 16), "L", seed=1)
    write_image(root / "train" / "circle" / "nested" / "b.png", (16, 16), "L", seed=2)
    write_image(root / "train" / "square" / "c.png", (32, 32), "L", seed=3)  # resized to 16
    write_image(root / "val" / "square" / "d.png", (16, 16), "L", seed=4)  # val/ stands for test/
    (root / "train" / "square" / "notes.txt").write_text("not an image")

    spec = data.get_spec(f"folder:{root}")
    assert (spec.channels, spec.image_size, spec.classes) == (1, 16, ("circle", "square"))
    raw = data.load_raw(f"folder:{root}")
    assert raw.train_images.shape == (3, 1, 16, 16) and raw.train_labels.tolist() == [0, 0, 1]
    assert raw.test_labels.tolist() == [1]
    assert np.array_equal(raw.train_images[0, 0].numpy(), first)
    pixels = raw.train_images.double() / 255
    assert spec.mean[0] == pytest.approx(pixels.mean().item()) and spec.std[0] == pytest.approx(pixels.std().item(), rel=1e-3)

    write_image(root / "val" / "square" / "e.png", (16, 16), "RGB", seed=5)  # one colour image: 3 channels
    assert data.load_raw(f"folder:{root}").spec.channels == 3

    (root / "val" / "square" / "e.png").write_bytes(b"garbage")
    with pytest.raises(FormatError, match="e.png"):
        data.load_raw(f"folder:{root}")


def test_image_folder_of_16_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    root = tmp_path / "scans"
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520
    for split, name in (("train", "a"), ("test", "b")):
        for cls in ("x", "y"):  # two classes: a one-class dataset is refused
            path = root / split / cls / f"{name}.png"
            path.parent.mkdir(parents=True)
            Image.fromarray(ramp).save(path)  # uint16: mode I;16
    assert Image.open(root / "train" / "x" / "a.png").mode in formats._WIDE_INT_MODES  # 16 bits in the file
    raw = data.load_raw(f"folder:{root}")
    assert raw.spec.channels == 1
    expected = np.rint(ramp * (255 / 65535)).astype(np.uint8)
    assert np.array_equal(raw.train_images[0, 0].numpy(), expected)

    # 32-bit integer images: 8-bit values are taken as they are, 16-bit ones scaled, wider refused
    eight = tmp_path / "i8.tiff"
    Image.fromarray((np.arange(64, dtype=np.int32) * 4).reshape(8, 8), "I").save(eight)
    assert formats.read_images([eight], 8, "test")[0][0, 0].max() == 252
    wider = tmp_path / "i32.tiff"
    Image.fromarray((np.arange(64, dtype=np.int32) * 4000).reshape(8, 8), "I").save(wider)
    with pytest.raises(FormatError, match="outside 0-65535"):
        formats.read_images([wider], 8, "test")

    floats = tmp_path / "f.tiff"
    Image.fromarray(ramp.astype(np.float32) / 65535, "F").save(floats)
    with pytest.raises(FormatError, match="floating-point"):
        formats.read_images([floats], 8, "test")


def test_image_folder_without_test_images_is_refused(tmp_path):
    root = tmp_path / "pets"
    write_image(root / "train" / "cat" / "a.png", (8, 8), seed=1)
    write_image(root / "test" / "b.png", (8, 8), seed=2)  # not in a class folder
    with pytest.raises(FormatError, match="holds no images in class folders"):
        data.load_raw(f"folder:{root}")


@pytest.mark.parametrize("offset", [11, 36])  # IHDR's length (Pillow: ValueError), IDAT's (SyntaxError)
def test_corrupt_png_chunk_is_a_format_error(tmp_path, offset):
    path = tmp_path / "a.png"
    write_image(path, (8, 8), seed=1)
    raw = bytearray(path.read_bytes())
    raw[offset] = 0
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="a.png"):
        formats.read_images([path], 8, "test")


def test_missing_image_folder(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="train.*test \\(or val\\)"):
        data.load_raw(f"folder:{tmp_path / 'nothing'}")


# --- where datasets are looked for ------------------------------------------------------------

def test_search_order(tmp_path, monkeypatch):
    argument, env, xdg = tmp_path / "argument", tmp_path / "env", tmp_path / "xdg" / "ddtool" / "data"
    monkeypatch.setenv("DDTOOL_DATA", str(env))
    paths = data.search_paths("mnist", argument)
    assert paths[0] == argument.absolute() and argument / "MNIST" / "raw" in paths
    assert paths.index(argument) < paths.index(env) < paths.index(xdg)

    write_idx_dataset(xdg / "MNIST" / "raw", n_train=10, n_test=10)  # torchvision's layout
    write_idx_dataset(env / "mnist", n_train=20, n_test=10)
    write_idx_dataset(argument, n_train=30, n_test=10)
    assert len(data.load_raw("mnist", argument).train_labels) == 30
    assert len(data.load_raw("mnist").train_labels) == 20
    monkeypatch.delenv("DDTOOL_DATA")
    assert data.load_raw("mnist").source == xdg / "MNIST" / "raw"

    debian = tmp_path / "debian"
    assert data.search_paths("fashion-mnist")[-1] == debian
    write_idx_dataset(debian, n_train=50, n_test=10)
    assert data.locate("fashion-mnist") == debian and data.locate("svhn") is None


def test_not_found_message_lists_every_place_and_how_to_get_it(tmp_path):
    partial = tmp_path / "root" / "fashion-mnist"
    write_idx_dataset(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        data.load_raw("fashion-mnist", tmp_path / "root")
    message = str(info.value)
    for folder in data.search_paths("fashion-mnist", tmp_path / "root"):
        assert str(folder) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "lacks t10k-labels-idx1-ubyte (or t10k-labels-idx1-ubyte.gz)" in message
    assert "FashionMNIST(" in message and "download=True" in message

    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200.zip"):
        data.load_raw("tiny-imagenet", download=True)  # torchvision has no Tiny ImageNet


def test_download_goes_through_torchvision_into_the_user_cache(tmp_path, monkeypatch):
    calls = []

    def fake_mnist(root, train, download):
        calls.append(train)
        write_idx_dataset(Path(root) / "MNIST" / "raw", n_train=10, n_test=10)

    # A stand-in torchvision (no network, and no seconds spent importing the real one).
    fake_datasets = types.SimpleNamespace(MNIST=fake_mnist)
    monkeypatch.setitem(sys.modules, "torchvision", types.SimpleNamespace(datasets=fake_datasets))
    monkeypatch.setitem(sys.modules, "torchvision.datasets", fake_datasets)
    with pytest.raises(DatasetNotFoundError):
        data.load_raw("mnist")  # nothing is downloaded unless asked
    raw = data.load_raw("mnist", download=True)
    assert calls == [True, False] and raw.source == tmp_path / "xdg" / "ddtool" / "data" / "MNIST" / "raw"

    # the command line's way to ask: `ddtool datasets --download mnist`, then found like any other
    from click.testing import CliRunner

    from ddtool.cli import commands  # noqa: F401  (registers the commands)
    from ddtool.cli.main import cli

    calls.clear()
    (raw.source / "train-images-idx3-ubyte.gz").unlink()
    result = CliRunner().invoke(cli, ["datasets", "--download", "MNIST"])
    assert result.exit_code == 0, result.output
    assert calls == [True, False] and "10 training and 10 test images" in result.output
    assert str(raw.source) in CliRunner().invoke(cli, ["datasets"]).output


# --- splits, normalisation, ZCA -----------------------------------------------------------------

def test_stratified_split():
    labels = torch.arange(300) % 3
    train, val = data.stratified_split(labels, 3, val_per_class=7, seed=5)
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 300
    assert torch.bincount(labels[val]).tolist() == [7, 7, 7]
    assert torch.equal(val, data.stratified_split(labels, 3, 7, seed=5)[1])
    assert not torch.equal(val, data.stratified_split(labels, 3, 7, seed=6)[1])
    assert torch.bincount(labels[data.stratified_split(labels, 3)[1]]).tolist() == [10, 10, 10]  # 10 %
    assert data.stratified_split(torch.arange(50000) % 10, 10)[1].numel() == 5000  # 500 per class
    assert data.stratified_split(labels, 3, 0)[1].numel() == 0
    with pytest.raises(ConfigError, match="class 0"):
        data.stratified_split(labels, 3, 100)


def test_sample_per_class_and_class_indices():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1])
    assert [i.tolist() for i in data.class_indices(labels, 3)] == [[1, 3, 6], [2, 5, 8], [0, 4, 7]]
    picked = data.sample_per_class(labels, 3, 2, torch.Generator().manual_seed(0))
    assert labels[picked].tolist() == [0, 0, 1, 1, 2, 2]  # class-major
    assert torch.equal(picked, data.sample_per_class(labels, 3, 2, torch.Generator().manual_seed(0)))
    with pytest.raises(DDToolError, match="class 0 has only 3"):
        data.sample_per_class(labels, 3, 4, torch.Generator())


def test_preprocessing_round_trip():
    pixels = torch.rand(64, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    plain = Preprocessing((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    assert torch.allclose(plain.invert(plain.apply(pixels)), pixels, atol=1e-6)
    whitened = Preprocessing(plain.mean, plain.std, ZCA.fit(plain.apply(pixels), eps=0.1, chunk_size=10))
    assert torch.allclose(whitened.invert(whitened.apply(pixels)), pixels, atol=1e-4)
    restored = Preprocessing.from_arrays(whitened.to_arrays())
    assert torch.equal(restored.apply(pixels), whitened.apply(pixels))


def test_preprocessing_record_with_a_partial_zca_is_a_format_error():
    pixels = torch.rand(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    whitened = Preprocessing((0.5,), (0.2,), ZCA.fit(pixels, eps=0.1, chunk_size=10))
    arrays = whitened.to_arrays()
    with pytest.raises(FormatError, match="lacks 'zca_mean'"):
        Preprocessing.from_arrays({k: v for k, v in arrays.items() if k != "zca_mean"})
    with pytest.raises(FormatError, match="inconsistent ZCA"):
        Preprocessing.from_arrays({**arrays, "zca_inverse": arrays["zca_inverse"][:2]})
    # values that would turn every image into NaN or zero
    for bad, message in [({"mean": np.array([np.nan])}, "mean/std"), ({"std": np.array([np.inf])}, "mean/std"),
                         ({"zca_matrix": np.full_like(arrays["zca_matrix"], np.nan)}, "NaN or infinite"),
                         ({"zca_eps": np.float64(np.inf)}, "inconsistent ZCA")]:
        with pytest.raises(FormatError, match=message):
            Preprocessing.from_arrays({**arrays, **bad})


def write_image_folder(root: Path, num_classes: int = 3, train_per_class: int = 12, size: int = 8) -> None:
    for label in range(num_classes):
        for i in range(train_per_class):
            write_image(root / "train" / f"c{label}" / f"{i}.png", (size, size), seed=100 * label + i)
        write_image(root / "test" / f"c{label}" / "0.png", (size, size), seed=1000 + label)


def test_prepare_splits_normalises_and_caches_zca(tmp_path, monkeypatch):
    name = f"folder:{tmp_path / 'small'}"  # 8x8 RGB: a 192-dimensional ZCA, quick to fit
    write_image_folder(tmp_path / "small")
    prepared = data.prepare(name, zca=True, val_per_class=2, split_seed=1)
    assert prepared.train_x.shape == (30, 3, 8, 8) and prepared.val_x.shape == (6, 3, 8, 8)
    assert prepared.train_x.dtype == torch.float32 and prepared.test_x.shape == (3, 3, 8, 8)
    raw = data.load_raw(name)
    assert torch.equal(prepared.train_y, raw.train_labels[prepared.train_indices])
    assert torch.equal(prepared.val_y, raw.train_labels[prepared.val_indices])
    # ZCA replaces the mean/std normalisation (methods.md; MTT and DATM fit kornia's ZCAWhitening,
    # eps 0.1, unbiased covariance, on [0, 1] pixels): rebuilt here in float64 from the training
    # part only, the network space is U diag(1/sqrt(s + 0.1)) U^T applied to centred pixels.
    pixels = raw.train_images[prepared.train_indices].double().div(255).flatten(1)
    centred = pixels - pixels.mean(0)
    eigvals, eigvecs = torch.linalg.eigh(centred.T @ centred / (pixels.shape[0] - 1))
    whitening = eigvecs @ torch.diag((eigvals.clamp_min(0) + 0.1).rsqrt()) @ eigvecs.T
    assert torch.allclose(prepared.train_x.double().flatten(1), centred @ whitening, atol=1e-4)
    assert prepared.preprocessing.mean == (0.0,) * 3 and prepared.preprocessing.std == (1.0,) * 3
    assert "ZCA whitening of [0, 1] pixels (eps=0.1)" == prepared.preprocessing.describe()
    assert torch.allclose(prepared.preprocessing.invert(prepared.test_x) * 255, raw.test_images.float(), atol=0.01)

    # Second prepare: the ZCA comes from the cache, and the tensors are the same.
    assert len(list((tmp_path / "cache" / "zca").glob("*.pt"))) == 1
    monkeypatch.setattr(ZCA, "fit", classmethod(lambda *a, **k: pytest.fail("ZCA fitted again")))
    again = data.prepare(name, zca=True, val_per_class=2, split_seed=1, cache_dir=tmp_path / "cache")
    for field in ("train_x", "val_x", "test_x"):
        assert torch.equal(getattr(again, field), getattr(prepared, field))


def test_prepare_raw_on_data_made_in_memory():
    spec = data.get_spec("mnist")
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw = data.RawDataset(spec, images, torch.arange(40) % 10, images[:10], torch.arange(10), source=Path("."))
    prepared = data.prepare_raw(raw, val_per_class=0)
    assert prepared.val_x.shape == (0, 1, 28, 28) and prepared.train_x.shape == (40, 1, 28, 28)
    assert torch.allclose(prepared.train_x, Preprocessing(spec.mean, spec.std).apply(images / 255))


def test_real_fashion_mnist(monkeypatch):
    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    monkeypatch.setitem(sources.SYSTEM_FOLDERS, "fashion-mnist", (DEBIAN_FASHION_MNIST,))
    raw = data.load_raw("fashion-mnist")
    assert raw.source == DEBIAN_FASHION_MNIST
    assert raw.train_images.shape == (60000, 1, 28, 28) and raw.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(raw.train_labels).tolist() == [6000] * 10
    assert raw.train_images.float().mean().item() / 255 == pytest.approx(raw.spec.mean[0], abs=1e-3)
