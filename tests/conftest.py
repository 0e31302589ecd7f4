"""Shared fixtures: tiny datasets in memory and in the real on-disk format, isolated caches."""

from __future__ import annotations

import os

# The tests run many small operations, where extra threads only add contention (on a shared
# 2-core machine two-thread processes were several times slower); the CLI tests' subprocesses
# inherit this. Set before torch is first imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import gzip
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ddtool.data import get_spec, prepare_raw  # noqa: E402
from ddtool.data.sources import RawDataset  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """No test reads or writes the user's caches (experts, baselines, ZCA, runs)."""
    monkeypatch.setenv("DDTOOL_CACHE", str(tmp_path / "ddtool-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DDTOOL_DATA", raising=False)


def tiny_prepared(name: str = "fashion-mnist", *, size: int = 8, per_class: int = 6, seed: int = 0,
                  zca: bool = False):
    """A registry dataset's spec at `size` px with a few random images per class, prepared by
    the real pipeline (validation split, normalisation, optional ZCA)."""
    spec = replace(get_spec(name), image_size=size)
    g = torch.Generator().manual_seed(seed)
    n, n_test = spec.num_classes * per_class, spec.num_classes * 3
    raw = RawDataset(
        spec,
        torch.randint(0, 256, (n, spec.channels, size, size), generator=g, dtype=torch.uint8),
        torch.arange(n) % spec.num_classes,
        torch.randint(0, 256, (n_test, spec.channels, size, size), generator=g, dtype=torch.uint8),
        torch.arange(n_test) % spec.num_classes,
        Path("memory"),
    )
    return prepare_raw(raw, zca=zca, val_per_class=1)


IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 0x00000803, 0x00000801


def write_idx_gz(path: Path, array: np.ndarray, magic: int) -> None:
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload))


@pytest.fixture
def fashion_root(tmp_path) -> Path:
    """A data root holding a tiny Fashion-MNIST in its real format (gzipped IDX files):
    12 training and 3 test images per class, with class-dependent brightness so it is learnable."""
    return write_tiny_fashion(tmp_path / "data")


def write_tiny_fashion(data_root: Path, train_per_class: int = 12) -> Path:
    """`data_root`/fashion-mnist with `train_per_class` training and 3 test images a class."""
    root = data_root / "fashion-mnist"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("t10k", 3)):
        labels = np.tile(np.arange(10, dtype=np.uint8), per_class)
        images = (rng.integers(0, 60, (labels.size, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
        write_idx_gz(root / f"{split}-images-idx3-ubyte.gz", images, IDX_IMAGES_MAGIC)
        write_idx_gz(root / f"{split}-labels-idx1-ubyte.gz", labels, IDX_LABELS_MAGIC)
    return root.parent
