"""The command line through real subprocesses, on a tiny Fashion-MNIST in its real format."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ddtool.cli.main import cli


def ddtool(*args, env_extra=None, cwd=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "ddtool", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def in_process(*args, env_extra=None):
    """The command run by click's runner in this process, read like `ddtool(...)`'s result: for
    checks of what a command plans, says and refuses, without a new interpreter importing torch
    (3-4 s a call). An exception other than the CLI's own exit is raised, traceback and all."""
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="ddtool", env=env_extra)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


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


HELP_OF_EACH_COMMAND = """
import json, sys
from click.testing import CliRunner
from ddtool.cli import commands  # noqa: F401  (registers the commands)
from ddtool.cli.main import cli
results = {}
for command in sys.argv[1:]:
    result = CliRunner().invoke(cli, [command, "--help"], prog_name="ddtool")
    results[command] = [result.exit_code, result.output + (repr(result.exception) if result.exit_code else "")]
print(json.dumps(results))
"""


def test_help_documents_every_command():
    out = ok(ddtool("--help")).stdout
    listed = {}  # command -> its one-line summary, from the top-level help's Commands section
    name = None
    for line in out.split("\nCommands:\n", 1)[1].splitlines():
        if line.startswith("   ") and name:  # a summary's continuation
            listed[name] += " " + line.strip()
        elif line.startswith("  ") and line.strip():
            name, _, summary = line.strip().partition(" ")
            listed[name] = summary.strip()
    assert {"datasets", "buffer", "distill", "evaluate", "info", "show", "export", "import"} <= set(listed)
    # Every command's own help, in one more process: a process per command spent ~4 s each importing
    # torch (~50 s in all on a busy 2-core machine); click's runner asks them in turn, as the shell would.
    asked = ok(subprocess.run([sys.executable, "-c", HELP_OF_EACH_COMMAND, *listed], capture_output=True, text=True,
                              timeout=600)).stdout
    helps = {}
    for command, (exit_code, text) in json.loads(asked).items():
        assert exit_code == 0, (command, text)
        helps[command] = text
    for command, summary in listed.items():
        # a command whose own help fails (a broken import, a bad option default) would still be listed
        text = helps[command]
        assert text.startswith(f"Usage: ddtool {command} "), text
        description = " ".join(text.split("\nOptions:\n", 1)[0].splitlines()[1:]).split()
        assert description, f"{command} --help has no description"
        assert summary and not summary.endswith("..."), (command, summary)  # listed whole
    assert "--ipc" in helps["distill"]


def test_random_set_round_trip_through_the_cli(tmp_path, fashion_root):
    # distill, info, show, export, import and evaluate through real processes; the refusals and
    # re-runs after them in this one
    out = tmp_path / "r.h5"
    ok(ddtool("distill", "--method", "random", "--ipc", 2, "--data-root", fashion_root, "-o", out,
              "--protocol", "classic", "--eval-runs", 2, "--eval-epochs", 2, "-q"))
    with h5py.File(out, "r") as f:  # plain h5py, no ddtool
        assert f["images"].shape == (20, 1, 28, 28)
        assert f.attrs["method"] == "random"
        record = f["evaluations"]["000"]
        assert len(record["runs"][()]) == 2

    info = ok(ddtool("info", out)).stdout
    assert "random, IPC 2" in info and "classic (epochs 2, runs 2) on convnet" in info

    ok(ddtool("show", out, "-o", tmp_path / "grid.png"))
    assert (tmp_path / "grid.png").stat().st_size > 0
    user_error(in_process("show", out, "-o", tmp_path / "grid.jpg"), "writes a PNG")  # not PNG bytes in a .jpg
    assert not (tmp_path / "grid.jpg").exists()

    ok(ddtool("export", out, "--format", "npz", "-o", tmp_path / "r.npz"))
    ok(ddtool("import", tmp_path / "r.npz", "--format", "npz", "-o", tmp_path / "back.h5",
              "--data-root", fashion_root))
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "back.h5", "r") as b:
        assert np.array_equal(a["images"][()], b["images"][()])
        assert np.array_equal(a["labels"][()], b["labels"][()])

    evaluated = ok(ddtool("evaluate", tmp_path / "back.h5", "--protocol", "classic", "--runs", 1, "--epochs", 1,
                          "--no-baselines", "--data-root", fashion_root, "-q")).stdout
    assert "synthetic set" in evaluated and "Recorded in" in evaluated
    # --resume of an evaluation that finished adds no second record of it
    again = ok(in_process("evaluate", tmp_path / "back.h5", "--protocol", "classic", "--runs", 1, "--epochs", 1,
                      "--no-baselines", "--data-root", fashion_root, "-q", "--resume")).stdout
    assert "already records this evaluation (record 0" in again and "Recorded in" not in again
    with h5py.File(tmp_path / "back.h5", "r") as f:
        assert list(f["evaluations"]) == ["000"]
    # ... but a record without the random baseline is not the evaluation that asks for one
    with_baseline = ok(in_process("evaluate", tmp_path / "back.h5", "--protocol", "classic", "--runs", 1, "--epochs", 1,
                              "--data-root", fashion_root, "-q", "--resume")).stdout
    assert "already records" not in with_baseline and "Recorded in" in with_baseline
    # importing over a set is refused unless asked, and then says what it replaced, records included
    refused = user_error(in_process("import", tmp_path / "r.npz", "--format", "npz", "-o", tmp_path / "back.h5",
                                "--data-root", fashion_root))
    assert "give --overwrite to replace it" in " ".join(refused.stderr.split())
    with h5py.File(tmp_path / "back.h5", "r") as f:  # left as it was, both records included
        assert len(f["evaluations"]) == 2
    again = ok(in_process("import", tmp_path / "r.npz", "--format", "npz", "-o", tmp_path / "back.h5", "--overwrite",
                      "--data-root", fashion_root)).stdout
    assert "replacing the imported:npz set there" in again and "and its 2 evaluation records" in again, again
    # an export does not replace a file either
    exported = (tmp_path / "r.npz").read_bytes()
    refused = user_error(in_process("export", tmp_path / "back.h5", "--format", "npz", "-o", tmp_path / "r.npz"))
    assert "export does not replace a file unless asked" in " ".join(refused.stderr.split())
    assert (tmp_path / "r.npz").read_bytes() == exported
    ok(in_process("export", tmp_path / "back.h5", "--format", "npz", "-o", tmp_path / "r.npz", "--overwrite"))


def test_an_evaluation_killed_midway_resumes_with_its_finished_runs(tmp_path, fashion_root):
    import json
    import shutil
    import time

    import torch

    from ddtool.device import describe_hardware
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
    assert stored["hardware"] == describe_hardware(torch.device("cpu"))
    first.write_text(json.dumps({**stored, "accuracy": 0.987, "hardware": "another machine (AVX512)"}))

    said = ok(ddtool("evaluate", copies["killed"], "--resume", *args)).stdout
    assert "taken from the interrupted evaluation" in said
    runs = {}
    for name, copy in copies.items():
        with h5py.File(copy, "r") as f:
            runs[name] = list(f["evaluations"]["000"]["runs"][()])
    record = load_synthetic_set(copies["killed"]).evaluations[0]
    assert record["resumed_runs"][0] == 0  # the record says which runs an earlier process trained
    # ... and on what: a resumed evaluation's runs may come from two machines
    assert record["hardware"] == {"another machine (AVX512)": [0], describe_hardware(torch.device("cpu")): [1, 2]}
    assert runs["killed"][0] == pytest.approx(0.987)
    assert runs["killed"][1:] == runs["whole"][1:] and len(runs["whole"]) == 3
    assert not list(kept.glob("*/run-*.json"))


KILLED_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path
from ddtool.cli.main import cli, main
from ddtool.files import atomic_path, exclusive_lock

out = Path(sys.argv[1])

@cli.command("killed-while-writing")
def killed_while_writing():
    with exclusive_lock(out.with_name(out.name + ".lock"), remove=True), atomic_path(out) as tmp:
        tmp.write_text("half a file")
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pause()

sys.argv = ["ddtool", "killed-while-writing"]
main()
"""


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary_or_lock_file(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_WHILE_WRITING, tmp_path / "set.h5"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 143, result.stdout + result.stderr
    assert "Terminated. Files being written were discarded" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_mtt_through_the_cli_trains_experts_and_saves_the_learned_lr(tmp_path, fashion_root):
    out = tmp_path / "m.h5"
    settings = ["width=8", "experts=1", "expert_train_epochs=2", "match_span_epochs=1", "max_start_epoch=1",
                "syn_steps=2", "checkpoint_every=1",
                "lr_lr=1e-7"]  # the preset's 1e-5 drives α to its clamp floor here, which would hide which α is saved
    result = ok(ddtool("distill", "--method", "mtt", "--ipc", 1, "--data-root", fashion_root, "-o", out,
                       "--iterations", 2, "--no-eval", "-q", *[a for s in settings for a in ("--set", s)]))
    assert "Plan:" in result.stdout and "to train first" in result.stdout
    assert "preset fashion-cpu-ipc1, with " in result.stdout  # the CPU preset's IPC-1 variant
    with h5py.File(out, "r") as f:
        assert f["images"].shape == (10, 1, 28, 28)
        learned_lr = float(f["learned_lr"][()])
        timings = json.loads(f.attrs["timings"])
    # the experts it trained count as experts, at their recorded time; the rest is distillation
    assert set(timings) == {"experts_s", "distill_s", "total_s", "hardware"}
    assert timings["experts_s"] > 0 and timings["distill_s"] > 0 and timings["hardware"]
    assert timings["total_s"] == pytest.approx(timings["experts_s"] + timings["distill_s"], abs=0.11)
    # the command's own wall-clock beside the set's recorded cost, which is what a budget counts
    [saved] = [line for line in result.stdout.splitlines() if line.startswith("Saved ")]
    assert "; its recorded cost " in saved and "(experts " in saved
    described = ok(ddtool("info", out)).stdout
    assert "  cost         " in described and "(experts " in described and ", distillation " in described
    # The run's log (in the cache's work folder) records α after each update; the set must hold
    # the last one, which has moved from α₀ = 0.01 (the preset's lr_init): a set that saved α₀,
    # or any positive number, would pass a mere "> 0".
    cache = Path(os.environ["DDTOOL_CACHE"])  # conftest's per-test cache, inherited by the subprocess
    [log] = (cache / "runs").glob("*/log.jsonl")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    assert not any(r["lr_clamped"] for r in records)
    assert learned_lr == pytest.approx(records[-1]["lr"], rel=1e-6) and learned_lr != pytest.approx(0.01, rel=1e-6)
    assert learned_lr != pytest.approx(records[0]["lr"], rel=1e-6)  # the last update's α, not the first's
    # ... and the experts it trained are in the cache, for later runs
    from ddtool.experts import read_manifest

    [store] = (cache / "experts").glob("*.h5")
    manifest = read_manifest(store)
    assert len(manifest.experts) == 1 and manifest.epochs == 2


def test_a_budget_sizes_the_run_in_its_plan_and_is_refused_where_it_cannot(tmp_path, fashion_root):
    out = tmp_path / "b.h5"
    common = ("--ipc", 1, "--data-root", fashion_root, "-o", out, "--set", "width=8")
    planned = ok(in_process("distill", "--method", "datm", *common, "--budget", "20m", "--dry-run")).stdout
    assert "- budget 20m 00s for experts and distillation (evaluation not included): " in planned
    assert re.search(r" outer iterations of N=\d+ student steps at about ", planned)
    assert "stopping early if the budget runs out" in planned
    assert not out.exists()
    user_error(in_process("distill", "--method", "random", *common[:-2], "--budget", "5m"), "--budget sizes the runs of")
    user_error(in_process("distill", "--method", "mtt", *common, "--budget", "5m", "--iterations", 9),
               "--budget sizes iterations itself")
    # the window a budget places on the trajectory it sizes: not replaced silently, refused
    user_error(in_process("distill", "--method", "datm", *common, "--budget", "5m", "--set", "max_start_epoch_final=3"),
               "--budget sizes max_start_epoch_final itself", "budget_start_share")
    user_error(in_process("distill", "--method", "mtt", *common, "--budget", "2s"), "too small for a useful mtt run", "--budget")
    user_error(in_process("distill", "--method", "mtt", *common, "--budget", "soon"), "Cannot read the duration")
    assert not out.exists()
    # Fashion-MNIST on a CPU: a run that names no preset and sizes nothing gets the default budget,
    # and says so; a named preset, or a sized setting, runs as configured
    default = ok(in_process("distill", "--method", "mtt", *common, "--dry-run")).stdout
    assert "- budget 30m 00s for experts and distillation" in default
    assert "the budget is the default for fashion-mnist on a CPU" in default and "--preset fashion-cpu" in default
    assert "- method " not in default  # named, not the default
    # and with no method named, the recipe's: DATM, sized to the same budget
    recipe = ok(in_process("distill", *common, "--dry-run")).stdout
    assert "- method datm: the default for fashion-mnist on a CPU" in recipe and "- datm: " in recipe
    assert "- budget 30m 00s for experts and distillation" in recipe
    for fixed in (("--preset", "fashion-cpu"), ("--iterations", 7), ("--set", "max_start_epoch=1")):
        planned = ok(in_process("distill", "--method", "mtt", *common, *fixed, "--dry-run")).stdout
        assert "- budget " not in planned and " iterations of N=" in planned


def test_distill_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    from conftest import write_tiny_fashion

    out, cache = tmp_path / "m.h5", tmp_path / "cache"
    fashion_root = write_tiny_fashion(tmp_path / "data", train_per_class=56)  # 51 a class after validation
    result = ok(in_process("distill", "--method", "datm", "--ipc", 50, "--data-root", fashion_root, "-o", out,
                       "--preset", "fashion-cpu", "--dry-run", env_extra={"DDTOOL_CACHE": str(cache)}))
    assert "preset fashion-cpu-ipc50" in result.stdout and "growing to [0, 19)" in result.stdout
    assert "to train first" in result.stdout and "Dry run" in result.stdout
    assert "- distillation: about " in result.stdout and "100 iterations at " in result.stdout  # timed here
    assert "then evaluate (datm protocol: about " in result.stdout and "for its 5 runs on convnet:width=32" in \
        result.stdout
    assert not out.exists() and not (cache / "runs").exists() and not (cache / "experts").exists()
    # the other methods' plans time their networks without leaving one (or a folder for it) behind
    for method, network in (("cda", "teachers"), ("herding", "feature-networks")):
        planned = ok(in_process("distill", "--method", method, "--ipc", 2, "--data-root", fashion_root, "-o", out,
                            "--dry-run", env_extra={"DDTOOL_CACHE": str(cache)})).stdout
        assert "timed here" in planned and not (cache / network).exists() and not out.exists(), planned
    assert "checkpoint of these settings" not in result.stdout and "left a checkpoint" not in result.stdout
    # --resume with nothing to resume from says so; a checkpoint a plain rerun would replace is named
    args = ("distill", "--method", "datm", "--ipc", 50, "--data-root", fashion_root, "-o", out, "--dry-run",
            "--preset", "fashion-cpu")
    resumed = ok(in_process(*args, "--resume", env_extra={"DDTOOL_CACHE": str(cache)})).stdout
    assert "--resume: no checkpoint of these settings there, so the run starts from the beginning" in resumed
    work_dir = Path(resumed.split("checkpoints and log in ", 1)[1].split()[0])
    work_dir.mkdir(parents=True)
    (work_dir / "checkpoint.pt").write_bytes(b"")
    rerun = ok(in_process(*args, env_extra={"DDTOOL_CACHE": str(cache)})).stdout
    assert "an interrupted run of these settings left a checkpoint there: this run starts afresh" in rerun


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
    assert "evaluation   kd (epochs 2, runs 1) on " in info and "over 1 run, random subset" in info  # with its baseline
    assert "the teacher's soft labels of 2 epochs of augmented views are stored beside them" in info
    # an export cannot hold what kd trains with, and says so
    exported = ok(ddtool("export", out, "--format", "npz", "-o", tmp_path / "c.npz"))
    assert "Not exported: the stored soft labels (2 epochs of augmented views) and the teacher network" in \
        exported.stderr


def test_bad_inputs_get_one_paragraph_and_exit_2(tmp_path, fashion_root):
    user_error(in_process("distill", "--method", "nope", "--data-root", fashion_root), "Unknown method", "mtt")
    user_error(in_process("distill", "--method", "random", "--ipc", 50, "--data-root", fashion_root, "--no-eval",
                      "-o", tmp_path / "x.h5"), "per class")
    assert not (tmp_path / "x.h5").exists()
    user_error(in_process("distill", "--method", "mtt", "--set", "ee=2", "--data-root", fashion_root), "No setting 'ee'")
    # an evaluation option beside --no-eval would be silently ignored
    user_error(in_process("distill", "--method", "random", "--no-eval", "--eval-precision", "bf16", "--data-root",
                      fashion_root, "-o", tmp_path / "x.h5"), "--eval-precision", "--no-eval")
    assert not (tmp_path / "x.h5").exists()
    # a kd evaluation of a set without a teacher would fail only after the distillation
    user_error(in_process("distill", "--method", "random", "--protocol", "kd", "--data-root", fashion_root, "-o",
                      tmp_path / "x.h5"), "random sets have no teacher", "sre2l make one")
    assert not (tmp_path / "x.h5").exists()
    (tmp_path / "empty").mkdir()
    user_error(in_process("distill", "--method", "random", "--dataset", "mnist", "--data-root", tmp_path / "empty"),
               "looked")
    user_error(in_process("distill", "--dataset", "imagenet-99"), "Unknown dataset")
    # a mistyped --data-root is refused, not passed over for the other places data is looked for
    user_error(in_process("datasets", "--data-root", tmp_path / "typo"), "typo", "does not exist")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all")
    user_error(ddtool("info", garbage), "garbage.h5")  # one through a real process: exit 2, no traceback
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    user_error(in_process("evaluate", foreign), "foreign.h5")


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist"), reason="Debian Fashion-MNIST absent")
def test_datasets_lists_the_debian_fashion_mnist():
    out = ok(ddtool("datasets")).stdout
    assert "fashion-mnist" in out and "/usr/share/datasets/fashion-mnist" in out


def _fashion_set(path, images=None, **fields):
    """A small set of the tiny Fashion-MNIST's shape (1x28x28, its ten classes), saved at `path`."""
    import torch

    from ddtool.data import Preprocessing, get_spec
    from ddtool.storage import SyntheticSet, save_synthetic_set

    spec = get_spec("fashion-mnist")
    g = torch.Generator().manual_seed(len(str(path)))
    images = torch.randn(20, 1, 28, 28, generator=g) if images is None else images
    sset = SyntheticSet(**{"images": images, "labels": torch.arange(10).repeat_interleave(2),
                           "classes": list(spec.classes), "preprocessing": Preprocessing(spec.mean, spec.std),
                           "dataset": spec.name, "ipc": 2, "method": "random", **fields})
    save_synthetic_set(path, sset)
    return sset


def test_seeds_beyond_what_files_store_are_refused_before_any_work(tmp_path, fashion_root):
    out = tmp_path / "s.h5"
    for command in ("distill", "evaluate", "buffer"):
        args = [out] if command == "evaluate" else []
        user_error(in_process(command, *args, "--seed", 2**63, "--data-root", fashion_root), "'--seed'", "0<=x<=")
    user_error(in_process("distill", "--seed", -1, "--data-root", fashion_root), "'--seed'")
    assert not out.exists()
    # the largest allowed seed is stored as it was given
    ok(in_process("distill", "--method", "random", "--ipc", 1, "--seed", 2**63 - 1, "--no-eval", "-o", out,
              "--data-root", fashion_root, "-q"))
    with h5py.File(out, "r") as f:
        assert int(f.attrs["seed"]) == 2**63 - 1


def test_an_output_that_cannot_be_written_is_one_paragraph(tmp_path):
    np.savez(tmp_path / "set.npz", images=np.zeros((10, 1, 28, 28), np.float32), labels=np.arange(10))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    user_error(in_process("import", tmp_path / "set.npz", "--format", "npz", "-o", blocker / "set.h5"),
               "Could not write", str(blocker / "set.h5"))
    user_error(in_process("import", tmp_path / "set.npz", "--format", "npz", "--checkpoint", "best", "-o",
                      tmp_path / "x.h5"), "--checkpoint applies to another format")
    assert not (tmp_path / "x.h5").exists()
    assert blocker.read_text() == "not a folder"


def test_distill_refuses_an_output_it_could_not_write_before_any_work(tmp_path, fashion_root):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    failed = user_error(in_process("distill", "--method", "mtt", "--ipc", 1, "--data-root", fashion_root,
                               "-o", blocker / "deeper" / "set.h5", "--dry-run"), "Could not write")
    assert "Plan:" not in failed.stdout  # refused before the plan, let alone the experts
    assert blocker.read_text() == "not a folder"


def test_evaluate_refuses_a_set_that_does_not_fit_its_dataset(tmp_path, fashion_root):
    import torch

    path = tmp_path / "cifar-sized.h5"
    _fashion_set(path, images=torch.zeros(20, 1, 32, 32), method="imported:npz")  # 32x32 called Fashion-MNIST
    before = path.read_bytes()
    user_error(ddtool("evaluate", path, "--protocol", "classic", "--runs", 1, "--epochs", 1, "--no-baselines",
                      "--data-root", fashion_root, "-q"), "1x32x32", "1x28x28", "fashion-mnist")
    assert path.read_bytes() == before  # nothing trained, nothing recorded


def test_evaluate_refuses_to_record_into_a_file_whose_set_was_replaced(tmp_path, fashion_root):
    import time

    from ddtool.paths import cache_root
    from ddtool.storage import load_synthetic_set

    path = tmp_path / "set.h5"
    _fashion_set(path)
    args = ("--protocol", "classic", "--runs", 3, "--epochs", 15, "--no-baselines", "--data-root", fashion_root, "-q")
    process = subprocess.Popen([sys.executable, "-m", "ddtool", "evaluate", str(path), *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kept = cache_root() / "evaluations"
    deadline = time.monotonic() + 300
    while not list(kept.glob("*/run-0.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert process.poll() is None, "the evaluation ended before its file could be replaced"
    replacement = _fashion_set(tmp_path / "other.h5")  # another set saved over the file meanwhile
    (tmp_path / "other.h5").replace(path)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2 and "Traceback" not in stderr, stderr
    assert "changed while it was being evaluated" in " ".join(stderr.split())
    replaced = load_synthetic_set(path)
    assert replaced.evaluations == [] and replaced.content_digest() == replacement.content_digest()
    assert list(kept.glob("*/run-*.json"))  # the runs wait for a resume on the restored file


def test_hard_labels_trains_a_soft_set_on_its_classes_and_says_so(tmp_path, fashion_root):
    import torch

    from ddtool.storage import load_synthetic_set

    path = tmp_path / "soft.h5"
    logits = torch.nn.functional.one_hot(torch.arange(10).repeat_interleave(2), 10).float() * 3
    _fashion_set(path, labels=logits, label_kind="logits", method="datm")
    args = ("--protocol", "classic", "--runs", 1, "--epochs", 1, "--no-baselines", "--data-root", fashion_root, "-q")
    assert "soft labels" in ok(ddtool("evaluate", path, *args)).stdout
    assert "hard labels" in ok(ddtool("evaluate", path, *args, "--hard-labels")).stdout
    soft, hard = load_synthetic_set(path).evaluations
    assert soft["labels"] == "soft" and soft["protocol"]["soft_labels"] is True
    assert hard["labels"] == "hard" and hard["protocol"]["soft_labels"] is False
    assert "soft_labels False" in ok(ddtool("info", path)).stdout  # not passed off as the classic protocol
    before = path.read_bytes()
    user_error(ddtool("evaluate", path, "--protocol", "kd", "--hard-labels", "--runs", 1, "--epochs", 1,
                      "--no-baselines", "--data-root", fashion_root, "-q"), "--hard-labels", "teacher")
    assert path.read_bytes() == before


def _save_like_mtt(folder, it, images, labels, lr=None):
    """What MTT/DATM's distill.py writes: torch.save of the (grad-requiring) tensors' .cpu()."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(images.clone().requires_grad_(True).cpu(), folder / f"images_{it}.pt")
    torch.save(labels.clone(), folder / f"labels_{it}.pt")
    if lr is not None:
        torch.save(torch.tensor(lr).requires_grad_(True).detach().cpu(), folder / f"lr_{it}.pt")


def test_an_imported_mtt_set_is_evaluated_under_the_mtt_protocol(tmp_path, fashion_root):
    import torch

    from ddtool.storage import load_synthetic_set

    run = tmp_path / "logged_files" / "FashionMNIST" / "run"
    images, labels = torch.randn(20, 1, 28, 28), torch.arange(10).repeat_interleave(2)
    _save_like_mtt(run, "best", images + 1, labels)  # selected on test accuracy: not the default
    _save_like_mtt(run, "5000", images, labels)  # plain MTT saves no lr
    ok(ddtool("import", run, "--format", "mtt", "-o", tmp_path / "mtt.h5"))
    ok(ddtool("import", run, "--format", "mtt", "--checkpoint", "best", "-o", tmp_path / "best.h5"))
    final, best = load_synthetic_set(tmp_path / "mtt.h5"), load_synthetic_set(tmp_path / "best.h5")
    assert torch.equal(final.images, images) and final.config["iteration"] == "5000"
    assert torch.equal(best.images, images + 1) and best.config["iteration"] == "best"

    said = ok(ddtool("evaluate", tmp_path / "mtt.h5", "--runs", 1, "--epochs", 1, "--no-baselines",
                     "--data-root", fashion_root, "-q")).stdout
    assert "'mtt' protocol" in said
    [record] = load_synthetic_set(tmp_path / "mtt.h5").evaluations
    assert record["protocol"]["name"] == "mtt" and record["protocol"]["augment"] is True
    assert record["lr"] == 0.01  # no lr saved: the protocol's


def test_import_zca_is_fitted_on_every_training_image_as_mtt_fits_it(tmp_path, fashion_root):
    import torch

    import ddtool.data as data
    from ddtool.storage import load_synthetic_set

    images, labels = torch.randn(20, 1, 28, 28), torch.arange(10).repeat_interleave(2)
    _save_like_mtt(tmp_path / "run", "5000", images, labels)
    ok(ddtool("import", tmp_path / "run", "--format", "mtt", "--zca", "--data-root", fashion_root,
              "-o", tmp_path / "zca.h5"))
    zca = load_synthetic_set(tmp_path / "zca.h5").preprocessing.zca
    raw = data.load_raw("fashion-mnist", fashion_root)  # 12 a class; ddtool's own runs hold 1 a class out
    pixels = raw.train_images.double() / 255  # MTT whitens pixels, not normalised images
    assert torch.allclose(zca.mean.double(), pixels.reshape(120, -1).mean(dim=0), atol=1e-5)

    # ddtool's own export records its ZCA: imported back as it is, with no flag and no dataset files
    ok(ddtool("export", tmp_path / "zca.h5", "--format", "npz", "-o", tmp_path / "zca.npz"))
    ok(ddtool("import", tmp_path / "zca.npz", "--format", "npz", "-o", tmp_path / "back.h5",
              env_extra={"DDTOOL_DATA": str(tmp_path / "nowhere")}))
    assert torch.equal(load_synthetic_set(tmp_path / "back.h5").preprocessing.zca.matrix, zca.matrix)
    user_error(ddtool("import", tmp_path / "zca.npz", "--format", "npz", "--no-zca", "-o", tmp_path / "no.h5"),
               "ZCA whitening of [0, 1] pixels")  # a flag that contradicts the file's record


def test_the_default_protocol_follows_the_sets_method(tmp_path):
    import torch

    from ddtool.run import default_protocol

    def protocol_of(method, **fields):
        return default_protocol(_fashion_set(tmp_path / f"{len(list(tmp_path.iterdir()))}.h5", method=method,
                                             **fields))

    assert protocol_of("mtt") == "mtt" and protocol_of("datm") == "datm" and protocol_of("random") == "classic"
    assert protocol_of("cda") == "kd"
    # imported: the mtt format holds MTT/TESLA/FTD sets (hard labels) and DATM's (soft logits)
    assert protocol_of("imported:mtt") == "mtt"
    assert protocol_of("imported:mtt", labels=torch.randn(20, 10), label_kind="logits") == "datm"
    assert protocol_of("imported:npz", config={"original": {"method": "ftd"}}) == "mtt"  # a ddtool export
    assert protocol_of("imported:dc") == "classic" and protocol_of("imported:npz") == "classic"
    assert protocol_of("imported:npz", learned_lr=0.02) == "mtt"  # only the MTT family learns an lr


def _write_image_folder(root, size=8):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 1)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")


def test_the_default_output_of_an_image_folder_is_named_by_the_folder(tmp_path):
    from pathlib import Path

    from ddtool.cli.actions import _default_output

    assert _default_output("folder:/data/my pets", "mtt", 10, 0) == Path("distilled/my_pets_mtt_ipc10_seed0.h5")
    assert _default_output("fashion-mnist", "mtt", 10, 0) == Path("distilled/fashion-mnist_mtt_ipc10_seed0.h5")
    _write_image_folder(tmp_path / "pets")
    said = ok(ddtool("distill", "--method", "random", "--ipc", 1, "--dataset", f"folder:{tmp_path / 'pets'}",
                     "--dry-run", cwd=tmp_path)).stdout
    assert "save to distilled/pets_random_ipc1_seed0.h5" in said


def test_an_ipc_beyond_the_smallest_class_is_refused_before_any_work(tmp_path, fashion_root):
    # the tiny dataset has 11 training images a class (1 held out); mtt would train experts first
    result = user_error(in_process("distill", "--method", "mtt", "--ipc", 12, "--data-root", fashion_root, "--dry-run"),
                        "Cannot take 12 images per class", "has only 11")
    assert "Plan:" not in result.stdout
    # a method that recovers images from noise needs none, unless its evaluation's baseline does
    user_error(in_process("distill", "--method", "sre2l", "--ipc", 12, "--data-root", fashion_root, "--dry-run"),
               "Cannot take 12 images per class")
    ok(in_process("distill", "--method", "sre2l", "--ipc", 12, "--data-root", fashion_root, "--dry-run", "--no-eval"))


def test_distill_replaces_a_set_only_when_asked_and_its_plan_says_so(tmp_path, fashion_root):
    out = tmp_path / "r.h5"
    args = ("distill", "--method", "random", "--ipc", 1, "--data-root", fashion_root, "-o", out, "--no-eval", "-q")
    assert "replacing" not in ok(ddtool(*args)).stdout
    made = out.read_bytes()
    # refused before any work, the set and its records left as they were
    for refused in (ddtool(*args, "--seed", 1), ddtool(*args, "--dry-run")):
        message = " ".join(user_error(refused).stderr.split())  # unwrapped
        assert f"{out} holds the random set there, made " in message and "give --overwrite to replace it" in message
    assert out.read_bytes() == made
    planned = ok(ddtool(*args, "--overwrite", "--dry-run")).stdout
    assert f"save to {out} (replacing the random set there, made " in planned
    ok(ddtool(*args, "--overwrite", "--seed", 1))
    assert out.read_bytes() != made
