"""Device selection (`--device auto|cpu|cuda[:i]`)."""

from __future__ import annotations

import torch

from ddtool.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {name!r} was asked for, but PyTorch sees no CUDA GPU on this machine. "
            "Use --device cpu (or auto)."
        )
    return device
