"""Gradients of the matching engine, in float64 on a tiny network.

`exact` must equal `bptt` (1e-8 relative) for images, learnable labels and the step size,
with minibatches and augmentation on; both must agree with finite differences and with the
independent `higher` library; `tesla`'s error is measured and printed, not hidden.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddtool.matching import InnerStep, MatchTarget, SyntheticBatch, Unroll, get_backend
from ddtool.networks import ParamLayout
from ddtool.networks.instance_norm import InstanceNorm
from ddtool.networks.pooling import avg_pool_2x2
from ddtool.augment import DSA, DSAConfig

DTYPE = torch.float64


class TinyNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = InstanceNorm(3)  # the networks' own norm and pooling, with their closed forms
        self.head = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x)))
        x = avg_pool_2x2(x)
        return self.head(x.flatten(1))


def make_problem(*, steps=4, momentum=0.0, soft=False, augment=True, intermediate=False, seed=0, device="cpu"):
    # random draws stay on the CPU generator, so every device gets the same problem
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = TinyNet().to(DTYPE).to(device)
    layout = ParamLayout.from_module(net)
    forward = lambda flat, x: layout.functional_forward(net, flat, x)  # noqa: E731
    start = layout.flatten(net).to(DTYPE)
    n_images, batch = 9, 4
    images = torch.randn(n_images, 1, 8, 8, dtype=DTYPE, generator=g).to(device).requires_grad_(True)
    lr = torch.tensor(0.3, dtype=DTYPE, device=device, requires_grad=True)
    if soft:
        syn = SyntheticBatch(images=images, lr=lr,
                             label_logits=torch.randn(n_images, 3, dtype=DTYPE, generator=g).to(device).requires_grad_(True),
                             label_temperature=1.5)
    else:
        syn = SyntheticBatch(images=images, lr=lr, fixed_targets=(torch.arange(n_images) % 3).to(device))
    dsa = DSA(DSAConfig()) if augment else None
    inner = []
    for _ in range(steps):
        idx = torch.randperm(n_images, generator=g)[:batch]
        inner.append(InnerStep(batch=idx, augmentation=dsa.sample(batch, 8, 8, g) if dsa else None))
    target = start + 0.05 * torch.randn(start.shape, dtype=DTYPE, generator=g).to(device)
    targets = [MatchTarget(step=steps, params=target, normaliser=(start - target).pow(2).sum())]
    if intermediate:
        mid = start + 0.02 * torch.randn(start.shape, dtype=DTYPE, generator=g).to(device)
        targets.append(MatchTarget(step=steps // 2, params=mid, normaliser=(start - mid).pow(2).sum(), weight=0.5))
    unroll = Unroll(forward=forward, start=start, steps=inner, targets=targets, augmenter=dsa, momentum=momentum)
    return unroll, syn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("soft", [False, True])
def test_exact_equals_bptt(momentum, soft):
    unroll, syn = make_problem(momentum=momentum, soft=soft, intermediate=True)
    reference = get_backend("bptt")(unroll, syn)
    result = get_backend("exact")(unroll, syn)
    assert abs(result.loss - reference.loss) <= 1e-12 * abs(reference.loss)
    assert rel_err(result.grad_images, reference.grad_images) < 1e-8
    assert rel_err(result.grad_lr, reference.grad_lr) < 1e-8
    assert reference.grad_images.abs().sum() > 0 and reference.grad_lr.abs() > 0
    if soft:
        assert rel_err(result.grad_label_logits, reference.grad_label_logits) < 1e-8
        assert reference.grad_label_logits.abs().sum() > 0


@pytest.mark.parametrize("backend", ["bptt", "exact", "tesla"])
def test_target_loss_is_the_end_point_match_alone(backend):
    # DATM's gate reads target_loss: with intermediate targets `loss` adds their terms, and a
    # gate at 1 on it skipped every update of AST's runs (the end-point match stays below 1)
    unroll, syn = make_problem(intermediate=True)
    result = get_backend(backend)(unroll, syn)
    end, mid = unroll.targets
    theta = _final_params(unroll, syn)
    expected = float((theta - end.params).pow(2).sum() / end.normaliser)
    assert result.target_loss == pytest.approx(expected, rel=1e-10)
    assert result.loss == pytest.approx(sum(result.terms)) and result.loss > result.target_loss + 1e-6
    plain, syn = make_problem(intermediate=False)
    assert get_backend(backend)(plain, syn).target_loss == pytest.approx(get_backend(backend)(plain, syn).loss)


def _final_params(unroll, syn) -> torch.Tensor:
    """The student's parameters after the whole unroll (plain SGD, as make_problem sets up)."""
    theta = unroll.start.detach().clone()
    with torch.no_grad():
        for k in range(len(unroll.steps)):
            with torch.enable_grad():
                t = theta.clone().requires_grad_(True)
                (grad,) = torch.autograd.grad(unroll.inner_loss(t, k, syn, syn.images.detach(), None), t)
            theta = theta - syn.lr.detach() * grad
    return theta


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_exact_equals_bptt_on_cuda_and_matches_cpu():
    """The GPU path: exact still equals bptt there, and both agree with the CPU's answer."""
    unroll, syn = make_problem(momentum=0.9, soft=True, intermediate=True, device="cuda")
    reference = get_backend("bptt")(unroll, syn)
    result = get_backend("exact")(unroll, syn)
    cpu = get_backend("bptt")(*make_problem(momentum=0.9, soft=True, intermediate=True))
    for got, want in ((result.grad_images, reference.grad_images), (result.grad_lr, reference.grad_lr),
                      (result.grad_label_logits, reference.grad_label_logits)):
        assert got.is_cuda and rel_err(got, want) < 1e-8
    assert rel_err(result.grad_images.cpu(), cpu.grad_images) < 1e-8
    assert rel_err(result.grad_label_logits.cpu(), cpu.grad_label_logits) < 1e-8


def _directional_fd(unroll, syn, which: str, direction: torch.Tensor, eps=1e-6) -> float:
    def loss_at(delta):
        def moved(tensor, name):
            return (tensor.detach() + (delta if which == name else 0)).requires_grad_(True)

        shifted = SyntheticBatch(
            images=moved(syn.images, "images"),
            lr=moved(syn.lr, "lr"),
            label_logits=moved(syn.label_logits, "labels") if syn.label_logits is not None else None,
            fixed_targets=syn.fixed_targets,
            label_temperature=syn.label_temperature,
        )
        return get_backend("exact")(unroll, shifted).loss

    return (loss_at(eps * direction) - loss_at(-eps * direction)) / (2 * eps)


@pytest.mark.parametrize("backend", ["bptt", "exact"])
def test_gradients_match_finite_differences(backend):
    unroll, syn = make_problem(soft=True, momentum=0.5)
    result = get_backend(backend)(unroll, syn)
    g = torch.Generator().manual_seed(1)
    for which, grad in (("images", result.grad_images), ("labels", result.grad_label_logits), ("lr", result.grad_lr)):
        direction = torch.randn(grad.shape, dtype=DTYPE, generator=g)
        analytic = float((grad * direction).sum())
        numeric = _directional_fd(unroll, syn, which, direction)
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (which, analytic, numeric)


@pytest.mark.parametrize("backend", ["bptt", "exact"])
def test_bptt_and_exact_agree_with_higher(backend):
    higher = pytest.importorskip("higher")
    unroll, syn = make_problem(augment=False, steps=3)
    torch.manual_seed(0)
    net = TinyNet().to(DTYPE)
    layout = ParamLayout.from_module(net)
    layout.load_(net, unroll.start)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with higher.innerloop_ctx(net, optimizer, copy_initial_weights=True, override={"lr": [syn.lr]}) as (fnet, diffopt):
        for step in unroll.steps:
            logits = fnet(syn.images[step.batch])
            diffopt.step(nn.functional.cross_entropy(logits, syn.fixed_targets[step.batch]))
        final = torch.cat([p.flatten() for p in fnet.parameters()])
        target = unroll.targets[0]
        loss = (final - target.params).pow(2).sum() / target.normaliser
        grad_images, grad_lr = torch.autograd.grad(loss, [syn.images, syn.lr])
    result = get_backend(backend)(unroll, syn)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-12)
    assert rel_err(result.grad_images, grad_images) < 1e-8
    assert rel_err(result.grad_lr, grad_lr) < 1e-8


def test_tesla_rule_is_exact_for_one_step_and_its_error_is_reported():
    one_step, syn = make_problem(steps=1)
    assert rel_err(get_backend("tesla")(one_step, syn).grad_images,
                   get_backend("bptt")(one_step, syn).grad_images) < 1e-10
    unroll, syn = make_problem(steps=6)
    reference = get_backend("bptt")(unroll, syn)
    approx = get_backend("tesla")(unroll, syn)
    error_images = rel_err(approx.grad_images, reference.grad_images)
    error_lr = rel_err(approx.grad_lr, reference.grad_lr)
    print(f"\nTESLA rule vs full backprop, 6 steps: images {error_images:.2%}, lr {error_lr:.2%}")
    # The rule drops the (I - αH) chain, so it must differ from the exact gradient here.
    assert error_images > 1e-6
    # The loss is computed from the same forward pass and is exact.
    assert approx.loss == pytest.approx(reference.loss, rel=1e-12)
