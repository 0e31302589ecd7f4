"""Durations as people write and read them: "90s", "30m", "1h30m", "1.5h" in, "1h 05m" out."""

from __future__ import annotations

import re

from ddtool.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([smhd])")


def parse_duration(text: str | float | int) -> float:
    """Seconds in `text`: numbers each followed by a unit s, m, h or d ("45m", "1h30m",
    "1.5h", "90s"); a number without a unit counts as minutes. A number is taken as seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        compact = str(text).strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", compact):
            seconds = float(compact) * 60
        elif compact and _PART.sub("", compact) == "":
            seconds = sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(compact))
        else:
            raise ConfigError(f"Cannot read the duration {text!r}: write a number with a unit, e.g. 30m, 1h30m, "
                              "1.5h or 900s (a bare number counts as minutes).")
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ConfigError(f"A duration must be positive and finite, got {text!r}.")
    return seconds


def format_step(seconds: float) -> str:
    """One step's time for a plan: "0.13 s" (two digits) under ten seconds, else as format_duration."""
    return f"{seconds:.2g} s" if seconds < 10 else format_duration(seconds)


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h"
