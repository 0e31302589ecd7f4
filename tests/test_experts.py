"""Expert trajectories: SAM/GSAM steps, resumable/shardable buffers, the HDF5 store, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import ddtool.experts.execution as execution_module
import ddtool.experts.runner as runner_module
import ddtool.experts.train as train_module
from ddtool.errors import ConfigError, DDToolError, FormatError
from ddtool.experts import (
    GSAM, SAM, ExpertConfig, ExpertStore, Shard, find_or_plan_store, for_data, merge_shards, read_manifest,
    run_buffer, store_path_for, train_expert,
)
from ddtool.experts.execution import ExpertExecution, plan_execution
from ddtool.experts.losses import expert_loss, input_gradient_penalty
from ddtool.experts.store import experts_folder

from conftest import tiny_prepared  # tests/conftest.py: tiny datasets through the real pipeline

REPO = Path(__file__).resolve().parents[1]


# -- tiny data ---------------------------------------------------------------------------------


def tiny_data(name: str = "fashion-mnist", *, zca: bool = False):
    return tiny_prepared(name, per_class=4, zca=zca)


def tiny_config(**overrides) -> ExpertConfig:
    values = dict(arch_options={"width": 8}, experts=3, epochs=3, batch_size=8, seed=7)
    return ExpertConfig(**{**values, **overrides})


def reference_config() -> ExpertConfig:
    """GSAM with momentum and a per-epoch cosine lr: a resume must restore the optimiser's
    state and keep the lr schedule acting on the restored optimiser."""
    return tiny_config(optimizer="gsam", momentum=0.9, lr_decay="cosine")


def store_contents(path: Path) -> dict:
    """Everything a store says, for equality between runs: manifest and every trajectory."""
    with ExpertStore.open(path) as store:
        # Where each expert's file lives depends on the store's name, and what it cost on the
        # machine and the load; nothing else does.
        manifest = replace(store.manifest, experts=tuple(replace(r, file="", seconds=None, side_by_side=1)
                                                         for r in store.manifest.experts))
        params = {i: np.stack([store.params(i, e).numpy() for e in range(store.epochs + 1)])
                  for i in store.expert_indices}
    return {"manifest": manifest.to_json(), "params": params}


def assert_same_store(a: Path, b: Path) -> None:
    ca, cb = store_contents(a), store_contents(b)
    assert ca["manifest"] == cb["manifest"]
    assert ca["params"].keys() == cb["params"].keys()
    for i in ca["params"]:
        np.testing.assert_array_equal(ca["params"][i], cb["params"][i])


@pytest.fixture(scope="module")
def data():
    return tiny_data()


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, data):
    """One uninterrupted run of reference_config: 3 experts x 3 epochs."""
    path = tmp_path_factory.mktemp("reference") / "store.h5"
    run_buffer(reference_config(), path, data, progress=False)
    return path


# -- SAM / GSAM against a hand computation ----------------------------------------------------------


class Quadratic(nn.Module):
    """f(theta) = 1/2 theta^T A theta + b^T theta, theta = (w1, w2) split over two tensors so
    norms and inner products must be taken over all parameters jointly."""

    A = np.array([[3.0, 0.5, -1.0], [0.5, 2.0, 0.3], [-1.0, 0.3, 1.5]])
    b = np.array([0.2, -0.7, 0.4])

    def __init__(self, theta):
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(theta[:2], dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor(theta[2:], dtype=torch.float64))

    def loss(self):
        theta = torch.cat([self.w1, self.w2])
        A, b = torch.tensor(self.A), torch.tensor(self.b)
        return 0.5 * theta @ A @ theta + b @ theta

    @classmethod
    def grad(cls, theta):
        return cls.A @ theta + cls.b


def sharpness_step(optimizer_cls, theta, *, lr, rho, adaptive, momentum=0.0, weight_decay=0.0, steps=1, **kw):
    model = Quadratic(theta)
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    opt = optimizer_cls(base, rho=rho, adaptive=adaptive, **kw)

    def closure():
        opt.zero_grad()
        loss = model.loss()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return torch.cat([model.w1, model.w2]).detach().numpy()


def hand_direction(theta, *, rho, adaptive, alpha=None):
    g = Quadratic.grad(theta)
    if adaptive:
        e = rho * theta**2 * g / np.linalg.norm(np.abs(theta) * g)
    else:
        e = rho * g / np.linalg.norm(g)
    g_perturbed = Quadratic.grad(theta + e)
    if alpha is None:
        return g_perturbed
    g_perp = g - (g @ g_perturbed) / (g_perturbed @ g_perturbed) * g_perturbed
    return g_perturbed - alpha * g_perp


THETA = np.array([0.8, -1.3, 0.45])


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_step_matches_hand_computation(adaptive):
    got = sharpness_step(SAM, THETA, lr=0.1, rho=0.05, adaptive=adaptive)
    expected = THETA - 0.1 * hand_direction(THETA, rho=0.05, adaptive=adaptive)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_step_matches_hand_computation(adaptive):
    got = sharpness_step(GSAM, THETA, lr=0.1, rho=0.05, adaptive=adaptive, alpha=0.3)
    d = hand_direction(THETA, rho=0.05, adaptive=adaptive, alpha=0.3)
    np.testing.assert_allclose(got, THETA - 0.1 * d, rtol=1e-12, atol=1e-14)
    assert not np.allclose(d, hand_direction(THETA, rho=0.05, adaptive=adaptive))  # GSAM != SAM here


def test_gsam_two_steps_with_momentum_and_weight_decay():
    lr, mom, wd, rho, alpha = 0.1, 0.9, 0.01, 0.05, 0.3
    got = sharpness_step(GSAM, THETA, lr=lr, rho=rho, adaptive=False, alpha=alpha, momentum=mom,
                         weight_decay=wd, steps=2)
    theta, buf = THETA.copy(), None
    for _ in range(2):
        d = hand_direction(theta, rho=rho, adaptive=False, alpha=alpha) + wd * theta
        buf = d if buf is None else mom * buf + d
        theta = theta - lr * buf
    np.testing.assert_allclose(got, theta, rtol=1e-12, atol=1e-14)


# -- the training loss --------------------------------------------------------------------------


def test_input_gradient_penalty_of_a_linear_model():
    # logits = W x: d sum(logits)/dx = column sums of W, the same for every sample.
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]]))
    penalty, _ = input_gradient_penalty(model, torch.randn(4, 3, dtype=torch.float64), 2.0)
    expected = 2.0 * (np.linalg.norm([1.5, 1.0, 2.0]) - 1.0) ** 2
    assert penalty.item() == pytest.approx(expected, rel=1e-12)


def test_ast_loss_scaling_schedule():
    config = tiny_config(ast_loss_scaling=True, epochs=20)
    assert [config.loss_scale_at(e) for e in (0, 1, 9, 10, 19)] == pytest.approx([0.5, 0.55, 0.95, 1.0, 1.0])


def test_expert_loss_is_scaled_cross_entropy_plus_the_penalty_by_hand():
    # logits = W x with W fixed: the input gradient of the summed logits is W's column sums
    # (1.5, 1, 2) for every sample, so the penalty is weight * (||(1.5, 1, 2)|| - 1)^2.
    weight = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    model = nn.Linear(3, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(weight))
    x = np.array([[0.1, -0.2, 0.3], [1.0, 0.5, -0.5], [-0.3, 0.2, 0.0]])
    y = np.array([0, 1, 1])
    logits = x @ weight.T
    ce = np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(3), y])
    penalty = 2.0 * (np.linalg.norm([1.5, 1.0, 2.0]) - 1.0) ** 2

    def loss(config, epoch):
        value, out = expert_loss(config, epoch)(model, torch.from_numpy(x), torch.from_numpy(y))
        np.testing.assert_allclose(out.detach().numpy(), logits, rtol=1e-12)
        return value.item()

    both = tiny_config(epochs=20, ast_loss_scaling=True, ast_input_grad_penalty=2.0)
    # epoch 1 scales the cross-entropy by 0.55; the penalty keeps its own weight, unscaled
    assert loss(both, 1) == pytest.approx(0.55 * ce + penalty, rel=1e-12)
    assert loss(both, 10) == pytest.approx(ce + penalty, rel=1e-12)  # scaling ends after epoch 9
    assert loss(tiny_config(epochs=20, ast_loss_scaling=True), 0) == pytest.approx(0.5 * ce, rel=1e-12)
    assert loss(tiny_config(epochs=20, ast_input_grad_penalty=2.0), 0) == pytest.approx(ce + penalty, rel=1e-12)
    assert loss(tiny_config(epochs=20), 0) == pytest.approx(ce, rel=1e-12)  # both off: plain cross-entropy


def test_expert_lr_schedules_by_hand():
    assert [tiny_config(lr=0.1, epochs=10).lr_at(e) for e in (0, 5, 9)] == [0.1, 0.1, 0.1]
    # step: a tenth from epochs // 2 on (epoch 5 of 10; epoch 2 of 5)
    step = tiny_config(lr=0.1, epochs=10, lr_decay="step")
    assert [step.lr_at(e) for e in (0, 4, 5, 9)] == pytest.approx([0.1, 0.1, 0.01, 0.01], rel=1e-12)
    odd = tiny_config(lr=0.1, epochs=5, lr_decay="step")
    assert [odd.lr_at(e) for e in (1, 2)] == pytest.approx([0.1, 0.01], rel=1e-12)
    # cosine: lr (1 + cos(pi e / epochs)) / 2, from lr at epoch 0 to half at the middle
    cosine = tiny_config(lr=0.1, epochs=10, lr_decay="cosine")
    assert [cosine.lr_at(e) for e in (0, 2, 5, 8)] == pytest.approx(
        [0.1, 0.05 * (1 + np.cos(0.2 * np.pi)), 0.05, 0.05 * (1 + np.cos(0.8 * np.pi))], rel=1e-12)
    assert cosine.lr_at(2) == pytest.approx(0.0904508497, rel=1e-9)  # 0.05 x (1 + 0.809017), by hand


# -- configuration ------------------------------------------------------------------------------


def test_fingerprint_identifies_trajectories_not_their_number():
    base = tiny_config()
    assert base.fingerprint() == replace(base, experts=50).fingerprint()
    assert base.fingerprint() == replace(base, eval_every=1).fingerprint()
    assert base.fingerprint() == replace(base, rho=0.5).fingerprint()  # no effect on plain SGD
    assert base.fingerprint() != replace(base, lr=0.02).fingerprint()
    assert base.fingerprint() != replace(base, optimizer="gsam").fingerprint()
    assert replace(base, optimizer="gsam").fingerprint() != replace(base, optimizer="gsam", gsam_alpha=1.0).fingerprint()
    assert ExpertConfig(arch_options={}).fingerprint() == ExpertConfig(arch_options={"width": 128}).fingerprint()


@pytest.mark.parametrize("bad", [dict(optimizer="adam"), dict(epochs=0), dict(lr=-1.0), dict(lr_decay="linear"),
                                 dict(arch_options={"widht": 3}), dict(arch="nonet"), dict(dataset="nope"),
                                 dict(arch_options={"width": 0}), dict(arch_options={"width": "wide"})])
def test_invalid_configuration_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        ExpertConfig(**bad)


# -- training -----------------------------------------------------------------------------------


def test_training_is_seeded_and_leaves_global_rng_alone(data):
    config = tiny_config(epochs=2)
    rng_before = torch.get_rng_state()
    first = train_expert(config, 1, data)
    assert torch.equal(torch.get_rng_state(), rng_before)
    again = train_expert(config, 1, data)
    other = train_expert(config, 2, data)
    assert first.params.shape == (3, other.params.shape[1]) and first.params.dtype == torch.float32
    assert torch.equal(first.params, again.params)
    assert not torch.equal(first.params[0], other.params[0])
    assert not torch.equal(first.params[0], first.params[1])
    assert 0.0 <= first.test_accuracy <= 1.0 and len(first.epoch_loss) == 2


def test_divergence_is_reported_not_stored(tmp_path, data):
    with pytest.raises(DDToolError, match="diverged"):
        run_buffer(tiny_config(experts=1, epochs=2, lr=1e12, augment=False), tmp_path / "s.h5", data, progress=False)
    assert ExpertStore.open(tmp_path / "s.h5").num_experts == 0


# -- resume and shards --------------------------------------------------------------------------


class Killed(Exception):
    pass


def test_resume_after_a_kill_between_experts(tmp_path, data, reference_store, monkeypatch):
    config, path = reference_config(), tmp_path / "store.h5"
    real = runner_module.train_expert

    def dies_at_expert_2(config, index, *args, **kwargs):
        if index == 2:
            raise Killed
        return real(config, index, *args, **kwargs)

    monkeypatch.setattr(runner_module, "train_expert", dies_at_expert_2)
    with pytest.raises(Killed):
        run_buffer(config, path, data, progress=False)
    assert ExpertStore.open(path).num_experts == 2  # experts 0 and 1 complete, 2 absent
    monkeypatch.setattr(runner_module, "train_expert", real)
    result = run_buffer(config, path, data, progress=False)
    assert result.skipped == (0, 1) and result.trained == (2,)
    assert_same_store(path, reference_store)


def test_resume_mid_expert_continues_from_its_last_epoch(tmp_path, data, reference_store, monkeypatch):
    config, path = reference_config(), tmp_path / "store.h5"
    real, calls = train_module.train_epoch, []

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", counting)
    kill_at = 3 + 2 + 1  # expert 0's three epochs, two of expert 1's, then die in its third
    with pytest.raises(Killed):
        run_buffer(config, path, data, progress=False)
    calls.clear()
    kill_at = -1
    run_buffer(config, path, data, progress=False)
    assert len(calls) == 1 + 3  # expert 1's last epoch, then expert 2
    assert_same_store(path, reference_store)
    assert not list((tmp_path / "store.experts").glob("*.partial.pt"))


def test_two_shards_merged_equal_one_run(tmp_path, data, reference_store):
    config, store = reference_config(), tmp_path / "store.h5"
    results = [run_buffer(config, store, data, shard=Shard(i, 2), progress=False) for i in (1, 0)]
    assert [r.path.name for r in results] == ["store.shard-1-of-2.h5", "store.shard-0-of-2.h5"]
    assert ExpertStore.open(results[0].path).expert_indices == (1,)
    merged = merge_shards([r.path for r in results], tmp_path / "merged.h5")
    assert list(h5py.File(merged)["experts"]) == ["0", "1", "2"]
    assert_same_store(merged, reference_store)


def test_merge_refuses_shards_of_different_configurations(tmp_path, data):
    a = run_buffer(tiny_config(experts=1, epochs=1), tmp_path / "a.h5", data, progress=False).path
    b = run_buffer(tiny_config(experts=1, epochs=1, lr=0.02), tmp_path / "b.h5", data, progress=False).path
    with pytest.raises(ConfigError, match="lr"):
        merge_shards([a, b], tmp_path / "merged.h5")
    with pytest.raises(ConfigError, match="different configuration"):
        run_buffer(tiny_config(experts=1, epochs=1, lr=0.02), a, data, progress=False)


# -- the store ----------------------------------------------------------------------------------


def test_store_reads_single_epochs(reference_store, data):
    trajectory = train_expert(reference_config(), 1, data)
    with ExpertStore.open(reference_store) as store:
        assert (store.num_experts, store.epochs, store.layout.total) == (3, 3, trajectory.params.shape[1])
        assert torch.equal(store.params(1, 2), trajectory.params[2])
        start, target = store.segment(1, 1, 2)
        assert torch.equal(start, trajectory.params[1]) and torch.equal(target, trajectory.params[3])
        seeds = store.manifest.experts[1].seed
        assert seeds == trajectory.seed
        g = torch.Generator().manual_seed(0)
        draws = [store.sample_segment(g, max_start=2, span=1) for _ in range(50)]
        assert {e for e, _ in draws} == {0, 1, 2} and {s for _, s in draws} == {0, 1}
        with pytest.raises(ConfigError):
            store.sample_segment(g, max_start=3, span=2)
    # Plain h5py sees one store; each epoch is its own chunk, so a row read touches one chunk.
    with h5py.File(reference_store, "r") as f:
        params = f["experts/1/params"]
        assert params.chunks == (1, params.shape[1])
        np.testing.assert_array_equal(params[2], trajectory.params[2].numpy())
        assert f.attrs["format"] == "ddtool.expert_store" and list(f.attrs["expert_indices"]) == [0, 1, 2]
    assert ExpertStore.open(reference_store, num_experts=2).expert_indices == (0, 1)
    with pytest.raises(ConfigError, match="missing"):
        ExpertStore.open(reference_store, num_experts=5)


def test_store_rejects_mismatched_runs(reference_store, data):
    store = ExpertStore.open(reference_store)
    store.check_compatible("fashion-mnist", "convnet", {"width": 8}, data.preprocessing)  # the right one
    with pytest.raises(ConfigError, match="dataset"):
        store.check_compatible("mnist", "convnet", {"width": 8}, tiny_data("mnist").preprocessing)
    with pytest.raises(ConfigError, match="architecture"):
        store.check_compatible("fashion-mnist", "mlp", {}, data.preprocessing)
    with pytest.raises(ConfigError, match="width"):
        store.check_compatible("fashion-mnist", "convnet", {}, data.preprocessing)
    with pytest.raises(ConfigError, match="ZCA"):
        store.check_compatible("fashion-mnist", "convnet", {"width": 8}, tiny_data(zca=True).preprocessing)


def test_foreign_and_corrupt_files_are_format_errors(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 10)
    for path in (foreign, garbage):
        with pytest.raises(FormatError):
            ExpertStore.open(path)


def test_a_damaged_epoch_row_is_a_format_error_not_silent_weights(tmp_path, reference_store):
    import shutil

    store_path = tmp_path / "store.h5"
    shutil.copy(reference_store, store_path)
    shutil.copytree(reference_store.with_suffix(".experts"), tmp_path / "store.experts")
    expert_file = tmp_path / "store.experts" / "expert-00001.h5"
    with h5py.File(expert_file, "r") as f:
        chunk = f["expert/params"].id.get_chunk_info_by_coord((2, 0))
    raw = bytearray(expert_file.read_bytes())
    raw[chunk.byte_offset + chunk.size // 2] ^= 0x01  # one bit of one weight of epoch 2
    expert_file.write_bytes(raw)
    with ExpertStore.open(reference_store) as reference:
        intact = reference.params(1, 1)
    with ExpertStore.open(store_path) as store:
        assert torch.equal(store.params(1, 1), intact)  # the other rows read as they were
        with pytest.raises(FormatError, match="Epoch 2 of expert 1 could not be read .* damaged"):
            store.params(1, 2)


def test_cache_lookup_finds_a_store_by_configuration(tmp_path, data):
    config = tiny_config(experts=2, epochs=1)
    path, missing = find_or_plan_store(config, tmp_path)
    assert path == tmp_path / f"{config.fingerprint()}.h5" and missing == [0, 1]
    run_buffer(config, path, data, progress=False)
    assert find_or_plan_store(config, tmp_path) == (path, [])
    assert find_or_plan_store(replace(config, experts=1), tmp_path) == (path, [])  # more serves fewer
    assert find_or_plan_store(replace(config, experts=4), tmp_path) == (path, [2, 3])
    assert read_manifest(path).fingerprint == config.fingerprint()


def test_a_store_is_of_its_images_and_one_from_before_that_serves_data_alike(tmp_path, data):
    config = tiny_config(experts=1, epochs=1)
    other = tiny_prepared("fashion-mnist", per_class=4, seed=1)  # same name and size, other images
    mine, theirs = for_data(config, data, tmp_path), for_data(config, other, tmp_path)
    assert mine.data_digest == data.content_digest() and mine.data_digest != theirs.data_digest
    assert store_path_for(mine, tmp_path) != store_path_for(theirs, tmp_path)
    assert mine.fingerprint() == config.fingerprint()  # the trajectories' settings: the same
    # a store made before stores named their images: found for data alike, as it always was...
    path = store_path_for(config, tmp_path)
    run_buffer(config, path, data, progress=False)
    assert for_data(config, data, tmp_path) == config
    assert find_or_plan_store(for_data(config, data, tmp_path), tmp_path) == (path, [])
    # ...and not for images of another size under the same name: those get a store of their own
    smaller = tiny_prepared("fashion-mnist", size=6, per_class=4)
    assert for_data(config, smaller, tmp_path).data_digest == smaller.content_digest()
    # once a store of the images exists, it is the one found
    run_buffer(mine, store_path_for(mine, tmp_path), data, progress=False)
    assert for_data(config, data, tmp_path) == mine


# -- the CLI, through a real process ------------------------------------------------------------


def test_cli_buffer_trains_resumes_and_reports_mismatch(tmp_path, fashion_root):
    out = tmp_path / "experts.h5"
    args = [sys.executable, "-m", "ddtool", "buffer", "--data-root", str(fashion_root), "--width", "4", "--depth", "1",
            "--experts", "2", "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # DDTOOL_CACHE: isolated by conftest

    def run(*extra):
        return subprocess.run(args + list(extra), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "Plan: 2 experts x 2 epochs" in first.stdout and "estimated time" in first.stdout
    assert "epoch/s" in first.stderr or "it/s" in first.stderr or "%|" in first.stderr, first.stderr  # bars
    with ExpertStore.open(out) as store:
        assert (store.num_experts, store.epochs) == (2, 2)
        assert store.manifest.dataset["train_images"] == 110  # one validation image per class carved out
    again = run()
    assert again.returncode == 0 and "to train: 0" in again.stdout
    quiet = run("--experts", "3", "-q")  # one more expert, trained without bars
    assert quiet.returncode == 0 and "%|" not in quiet.stderr, quiet.stderr
    clash = run("--lr", "0.5")
    assert clash.returncode == 2 and "different configuration" in clash.stderr and "Traceback" not in clash.stderr


# -- a store is its index file and its folder ---------------------------------------------------------


def store_files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_index_only(store: Path, folder: Path) -> Path:
    """`store`'s index file copied into `folder` without its NAME.experts/ folder."""
    folder.mkdir(parents=True, exist_ok=True)
    moved = folder / store.name
    moved.write_bytes(store.read_bytes())
    return moved


def test_a_store_moved_without_its_folder_counts_no_experts(tmp_path, data):
    from ddtool.experts.plan import inspect_store, stored_experts

    config = tiny_config(experts=2, epochs=1)
    store = run_buffer(config, tmp_path / "b.h5", data, progress=False).path
    assert stored_experts(config, store) == {0, 1}
    moved = copy_index_only(store, tmp_path / "moved")
    state = inspect_store(config, moved)
    assert state.present == frozenset()
    assert state.unreadable == {i: tmp_path / "moved" / "b.experts" / f"expert-{i:05d}.h5" for i in (0, 1)}
    (tmp_path / "b.experts" / "expert-00001.h5").write_bytes(b"damaged")  # unreadable counts as missing too
    assert stored_experts(config, store) == {0}
    # a buffer run on the moved index trains the missing experts again, and the store is whole
    result = run_buffer(config, moved, data, progress=False)
    assert result.trained == (0, 1) and ExpertStore.open(moved).num_experts == 2


def test_an_expert_file_not_yet_indexed_is_indexed_by_the_next_run_not_trained(tmp_path, data):
    """A kill between an expert file's rename and the index's rewrite: distill's lookup must
    send the store through run_buffer (whose scan indexes the file) rather than open it as ready."""
    from ddtool.experts.plan import find_or_plan_store
    from ddtool.experts.store import read_manifest, write_index_file

    config = tiny_config(experts=2, epochs=1)
    path, missing = find_or_plan_store(config, tmp_path)
    run_buffer(config, path, data, progress=False)
    manifest = read_manifest(path)
    write_index_file(path, manifest.with_experts(manifest.experts[:1]))  # expert 1's file is there, unindexed
    assert find_or_plan_store(config, tmp_path) == (path, [1])
    result = run_buffer(config, path, data, progress=False)
    assert result.trained == () and ExpertStore.open(path, num_experts=2).num_experts == 2


def test_a_failed_merge_leaves_nothing_behind(tmp_path, data, monkeypatch):
    config = tiny_config(experts=3, epochs=1)
    shards = [run_buffer(config, tmp_path / "s.h5", data, shard=Shard(i, 2), progress=False).path for i in (0, 1)]
    # a shard copied without its folder: refused before anything is written
    broken = copy_index_only(shards[1], tmp_path / "moved")
    out = tmp_path / "m2.h5"
    with pytest.raises(FormatError, match=r"expert-00001\.h5 does not exist.*s\.shard-1-of-2\.experts/ beside it"):
        merge_shards([shards[0], broken], out)
    assert not out.exists() and not (tmp_path / "m2.experts").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["moved", "s.shard-0-of-2.h5", "s.shard-0-of-2.experts", "s.shard-1-of-2.h5", "s.shard-1-of-2.experts"])
    # an existing --out store is left exactly as it was
    merge_shards([shards[0]], out)
    before = {"index": out.read_bytes(), **store_files(tmp_path / "m2.experts")}
    with pytest.raises(FormatError, match="Nothing was merged"):
        merge_shards([broken], out)
    assert {"index": out.read_bytes(), **store_files(tmp_path / "m2.experts")} == before
    # a merge that fails part-way (here: a full disk on adopting the expert file) is undone
    import ddtool.experts.store as store_module

    def disk_full(self, source):
        raise DDToolError("The disk is full")

    monkeypatch.setattr(store_module.StoreWriter, "add_file", disk_full)
    with pytest.raises(DDToolError, match="disk is full"):
        merge_shards([shards[1]], out)
    assert {"index": out.read_bytes(), **store_files(tmp_path / "m2.experts")} == before
    with pytest.raises(DDToolError, match="disk is full"):
        merge_shards(shards, tmp_path / "new.h5")
    assert not (tmp_path / "new.h5").exists() and not (tmp_path / "new.experts").exists()
    monkeypatch.undo()
    merge_shards([shards[1]], out)
    assert ExpertStore.open(out).expert_indices == (0, 1, 2)


def test_cli_buffer_merge_of_a_moved_store_and_its_dry_run(tmp_path, fashion_root):
    args = [sys.executable, "-m", "ddtool", "buffer", "--data-root", str(fashion_root), "--width", "4", "--depth", "1",
            "--experts", "2", "--epochs", "1", "--batch-size", "16", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*command):
        return subprocess.run(list(command), capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)

    assert run(*args, "--out", "b.h5").returncode == 0
    copy_index_only(tmp_path / "b.h5", tmp_path / "moved")
    merged = run(sys.executable, "-m", "ddtool", "buffer-merge", "moved/b.h5", "--out", "m2.h5")
    said = " ".join(merged.stderr.split())
    assert merged.returncode == 2 and "Traceback" not in said
    assert "expert-00000.h5 does not exist" in said and "b.experts/ beside it" in said
    assert not (tmp_path / "m2.h5").exists() and not (tmp_path / "m2.experts").exists()
    plan = run(*args, "--out", "moved/b.h5", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert "already stored: 0; to train: 2" in plan.stdout
    assert "on cpu, one at a time, not compiled" in plan.stdout  # too short to be worth either
    assert "lists experts 0, 1 whose files are missing" in plan.stdout and "b.experts/" in plan.stdout
    assert not (tmp_path / "moved" / "b.experts").exists()  # a dry run writes nothing
    chosen = run(*args, "--out", "moved/b.h5", "--dry-run", "--workers", "2", "--compile")
    assert chosen.returncode == 0, chosen.stderr
    assert "2 at a time" in chosen.stdout and "compiled" in chosen.stdout and "not compiled" not in chosen.stdout
    assert "timed uncompiled" in chosen.stdout


def test_buffer_help_names_the_store_files_and_the_presets_experts():
    from click.testing import CliRunner

    from ddtool.cli.buffer import buffer, config_from_options
    from ddtool.cli.main import cli
    from ddtool.methods.base import build_config, get_method_class
    from ddtool.methods.experts import expert_config_for

    text = " ".join(CliRunner().invoke(cli, ["buffer", "--help"], terminal_width=200).output.split())
    assert Shard(0, 2).store_path(Path("NAME.h5")).name == "NAME.shard-0-of-2.h5"
    assert "-o NAME.h5 --shard 0/2 writes NAME.shard-0-of-2.h5" in text
    assert "NAME.experts/" in text and "move or copy the two together" in text
    for option in ("--batch-size", "--lr", "--momentum", "--weight-decay", "--gsam-alpha", "--width"):
        described = text.split("Options:", 1)[1].split(f"{option} ", 1)[1].split(" --", 1)[0]
        assert "[default: " in described and len(described.split("[default:")[0].split()) > 2, option
    # each example trains exactly the experts the distill runs it names use
    ctx = SimpleNamespace(data=SimpleNamespace(spec=SimpleNamespace(name="fashion-mnist"),  # all it reads
                                               content_digest=lambda: "the images"))
    examples = {
        "--width 32 --experts 3 --epochs 20": [("mtt", None, 10), ("mtt", "fashion-cpu", 50), ("datm", None, 10),
                                               ("tesla", None, 50)],
        "--width 32 --experts 3 --epochs 6": [("mtt", "fashion-cpu", 1), ("tesla", None, 10)],
        "--experts 20 --epochs 30": [(m, "fashion-gpu", ipc) for m in ("mtt", "tesla", "datm") for ipc in (1, 10, 50)],
        "--width 32 --experts 3 --epochs 20 --optimizer gsam": [("ftd", None, 10)],
    }
    for flags, runs in examples.items():
        assert f"ddtool buffer {flags} #" in text
        config = for_data(config_from_options(buffer.make_context("buffer", flags.split()).params), ctx.data)
        for method, preset, ipc in runs:
            wanted = expert_config_for(build_config(get_method_class(method), preset, {}, ipc=ipc), ctx)
            assert config.fingerprint() == wanted.fingerprint() and config.experts == wanted.experts, (flags, method)


# -- how a machine trains a buffer: workers, threads, compilation ------------------------------------


def test_experts_trained_side_by_side_in_worker_processes_equal_one_at_a_time(tmp_path, data, reference_store):
    # the same threads in each: an expert is a pure function of (configuration, index), wherever it runs
    serial = run_buffer(reference_config(), tmp_path / "one.h5", data, progress=False,
                        execution=ExpertExecution(workers=1, threads=1))
    result = run_buffer(reference_config(), tmp_path / "two.h5", data, progress=False,
                        execution=ExpertExecution(workers=2, threads=1))
    assert result.trained == (0, 1, 2)
    assert_same_store(result.path, serial.path)
    assert_same_store(result.path, reference_store)  # tests run one thread a process (conftest)
    # each records that it shared the machine with another, so its cost is half its wall-clock
    assert [r.side_by_side for r in read_manifest(result.path).experts] == [2, 2, 2]
    assert [r.side_by_side for r in read_manifest(serial.path).experts] == [1, 1, 1]


def test_a_worker_failure_keeps_the_finished_experts_and_resumes(tmp_path, data, reference_store):
    path = tmp_path / "store.h5"
    # expert 1's file cannot be written: a folder is in its way
    blocker = experts_folder(path) / "expert-00001.h5"
    blocker.mkdir(parents=True)
    with pytest.raises(DDToolError, match="expert-00001"):
        run_buffer(reference_config(), path, data, progress=False, execution=ExpertExecution(workers=2, threads=1))
    blocker.rmdir()
    result = run_buffer(reference_config(), path, data, progress=False,
                        execution=ExpertExecution(workers=2, threads=1))
    # whatever finished before the failure was kept (which expert finishes first varies)
    assert 1 in result.trained and sorted(result.trained + result.skipped) == [0, 1, 2]
    assert_same_store(path, reference_store)


def test_the_execution_follows_the_machine_and_the_experts_length(monkeypatch):
    monkeypatch.setattr(execution_module, "available_cores", lambda: 2)
    cpu = torch.device("cpu")
    long = tiny_config(experts=3, epochs=20)
    # full-length experts on 54,000 images: two at a time, one thread each, compiled
    assert plan_execution(long, cpu, 54_000) == ExpertExecution(workers=2, threads=1, compile=True)
    # a single expert gets both cores
    assert plan_execution(tiny_config(experts=1, epochs=20), cpu, 54_000) == ExpertExecution(1, 0, True)
    # short ones (tests, quick runs) are not worth a process or a compilation
    assert plan_execution(long, cpu, 1_000) == ExpertExecution(1, 0, False)
    # the choice never depends on how many experts are left, so a resumed expert runs as it began
    assert plan_execution(long, cpu, 54_000, compile=False, workers=1) == ExpertExecution(1, 0, False)
    # AST's input-gradient penalty differentiates twice, which torch.compile refuses
    penalised = tiny_config(experts=3, epochs=20, ast_input_grad_penalty=2.0)
    assert plan_execution(penalised, cpu, 54_000).compile is False
    with pytest.raises(ConfigError, match="compile"):
        plan_execution(penalised, cpu, 54_000, compile=True)


def test_compiled_expert_training_follows_eager_training(data):
    config = tiny_config(experts=1, epochs=2, arch_options={"width": 8, "depth": 1})  # depth 1: a quick compile
    eager = train_module.train_expert(config, 0, data)
    compiled = train_module.train_expert(config, 0, data, compile=True)
    assert compiled.params.shape == eager.params.shape
    torch.testing.assert_close(compiled.params[0], eager.params[0], rtol=0, atol=0)  # the same initialisation
    # the same training fused into other kernels: rounding apart, not another trajectory
    torch.testing.assert_close(compiled.params, eager.params, rtol=1e-4, atol=1e-5)
