"""A flat-parameter (functional) view of any network.

Experts are stored, and the matching engine unrolls, as one flat vector θ per network. A
ParamLayout records how that vector maps onto the module's parameters (names, shapes, in
`named_parameters()` order) and runs the module with θ substituted via
`torch.func.functional_call`, so autograd (and vmap) flow from θ to the logits.

Buffers (BatchNorm running statistics) are not part of θ. `functional_forward` passes private
copies of them, so the module's own buffers are never changed by a functional forward. In
training mode BatchNorm normalises with the *batch* statistics, which is what the matching
engine relies on; running statistics only matter in eval mode, where the module's current
values are used as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call


@dataclass(frozen=True)
class ParamLayout:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    numels: tuple[int, ...] = field(init=False)
    offsets: tuple[int, ...] = field(init=False)  # start of each parameter in the flat vector
    total: int = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        shapes = tuple(tuple(int(d) for d in s) for s in self.shapes)
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} parameter names but {len(shapes)} shapes")
        numels = tuple(math.prod(s) for s in shapes)
        offsets, running = [], 0
        for n in numels:
            offsets.append(running)
            running += n
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "shapes", shapes)
        object.__setattr__(self, "numels", numels)
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "total", running)

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamLayout":
        named = list(module.named_parameters())
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    def to_dict(self) -> dict[str, list]:
        """Plain lists, for manifests (JSON / HDF5 attributes)."""
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: dict) -> "ParamLayout":
        return cls(tuple(d["names"]), tuple(tuple(s) for s in d["shapes"]))

    def check(self, module: nn.Module) -> None:
        """ValueError if `module`'s parameters do not have exactly this layout."""
        other = ParamLayout.from_module(module)
        if other != self:
            diff = next((f"{a}{list(sa)} vs {b}{list(sb)}"
                         for a, sa, b, sb in zip(self.names, self.shapes, other.names, other.shapes)
                         if (a, sa) != (b, sb)), f"{len(self.names)} vs {len(other.names)} tensors")
            raise ValueError(f"parameter layout mismatch: {diff}")

    def flatten(self, module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A detached copy of the parameters as one vector (the parameters' dtype by default)."""
        self.check(module)
        parts = [p.detach().reshape(-1) for p in module.parameters()]
        flat = torch.cat(parts)  # cat always allocates: never aliases the module
        return flat if dtype is None else flat.to(dtype)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """name -> view into `flat` (narrow + view: no copy, gradients flow back into `flat`)."""
        if flat.dim() != 1 or flat.shape[0] != self.total:
            raise ValueError(f"expected a flat vector of {self.total} values, got shape {tuple(flat.shape)}")
        return {
            name: flat.narrow(0, offset, numel).view(shape)
            for name, shape, offset, numel in zip(self.names, self.shapes, self.offsets, self.numels)
        }

    def load_(self, module: nn.Module, flat: torch.Tensor) -> nn.Module:
        """Copy `flat` into the module's parameters in place (converted to their dtype/device)."""
        self.check(module)
        with torch.no_grad():
            for p, value in zip(module.parameters(), self.unflatten(flat.detach()).values()):
                p.copy_(value)
        return module

    def functional_forward(self, module: nn.Module, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """module(x) with the parameters taken from `flat` (differentiable in flat and x).

        Works in any floating dtype (floating buffers are cast to flat's dtype). Under
        `torch.vmap` over `flat`, networks without BatchNorm work as they are; BatchNorm in
        training mode updates its (unbatched) running-statistics copies in place, which vmap
        refuses: use eval mode or norm != "batch" there.
        """
        buffers = {
            name: b.detach().to(dtype=flat.dtype, copy=True) if b.is_floating_point() else b.detach().clone()
            for name, b in module.named_buffers()
        }
        return functional_call(module, (self.unflatten(flat), buffers), (x,), strict=True)
