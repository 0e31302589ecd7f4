"""The trajectory-matching engine: unroll a student on the synthetic set, measure how far it
lands from the expert, and return the gradient of that distance for the images, the labels
and the learnable step size.

One unroll, three interchangeable backends (docs/methods.md §2-3):

- ``bptt``  full backpropagation through all N steps; memory grows with N. The reference.
- ``tesla`` the published constant-memory rule of TESLA: a recompute sweep that treats every
            inner gradient g_k as if it fed the final parameters directly, dropping the
            (I - αH_j) chain through later steps. Exact only for N = 1; kept for parity and
            so its error can be measured.
- ``exact`` the adjoint (reverse) sweep: same recompute structure and O(1) activation
            memory in N as ``tesla``, plus one Hessian-vector product per step, which makes it
            equal to ``bptt`` up to rounding. What ``auto`` picks where bptt's graph would not
            fit in memory (methods/trajectory.py, choose_backend).

The inner update is SGD, optionally with heavy-ball momentum (AST's momentum inner loop):
    v_{k+1} = μ v_k + g_k,   θ_{k+1} = θ_k − α v_{k+1},   g_k = ∇_θ ℓ_k(θ_k; X, Y)
The matching loss is a sum of normalised distances, usually one (θ_N against θ*_{t+M}); AST's
intermediate matching adds terms at earlier steps, which the adjoint sweep picks up as it
passes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from ddtool.errors import ConfigError

Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (flat params, images) -> logits


class Augmenter(Protocol):
    def apply(self, x: torch.Tensor, params) -> torch.Tensor: ...


@dataclass
class InnerStep:
    """Everything that makes inner step k replayable: which images, which augmentation."""

    batch: torch.Tensor  # int64 indices into the synthetic set
    augmentation: object | None = None  # AugParams for the augmenter, or None


@dataclass
class MatchTarget:
    """One term  weight · ‖θ_step − params‖² / normaliser  of the matching loss."""

    step: int
    params: torch.Tensor
    normaliser: torch.Tensor | float
    weight: float = 1.0


@dataclass
class SyntheticBatch:
    """The quantities being learned.

    `label_logits` (N, K) are learnable soft labels (targets = softmax(logits / T)); when None,
    `fixed_targets` are used: hard ids (N,) or fixed probabilities (N, K).
    """

    images: torch.Tensor
    lr: torch.Tensor  # scalar α
    label_logits: torch.Tensor | None = None
    fixed_targets: torch.Tensor | None = None
    label_temperature: float = 1.0

    def targets(self, batch: torch.Tensor, label_logits: torch.Tensor | None) -> torch.Tensor:
        if label_logits is not None:
            return F.softmax(label_logits[batch] / self.label_temperature, dim=1)
        assert self.fixed_targets is not None
        return self.fixed_targets[batch]


@dataclass
class Unroll:
    forward: Forward
    start: torch.Tensor  # θ̂_0, flat
    steps: list[InnerStep]
    targets: list[MatchTarget]
    augmenter: Augmenter | None = None
    momentum: float = 0.0
    inner_loss_scale: float = 1.0  # AST's balanced inner loss multiplies ℓ_k by this

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("An unroll needs at least one inner step (syn_steps >= 1).")
        for target in self.targets:
            if not 0 <= target.step <= len(self.steps):
                raise ConfigError(f"Match target at step {target.step} is outside 0..{len(self.steps)}.")

    def inner_loss(self, params: torch.Tensor, k: int, syn: SyntheticBatch, images: torch.Tensor,
                   label_logits: torch.Tensor | None) -> torch.Tensor:
        step = self.steps[k]
        x = images[step.batch]
        if self.augmenter is not None and step.augmentation is not None:
            x = self.augmenter.apply(x, step.augmentation)
        logits = self.forward(params, x)
        targets = syn.targets(step.batch, label_logits)
        if targets.dim() == 1:
            loss = F.cross_entropy(logits, targets)
        else:
            loss = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
        return self.inner_loss_scale * loss

    def target_terms(self, step: int) -> list[MatchTarget]:
        return [t for t in self.targets if t.step == step]


@dataclass
class MatchResult:
    loss: float  # the objective: the targets' weighted sum, whose gradients these are
    grad_images: torch.Tensor
    grad_lr: torch.Tensor
    grad_label_logits: torch.Tensor | None
    terms: list[float] = field(default_factory=list)  # each target's loss value, in order
    # The first target's normalised loss, unweighted: the match against the trajectory's end
    # (1 = the student ended as far from it as its start). What DATM's gate compares and the
    # log records; unlike `loss`, it does not grow with intermediate targets.
    target_loss: float = float("nan")


def _target_loss(unroll: Unroll, terms: list[float]) -> float:
    return terms[0] / unroll.targets[0].weight


def _term_loss(theta: torch.Tensor, target: MatchTarget) -> torch.Tensor:
    return target.weight * (theta - target.params).pow(2).sum() / target.normaliser


def _term_grad(theta: torch.Tensor, target: MatchTarget) -> torch.Tensor:
    return (2.0 * target.weight / target.normaliser) * (theta - target.params)


def _zeros_or(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad


def bptt(unroll: Unroll, syn: SyntheticBatch) -> MatchResult:
    """Full backpropagation through the unroll: the reference, memory linear in N."""
    theta = unroll.start.detach().requires_grad_(True)
    velocity = torch.zeros_like(theta)
    thetas = [theta]
    for k in range(len(unroll.steps)):
        loss_k = unroll.inner_loss(theta, k, syn, syn.images, syn.label_logits)
        (grad,) = torch.autograd.grad(loss_k, theta, create_graph=True)
        velocity = unroll.momentum * velocity + grad if unroll.momentum else grad
        theta = theta - syn.lr * velocity
        thetas.append(theta)
    terms = [_term_loss(thetas[t.step], t) for t in unroll.targets]
    total = torch.stack(terms).sum()
    inputs = [syn.images, syn.lr] + ([syn.label_logits] if syn.label_logits is not None else [])
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    values = [float(t.detach()) for t in terms]
    return MatchResult(
        loss=float(total.detach()),
        grad_images=_zeros_or(grads[0], syn.images),
        grad_lr=_zeros_or(grads[1], syn.lr),
        grad_label_logits=_zeros_or(grads[2], syn.label_logits) if syn.label_logits is not None else None,
        terms=values,
        target_loss=_target_loss(unroll, values),
    )


def _forward_pass(unroll: Unroll, syn: SyntheticBatch) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Pass 1 of the recompute backends: the unroll without a graph, keeping θ_k (and, with
    momentum, v_k; without it v_{k+1} = g_k is recomputed in pass 2 anyway)."""
    images = syn.images.detach()
    labels = syn.label_logits.detach() if syn.label_logits is not None else None
    lr = syn.lr.detach()
    theta = unroll.start.detach()
    velocity = torch.zeros_like(theta)
    thetas = [theta]
    velocities = [velocity] if unroll.momentum else None
    for k in range(len(unroll.steps)):
        params = theta.detach().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(unroll.inner_loss(params, k, syn, images, labels), params)
        velocity = unroll.momentum * velocity + grad if unroll.momentum else grad
        theta = theta - lr * velocity
        thetas.append(theta)
        if velocities is not None:
            velocities.append(velocity)
    return thetas, velocities


def _reverse_sweep(unroll: Unroll, syn: SyntheticBatch, first_order: bool) -> MatchResult:
    """Pass 2: walk the steps backwards, one step's graph alive at a time.

    λθ_k is ∂L/∂θ_k and λv_k is ∂L/∂v_k. At step k the inner gradient g_k feeds v_{k+1}, whose
    total adjoint is  ṽ = λv_{k+1} − α λθ_{k+1}. One vector-Jacobian product of g_k with ṽ gives
    at once  H_k ṽ (for λθ_k),  (∂g_k/∂X)ᵀ ṽ  and  (∂g_k/∂Y)ᵀ ṽ.  `first_order` drops H_k ṽ,
    which is exactly TESLA's published rule.
    """
    thetas, velocities = _forward_pass(unroll, syn)
    lr = syn.lr.detach()
    n_steps = len(unroll.steps)
    terms = [float(_term_loss(thetas[t.step], t)) for t in unroll.targets]

    grad_images = torch.zeros_like(syn.images)
    grad_labels = torch.zeros_like(syn.label_logits) if syn.label_logits is not None else None
    grad_lr = torch.zeros_like(lr)
    lam_theta = torch.zeros_like(unroll.start)
    lam_velocity = torch.zeros_like(unroll.start)
    for target in unroll.target_terms(n_steps):
        lam_theta = lam_theta + _term_grad(thetas[n_steps], target)

    differentiable = [syn.images] + ([syn.label_logits] if syn.label_logits is not None else [])
    for k in reversed(range(n_steps)):
        v_adjoint = lam_velocity - lr * lam_theta
        params = thetas[k].detach().requires_grad_(True)
        with torch.enable_grad():
            loss_k = unroll.inner_loss(params, k, syn, syn.images, syn.label_logits)
            (grad,) = torch.autograd.grad(loss_k, params, create_graph=True)
        # θ_{k+1} = θ_k − α v_{k+1}
        velocity = velocities[k + 1] if velocities is not None else grad.detach()
        grad_lr -= torch.dot(velocity.flatten(), lam_theta.flatten())
        inputs = differentiable if first_order else [params] + differentiable
        vjps = torch.autograd.grad(grad, inputs, grad_outputs=v_adjoint, allow_unused=True)
        if not first_order:
            hessian_term, vjps = vjps[0], vjps[1:]
            lam_theta = lam_theta + _zeros_or(hessian_term, lam_theta)
        grad_images += _zeros_or(vjps[0], grad_images)
        if grad_labels is not None:
            grad_labels += _zeros_or(vjps[1], grad_labels)
        lam_velocity = unroll.momentum * v_adjoint
        for target in unroll.target_terms(k):
            lam_theta = lam_theta + _term_grad(thetas[k], target)

    return MatchResult(loss=sum(terms), grad_images=grad_images, grad_lr=grad_lr,
                       grad_label_logits=grad_labels, terms=terms, target_loss=_target_loss(unroll, terms))


def exact(unroll: Unroll, syn: SyntheticBatch) -> MatchResult:
    """Adjoint sweep: equal to bptt, activation memory independent of N."""
    return _reverse_sweep(unroll, syn, first_order=False)


def tesla(unroll: Unroll, syn: SyntheticBatch) -> MatchResult:
    """TESLA's published first-order rule (see module docstring): not exact for N > 1."""
    return _reverse_sweep(unroll, syn, first_order=True)


BACKENDS: dict[str, Callable[[Unroll, SyntheticBatch], MatchResult]] = {
    "exact": exact,
    "bptt": bptt,
    "tesla": tesla,
}


def get_backend(name: str) -> Callable[[Unroll, SyntheticBatch], MatchResult]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"Unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}.") from None
