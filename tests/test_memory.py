"""ddtool.memory: a command's tensors reuse freed heap memory instead of fresh mappings."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys, torch
from ddtool.memory import keep_freed_memory, keeping_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keeping_freed_memory()
else:
    assert not keeping_freed_memory()
before = libc.mallinfo2().hblkhd  # bytes held in mappings of their own
block = torch.empty(64 * 2**20 // 4)  # 64 MiB: far above malloc's mmap threshold
print(libc.mallinfo2().hblkhd - before)
"""


def _mapped_bytes(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_large_tensors_come_from_the_heap_once_kept():
    try:
        plain = _mapped_bytes("plain")
    except AssertionError as exc:
        if "mallinfo2" in str(exc):
            pytest.skip("not glibc 2.33 or later")
        raise
    assert plain >= 64 * 2**20  # by default a large tensor is a mapping of its own, unmapped when freed
    assert _mapped_bytes("keep") == 0
