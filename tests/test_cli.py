"""The command line through real subprocesses, on a tiny Fashion-MNIST in its real format."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest


def ddtool(*args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ddtool", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def ok(result):
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def user_error(result, *phrases):
    """Exit 2, a readable message, no traceback."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    return result


def test_help_documents_every_command():
    out = ok(ddtool("--help")).stdout
    for command in ("datasets", "buffer", "distill", "evaluate", "info", "show", "export", "import"):
        assert command in out
    assert "--ipc" in ok(ddtool("distill", "--help")).stdout


def test_random_set_round_trip_through_the_cli(tmp_path, fashion_root):
    out = tmp_path / "r.h5"
    ok(ddtool("distill", "--method", "random", "--ipc", 2, "--data-root", fashion_root, "-o", out,
              "--protocol", "classic", "--eval-runs", 2, "--eval-epochs", 2, "-q"))
    with h5py.File(out, "r") as f:  # plain h5py, no ddtool
        assert f["images"].shape == (20, 1, 28, 28)
        assert f.attrs["method"] == "random"
        record = f["evaluations"]["000"]
        assert len(record["runs"][()]) == 2

    info = ok(ddtool("info", out)).stdout
    assert "random, IPC 2" in info and "classic on convnet" in info

    ok(ddtool("show", out, "-o", tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0

    ok(ddtool("export", out, "--format", "npz", "-o", tmp_path / "r.npz"))
    ok(ddtool("import", tmp_path / "r.npz", "--format", "npz", "-o", tmp_path / "back.h5",
              "--data-root", fashion_root))
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "back.h5", "r") as b:
        assert np.array_equal(a["images"][()], b["images"][()])
        assert np.array_equal(a["labels"][()], b["labels"][()])

    evaluated = ok(ddtool("evaluate", tmp_path / "back.h5", "--protocol", "classic", "--runs", 1, "--epochs", 1,
                          "--no-baselines", "--data-root", fashion_root, "-q")).stdout
    assert "synthetic set" in evaluated and "Recorded in" in evaluated


def test_an_evaluation_killed_midway_resumes_with_its_finished_runs(tmp_path, fashion_root):
    import json
    import shutil
    import time

    from ddtool.paths import cache_root
    from ddtool.storage import load_synthetic_set

    made = tmp_path / "set.h5"
    ok(ddtool("distill", "--method", "random", "--ipc", 2, "--data-root", fashion_root, "-o", made, "--no-eval", "-q"))
    copies = {name: tmp_path / f"{name}.h5" for name in ("whole", "killed")}
    for copy in copies.values():
        shutil.copy(made, copy)
    # a second or more per run: the kill lands between the first run and the last
    args = ("--protocol", "classic", "--runs", 3, "--epochs", 15, "--no-baselines", "--data-root", fashion_root, "-q")
    ok(ddtool("evaluate", copies["whole"], *args))

    kept = cache_root() / "evaluations"
    process = subprocess.Popen([sys.executable, "-m", "ddtool", "evaluate", str(copies["killed"]), *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(kept.glob("*/run-0.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    assert process.wait() != 0, "the evaluation ended before it could be interrupted"
    [first] = kept.glob("*/run-0.json")
    # mark the kept run, to tell a run read back from one trained again
    stored = json.loads(first.read_text())
    first.write_text(json.dumps({**stored, "accuracy": 0.987}))

    said = ok(ddtool("evaluate", copies["killed"], "--resume", *args)).stdout
    assert "taken from the interrupted evaluation" in said
    runs = {}
    for name, copy in copies.items():
        with h5py.File(copy, "r") as f:
            runs[name] = list(f["evaluations"]["000"]["runs"][()])
    record = load_synthetic_set(copies["killed"]).evaluations[0]
    assert record["resumed_runs"][0] == 0  # the record says which runs an earlier process trained
    assert runs["killed"][0] == pytest.approx(0.987)
    assert runs["killed"][1:] == runs["whole"][1:] and len(runs["whole"]) == 3
    assert not list(kept.glob("*/run-*.json"))


def test_mtt_through_the_cli_trains_experts_and_saves_the_learned_lr(tmp_path, fashion_root):
    out = tmp_path / "m.h5"
    settings = ["width=8", "experts=1", "expert_train_epochs=2", "expert_epochs=1", "max_start_epoch=1",
                "syn_steps=2", "checkpoint_every=1"]
    result = ok(ddtool("distill", "--method", "mtt", "--ipc", 1, "--data-root", fashion_root, "-o", out,
                       "--iterations", 2, "--no-eval", "-q", *[a for s in settings for a in ("--set", s)]))
    assert "Plan:" in result.stdout and "to train first" in result.stdout
    assert "preset fashion-cpu-ipc1, with " in result.stdout  # the CPU preset's IPC-1 variant
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (10, 1, 28, 28)
        assert f["learned_lr"][()] > 0


def test_distill_dry_run_prints_the_plan_and_writes_nothing(tmp_path, fashion_root):
    out, cache = tmp_path / "m.h5", tmp_path / "cache"
    result = ok(ddtool("distill", "--method", "datm", "--ipc", 50, "--data-root", fashion_root, "-o", out,
                       "--dry-run", env_extra={"DDTOOL_CACHE": str(cache)}))
    assert "preset fashion-cpu-ipc50" in result.stdout and "growing to [0, 19)" in result.stdout
    assert "to train first" in result.stdout and "Dry run" in result.stdout
    assert not out.exists() and not (cache / "runs").exists() and not (cache / "experts").exists()


def test_cda_through_the_cli_recovers_relabels_and_evaluates_with_kd(tmp_path, fashion_root):
    out = tmp_path / "c.h5"
    settings = ["teacher_width=8", "teacher_epochs=1", "teacher_batch_size=32", "iterations=3", "relabel_epochs=2"]
    result = ok(ddtool("distill", "--method", "cda", "--ipc", 2, "--data-root", fashion_root, "-o", out, "-q",
                       "--eval-runs", 1, "--eval-epochs", 2, *[a for s in settings for a in ("--set", s)]))
    assert "preset fashion-cpu" in result.stdout and "kd" in result.stdout
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (20, 1, 28, 28)
        assert f.attrs["method"] == "cda"
    info = ok(ddtool("info", out)).stdout
    assert "evaluation   kd on " in info and "over 1 runs, random subset" in info  # recorded with its baseline


def test_bad_inputs_get_one_paragraph_and_exit_2(tmp_path, fashion_root):
    user_error(ddtool("distill", "--method", "nope", "--data-root", fashion_root), "Unknown method", "mtt")
    user_error(ddtool("distill", "--method", "random", "--ipc", 50, "--data-root", fashion_root, "--no-eval",
                      "-o", tmp_path / "x.h5"), "per class")
    assert not (tmp_path / "x.h5").exists()
    user_error(ddtool("distill", "--method", "mtt", "--set", "ee=2", "--data-root", fashion_root), "No setting 'ee'")
    user_error(ddtool("distill", "--method", "random", "--dataset", "mnist", "--data-root", tmp_path / "empty"),
               "looked")
    user_error(ddtool("distill", "--dataset", "imagenet-99"), "Unknown dataset")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    user_error(ddtool("info", garbage), "garbage.h5")
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    user_error(ddtool("evaluate", foreign), "foreign.h5")


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist"), reason="Debian Fashion-MNIST absent")
def test_datasets_lists_the_debian_fashion_mnist():
    out = ok(ddtool("datasets")).stdout
    assert "fashion-mnist" in out and "/usr/share/datasets/fashion-mnist" in out
