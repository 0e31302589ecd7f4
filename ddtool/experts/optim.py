"""Sharpness-aware optimisers for flat expert trajectories (FTD): SAM and GSAM.

Both wrap a base optimiser (plain SGD for experts, with its momentum and weight decay) and
need the loss twice per step, so `step(closure)` calls the closure twice:

1. gradient g at the current weights w;
2. ascent to the worst point of a rho-ball: e = rho * g / ||g||, or in the adaptive form
   (ASAM, which the published FTD code always uses) e = rho * w^2 * g / || |w| * g ||,
   so the radius scales with each weight's magnitude;
3. gradient g' at w + e;
4. the update direction: SAM uses g'. GSAM also descends the surrogate gap by removing part
   of the component of g orthogonal to g': d = g' - alpha * g_perp, with
   g_perp = g - (<g, g'> / ||g'||^2) g';
5. back to w exactly (restored from a copy: w + e - e is not w in floating point), then the
   base step with d as the gradient.

Norms and inner products are taken over all parameters jointly. Everything stays on the
device as tensors: no .item() syncs per step.
"""

from __future__ import annotations

from typing import Callable

import torch

# Keeps e finite when the gradient vanishes (then e = 0 and the step is plain SGD).
_EPS = 1e-12


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimisation around `base` (which owns the parameters and their state).

    `base.param_groups` are shared, so changing a group's lr changes the base step's lr.
    """

    def __init__(self, base: torch.optim.Optimizer, *, rho: float = 0.01, adaptive: bool = False):
        if rho <= 0:
            raise ValueError(f"rho must be positive, got {rho}")
        self.base = base
        self.rho = float(rho)
        self.adaptive = bool(adaptive)
        super().__init__(base.param_groups, {})
        # Optimizer.__init__ re-registers the groups; share the base's list itself so both
        # see the same groups (lr schedules act on either).
        self.param_groups = base.param_groups

    # The base optimiser's state (momentum buffers) is the only state: SAM's perturbation
    # lives only inside one step.
    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base.load_state_dict(state_dict)
        # Loading gives the base a new list of groups: share it again, or an lr schedule
        # would act on the old list and the base would step at the checkpoint's lr.
        self.param_groups = self.base.param_groups

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    @staticmethod
    def _grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
        # An unused parameter has no gradient: it counts as zero in norms and updates.
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]

    def _perturbation(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.adaptive:
            scaled = [p.abs() * g for p, g in zip(params, grads)]  # |w| * g
            norm = _global_norm(scaled)
            return [p.abs() * s * (self.rho / (norm + _EPS)) for p, s in zip(params, scaled)]  # w^2 g
        norm = _global_norm(grads)
        return [g * (self.rho / (norm + _EPS)) for g in grads]

    def _direction(self, grad_w: list[torch.Tensor], grad_perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        """The update direction from g (at w) and g' (at w + e); SAM: g'."""
        return grad_perturbed

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:  # type: ignore[override]
        if closure is None:
            raise ValueError(f"{type(self).__name__} evaluates the loss twice per step: pass a closure")
        with torch.enable_grad():
            loss = closure()
        params = self._params()
        grad_w = self._grads(params)  # closure() sets p.grad to fresh tensors next time: keep these
        originals = [p.detach().clone() for p in params]
        for p, e in zip(params, self._perturbation(params, grad_w)):
            p.add_(e)
        with torch.enable_grad():
            closure()
        grad_perturbed = self._grads(params)
        direction = self._direction(grad_w, grad_perturbed)
        for p, w, d in zip(params, originals, direction):
            p.copy_(w)
            p.grad = d
        self.base.step()
        return loss


class GSAM(SAM):
    """Surrogate-gap guided SAM: d = g' - alpha * g_perp (alpha = 0 is SAM)."""

    def __init__(self, base: torch.optim.Optimizer, *, rho: float = 0.01, alpha: float = 0.3,
                 adaptive: bool = False):
        super().__init__(base, rho=rho, adaptive=adaptive)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)

    def _direction(self, grad_w: list[torch.Tensor], grad_perturbed: list[torch.Tensor]) -> list[torch.Tensor]:
        inner = sum((g * gp).sum() for g, gp in zip(grad_w, grad_perturbed))
        norm_sq = sum((gp * gp).sum() for gp in grad_perturbed)
        along = inner / (norm_sq + _EPS)  # g's coefficient along g'
        return [gp - self.alpha * (g - along * gp) for g, gp in zip(grad_w, grad_perturbed)]


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def build_optimizer(params, *, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
                    rho: float = 0.01, gsam_alpha: float = 0.3, adaptive: bool = False) -> torch.optim.Optimizer:
    """SGD, or SAM/GSAM around SGD, by name ("sgd", "sam", "gsam")."""
    base = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return base
    if name == "sam":
        return SAM(base, rho=rho, adaptive=adaptive)
    if name == "gsam":
        return GSAM(base, rho=rho, alpha=gsam_alpha, adaptive=adaptive)
    raise ValueError(f"unknown optimizer {name!r}")
