"""Device selection (`--device auto|cpu|cuda[:i]`)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

from ddtool.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"Unknown device {name!r}: use auto, cpu, cuda or cuda:N.") from exc
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        raise ConfigError(f"Device {name!r} is not one ddtool runs on: use auto, cpu, cuda or cuda:N.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"Device {name!r} was asked for, but PyTorch sees no CUDA GPU on this machine. "
            "Use --device cpu (or auto)."
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"Device {name!r} was asked for, but this machine has {torch.cuda.device_count()} "
                          f"CUDA GPU(s), numbered from 0.")
    return device


@functools.cache
def _cpu_model() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def describe_hardware(device: torch.device) -> str:
    """What computed on `device`, for records: the GPU's name, or the CPU's model and the
    instruction set torch's kernels use. Both change the time taken and, by rounding, the
    numbers a seed gives (one compiled AlexNet run: 76.31 on one session's 2-core machine,
    75.53 and twice the time on another's with AVX2 only)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"
