"""Processes sharing one expert store or one set file: each expert trained once, a dead
trainer's expert taken over, no record lost or written twice. Real processes, real locks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
import torch

from ddtool.experts import ExpertConfig, ExpertStore, read_manifest, run_buffer
from ddtool.experts.execution import ExpertExecution
from ddtool.experts.store import StoreWriter, expert_lock_path, experts_folder, index_locked, index_lock_path
from ddtool.storage import append_evaluation, load_synthetic_set, save_synthetic_set
from ddtool.files import exclusive_lock

from conftest import tiny_prepared  # tests/conftest.py: tiny datasets through the real pipeline
from test_experts import assert_same_store  # the manifest and every trajectory, bit for bit
from test_storage import make_set  # a small valid synthetic set

REPO = Path(__file__).resolve().parents[1]
# `ddtool buffer`'s settings in these tests: 4 tiny experts of 2 epochs (well under a second each)
BUFFER_FLAGS = ["--width", "4", "--depth", "1", "--experts", "4", "--epochs", "2", "--batch-size", "16",
                "--device", "cpu"]


def cli_env() -> dict[str, str]:
    # DDTOOL_CACHE: isolated by conftest; unbuffered, so that a test can follow a process's output
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def buffer_process(store: Path, fashion_root: Path, flags: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ddtool", "buffer", "--data-root", str(fashion_root), *flags,
                             "-o", str(store)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(), cwd=cwd)


def cli_config_and_data(flags: list[str], fashion_root: Path):
    """The ExpertConfig and prepared data `ddtool buffer FLAGS` trains with (for reference stores)."""
    from ddtool.cli.buffer import buffer, config_from_options
    from ddtool.data import prepare
    from ddtool.experts import for_data

    config = config_from_options(buffer.make_context("buffer", list(flags)).params)
    data = prepare(config.dataset, str(fashion_root), zca=config.zca, device=torch.device("cpu"))
    return for_data(config, data), data


def trained_now(stdout: str) -> int:
    """How many experts a `ddtool buffer` process trained itself (its closing line says)."""
    [count] = re.findall(r"trained now: (\d+)", stdout)
    return int(count)


def flock_waiters(lock: Path) -> set[int]:
    """The processes blocked in flock on the file `lock` (Linux: /proc/locks lists them with "->")."""
    inode = os.stat(lock).st_ino
    waiting = set()
    for line in Path("/proc/locks").read_text().splitlines():
        found = re.search(r"->\s+FLOCK\s+\S+\s+\S+\s+(\d+)\s+[0-9a-f]+:[0-9a-f]+:(\d+)\s", line)
        if found and int(found.group(2)) == inode:
            waiting.add(int(found.group(1)))
    return waiting


class Output:
    """A process's output read as it comes (a thread a stream), to wait for a line in it."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.process = process
        self.text = {"stdout": "", "stderr": ""}
        self.threads = [threading.Thread(target=self._read, args=(name,), daemon=True) for name in self.text]
        for thread in self.threads:
            thread.start()

    def _read(self, name: str) -> None:
        stream = getattr(self.process, name)
        while chunk := stream.read(1):
            self.text[name] += chunk

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text["stderr"]) or re.search(pattern, self.text["stdout"])
            if found:
                return found
            assert self.process.poll() is None or any(t.is_alive() for t in self.threads), \
                f"the process ended before {pattern!r}:\n{self.text['stdout']}\n{self.text['stderr']}"
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.text['stdout']}\n{self.text['stderr']}")

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        code = self.process.wait(timeout=timeout)
        for thread in self.threads:
            thread.join(timeout=10)
        return code, self.text["stdout"], self.text["stderr"]


def stop(*processes: subprocess.Popen) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


# -- two `ddtool buffer` processes into one store --------------------------------------------------


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks to see both processes wait")
def test_two_buffer_processes_share_the_experts_of_one_store(tmp_path, fashion_root):
    store = tmp_path / "shared.h5"
    config, data = cli_config_and_data(BUFFER_FLAGS, fashion_root)
    # Both processes are let into the store at the same moment: each finds it empty and needs all
    # four experts, so without a lock per expert each trains all four.
    processes = []
    try:
        with index_locked(store):
            processes = [buffer_process(store, fashion_root, BUFFER_FLAGS, tmp_path) for _ in range(2)]
            deadline = time.monotonic() + 120
            while not flock_waiters(index_lock_path(store)) >= {p.pid for p in processes}:
                assert time.monotonic() < deadline, "the processes never reached the store"
                assert all(p.poll() is None for p in processes), [p.communicate() for p in processes]
                time.sleep(0.05)
        results = [p.communicate(timeout=120) for p in processes]
    finally:
        stop(*processes)
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stdout + stderr
    counts = [trained_now(stdout) for stdout, _ in results]
    # four trainings for four experts, all in the store: each was trained exactly once
    assert sum(counts) == 4, (counts, results)
    with ExpertStore.open(store, num_experts=4) as done:  # through the index: no expert lost from it
        assert done.expert_indices == (0, 1, 2, 3)
    run_buffer(config, tmp_path / "alone.h5", data, progress=False)
    assert_same_store(store, tmp_path / "alone.h5")
    # the locks went with their holders: no file is left to block anything
    assert not list(experts_folder(store).glob("*.lock"))


def test_an_expert_whose_trainer_died_is_taken_over_from_its_checkpoint(tmp_path, fashion_root):
    flags = ["--width", "4", "--depth", "1", "--experts", "3", "--epochs", "3", "--batch-size", "16", "--device", "cpu"]
    store = tmp_path / "store.h5"
    config, data = cli_config_and_data(flags, fashion_root)
    # A process training expert 1 as `ddtool buffer` does (its lock held, a checkpoint after each
    # epoch) stops after its first epoch, and is then killed.
    holder_script = f"""
import os, socket, sys, time
from pathlib import Path
import torch
from ddtool.cli.buffer import buffer, config_from_options
from ddtool.data import prepare
from ddtool.experts.store import expert_lock_path, experts_folder
from ddtool.experts.train import train_expert
from ddtool.files import exclusive_lock

store = Path({str(store)!r})
config = config_from_options(buffer.make_context("buffer", {flags!r}).params)
data = prepare(config.dataset, {str(fashion_root)!r}, zca=config.zca, device=torch.device("cpu"))

def hold(done, stats, seconds):
    print("holding expert 1 after epoch", done, flush=True)
    time.sleep(600)

lock = expert_lock_path(store, 1)
with exclusive_lock(lock, wait=False, remove=True) as held:
    assert held
    lock.write_text(f"{{os.getpid()}} {{socket.gethostname()}}")
    train_expert(config, 1, data, checkpoint=experts_folder(store) / "expert-00001.partial.pt", on_epoch=hold)
"""
    holder = subprocess.Popen([sys.executable, "-c", holder_script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=tmp_path)
    trainer = None
    try:
        Output(holder).wait_for("holding expert 1 after epoch 1")
        trainer = Output(buffer_process(store, fashion_root, flags, tmp_path))
        trainer.wait_for(rf"expert 1 is being trained by another process \(pid {holder.pid}\); waiting")
        assert trainer.process.poll() is None  # it waits: the store lacks expert 1
        assert sorted(p.name for p in experts_folder(store).glob("expert-*.h5")) == \
            ["expert-00000.h5", "expert-00002.h5"]  # it trained the others meanwhile
        holder.send_signal(signal.SIGKILL)  # dies holding the lock: the OS releases it
        holder.wait(timeout=30)
        code, stdout, stderr = trainer.finish()
    finally:
        stop(holder, *([trainer.process] if trainer else []))
    assert code == 0, stdout + stderr
    assert (f"expert 1: another process (pid {holder.pid}) stopped before finishing it; this process takes it "
            "over from its checkpoint after epoch 1 of 3") in stderr
    assert trained_now(stdout) == 3
    run_buffer(config, tmp_path / "alone.h5", data, progress=False)
    assert_same_store(store, tmp_path / "alone.h5")  # resumed from the dead process's epoch: the same expert
    assert not list(experts_folder(store).glob("*.lock")) and not list(experts_folder(store).glob("*.partial.pt"))


# -- in one process: the worker pool and the index ---------------------------------------------------


def tiny_config(**overrides) -> ExpertConfig:
    values = dict(arch_options={"width": 4, "depth": 1}, experts=3, epochs=2, batch_size=8, seed=7)
    return ExpertConfig(**{**values, **overrides})


def test_worker_processes_leave_an_expert_locked_elsewhere_and_wait_for_it(tmp_path, capfd):
    data = tiny_prepared(per_class=4)
    config, store = tiny_config(), tmp_path / "store.h5"
    lock = expert_lock_path(store, 1)
    outcome = {}

    def fill():
        try:
            outcome["result"] = run_buffer(config, store, data, progress=False,
                                           execution=ExpertExecution(workers=2, threads=1))
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    with exclusive_lock(lock, remove=True):  # "another process" trains expert 1 (another open of the file)
        lock.write_text("4242 elsewhere")
        filler = threading.Thread(target=fill)
        filler.start()
        deadline = time.monotonic() + 120
        while "expert 1 is being trained" not in capfd.readouterr().err:
            assert filler.is_alive(), outcome
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # everything else is done, expert 1 is not: the workers were never handed it
        assert sorted(p.name for p in experts_folder(store).glob("expert-*.h5")) == \
            ["expert-00000.h5", "expert-00002.h5"]
        assert filler.is_alive()
    filler.join(timeout=120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].trained == (0, 1, 2)
    run_buffer(config, tmp_path / "alone.h5", data, progress=False)
    assert_same_store(store, tmp_path / "alone.h5")


def test_no_writer_drops_an_expert_another_added_to_the_index(tmp_path):
    from ddtool.experts.manifest import build_manifest
    from ddtool.experts.train import expert_layout, train_expert, training_split

    data = tiny_prepared(per_class=4)
    config, store = tiny_config(), tmp_path / "store.h5"
    manifest = build_manifest(config, data, expert_layout(config, data),
                              train_images=training_split(config, data, torch.device("cpu"))[0].shape[0])
    # two processes' writers, both opened on the empty store
    first, second = StoreWriter.open(store, manifest), StoreWriter.open(store, manifest)
    first.add(train_expert(config, 0, data))
    second.add(train_expert(config, 2, data))  # its index rewrite keeps expert 0
    assert [r.index for r in read_manifest(store).experts] == [0, 2]
    assert second.completed() == {0, 2}  # and it knows of it now
    first.add(train_expert(config, 1, data))
    assert [r.index for r in read_manifest(store).experts] == [0, 1, 2]
    with h5py.File(store) as f:
        assert list(f["experts"]) == ["0", "1", "2"]


# -- two evaluations of one set -------------------------------------------------------------------


def test_two_evaluations_of_one_set_at_once_record_it_once(tmp_path, fashion_root):
    import ddtool

    path = tmp_path / "set.h5"
    ddtool.distill("random", 2, data_root=str(fashion_root), output=path, progress=False, device="cpu")
    assert load_synthetic_set(path).evaluations == []
    args = [sys.executable, "-m", "ddtool", "evaluate", str(path), "--protocol", "classic", "--runs", "1",
            "--epochs", "1", "--data-root", str(fashion_root), "--device", "cpu", "-q"]
    processes = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(),
                                  cwd=tmp_path) for _ in range(2)]
    try:
        results = [p.communicate(timeout=120) for p in processes]
    finally:
        stop(*processes)
    for process, (stdout, stderr) in zip(processes, results):
        assert process.returncode == 0, stdout + stderr
    records = load_synthetic_set(path).evaluations
    assert len(records) == 1, records
    assert records[0]["baselines"]["random_subset"]["runs"]  # the record is the whole evaluation
    assert [p.name for p in tmp_path.glob("set.h5*")] == ["set.h5"]  # no lock file left beside it


def test_an_append_of_a_record_already_there_adds_nothing(tmp_path):
    path = tmp_path / "set.h5"
    save_synthetic_set(path, make_set())
    record = {"protocol": {"name": "classic", "epochs": 1, "runs": 2}, "arch": "convnet", "seed": 0,
              "runs": [0.5, 0.25], "baselines": {"random_subset": {"runs": [0.4], "seconds": 1.0}},
              "seconds": 3.0, "timestamp": "2026-12-07T10:00:00"}
    assert append_evaluation(path, record) == 0
    # the same evaluation recorded again by another process: when, where and how long differ
    again = {**record, "seconds": 4.5, "timestamp": "2026-12-07T10:00:02", "device": "cpu",
             "baselines": {"random_subset": {"runs": [0.4], "seconds": 0.0}}}
    assert append_evaluation(path, again) == 0
    assert len(load_synthetic_set(path).evaluations) == 1
    # another seed, other accuracies, another network, other baselines: other evaluations
    for change in ({"seed": 1}, {"runs": [0.5, 0.5]}, {"arch": "resnet18"}, {"baselines": {}}):
        append_evaluation(path, {**record, **change})
    assert len(load_synthetic_set(path).evaluations) == 5
