"""Host memory: keep freed heap memory mapped, so XLA:CPU's per-call temporaries are not faulted in afresh.

XLA:CPU allocates each compiled call's temporaries (the learn phase's activations for its backward: about 1.1 GiB
in scripts/bench_step.py) with malloc and frees them when the call ends. glibc serves an allocation that large
with a fresh mmap and unmaps it on free, so every step pays one minor page fault per 4 KiB page: the kernel zeroes
~280,000 pages, 1-1.6 s of system time per bench_step round on a 2-core host, and more where neighbours load the
memory bus. That cost is what made our step slow down far more than TRL's on a busy host (issue 17).

`keep_freed_memory()` sets glibc's malloc (mallopt) so that freed memory stays in the process for the next call:
  * M_ARENA_MAX 1: every thread allocates from the main (brk) heap. A thread's own arena is a set of 64 MiB
    mmapped heaps, and an allocation larger than that falls back to mmap whatever M_MMAP_MAX says.
  * M_MMAP_MAX 0: no allocation is served by mmap; large blocks come from the heap and return to it.
  * M_TRIM_THRESHOLD -1: the heap's free top is never given back to the kernel. A finite threshold is not enough:
    with 2 GiB (the largest int mallopt takes) fragmentation pushed the free top past it every few rounds, and
    each trim cost a round 290,000 faults and 4 s of system time.
The process's resident memory then stays at its peak (as an accelerator's allocator pool does: 2.7 GiB in
bench_step); nothing else changes. It must run before XLA starts its threads (before the first jax computation or `jax.devices()`):
`rlaif_jax/__init__.py` calls it on import. Set RLAIF_JAX_SYSTEM_MALLOC=1 to leave glibc's defaults. On a C
library other than glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_NEVER = -1  # glibc: "setting M_TRIM_THRESHOLD to -1 disables trimming completely"

# What keep_freed_memory() did: None before the first call, else "glibc" (applied) or why it did nothing.
state: str | None = None


def keep_freed_memory() -> str:
    """Apply the settings above once per process; returns "glibc" when applied, else the reason it did nothing."""
    global state
    if state is not None:
        return state
    if os.environ.get("RLAIF_JAX_SYSTEM_MALLOC", "") not in ("", "0"):
        state = "RLAIF_JAX_SYSTEM_MALLOC is set"
    elif not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None:
        state = f"not glibc ({sys.platform})"
    else:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            state = "not glibc (no mallopt)"
        else:
            ok = all(libc.mallopt(param, value) == 1 for param, value in
                     ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_NEVER)))
            state = "glibc" if ok else "mallopt refused a setting"
    return state
