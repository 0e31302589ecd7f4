"""DATM, FTD and AST's options on the shared loop, each checked against what it should do."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_prepared
from ddtool.errors import ConfigError
from ddtool.matching import MatchResult
from ddtool.methods.base import DistillContext
from ddtool.methods.datm import DATM, DATMConfig
from ddtool.methods.ftd import FTD, FTDConfig
from ddtool.methods.initialisation import correct_only_init, kmeans, representative_indices
from ddtool.methods.matching_state import MatchingState
from ddtool.methods.trajectory import MTT, perturb_conv_weights
from ddtool.methods.trajectory_config import TrajectoryConfig
from ddtool.networks import ParamLayout, create_network


class StubStore:
    """The slice of ExpertStore the methods use, over hand-made trajectories."""

    def __init__(self, trajectories: list[torch.Tensor]):
        self.trajectories = trajectories  # each (epochs + 1, P)
        self.expert_indices = tuple(range(len(trajectories)))
        self.epochs = trajectories[0].shape[0] - 1

    def params(self, expert: int, epoch: int) -> torch.Tensor:
        return self.trajectories[expert][epoch]


def linear_forward(params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """logits = flatten(x) @ W, W = params viewed as (D, K)."""
    flat = x.flatten(1)
    return flat @ params.view(flat.shape[1], -1)


def base(**overrides) -> dict:
    values = dict(width=8, experts=2, expert_train_epochs=8, syn_steps=4, match_span_epochs=2, max_start_epoch=2,
                  iterations=4, checkpoint_every=2, lr_img=10.0, lr_lr=1e-5)
    return {**values, **overrides}


# ---- DATM ---------------------------------------------------------------------------------------
def test_datm_window_grows_linearly_then_stays():
    datm = DATM(DATMConfig(**base(max_start_epoch=2, max_start_epoch_final=6, window_grow_iterations=100)))
    assert [datm.start_epoch_range(it) for it in (0, 24, 25, 50, 99, 100, 500)] == [
        (0, 2), (0, 2), (0, 3), (0, 4), (0, 5), (0, 6), (0, 6)]
    fixed = DATM(DATMConfig(**base(max_start_epoch=3)))
    assert fixed.start_epoch_range(0) == fixed.start_epoch_range(10**6) == (0, 3)


@pytest.mark.parametrize("name, steps, lr_img, lr_lr, lr_label, batch_syn", [
    # methods.md §5: (N, M = 2, lr_img, lr_lr, lr_y, batch_syn) as published
    ("datm-cifar10-ipc1", 80, 100, 1e-7, 5, 10), ("datm-cifar10-ipc10", 80, 100, 1e-5, 2, 100),
    ("datm-cifar10-ipc50", 80, 1000, 1e-5, 2, 500), ("datm-cifar100-ipc10", 80, 1000, 1e-5, 10, 1000),
    ("datm-tiny-ipc10", 40, 100, 1e-4, 10, 500)])
def test_datm_published_presets_carry_the_published_settings(name, steps, lr_img, lr_lr, lr_label, batch_syn):
    c = DATM.presets[name]
    assert (c.syn_steps, c.match_span_epochs, c.lr_img, c.lr_lr, c.lr_label, c.batch_syn) == (
        steps, 2, lr_img, lr_lr, lr_label, batch_syn)
    assert c.iterations == 10000 and c.zca and c.labels == "learned"
    assert (c.gate_threshold == 1.1) == (name == "datm-cifar10-ipc1")


def test_datm_large_set_presets_match_late_epochs_only():
    # methods.md §5: [40, 60) at IPC 500 and 1000
    for ipc in (500, 1000):
        datm = DATM(DATM.presets[f"datm-cifar10-ipc{ipc}"])
        assert datm.start_epoch_range(0) == datm.start_epoch_range(10000) == (40, 60)


def test_datm_plan_names_the_window_it_will_reach():
    growing = DATM(DATMConfig(**base(max_start_epoch=2, max_start_epoch_final=6, window_grow_iterations=4)))
    assert growing.describe_start_epochs() == "start epochs [0, 2) growing to [0, 6) over 4 iterations"
    # a window set to grow over more iterations than the run has only gets part of the way
    partial = DATM(DATMConfig(**base(max_start_epoch=2, max_start_epoch_final=6, window_grow_iterations=8)))
    assert partial.describe_start_epochs() == "start epochs [0, 2) growing to [0, 4) over 4 iterations"
    assert DATM(DATMConfig(**base(max_start_epoch=3))).describe_start_epochs() == "start epochs [0, 3)"


def test_correct_only_init_and_averaged_logits_by_hand():
    data = tiny_prepared(size=2, per_class=6)
    d, k = 4, 10
    # Experts as lookups of the training labels: expert 0 is always right (confidence 2), expert 1
    # always predicts the next class (confidence 3), so it never counts.
    x = data.train_x.flatten(1)
    table = {tuple(v.tolist()): int(y) for v, y in zip(x, data.train_y)}

    def forward(params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        shift = int(params[0])  # expert 0: shift 0 (correct), expert 1: shift 1 (wrong)
        labels = torch.tensor([(table[tuple(v.tolist())] + shift) % k for v in images.flatten(1)])
        logits = torch.nn.functional.one_hot(labels, k).float() * (2.0 + shift)
        return logits

    store = StubStore([torch.zeros(2, d * k), torch.ones(2, d * k)])
    idx, logits = correct_only_init(data, store, forward, 2, pool_per_class=10, generator=torch.Generator())
    assert idx.numel() == 20 and (data.train_y[idx] == torch.arange(10).repeat_interleave(2)).all()
    # Only expert 0 is correct, so each label is expert 0's logits alone: 2 at the true class.
    expected = torch.nn.functional.one_hot(data.train_y[idx], k).float() * 2.0
    assert torch.equal(logits, expected)
    # a set larger than half the scored pool scores more of each class (DATM at IPC 500-1000)
    idx, _ = correct_only_init(data, store, forward, 3, pool_per_class=2, generator=torch.Generator())
    assert idx.numel() == 30 and (data.train_y[idx] == torch.arange(10).repeat_interleave(3)).all()


def test_experts_score_images_in_batches_of_every_class():
    from ddtool.methods.initialisation import class_mixed_logits, class_pools

    data = tiny_prepared(size=2, per_class=6)
    table = {tuple(v.tolist()): int(y) for v, y in zip(data.train_x.flatten(1), data.train_y)}
    batches = []

    def forward(params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        batches.append(sorted({table[tuple(v.tolist())] for v in images.flatten(1)}))
        return images.flatten(1) * params[0]  # each image's own pixels: shows where each result went

    pools = class_pools(data, 5, torch.Generator().manual_seed(0))
    logits = class_mixed_logits(StubStore([torch.full((2, 1), 2.0)]), 0, forward, data, pools, batch_size=20)
    # a batch of one class would let batch statistics (BatchNorm) normalise the class by itself
    assert batches == [list(range(10))] * 3  # 50 images in batches of 20, 20 and 10
    for pool, scores in zip(pools, logits):  # every pool's logits are its own images', in its order
        assert torch.equal(scores, data.train_x[pool].flatten(1) * 2.0)


def test_correct_only_init_averages_over_the_correct_experts_only():
    data = tiny_prepared(size=2, per_class=3)
    x = data.train_x.flatten(1)
    table = {tuple(v.tolist()): int(y) for v, y in zip(x, data.train_y)}

    def forward(params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        scale = float(params[0])  # every expert is correct, with confidence `scale`
        labels = torch.tensor([table[tuple(v.tolist())] for v in images.flatten(1)])
        return torch.nn.functional.one_hot(labels, 10).float() * scale

    store = StubStore([torch.full((2, 1), 1.0), torch.full((2, 1), 3.0)])
    _, logits = correct_only_init(data, store, forward, 1, pool_per_class=10, generator=torch.Generator())
    assert torch.equal(logits.max(dim=1).values, torch.full((10,), 2.0))  # (1 + 3) / 2


def test_correct_only_init_with_kmeans_picks_the_representative_among_the_correct_images(tmp_path, monkeypatch):
    data = tiny_prepared(size=2, per_class=5)
    x = data.train_x.flatten(1)
    # The j-th training image of each class (4 or 5 per class here): expert 0 predicts its class
    # with confidence 1, -, 4, 7, 4.2; the second (j = 1) it gets wrong. IPC 1 takes the correct
    # image nearest the mean of the correct ones' logits (4 or 4.05 at the true class): the one
    # of confidence 4.
    confidence = {0: 1.0, 1: 3.0, 2: 4.0, 3: 7.0, 4: 4.2}
    table = {}
    for c in range(10):
        for j, i in enumerate((data.train_y == c).nonzero().squeeze(1).tolist()):
            table[tuple(x[i].tolist())] = ((c + 1) % 10 if j == 1 else c, confidence[j])

    def forward(params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        rows = [table[tuple(v.tolist())] for v in images.flatten(1)]
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(label), 10).float() * conf
                            for label, conf in rows])

    store = StubStore([torch.zeros(2, 1)])
    idx, logits = correct_only_init(data, store, forward, 1, pool_per_class=10,
                                    generator=torch.Generator().manual_seed(0), representative=True)
    assert (data.train_y[idx] == torch.arange(10)).all()
    assert torch.equal(logits, torch.eye(10) * 4.0)
    # DATM passes init=kmeans through to it; init=noise cannot start from scored real images
    import ddtool.methods.datm as datm_module

    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return idx, logits

    monkeypatch.setattr(datm_module, "correct_only_init", spy)
    ctx = _context(tmp_path, data)
    for init in ("kmeans", "real"):
        DATM(DATMConfig(**base(init=init))).initialise(ctx, store, forward)
        assert seen["representative"] is (init == "kmeans")
    with pytest.raises(ConfigError, match="correct_only_init=false"):
        DATMConfig(**base(init="noise"))
    DATMConfig(**base(init="noise", correct_only_init=False))


def test_gate_skips_exactly_the_updates_above_the_threshold(tmp_path):
    datm = DATM(DATMConfig(**base(gate_threshold=1.0)))
    # `loss` also counts AST's intermediate targets (here 0.9 more); the gate reads the end-point match
    result = lambda loss: MatchResult(loss=loss + 0.9, grad_images=torch.zeros(1), grad_lr=torch.zeros(()),  # noqa: E731
                                      grad_label_logits=None, target_loss=loss)
    assert datm.skip_reason(result(1.0001)) and datm.skip_reason(result(0.9999)) is None
    assert DATM(DATMConfig(**base(gate_threshold=0.0))).skip_reason(result(50.0)) is None


def _context(tmp_path, data, ipc=1, work="run"):
    return DistillContext(data=data, ipc=ipc, seed=0, device=torch.device("cpu"), work_dir=tmp_path / work,
                          progress=False, log=lambda m: None)


def test_datm_end_to_end_learns_soft_labels_and_gates(tmp_path):
    data = tiny_prepared(per_class=6)
    initial = torch.nn.functional.one_hot(torch.arange(10), 10).float() * 3.0  # labels="learned" starts here

    def run(gate_threshold, work):
        config = DATMConfig(**base(gate_threshold=gate_threshold, correct_only_init=False))
        sset = DATM(config).distill(_context(tmp_path, data, work=work))
        log = [json.loads(line) for line in (tmp_path / work / "log.jsonl").read_text().splitlines()]
        assert sset.label_kind == "logits" and sset.labels.shape == (10, 10)
        return sset, log

    # gate off: every update applies, and the labels are learned away from their initialisation
    learned, log = run(0.0, "ungated")
    assert len(log) == 4 and not any(r["skipped"] for r in log)
    assert (learned.labels - initial).abs().max() > 1e-3
    # every update gated: nothing was updated, the labels are still their initialisation
    gated, log = run(1e-9, "gated")  # the same experts, from this test's cache
    assert len(log) == 4 and all(r["skipped"] for r in log)
    assert torch.equal(gated.labels, initial)


# ---- FTD ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("make", [
    lambda **kw: FTD(FTDConfig(**base(**kw))),
    # the average lives in the shared loop: DATM (or MTT) with ema_decay gets the same one
    lambda **kw: DATM(DATMConfig(**base(correct_only_init=False, **kw))),
], ids=["ftd", "datm+ema"])
def test_moving_average_by_hand(bias_correction, make):
    ftd = make(ema_decay=0.5, ema_bias_correction=bias_correction)
    state = MatchingState(iteration=0, images=torch.full((1,), 4.0), hard_labels=torch.zeros(1, dtype=torch.long),
                          lr=torch.tensor(0.01), label_logits=None, optimizer_states={})
    ftd.on_start(state)
    for value in (8.0, 16.0):
        state.images = torch.full((1,), value)
        ftd.after_update(state)
    saved = float(ftd.images_to_save(state))
    if bias_correction:  # ema = 0.5*(0.5*0 + 0.5*8) + 0.5*16 = 10, corrected by 1 - 0.25
        assert saved == pytest.approx(10.0 / 0.75)
    else:  # starts at the initial images: 0.5*(0.5*4 + 0.5*8) + 0.5*16 = 11
        assert saved == pytest.approx(11.0)


def test_no_moving_average_saves_the_iterate():
    mtt = MTT(TrajectoryConfig(**base()))
    state = MatchingState(iteration=0, images=torch.full((1,), 4.0), hard_labels=torch.zeros(1, dtype=torch.long),
                          lr=torch.tensor(0.01), label_logits=None, optimizer_states={})
    mtt.on_start(state)
    state.images = torch.full((1,), 8.0)
    mtt.after_update(state)
    assert "ema" not in state.extra and float(mtt.images_to_save(state)) == 8.0
    with pytest.raises(ConfigError, match="moving average"):
        FTDConfig(**base(ema_decay=0.0))


# ---- AST ----------------------------------------------------------------------------------------
def _unroll_for(config: TrajectoryConfig, start_epoch: int = 1):
    net = create_network("convnet", channels=1, num_classes=10, image_size=8, width=4)
    layout = ParamLayout.from_module(net)
    p = layout.total
    trajectory = torch.stack([torch.full((p,), float(e)) for e in range(config.expert_train_epochs + 1)])
    store = StubStore([trajectory])
    method = MTT(config)
    unroll = method._unroll(store, 0, start_epoch, lambda w, x: x, layout, torch.Size([10, 1, 8, 8]),
                            torch.Generator().manual_seed(0), None, torch.device("cpu"))
    return unroll, layout, trajectory


def test_ast_balanced_loss_scales_with_the_start_epoch():
    unroll, _, _ = _unroll_for(TrajectoryConfig(**base(ast_balanced_loss=0.5, max_start_epoch=4)), start_epoch=2)
    assert unroll.inner_loss_scale == pytest.approx(1 + 0.5 * 2 / 4)
    plain, _, _ = _unroll_for(TrajectoryConfig(**base(max_start_epoch=4)), start_epoch=2)
    assert plain.inner_loss_scale == 1.0


def test_ast_intermediate_matching_adds_weighted_targets_at_the_right_steps():
    config = TrajectoryConfig(**base(ast_intermediate_weight=0.3, match_span_epochs=3, syn_steps=6, max_start_epoch=2))
    unroll, _, trajectory = _unroll_for(config, start_epoch=1)
    steps = sorted((t.step, t.weight, float(t.params[0])) for t in unroll.targets)
    assert steps == [(2, 0.3, 2.0), (4, 0.3, 3.0), (6, 1.0, 4.0)]
    for t in unroll.targets:  # each normalised by its own distance from the start epoch
        assert float(t.normaliser) == pytest.approx(float((trajectory[1] - t.params).pow(2).sum()))


def test_ast_weight_perturbation_touches_only_conv_weights():
    net = create_network("convnet", channels=1, num_classes=10, image_size=8, width=4)
    layout = ParamLayout.from_module(net)
    params = layout.flatten(net)
    perturbed = perturb_conv_weights(params, layout, 0.1, torch.Generator().manual_seed(0))
    before, after = layout.unflatten(params), layout.unflatten(perturbed)
    for name, shape in zip(layout.names, layout.shapes):
        changed = not torch.equal(before[name], after[name])
        assert changed == (len(shape) == 4), name
        if len(shape) == 4:
            ratio = (after[name] - before[name]).std() / before[name].std()
            assert 0.05 < float(ratio) < 0.2
    assert torch.equal(params, layout.flatten(net))  # the input is not modified


def test_ast_inner_momentum_reaches_the_engine():
    unroll, _, _ = _unroll_for(TrajectoryConfig(**base(ast_inner_momentum=0.9)))
    assert unroll.momentum == 0.9


def test_kmeans_and_representative_init_for_ipc_one():
    points = torch.tensor([[0.0], [0.1], [10.0], [10.2]])
    centres = kmeans(points, 2, torch.Generator().manual_seed(0))
    assert sorted(round(float(c), 2) for c in centres) == [0.05, 10.1]
    data = tiny_prepared(size=2, per_class=5)
    store = StubStore([torch.eye(4, 10).flatten().repeat(2, 1)])  # logits = the first 4 pixels, padded
    idx = representative_indices(data, store, linear_forward, 1, pool_per_class=100,
                                 generator=torch.Generator().manual_seed(0))
    for c, i in enumerate(idx):  # IPC 1: the image whose logits are nearest its class mean
        members = (data.train_y == c).nonzero().squeeze(1)
        logits = linear_forward(store.params(0, 1), data.train_x[members])
        nearest = members[(logits - logits.mean(0)).norm(dim=1).argmin()]
        assert int(i) == int(nearest)
