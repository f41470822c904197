"""The C heap of a node that computes on the CPU: freed activation memory is kept for the next step.

Why: a CPU prefill step allocates and frees tens of MB of activations per layer (projections, attention,
norms). glibc's malloc serves a block above its mmap threshold (128 KiB at start, then whatever was freed last,
at most 32 MiB) with a fresh mmap, and gives the top of the heap back to the kernel once more than twice that
threshold is free there, so each step faulted its pages in again. On a 2-vCPU AMD EPYC (avx512_bf16),
`python -m benchmarks.engine_ab --base-env AFD_HOST_MALLOC=default --ffn-shards 1 --batch 8 32` gave the 32 x
32-token prefill step of the `afd bench engine` checkpoint 268 ms (median) with the thresholds below against 305
with glibc's defaults (8 x 32 tokens: 105 against 98, within the spread), decode 1.04x at batch 32.
Applied once the weights are in memory: set at process start (the same values through MALLOC_MMAP_THRESHOLD_ /
MALLOC_TRIM_THRESHOLD_), which loads the weights under 32 MiB onto the heap too, decode at batch 32 took 31.9-46.6
ms per step against 30.2-33.5 in the same hour (an ad-hoc timing; which allocation slowed it was not measured).

`AFD_HOST_MALLOC=default` leaves glibc's own thresholds. Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

log = logging.getLogger(__name__)

ENV = "AFD_HOST_MALLOC"
M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
"""Blocks from this size on still get their own mmap (glibc's largest dynamic threshold): KV caches, weights."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the heap top kept for reuse before the rest goes back to the kernel."""

_applied = False


def retain_freed_memory(device: torch.device | str = "cpu") -> bool:
    """Set the thresholds above for this process where `device` is the CPU and the C library is glibc; calls after
    the first that set them change nothing. Returns whether they are in effect."""
    global _applied
    if torch.device(device).type != "cpu" or os.environ.get(ENV, "").strip().lower() == "default":
        return _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        return False
    mmap_set = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not (mmap_set and trim_set):
        log.warning("glibc refused a heap threshold (mmap one set: %s, trim one set: %s)", mmap_set, trim_set)
        return False
    _applied = True
    return True


def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the process's own symbols: the C library it runs on
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def describe() -> str:
    """What this process's heap does with freed memory, for benchmark reports."""
    if _applied:
        mmap_mib, trim_mib = MMAP_THRESHOLD_BYTES >> 20, TRIM_THRESHOLD_BYTES >> 20
        return f"retained (glibc mmap from {mmap_mib} MiB, trim above {trim_mib} MiB)"
    return "allocator defaults"
