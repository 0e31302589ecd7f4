"""DSA: differentiable Siamese augmentation with explicit, replayable parameters.

Each call picks ONE family uniformly at random, then draws per-sample parameters for it:

    color   brightness  x + b,                    b ~ U(-brightness, brightness)
            saturation  mean_c + (x - mean_c)·s,  s ~ U(0, saturation)   (mean over channels)
            contrast    mean + (x - mean)·c,      c ~ U(1-contrast, 1+contrast) (mean over C,H,W)
            applied in that order
    crop    integer translation by (dy, dx), |d| <= round(crop·size), zero fill
    cutout  a zeroed square of side round(cutout·size) centred anywhere in the image (clipped
            at the border, as in the published DSA)
    flip    horizontal flip with probability 1/2 (never drawn when DSAConfig.flip is False)
    scale   x and y stretched by factors in [1/scale, scale] (affine grid, bilinear, zero fill)
    rotate  angle ~ U(-rotate, rotate) degrees (affine grid, bilinear, zero fill)

The draw (`DSA.sample`) is separate from the application (`DSA.apply`): the parameters are
a small AugParams record, so a step can be replayed exactly (the same params give bitwise the
same output on CPU), stored in checkpoints, or applied to two batches ("Siamese"). Sampling
happens on CPU from a torch.Generator; the params are then moved to the images' device, so CPU
and CUDA runs draw the same numbers. `apply` is vectorised (no per-sample Python loop) and
differentiable in x. Zero fill means zero in network space, i.e. the dataset mean colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F

from ddtool.errors import ConfigError, FormatError

FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
NONE = "none"  # the family of AugParams that leave images unchanged


@dataclass(frozen=True)
class DSAConfig:
    families: tuple[str, ...] = FAMILIES  # empty: augmentation off
    flip: bool = True  # False for digit datasets: the "flip" family is then never drawn
    brightness: float = 0.5
    saturation: float = 2.0
    contrast: float = 0.5
    crop: float = 0.125
    cutout: float = 0.5
    scale: float = 1.2
    rotate: float = 15.0  # degrees

    def __post_init__(self) -> None:
        families = (self.families,) if isinstance(self.families, str) else tuple(self.families)
        object.__setattr__(self, "families", families)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ConfigError(f"Unknown DSA families {unknown}; choose from {', '.join(FAMILIES)}.")
        if len(set(families)) != len(families):
            raise ConfigError(f"DSA families listed twice: {list(families)}.")
        if families and not self.active_families:
            raise ConfigError("DSA families are only 'flip', but flipping is off for this dataset; "
                              "add other families or turn augmentation off (families=()).")
        checks = {
            "brightness": self.brightness >= 0,
            "saturation": self.saturation >= 0,
            "contrast": 0 <= self.contrast <= 1,
            "crop": 0 <= self.crop < 0.5,
            "cutout": 0 <= self.cutout <= 1,
            "scale": self.scale >= 1,
            "rotate": 0 <= self.rotate <= 180,
        }
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"Invalid DSA settings {', '.join(bad)}: need brightness >= 0, saturation >= 0, "
                "0 <= contrast <= 1, 0 <= crop < 0.5, 0 <= cutout <= 1, scale >= 1, 0 <= rotate <= 180."
            )

    @property
    def active_families(self) -> tuple[str, ...]:
        """The families a call may draw from (flip removed when flipping is off)."""
        return tuple(f for f in self.families if self.flip or f != "flip")

    @property
    def enabled(self) -> bool:
        return bool(self.active_families)

    def to_dict(self) -> dict:
        """Plain values (families as a list), for manifests."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["families"] = list(self.families)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DSAConfig":
        d = dict(d)
        if "families" in d:
            d["families"] = tuple(d["families"])
        return cls(**d)


@dataclass(frozen=True, eq=False)
class AugParams:
    """One call's augmentation: the family and per-sample values (CPU tensors unless moved).

    values by family: color {brightness, saturation, contrast} float (N,); crop {shift_y, shift_x}
    int64 (N,); cutout {center_y, center_x} int64 (N,) and size int64 (2,) = (height, width);
    flip {flip} bool (N,); scale {scale_y, scale_x} float (N,); rotate {angle} float (N,) radians.
    """

    family: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES + (NONE,):
            raise ValueError(f"unknown augmentation family {self.family!r}")

    @classmethod
    def none(cls) -> "AugParams":
        return cls(NONE)

    @property
    def n(self) -> int | None:
        """Batch size these params are for (None for the identity)."""
        per_sample = [v for k, v in self.values.items() if k != "size"]
        return int(per_sample[0].shape[0]) if per_sample else None

    def to(self, device: torch.device | str) -> "AugParams":
        return AugParams(self.family, {k: v.to(device) for k, v in self.values.items()})

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays only (family as a 0-d bytes array), e.g. for an HDF5 group."""
        out = {"family": np.array(self.family.encode())}
        out.update({k: v.detach().cpu().numpy() for k, v in self.values.items()})
        return out

    @classmethod
    def from_arrays(cls, d: dict) -> "AugParams":
        family = d["family"]
        family = family.item() if isinstance(family, np.ndarray) else family
        family = family.decode() if isinstance(family, bytes) else str(family)
        values = {k: torch.from_numpy(np.array(v)) for k, v in d.items() if k != "family"}
        try:
            return cls(family, values)
        except ValueError as exc:
            raise FormatError(f"Stored augmentation parameters are not readable: {exc}.") from None


class DSA:
    """Sample and apply DSA augmentations; `DSA.identity()` (or families=()) turns it off."""

    def __init__(self, config: DSAConfig | None = None):
        self.config = config if config is not None else DSAConfig()

    @classmethod
    def identity(cls) -> "DSA":
        return cls(DSAConfig(families=()))

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def __repr__(self) -> str:
        return f"DSA({self.config})"

    # ---------------------------------------------------------------- sampling (CPU)
    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> AugParams:
        """Draw one family and its per-sample parameters for a batch of n height x width images."""
        families = self.config.active_families
        if not families:
            return AugParams.none()
        family = families[int(torch.randint(len(families), (1,), generator=generator))]
        return AugParams(family, getattr(self, f"_sample_{family}")(n, height, width, generator))

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float32)

    def _sample_color(self, n, height, width, g):
        c = self.config
        return {
            "brightness": self._uniform(n, -c.brightness, c.brightness, g),
            "saturation": self._uniform(n, 0.0, c.saturation, g),
            "contrast": self._uniform(n, 1.0 - c.contrast, 1.0 + c.contrast, g),
        }

    def _sample_crop(self, n, height, width, g):
        max_y, max_x = (int(self.config.crop * s + 0.5) for s in (height, width))
        return {
            "shift_y": torch.randint(-max_y, max_y + 1, (n,), generator=g),
            "shift_x": torch.randint(-max_x, max_x + 1, (n,), generator=g),
        }

    def _sample_cutout(self, n, height, width, g):
        size_y, size_x = (int(self.config.cutout * s + 0.5) for s in (height, width))
        # Centre range as in the published DSA: 0..size for even sides, 0..size-1 for odd ones.
        return {
            "center_y": torch.randint(0, height + 1 - size_y % 2, (n,), generator=g),
            "center_x": torch.randint(0, width + 1 - size_x % 2, (n,), generator=g),
            "size": torch.tensor([size_y, size_x], dtype=torch.int64),
        }

    def _sample_flip(self, n, height, width, g):
        return {"flip": torch.rand(n, generator=g, dtype=torch.float32) < 0.5}

    def _sample_scale(self, n, height, width, g):
        low, high = 1.0 / self.config.scale, self.config.scale
        return {"scale_y": self._uniform(n, low, high, g), "scale_x": self._uniform(n, low, high, g)}

    def _sample_rotate(self, n, height, width, g):
        limit = math.radians(self.config.rotate)
        return {"angle": self._uniform(n, -limit, limit, g)}

    # ---------------------------------------------------------------- application (any device)
    def apply(self, x: torch.Tensor, params: AugParams | None) -> torch.Tensor:
        """Augment (N, C, H, W) images with `params` (None or family "none": unchanged)."""
        if params is None or params.family == NONE:
            return x
        if params.n != x.shape[0]:
            raise ValueError(f"augmentation params are for {params.n} images, got a batch of {x.shape[0]}")
        values = {k: v.to(x.device) for k, v in params.values.items()}
        return _APPLY[params.family](x, values)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(x.shape[0], x.shape[2], x.shape[3], generator))


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1) in x's dtype, to broadcast over an image batch."""
    return v.to(x.dtype).view(-1, 1, 1, 1)


def _apply_color(x, v):
    x = x + _per_sample(v["brightness"], x)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * _per_sample(v["saturation"], x) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(v["contrast"], x) + mean


def _apply_crop(x, v):
    # out[i, j] = x[i + dy, j + dx], zero where that falls outside. Out-of-range indices are
    # clamped into a one-pixel zero border, so any shift needs only that border.
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device) + v["shift_y"].view(-1, 1) + 1).clamp(0, h + 1)  # (N, H)
    cols = (torch.arange(w, device=x.device) + v["shift_x"].view(-1, 1) + 1).clamp(0, w + 1)  # (N, W)
    batch = torch.arange(n, device=x.device).view(-1, 1, 1)
    # Advanced indices around a slice: the result is (N, H, W, C). Copied back to NCHW: a
    # channels-last batch (with one channel, even one that passes is_contiguous) makes the
    # convolutions answer channels-last and the norms and pooling take their slower paths.
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format)


def _apply_cutout(x, v):
    # Tensor arithmetic only (no .item()), so a CUDA batch needs no host round trip.
    _, _, h, w = x.shape
    size_y, size_x = v["size"][0], v["size"][1]
    top = v["center_y"].view(-1, 1) - size_y // 2
    left = v["center_x"].view(-1, 1) - size_x // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + size_y)  # (N, H)
    in_cols = (cols >= left) & (cols < left + size_x)  # (N, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep.unsqueeze(1).to(x.dtype)


def _apply_flip(x, v):
    return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x, theta):
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _apply_scale(x, v):
    sy, sx = v["scale_y"].to(x.dtype), v["scale_x"].to(x.dtype)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
    return _affine(x, theta)


def _apply_rotate(x, v):
    angle = v["angle"].to(x.dtype)
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    return _affine(x, theta)


_APPLY = {
    "color": _apply_color,
    "crop": _apply_crop,
    "cutout": _apply_cutout,
    "flip": _apply_flip,
    "scale": _apply_scale,
    "rotate": _apply_rotate,
}
