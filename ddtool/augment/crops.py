"""The geometry of augmented views: random-resized-crop boxes, a differentiable crop-and-resize,
CutMix boxes. Each is drawn from an explicit generator as integer parameters, so a view can be
stored and replayed bit for bit: the knowledge-distillation evaluation stores them beside the
teacher's soft labels (ddtool.evaluation.kd), and SRe2L/CDA's recover step optimises images
through the crop (ddtool.methods.curriculum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Aspect ratios and attempts of a random-resized crop, as in torchvision's RandomResizedCrop.
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10

def random_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              generator: torch.Generator, ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """int64 (n, 4) boxes (top, left, height, width) of random-resized crops.

    As torchvision's RandomResizedCrop, vectorised: per image, up to CROP_ATTEMPTS candidates
    of area fraction U(scale) and log-uniform aspect ratio; the first that fits is taken, else
    the largest centred crop within the ratio bounds (the whole image for square images).
    Always draws the same amount of randomness, so a generator's stream does not depend on
    which candidates fit.
    """
    u = torch.rand(n, CROP_ATTEMPTS, 4, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w >= 1) & (h >= 1) & (w <= width) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    first = fits.to(torch.int8).argmax(dim=1, keepdim=True)  # argmax returns the first fitting attempt
    boxes = torch.stack([t.gather(1, first).squeeze(1) for t in (top, left, h, w)], dim=1)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float64)
    boxes = torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)
    return boxes.to(torch.int64)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each image of x (N, C, H, W) to its box (top, left, height, width) and resize it
    back to H x W (bilinear, pixel centres as F.interpolate with align_corners=False), mirrored
    where `flip` is true. Differentiable in x (the recover step optimises through it)."""
    n, _, height, width = x.shape
    top, left, h, w = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    scale_x, scale_y = w / width, h / height
    if flip is not None:
        scale_x = torch.where(flip.to(x.device), -scale_x, scale_x)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = scale_x
    theta[:, 0, 2] = (2 * left + w) / width - 1  # box centre in [-1, 1] coordinates
    theta[:, 1, 1] = scale_y
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Near the box's edges the sampling points fall up to half a pixel outside it; clamp them to
    # the box's outer pixel centres, so the result is that of cutting the box out, then resizing.
    grid_x = grid[..., 0].clamp(((2 * left + 1) / width - 1)[:, None, None],
                                ((2 * (left + w) - 1) / width - 1)[:, None, None])
    grid_y = grid[..., 1].clamp(((2 * top + 1) / height - 1)[:, None, None],
                                ((2 * (top + h) - 1) / height - 1)[:, None, None])
    return F.grid_sample(x, torch.stack([grid_x, grid_y], dim=-1), mode="bilinear", padding_mode="border",
                         align_corners=False)


def cutmix_boxes(n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """int64 (n, 4) CutMix boxes (top, left, bottom, right): mixing ratio lambda ~ Beta(1, 1),
    a box of area about (1 - lambda) centred at a uniform pixel, clipped by the border."""
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    cut = torch.sqrt(1.0 - u[:, 0])
    half_h = torch.floor(height * cut).to(torch.int64) // 2
    half_w = torch.floor(width * cut).to(torch.int64) // 2
    cy = torch.floor(u[:, 1] * height).to(torch.int64)
    cx = torch.floor(u[:, 2] * width).to(torch.int64)
    return torch.stack([(cy - half_h).clamp(0, height), (cx - half_w).clamp(0, width),
                        (cy + half_h).clamp(0, height), (cx + half_w).clamp(0, width)], dim=1)
