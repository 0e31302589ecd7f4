"""Making a set again from its own record: `ddtool distill --from SET.h5` and
`ddtool.distill(**ddtool.recorded_run(path))` repeat the run bit for bit on a CPU."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import ddtool
from ddtool.errors import ConfigError
from ddtool.data.preprocess import Preprocessing
from ddtool.storage import SyntheticSet, save_synthetic_set
from test_cli import ddtool as run_cli
from test_cli import ok, user_error

TINY_MTT = ["--method", "mtt", "--ipc", 1, "--no-eval", "-q", "--seed", 3, "--set", "width=8", "--set", "experts=2",
            "--set", "expert_train_epochs=3", "--set", "max_start_epoch=2", "--set", "syn_steps=3",
            "--set", "iterations=4", "--set", "checkpoint_every=2", "--set", "lr_img=10"]


def images_and_lr(path):
    with h5py.File(path) as f:
        return f["images"][:], float(f["learned_lr"][()])


def test_a_set_made_again_from_its_record_is_the_same_set(tmp_path, fashion_root):
    first = tmp_path / "first.h5"
    made = ok(run_cli("distill", *TINY_MTT, "--data-root", fashion_root, "-o", first)).stdout
    again = tmp_path / "again.h5"
    said = ok(run_cli("distill", "--config", first, "--data-root", fashion_root, "--no-eval", "-q", "-o", again)).stdout
    assert f"settings: every one recorded in {first}" in said
    # the recorded run is planned as the same run: its work folder (the run's fingerprint)
    work_folder = [line for line in made.splitlines() if "checkpoints and log in" in line]
    assert work_folder and work_folder[0] in said.splitlines()
    images, lr = images_and_lr(first)
    images_again, lr_again = images_and_lr(again)
    assert np.array_equal(images, images_again) and lr == lr_again

    recorded = ddtool.recorded_run(first)
    assert (recorded["method"], recorded["ipc"], recorded["seed"]) == ("mtt", 1, 3)
    assert recorded["settings"]["syn_steps"] == 3 and "selected_iteration" not in recorded["settings"]

    # a setting changed on top of the record, and another seed: a different set, said in the plan
    other = tmp_path / "other.h5"
    said = ok(run_cli("distill", "--from", first, "--data-root", fashion_root, "--no-eval", "-q", "--seed", 4,
                      "--set", "iterations=2", "-o", other)).stdout
    assert "with iterations=2" in said
    with h5py.File(other) as f:
        assert int(f.attrs["seed"]) == 4
    assert not np.array_equal(images_and_lr(other)[0], images)

    # what the record fixes cannot be given as well
    user_error(run_cli("distill", "--from", first, "--ipc", 2, "--data-root", fashion_root, "--dry-run"),
               "recorded ipc", "drop --ipc")


def test_a_set_without_a_record_of_its_run_is_refused(tmp_path):
    imported = tmp_path / "imported.h5"
    save_synthetic_set(imported, SyntheticSet(images=torch.zeros(10, 1, 28, 28), labels=torch.arange(10),
                                              classes=[str(c) for c in range(10)],
                                              preprocessing=Preprocessing(mean=(0.5,), std=(0.5,)),
                                              dataset="fashion-mnist", ipc=1, method="mtt"))
    with pytest.raises(ConfigError, match="does not record how it was made"):
        ddtool.recorded_run(imported)


def test_a_renamed_setting_is_taken_under_its_old_name(tmp_path):
    """match_span_epochs was expert_epochs: sets, scripts and work folders made before keep working."""
    from ddtool.methods.base import build_config, get_method_class, parse_overrides, run_fingerprint
    from ddtool.storage import load_synthetic_set

    mtt = get_method_class("mtt")
    assert parse_overrides(mtt.config_class, ("expert_epochs=3",)) == {"match_span_epochs": 3}
    old = build_config(mtt, None, {"expert_epochs": 3})
    assert old == build_config(mtt, None, {"match_span_epochs": 3}) and old.match_span_epochs == 3
    with pytest.raises(ConfigError, match="former name of match_span_epochs"):
        build_config(mtt, None, {"expert_epochs": 3, "match_span_epochs": 2})
    # a shipped set recorded before the rename is made again with its span
    shipped = Path(__file__).parents[1] / "synthetic_sets" / "fashion-mnist_mtt_ipc10_seed0.h5"
    recorded = ddtool.recorded_run(shipped)
    assert "expert_epochs" not in recorded["settings"]
    assert recorded["settings"]["match_span_epochs"] == load_synthetic_set(shipped).config["expert_epochs"]
    # hashed under the first name, the run keeps the work folder the code before the rename gave it
    config = build_config(mtt, None, recorded["settings"])
    assert run_fingerprint("mtt", config, "fashion-mnist", 10, 0) == "c98d750bad9431ad"
