"""Datasets ddtool was never tuned on: tiny grayscale images (8 and 16 px) in an ImageFolder,
made here, through the command line. The network follows the image size, a healthy run saves a
set without warnings, and a run that blows its images up while every number stays finite stops
with a message naming what diverged and what to change, writing no set."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from PIL import Image

from test_cli import ddtool, ok, user_error

CLASSES = 4


def write_blob_folder(root, size: int, train_per_class: int = 10, test_per_class: int = 3, seed: int = 0):
    """Class c is a bright square in quadrant c on a noisy dark background."""
    rng = np.random.default_rng(seed)
    half = size // 2
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 60, (size, size))
                top, left = (c // 2) * half, (c % 2) * half
                image[top:top + half, left:left + half] += 150
                Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


TINY_RUN = ["--method", "mtt", "--ipc", 2, "--no-eval", "--set", "width=8", "--set", "experts=2",
            "--set", "expert_train_epochs=3", "--set", "max_start_epoch=2", "--set", "syn_steps=4",
            "--set", "iterations=6", "--set", "checkpoint_every=3"]


@pytest.mark.parametrize("size, depth", [(8, 2), (16, 3)])
def test_a_healthy_run_on_tiny_images_chooses_its_depth_and_saves_without_warnings(tmp_path, size, depth):
    root = write_blob_folder(tmp_path / f"blobs{size}", size)
    out = tmp_path / "set.h5"
    said = ok(ddtool("distill", "--dataset", f"folder:{root}", *TINY_RUN, "--set", "lr_img=10", "-o", out)).stdout
    assert f"network: depth {depth} for {size}-px images" in said
    with h5py.File(out) as f:
        config = f.attrs["config"]
    assert "health_warnings" not in config and '"depth": 0' in config


def test_a_run_whose_images_blow_up_stops_with_what_diverged_and_writes_no_set(tmp_path):
    root = write_blob_folder(tmp_path / "blobs8", 8)
    out = tmp_path / "set.h5"
    result = user_error(ddtool("distill", "--dataset", f"folder:{root}", *TINY_RUN, "--set", "lr_img=1e7",
                               "--set", "max_rollbacks=1", "-o", out),
                        "grew far beyond", "To try: lower lr_img")
    assert "diverged 2 times" in result.stderr
    assert not out.exists()


def test_a_folder_says_whether_its_images_may_be_flipped_and_datasets_describes_it(tmp_path):
    from ddtool.data import get_spec
    from ddtool.data.sources import folder_options
    from ddtool.errors import FormatError

    root = write_blob_folder(tmp_path / "glyphs", 8)
    assert get_spec(f"folder:{root}").flip  # an image folder may be mirrored unless it says otherwise
    (root / "ddtool-dataset.json").write_text('{"flip": false}')
    said = ok(ddtool("datasets", f"folder:{root}")).stdout
    assert "without left-right flips (set in" in said and "depth 2 for 8-px" in said
    assert "4 classes: class0, class1, class2, class3" in said and "train: 40 images, 10-10 a class" in said
    plan = ok(ddtool("distill", "--dataset", f"folder:{root}", *TINY_RUN, "--dry-run")).stdout
    assert "augmentation: DSA without left-right flips" in plan
    (root / "ddtool-dataset.json").write_text('{"flip": "no", "colour": 1}')
    with pytest.raises(FormatError, match="unknown option colour"):
        folder_options(root)
    (root / "ddtool-dataset.json").write_text('{"flip": "no"}')
    with pytest.raises(FormatError, match="flip must be true or false"):
        folder_options(root)
