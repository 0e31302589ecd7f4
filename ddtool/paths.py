"""Where ddtool keeps what it computes once and reuses: experts, ZCA, baselines, teachers,
run checkpoints. One root for all of them: $DDTOOL_CACHE, else $XDG_CACHE_HOME/ddtool, else
~/.cache/ddtool."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def user_cache_root() -> Path:
    """$XDG_CACHE_HOME/ddtool (~/.cache/ddtool): also where datasets are looked for."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ddtool"


def cache_root() -> Path:
    env = os.environ.get("DDTOOL_CACHE")
    return Path(env).expanduser() if env else user_cache_root()


def key_digest(key: dict) -> str:
    """A short name for a cache entry identified by `key` (JSON values). Entries store their
    key too, and check it on reading: 16 hex digits name files, they do not prove a match."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(*parts: str) -> Path:
    """A folder under the cache root, created on demand."""
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
