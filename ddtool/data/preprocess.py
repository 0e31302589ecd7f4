"""From stored pixels to the space the networks see, and back.

Network space = per-channel mean/std normalisation, or, in its place, ZCA whitening fitted on
the training images' [0, 1] pixels, as in the MTT family (stored as mean 0, std 1 followed by
the ZCA, so that one record describes both). The inverse is needed to look at synthetic
images and to export them as pictures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ddtool.errors import FormatError

# What ddtool fits its ZCA on, named in the fingerprints of what a whitened space made (experts,
# distillation runs): until 2026-12 it fitted it on mean/std-normalised images.
ZCA_FITTED_ON = "pixels"


@dataclass(frozen=True, eq=False)
class ZCA:
    """x_white = (x - mean) @ matrix, on images flattened to D = C*H*W values.

    matrix = U diag(1/sqrt(s + eps)) U^T for the eigen-decomposition U diag(s) U^T of the
    training covariance; the eps regulariser keeps noise directions from being blown up.
    """

    mean: torch.Tensor  # (D,)
    matrix: torch.Tensor  # (D, D), symmetric
    inverse: torch.Tensor  # (D, D)
    eps: float

    @classmethod
    def fit(cls, x: torch.Tensor, eps: float = 0.1, chunk_size: int = 8192) -> "ZCA":
        # Statistics in float64, accumulated chunk by chunk, so that no float64 copy of the
        # whole training set (CIFAR-10: 1.2 GB) is ever made.
        flat = x.reshape(x.shape[0], -1)
        chunks = flat.split(chunk_size)
        mean = sum(chunk.to(torch.float64).sum(dim=0) for chunk in chunks) / flat.shape[0]
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        for chunk in chunks:
            centred = chunk.to(torch.float64) - mean
            cov.addmm_(centred.T, centred)
        cov /= flat.shape[0] - 1
        eigvals, eigvecs = torch.linalg.eigh(cov)
        eigvals = eigvals.clamp_min(0.0)
        matrix = (eigvecs * (eigvals + eps).rsqrt()) @ eigvecs.T
        inverse = (eigvecs * (eigvals + eps).sqrt()) @ eigvecs.T
        return cls(mean.float(), matrix.float(), inverse.float(), float(eps))

    def to(self, device: torch.device | str) -> "ZCA":
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse.to(device), self.eps)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        mean, matrix = self.mean.to(flat), self.matrix.to(flat)
        return ((flat - mean) @ matrix).reshape(x.shape)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        mean, inverse = self.mean.to(flat), self.inverse.to(flat)
        return (flat @ inverse + mean).reshape(x.shape)


@dataclass(frozen=True, eq=False)
class Preprocessing:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    zca: ZCA | None = None

    @classmethod
    def identity(cls, channels: int) -> "Preprocessing":
        """[0, 1] pixels as they are: the normalisation step of a ZCA-whitened space."""
        return cls((0.0,) * channels, (1.0,) * channels)

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return mean, std

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels (N, C, H, W) -> network space."""
        mean, std = self._stats(pixels)
        x = (pixels - mean) / std
        return self.zca.apply(x) if self.zca is not None else x

    def invert(self, x: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Network space -> pixels, clamped to [0, 1] unless `clamp` is False (synthetic images
        may leave the range)."""
        if self.zca is not None:
            x = self.zca.invert(x)
        mean, std = self._stats(x)
        pixels = x * std + mean
        return pixels.clamp(0.0, 1.0) if clamp else pixels

    def describe(self) -> str:
        base = f"mean/std normalisation (mean={_fmt(self.mean)}, std={_fmt(self.std)})"
        if self.zca is None:
            return base
        if all(m == 0 for m in self.mean) and all(s == 1 for s in self.std):
            return f"ZCA whitening of [0, 1] pixels (eps={self.zca.eps:g})"
        return base + f" + ZCA whitening (eps={self.zca.eps:g})"  # sets made before ddtool whitened pixels

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for storage (HDF5 datasets/attributes, npz)."""
        out = {"mean": np.asarray(self.mean, np.float64), "std": np.asarray(self.std, np.float64)}
        if self.zca is not None:
            out["zca_eps"] = np.float64(self.zca.eps)
            out["zca_mean"] = self.zca.mean.cpu().numpy()
            out["zca_matrix"] = self.zca.matrix.cpu().numpy()
            out["zca_inverse"] = self.zca.inverse.cpu().numpy()
        return out

    @classmethod
    def from_arrays(cls, arrays: dict) -> "Preprocessing":
        try:
            mean = tuple(float(v) for v in np.asarray(arrays["mean"]).ravel())
            std = tuple(float(v) for v in np.asarray(arrays["std"]).ravel())
        except KeyError as exc:
            raise FormatError(f"Preprocessing record lacks {exc.args[0]!r}.") from None
        if len(mean) != len(std) or not all(math.isfinite(m) for m in mean) or not all(
                0 < s < math.inf for s in std):
            raise FormatError(f"Preprocessing record has inconsistent mean/std: mean {mean}, std {std}.")
        zca = None
        if "zca_matrix" in arrays:
            try:
                zca = ZCA(
                    mean=torch.as_tensor(np.asarray(arrays["zca_mean"]), dtype=torch.float32),
                    matrix=torch.as_tensor(np.asarray(arrays["zca_matrix"]), dtype=torch.float32),
                    inverse=torch.as_tensor(np.asarray(arrays["zca_inverse"]), dtype=torch.float32),
                    eps=float(np.asarray(arrays["zca_eps"])),
                )
            except KeyError as exc:
                raise FormatError(f"Preprocessing record has a ZCA matrix but lacks {exc.args[0]!r}.") from None
            except (TypeError, ValueError) as exc:
                raise FormatError(f"Preprocessing record has an unreadable ZCA ({exc}).") from None
            dim = zca.mean.numel()
            if (zca.mean.shape != (dim,) or zca.matrix.shape != (dim, dim) or zca.inverse.shape != (dim, dim)
                    or not 0 < zca.eps < math.inf):
                raise FormatError(
                    f"Preprocessing record has an inconsistent ZCA: mean {tuple(zca.mean.shape)}, matrix "
                    f"{tuple(zca.matrix.shape)}, inverse {tuple(zca.inverse.shape)}, eps {zca.eps}.")
            if not all(bool(t.isfinite().all()) for t in (zca.mean, zca.matrix, zca.inverse)):
                raise FormatError("Preprocessing record has a ZCA with NaN or infinite values.")
        return cls(mean, std, zca)


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
