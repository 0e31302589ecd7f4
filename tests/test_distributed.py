"""torchrun: two CPU processes (gloo) against one process, for buffer, distill and evaluate.

The launches are real: `python -m torch.distributed.run --nproc-per-node 2 -m ddtool ...` on
the tiny Fashion-MNIST of conftest, with the cache isolated by conftest ($DDTOOL_CACHE).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import torch

from conftest import tiny_prepared
from ddtool import distributed
from ddtool.data import prepare
from ddtool.errors import ConfigError
from ddtool.evaluation import evaluate_set, get_protocol
from ddtool.experts import ExpertConfig, Shard, for_data, run_buffer
from ddtool.experts.store import experts_folder
from ddtool.methods import trajectory
from ddtool.methods.base import DistillContext, build_config, get_method_class, parse_overrides, run_fingerprint
from ddtool.methods.trajectory import MTT
from ddtool.methods.trajectory_config import TrajectoryConfig
from ddtool.paths import cache_root
from ddtool.storage import load_synthetic_set, save_synthetic_set
from test_experts import assert_same_store

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m ddtool ARGS` on CPU with gloo, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "ddtool", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def context(work_dir: Path, data, ipc: int = 1) -> DistillContext:
    return DistillContext(data=data, ipc=ipc, seed=0, device=torch.device("cpu"), work_dir=work_dir, progress=False,
                          log=lambda message: None)


# ---- buffer -------------------------------------------------------------------------------------
BUFFER_ARGS = ["--width", 4, "--depth", 1, "--experts", 3, "--epochs", 2, "--batch-size", 16, "--device", "cpu"]


def test_buffer_over_two_ranks_reports_a_failure_resumes_and_equals_one_process(tmp_path, fashion_root):
    data = prepare("fashion-mnist", fashion_root)
    # as `ddtool buffer` makes it: with the digest of its images
    config = for_data(ExpertConfig(arch_options={"width": 4, "depth": 1}, experts=3, epochs=2, batch_size=16), data)
    reference = run_buffer(config, tmp_path / "one" / "store.h5", data, progress=False).path
    store = tmp_path / "store.h5"
    # What an interrupted run leaves behind: rank 0's shard store holds expert 0 already.
    run_buffer(replace(config, experts=1), store, data, shard=Shard(0, 2), progress=False)
    # Rank 1 (experts 1 mod 2) cannot write expert 1: a folder is in the way.
    blocker = experts_folder(Shard(1, 2).store_path(store)) / "expert-00001.h5"
    blocker.mkdir(parents=True)
    (blocker / "keep").touch()

    failed = torchrun("buffer", "--data-root", fashion_root, *BUFFER_ARGS, "--out", store, cwd=tmp_path)
    assert failed.returncode != 0
    # the unwritable expert file is a user-facing error, naming the rank and the file
    message = " ".join(failed.stderr.split())
    assert "Error (rank 1 of 2): Could not write" in message and "expert-00001.h5" in message, failed.stderr
    assert not store.exists()  # rank 0 merges only when every rank is done

    (blocker / "keep").unlink()
    blocker.rmdir()
    rerun = ok(torchrun("buffer", "--data-root", fashion_root, *BUFFER_ARGS, "--out", store, cwd=tmp_path))
    trained_now = int(re.search(r"trained now: (\d+)", rerun.stdout).group(1))
    assert trained_now < 3  # expert 0 (and whatever the failed run finished) was not trained again
    assert_same_store(store, reference)
    assert not list(tmp_path.glob("store.shard-*"))  # the shard stores are gone once merged


# ---- distill ------------------------------------------------------------------------------------
MTT_SETTINGS = ("width=8", "depth=1", "experts=2", "expert_train_epochs=3", "match_span_epochs=1", "max_start_epoch=2",
                "syn_steps=2", "checkpoint_every=2", "labels=learned", "segments_per_iteration=2")


def test_distill_over_two_ranks_equals_one_process_with_the_same_segments(tmp_path, fashion_root):
    out = tmp_path / "two.h5"
    ok(torchrun("distill", "--method", "mtt", "--ipc", 1, "--data-root", fashion_root, "-o", out, "--iterations", 3,
                "--no-eval", "-q", *[a for s in MTT_SETTINGS for a in ("--set", s)], cwd=tmp_path))
    two = load_synthetic_set(out)

    # One process, segments_per_iteration=2 as well, on the experts the two ranks trained (same cache).
    cls = get_method_class("mtt")
    config = build_config(cls, None, {**parse_overrides(cls.config_class, MTT_SETTINGS), "iterations": 3})
    data = prepare("fashion-mnist", fashion_root)
    one = cls(config).distill(context(tmp_path / "one-run", data))

    # Bit for bit: each segment is computed alike wherever it runs, and the all_reduce of two
    # ranks adds the same two numbers as one process does (a + b = b + a).
    assert torch.equal(two.images, one.images)
    assert torch.equal(two.labels, one.labels) and two.label_kind == "logits"
    assert two.learned_lr == one.learned_lr
    work_dir = cache_root() / "runs" / run_fingerprint("mtt", config, "fashion-mnist", 1, 0)
    assert sorted(p.name for p in work_dir.iterdir()) == ["checkpoint.pt", "log.jsonl"]
    logged = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (tmp_path / "one-run" / "log.jsonl").read_text().splitlines()]
    assert len(logged) == 3  # rank 0 alone writes the log
    for a, b in zip(logged, expected):
        assert (a["loss"], a["lr"], a["expert"], a["start_epoch"]) == (b["loss"], b["lr"], b["expert"],
                                                                     b["start_epoch"])
        assert len(a["expert"]) == 2


# ---- evaluate -----------------------------------------------------------------------------------
def test_evaluate_over_two_ranks_equals_one_process(tmp_path, fashion_root, monkeypatch):
    data = prepare("fashion-mnist", fashion_root)
    cls = get_method_class("random")
    path = tmp_path / "random.h5"
    save_synthetic_set(path, cls(build_config(cls, None, {})).distill(context(tmp_path / "run", data, ipc=2)))
    arch = "convnet:depth=1,width=8"
    # Three runs over two ranks: rank 0 trains runs 0 and 2, rank 1 run 1.
    ok(torchrun("evaluate", path, "--protocol", "classic", "--runs", 3, "--epochs", 2, "--arch", arch,
                "--data-root", fashion_root, "-q", cwd=tmp_path))
    with h5py.File(path, "r") as f:
        assert list(f["evaluations"]) == ["000"]  # recorded once, by rank 0
    recorded = load_synthetic_set(path).evaluations[0]
    assert len(list((cache_root() / "baselines").glob("*.json"))) == 1  # rank 0 alone wrote the baseline cache
    kept = cache_root() / "evaluations"  # each rank kept its runs there, and deleted them once recorded
    assert kept.is_dir() and not list(kept.glob("*/*"))

    monkeypatch.setenv("DDTOOL_CACHE", str(tmp_path / "one-process-cache"))  # compute the baseline afresh
    sset = load_synthetic_set(path)
    report = evaluate_set(sset, prepare("fashion-mnist", fashion_root, preprocessing=sset.preprocessing),
                          protocol=get_protocol("classic").with_overrides(runs=3, epochs=2), arch=arch, seed=0,
                          progress=False)
    assert recorded["runs"] == report.synthetic.runs
    assert recorded["baselines"]["random_subset"]["runs"] == report.random_subset.runs


# ---- segments per iteration, in one process ---------------------------------------------------------
def tiny_mtt(**overrides) -> TrajectoryConfig:
    values = dict(width=8, experts=2, expert_train_epochs=3, expert_batch_size=16, syn_steps=3, match_span_epochs=1,
                  max_start_epoch=2, iterations=1, checkpoint_every=1, lr_img=10.0, lr_lr=1e-6, lr_init=0.01,
                  labels="learned")
    return TrajectoryConfig(**{**values, **overrides})


def test_two_segments_make_one_update_with_the_mean_of_their_gradients(tmp_path, monkeypatch):
    data = tiny_prepared(per_class=6)
    exact, calls = trajectory.get_backend("exact"), []

    def recording(unroll, syn):
        result = exact(unroll, syn)
        calls.append((syn.images.detach().clone(), syn.label_logits.detach().clone(), syn.lr.detach().clone(), result))
        return result

    monkeypatch.setattr(trajectory, "get_backend", lambda name: recording)
    one_segment = MTT(tiny_mtt()).distill(context(tmp_path / "one", data))
    two_segments = MTT(tiny_mtt(segments_per_iteration=2)).distill(context(tmp_path / "two", data))
    assert len(calls) == 3
    (images, labels, lr, single), (_, _, _, first), (_, _, _, second) = calls

    # Segment 0 is the one-segment run's segment; segment 1 is another draw.
    assert torch.equal(first.grad_images, single.grad_images) and first.loss == single.loss
    assert not torch.equal(second.grad_images, first.grad_images)
    # One outer SGD step from the same start (the momentum buffer starts as the gradient).
    config = tiny_mtt()
    for sset, grads in ((one_segment, [single]), (two_segments, [first, second])):
        mean = {name: sum(getattr(g, name) for g in grads) / len(grads)
                for name in ("grad_images", "grad_label_logits", "grad_lr")}
        torch.testing.assert_close(sset.images, images - config.lr_img * mean["grad_images"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sset.labels, labels - config.lr_label * mean["grad_label_logits"],
                                   rtol=1e-6, atol=1e-6)
        assert sset.learned_lr == pytest.approx(float(lr - config.lr_lr * mean["grad_lr"]), rel=1e-6)
    logged = json.loads((tmp_path / "two" / "log.jsonl").read_text())
    assert logged["loss"] == pytest.approx((first.loss + second.loss) / 2, rel=1e-12)


def test_segments_must_split_evenly_over_the_processes(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="segments_per_iteration"):
        tiny_mtt(segments_per_iteration=0)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="multiple of 2"):
        MTT(tiny_mtt(segments_per_iteration=3)).distill(context(tmp_path, tiny_prepared(per_class=6)))


# ---- decisions that measure the machine -------------------------------------------------------------
RANK_ZERO_DECIDES = """
from ddtool import distributed
from ddtool.errors import ConfigError

distributed.init_from_env("gloo")


def refused_on_rank_zero():
    if distributed.rank() == 0:
        raise ConfigError("rank 0 refused")
    return "fine"


# each rank writes a file of its own: the two ranks' prints would interleave in one stdout
lines = [f"took {distributed.decided_by_rank_zero(lambda: 10 + distributed.rank())}"]
try:
    distributed.decided_by_rank_zero(refused_on_rank_zero)
except ConfigError as error:
    lines.append(f"raised {error}")
with open(f"rank{distributed.rank()}.txt", "w") as out:
    out.write("\\n".join(lines))
distributed.shutdown()
"""


def test_every_rank_takes_rank_zeros_decision_and_its_refusal(tmp_path):
    script = tmp_path / "decide.py"
    script.write_text(RANK_ZERO_DECIDES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = ok(subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                              "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120))
    # rank 1 decided 11 and "fine", rank 0 decided 10 and refused: both take rank 0's outcomes
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().splitlines() == ["took 10", "raised rank 0 refused"], \
            done.stdout + done.stderr


def test_a_budgets_sizing_is_rank_zeros_on_every_rank(tmp_path, fashion_root, monkeypatch):
    from ddtool.methods.budget import BudgetPlan
    from ddtool.run import prepare_distill

    def rank_zeros(outcome):  # what rank 1 receives: rank 0 timed another iteration and sized 7 of them
        if isinstance(outcome, BudgetPlan):
            return replace(outcome, config=replace(outcome.config, iterations=7), iteration_s=9.0)
        return outcome

    monkeypatch.setattr(distributed, "broadcast_object", rank_zeros)
    run = prepare_distill("mtt", ipc=1, data_root=fashion_root, settings={"width": 8}, budget="10m", progress=False)
    assert run.config.iterations == 7 and run.method.budget_iteration_s == 9.0 and run.budget.iteration_s == 9.0
