"""Pictures of a set: the PNG grid `ddtool show` draws (a row of tiles per class, its name
beside it), and the PNG writers the imagefolder export shares."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import torch
from PIL import Image

from ddtool.errors import ConfigError
from ddtool.files import atomic_path
from ddtool.storage.synthetic_set import SyntheticSet

# Grid picture: pixels between tiles, and the value (white) of padding and empty tiles.
GRID_PADDING = 2
_GRID_BACKGROUND = 1.0

PathLike = str | os.PathLike


def save_grid_png(sset: SyntheticSet, path: PathLike, max_per_class: int = 10, *, scale: int = 1,
                  class_names: bool = False) -> Path:
    """One PNG with a row per class showing its first `max_per_class` images (by hard label,
    the argmax for soft labels), un-whitened and de-normalised with Preprocessing.invert
    (clamped, not rescaled per image, so colours are what the network sees).

    Size: height = K * (H + p) + p, width = cols * (W + p) + p, with p = GRID_PADDING and
    cols = min(max_per_class, the largest class count); short rows are padded with white.
    Grayscale for 1-channel images, RGB for 3. `scale` enlarges every pixel to scale x scale
    (nearest neighbour, so small images stay sharp); `class_names` adds a column at the left
    with each row's class name.
    """
    if max_per_class < 1:
        raise ConfigError(f"max_per_class must be at least 1, not {max_per_class}.")
    if scale < 1:
        raise ConfigError(f"scale must be at least 1, not {scale}.")
    labels = sset.hard_labels().cpu()
    per_class = [torch.nonzero(labels == c).flatten()[:max_per_class] for c in range(sset.num_classes)]
    cols = max(1, max(len(indices) for indices in per_class))
    channels, height, width = sset.image_shape
    pad = GRID_PADDING
    canvas = torch.full((channels, sset.num_classes * (height + pad) + pad, cols * (width + pad) + pad),
                        _GRID_BACKGROUND)
    for row, indices in enumerate(per_class):
        if len(indices) == 0:
            continue
        pixels = sset.preprocessing.invert(sset.images[indices].detach().cpu())
        top = pad + row * (height + pad)
        for col, image in enumerate(pixels):
            left = pad + col * (width + pad)
            canvas[:, top:top + height, left:left + width] = image
    picture = to_pil(canvas)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    if class_names:
        picture = _with_row_names(picture, sset.classes, (height + pad) * scale, pad * scale)
    path = Path(path)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return path


def auto_grid_scale(image_size: int, at_least: int = 64) -> int:
    """The whole-number enlargement that shows `image_size`-px images at `at_least` px or more."""
    return max(1, -(-at_least // image_size))


def _with_row_names(picture: Image.Image, names: list[str], row_height: int, pad: int) -> Image.Image:
    """`picture` with a white column at its left holding each row's name, centred on the row."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = ImageDraw.Draw(picture)
    boxes = [measure.textbbox((0, 0), name, font=font) for name in names]
    margin = max(box[2] - box[0] for box in boxes) + 2 * max(pad, 4)
    white = 255 if picture.mode == "L" else (255,) * len(picture.mode)
    named = Image.new(picture.mode, (picture.width + margin, picture.height), white)
    named.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(named)
    black = 0 if picture.mode == "L" else (0, 0, 0) + ((255,) if picture.mode == "RGBA" else ())
    for row, (name, box) in enumerate(zip(names, boxes)):
        middle = pad + row * row_height + (row_height - pad) // 2
        draw.text((max(pad, 4) - box[0], middle - (box[1] + box[3]) // 2), name, fill=black, font=font)
    return named


def write_png16(path: Path, image: torch.Tensor) -> None:
    """A (C, H, W) tensor of [0, 1] values as a 16-bit PNG (gray, RGB or RGBA; PIL writes 16 bits
    for gray only): the PNG format's own chunks, every row unfiltered."""
    channels, height, width = image.shape
    if channels not in (1, 3, 4):
        raise ConfigError(f"Images with {channels} channels cannot be written as PNG (1, 3 or 4 needed).")
    values = (image.clamp(0, 1) * 65535).round().to(torch.int32).permute(1, 2, 0).numpy().astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in values)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    colour = {1: 0, 3: 2, 4: 6}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def to_pil(image: torch.Tensor) -> Image.Image:
    """A (C, H, W) tensor of [0, 1] pixels as an 8-bit PIL image (L, RGB or RGBA)."""
    if image.shape[0] not in (1, 3, 4):
        raise ConfigError(f"Images with {image.shape[0]} channels cannot be written as PNG (1, 3 or 4 needed).")
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if image.shape[0] == 1 else array)  # mode from the shape
