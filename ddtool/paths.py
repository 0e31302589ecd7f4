"""Where ddtool keeps what it computes once and reuses: experts, ZCA, baselines, teachers."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$DDTOOL_CACHE, else $XDG_CACHE_HOME/ddtool, else ~/.cache/ddtool (created on demand)."""
    root = os.environ.get("DDTOOL_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ddtool"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
