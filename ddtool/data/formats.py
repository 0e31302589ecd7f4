"""Readers of the file formats datasets ship in: IDX, CIFAR pickles, MATLAB files, images.

Each reader checks what it reads and raises FormatError naming the file, so that a truncated
download or a foreign file is reported as such instead of surfacing later as a shape error.
Readers return numpy arrays as stored; arranging them into (N, C, H, W) is the caller's job.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ddtool.errors import DDToolError, FormatError

# IDX magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    """The file's contents, gunzipped when it is gzip data (recognised by content, not name)."""
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == _GZIP_MAGIC else data
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise FormatError(f"{path} is corrupt or truncated ({exc}); download it again.") from exc


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST format), gzipped or not."""
    data = read_bytes(path)
    ndim = magic & 0xFF
    header_size = 4 + 4 * ndim
    if len(data) < header_size or struct.unpack(">I", data[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', data[:4])[0]:08X}" if len(data) >= 4 else "none"
        raise FormatError(
            f"{path} is not an IDX file of {ndim}-dimensional unsigned bytes "
            f"(magic number {found}, expected 0x{magic:08X})."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    body = memoryview(data)[header_size:]
    if len(body) != int(np.prod(shape)):
        raise FormatError(
            f"{path} is corrupt or truncated: its header promises {'x'.join(map(str, shape))} "
            f"values, it holds {len(body)}; download it again."
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, nothing else.

    CIFAR ships as pickles; refusing every other global means a foreign or malicious file
    cannot run code when it is read.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        # numpy 2 renamed numpy.core (which old pickles, CIFAR's included, name) to numpy._core.
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core"):]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_pickle_dict(path: Path, keys: Sequence[bytes]) -> dict[bytes, Any]:
    """A pickled dict with bytes keys (Python 2 pickles, as CIFAR's), checked for `keys`."""
    try:
        with path.open("rb") as f:
            record = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, LookupError, MemoryError) as exc:
        raise FormatError(f"{path} is not a readable CIFAR pickle ({exc}); download it again.") from exc
    missing = [key.decode() for key in keys if not isinstance(record, dict) or key not in record]
    if missing:
        raise FormatError(f"{path} is not the expected CIFAR file: it lacks {', '.join(missing)}.")
    return record


def read_mat(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """A MATLAB (v5) file, as SVHN ships; needs scipy, imported only when such a file is read."""
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError:
        raise DDToolError(
            f"{path} is a MATLAB file (SVHN's format); reading it needs scipy: pip install scipy"
        ) from None
    try:
        record = loadmat(path)
    except (MatReadError, ValueError, TypeError, IndexError, OSError, EOFError, NotImplementedError) as exc:
        raise FormatError(f"{path} is not a readable MATLAB file ({exc}); download it again.") from exc
    missing = [key for key in keys if key not in record]
    if missing:
        raise FormatError(f"{path} is not the expected MATLAB file: it lacks {', '.join(missing)}.")
    return record


# Modes whose pixels carry no colour; anything else is read as RGB.
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# 16-bit greyscale (PNG, TIFF) opens as one of these (older Pillow: "I", 32-bit integers);
# Pillow's conversion to RGB clips their values at 255 instead of rescaling, which would turn
# most of an image white.
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
# What a corrupt file makes Pillow raise besides OSError: broken PNG chunks raise SyntaxError,
# a damaged size header DecompressionBombError.
_UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except _UNREADABLE as exc:
        raise FormatError(f"{path} is not a readable image ({exc}).") from exc


def read_images(paths: Sequence[Path], size: int, desc: str) -> tuple[np.ndarray, bool]:
    """Decode images into uint8 (N, 3, size, size), and whether every one of them is grayscale.

    An image that is not square is centre-cropped to a square first; one of another size is
    resized (with antialiasing). Grayscale images are replicated into the three channels; the
    flag lets a caller keep one channel when the whole set is grayscale.
    """
    out = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    all_gray = True
    for i, path in enumerate(_progress(paths, desc)):
        try:
            with Image.open(path) as image:
                all_gray &= image.mode in _GRAY_MODES
                pixels = _square(_as_rgb(image, path), size)
        except _UNREADABLE as exc:
            raise FormatError(f"{path} is not a readable image ({exc}).") from exc
        out[i] = np.asarray(pixels).transpose(2, 0, 1)
    return out, all_gray


def _as_rgb(image: Image.Image, path: Path) -> Image.Image:
    """The image as 8-bit RGB. 16-bit greyscale is scaled by 255/65535 (full scale to full
    scale). A 32-bit integer image ("I") is read as 16-bit, unless its values all fit 8 bits
    (then as they are); values beyond 16 bits, and floating-point images, which have no agreed
    range, are refused."""
    if image.mode in _WIDE_INT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise FormatError(f"{path} holds integer pixels outside 0-65535; save the images as 8- or 16-bit PNG.")
        scale = 1.0 if image.mode == "I" and wide.max(initial=0) <= 255 else 255 / 65535
        eight_bit = np.clip(np.rint(wide * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(eight_bit, "L").convert("RGB")
    if image.mode == "F":
        raise FormatError(f"{path} holds floating-point pixels, whose range is unknown; save the images "
                          f"as 8- or 16-bit PNG.")
    return image.convert("RGB")


def _square(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return image if side == size else image.resize((size, size), Image.Resampling.BICUBIC)


def _progress(items: Sequence[Path], desc: str) -> Iterator[Path]:
    """A progress bar on a terminal (decoding a large folder takes minutes), silent otherwise."""
    return iter(tqdm(items, desc=desc, unit="img", disable=None, leave=False))
