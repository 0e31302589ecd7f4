"""Process-wide memory behaviour that the command line sets for its long computations.

glibc's malloc hands blocks above its mmap threshold (128 KiB, adapting up to 32 MiB) to the
kernel as fresh mappings and unmaps them when freed, so every first touch of each 4 KiB page
of the next block is a page fault the kernel serves with a zeroed page. Unrolling a network
allocates and frees activations of several MiB thousands of times an iteration (a ConvNet's
first layer at IPC 10 is 13 MiB at width 32): on a 2-core machine that was a tenth of the
distillation's time in the kernel, and bptt's outer iteration ran 1.5x slower (one thread,
width 32, N = 10). Kept in the heap instead, freed blocks are reused warm.

The cost: a process keeps the memory of its peak until it exits (nothing is handed back to
the system between phases). Right for a command that distils or trains and exits; a library
user decides for their own process, so `import ddtool` changes nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_keeping = False


def keeping_freed_memory() -> bool:
    """Whether keep_freed_memory took effect in this process (worker processes follow it)."""
    return _keeping


def keep_freed_memory() -> bool:
    """Serve every allocation from malloc's heap and never trim it, so freed tensors' memory is
    reused without page faults. True where this took effect (glibc); False elsewhere, changing
    nothing. Idempotent; affects allocations made from now on."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        # gnu_get_libc_version exists only in glibc: musl and others have other allocators
        libc.gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    global _keeping
    _keeping = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _keeping
