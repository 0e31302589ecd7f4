"""Mixed precision (bf16 autocast) where only an accuracy depends on the result: evaluation and
expert training. float32 stays the default, and its records, cache keys and store fingerprints
are the ones made before precision was a setting."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_prepared
from ddtool import evaluation
from ddtool.cli.actions import protocol_label
from ddtool.errors import ConfigError
from ddtool.evaluation import get_protocol
from ddtool.experts import ExpertConfig
from ddtool.experts.train import train_expert
from ddtool.methods.experts import expert_config_for
from ddtool.methods.trajectory_config import TrajectoryConfig
from ddtool.networks import create_network
from ddtool.storage import SyntheticSet
from ddtool.training import train_epoch

ARCH = "convnet:width=4"


@pytest.fixture(scope="module")
def data():
    return tiny_prepared(per_class=4)


def _forward_dtypes(precision: str) -> tuple[set, set]:
    """(dtypes of the convolutions' outputs, dtypes of the weights' gradients) over one epoch."""
    net = create_network(ARCH, channels=1, num_classes=10, image_size=8)
    seen = set()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 10
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    train_epoch(net, x, y, optimizer=optimizer, batch_size=10, generator=torch.Generator().manual_seed(0),
                precision=precision)
    return seen, {p.grad.dtype for p in net.parameters()}


def test_bf16_autocasts_the_forward_passes_and_keeps_float32_weights():
    assert _forward_dtypes("fp32") == ({torch.float32}, {torch.float32})
    assert _forward_dtypes("bf16") == ({torch.bfloat16}, {torch.float32})


def test_losses_are_float32_under_bf16_autocast():
    from ddtool.evaluation.kd import kd_loss
    from ddtool.training import autocast, cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g).to(torch.bfloat16)
    teacher, soft = torch.randn(8, 10, generator=g), torch.softmax(torch.randn(8, 10, generator=g), dim=1)
    with autocast(torch.device("cpu"), "bf16"):
        losses = [cross_entropy(logits, soft), cross_entropy(logits, torch.arange(8)), kd_loss(logits, teacher, 20.0)]
    expected = [cross_entropy(logits.float(), soft), cross_entropy(logits.float(), torch.arange(8)),
                kd_loss(logits.float(), teacher, 20.0)]
    for loss, reference in zip(losses, expected):
        assert loss.dtype == torch.float32
        torch.testing.assert_close(loss, reference)


def test_ast_input_gradient_penalty_trains_under_bf16(data):
    config = ExpertConfig(arch="convnet", arch_options={"width": 4}, experts=1, epochs=1, batch_size=16,
                          ast_input_grad_penalty=2.0, precision="bf16")
    trajectory = train_expert(config, 0, data)
    assert torch.isfinite(trajectory.params).all() and not torch.equal(trajectory.params[0], trajectory.params[1])


def test_fp32_protocols_keep_their_records_and_keys_and_bf16_is_a_protocol_of_its_own():
    mtt = get_protocol("mtt")
    assert "precision" not in mtt.to_dict()  # what records and cache keys held before
    bf16 = mtt.with_overrides(precision="bf16")
    assert bf16.to_dict() == {**mtt.to_dict(), "precision": "bf16"}
    assert protocol_label(bf16.to_dict()) == "mtt (precision bf16)" and protocol_label(mtt.to_dict()) == "mtt"
    with pytest.raises(ConfigError, match="fp32, bf16"):
        mtt.with_overrides(precision="fp16")


def test_a_bf16_evaluation_trains_its_own_baseline_and_records_its_precision(data, monkeypatch):
    from ddtool.evaluation import evaluate as runs_module

    from ddtool.evaluation import train as train_module

    trained, epochs_at = [], set()
    real = runs_module.train_fresh_network
    monkeypatch.setattr(runs_module, "train_fresh_network",
                        lambda *a, **k: trained.append(k["protocol"].precision) or real(*a, **k))
    real_epoch = train_module.train_epoch
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: epochs_at.add(k["precision"]) or real_epoch(*a, **k))
    g = torch.Generator().manual_seed(0)
    sset = SyntheticSet(images=torch.randn(10, 1, 8, 8, generator=g), labels=torch.arange(10), label_kind="hard",
                        dataset=data.spec.name, ipc=1, method="random", preprocessing=data.preprocessing,
                        classes=list(data.spec.classes))
    small = get_protocol("mtt").with_overrides(epochs=2, runs=1, reference_epochs=1)
    full = evaluation.evaluate_set(sset, data, protocol=small, arch=ARCH, progress=False, reference=False)
    assert epochs_at == {"fp32"}
    epochs_at.clear()
    half = evaluation.evaluate_set(sset, data, protocol=small.with_overrides(precision="bf16"), arch=ARCH,
                                   progress=False, reference=False)
    assert epochs_at == {"bf16"}  # the networks trained at the protocol's precision
    assert half.to_record()["protocol"]["precision"] == "bf16"
    assert "precision" not in full.to_record()["protocol"]
    assert 0 <= half.synthetic.mean <= 1 and half.random_subset is not None
    # the set's run and its baseline's, each time: the float32 baseline is not served to bf16
    assert trained == ["fp32", "fp32", "bf16", "bf16"]


def test_bf16_experts_are_a_store_of_their_own_with_float32_snapshots(data, monkeypatch):
    from ddtool.experts import train as train_module

    epochs_at = []
    real_epoch = train_module.train_epoch
    monkeypatch.setattr(train_module, "train_epoch", lambda *a, **k: epochs_at.append(k["precision"]) or real_epoch(*a, **k))
    fp32 = ExpertConfig(arch="convnet", arch_options={"width": 4}, experts=1, epochs=1, batch_size=16)
    bf16 = ExpertConfig(**{**fp32.to_dict(), "precision": "bf16"})
    assert "precision" not in fp32.trajectory_settings()  # existing stores keep their fingerprints
    assert bf16.fingerprint() != fp32.fingerprint()
    trajectory = train_expert(bf16, 0, data)
    assert epochs_at == ["bf16"]
    assert trajectory.params.dtype == torch.float32 and torch.isfinite(trajectory.params).all()
    with pytest.raises(ConfigError, match="expert precision"):
        ExpertConfig(precision="half")


def test_distill_reaches_the_expert_precision_setting(data):
    class Ctx:
        pass

    ctx = Ctx()
    ctx.data = data
    config = TrajectoryConfig(experts=1, expert_train_epochs=2, max_start_epoch=1, match_span_epochs=1,
                              expert_precision="bf16")
    assert expert_config_for(config, ctx).precision == "bf16"
    with pytest.raises(ConfigError, match="expert_precision"):
        TrajectoryConfig(expert_precision="fp16")


def test_the_cli_evaluates_in_bf16_and_info_says_so(tmp_path, fashion_root):
    from test_cli import ddtool, ok

    out = tmp_path / "r.h5"
    ok(ddtool("distill", "--method", "random", "--ipc", 1, "--data-root", fashion_root, "-o", out, "--protocol",
              "classic", "--eval-runs", 1, "--eval-epochs", 1, "--eval-precision", "bf16", "-q"))
    ok(ddtool("evaluate", out, "--protocol", "classic", "--runs", 1, "--epochs", 1, "--no-baselines",
              "--data-root", fashion_root, "-q"))
    info = ok(ddtool("info", out)).stdout
    assert "classic (epochs 1, runs 1, precision bf16)" in info and "classic (epochs 1, runs 1) on" in info
