"""Explicit randomness: every random choice in ddtool draws from a generator made here.

No global seeding, no wall-clock seeds. Derived seeds are a pure function of a base seed and
a tuple of names/indices, so that (for example) expert 7 gets the same stream whether it is
trained alone, in a shard, or after a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def derive_seed(seed: int, *path: object) -> int:
    """A 63-bit seed determined by `seed` and the labels in `path`."""
    text = repr((int(seed),) + tuple(path)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, *path: object) -> torch.Generator:
    """A CPU generator seeded by derive_seed; sample on CPU, then move to the device,
    so that CPU and CUDA runs draw the same numbers."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *path))
    return g


def fork_rng_seed(gen: torch.Generator) -> int:
    """Draw a fresh seed from a generator (to seed a child generator or a torch.manual_seed scope)."""
    return int(torch.randint(0, 2**62, (1,), generator=gen).item())


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block (typically network construction) under torch.manual_seed(seed) without
    touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
