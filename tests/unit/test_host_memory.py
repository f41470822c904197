"""afd.host_memory: a CPU node keeps freed heap memory for the next step instead of faulting it in again."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from afd import host_memory

REPO = Path(__file__).resolve().parents[2]

# In a fresh interpreter, thresholds set (or not) before any large block: does the first 20 MiB block get its own
# mmap (glibc starts at 128 KiB), and once three such blocks are freed, does the heap keep them (the trim threshold;
# setting only the mmap one would leave glibc's fixed 128 KiB trim and hand them back)? glibc's mallinfo2 counts
# mmapped bytes (hblkhd) and the free bytes the heap holds (fordblks).
PROBE = """
import ctypes, sys
from afd import host_memory
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                               "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
applied = host_memory.retain_freed_memory(sys.argv[1])
before = libc.mallinfo2().hblkhd
first = libc.malloc(20 << 20)
mapped = libc.mallinfo2().hblkhd - before >= 20 << 20
libc.free(first)
blocks = [libc.malloc(20 << 20) for _ in range(3)]
for block in reversed(blocks):  # the top of the heap first: each free could trim it
    libc.free(block)
kept = libc.mallinfo2().fordblks >= 60 << 20  # free bytes still in the heap
print(applied, mapped, kept, host_memory.describe())
"""


def _probe(device: str, **env: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, device],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return result.stdout.split(maxsplit=3)


@pytest.fixture(scope="module")
def glibc() -> None:
    if host_memory._glibc() is None:
        pytest.skip("the heap thresholds are glibc's; this C library is another")


def test_a_cpu_node_serves_large_blocks_from_the_heap_and_keeps_them(glibc) -> None:
    applied, mapped, kept, described = _probe("cpu")
    assert (applied, mapped, kept) == ("True", "False", "True")
    assert described.startswith("retained (glibc mmap from 32 MiB")


def test_the_defaults_stay_when_asked_or_off_the_cpu(glibc) -> None:
    for defaults in (_probe("cpu", AFD_HOST_MALLOC="default"), _probe("meta")):
        assert defaults[:2] == ["False", "True"]  # not applied, and the first large block got its own mmap
        assert defaults[3].strip() == "allocator defaults"
