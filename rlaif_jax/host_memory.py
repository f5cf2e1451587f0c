"""Host memory: optionally keep freed heap memory mapped, so XLA:CPU's per-call temporaries are not faulted in afresh.

XLA:CPU allocates each compiled call's temporaries (the learn phase's activations for its backward: about 1.1 GiB
in scripts/bench_step.py) with malloc and frees them when the call ends. glibc serves an allocation that large
with a fresh mmap and unmaps it on free, so every call pays one minor page fault per 4 KiB page (~280,000 per
bench_step step). What a fault costs depends on the host and the hour: measured on one 2-core host, 1.3 us at
one time and 14 us at another (1-4 s of system time per step, 32% of our CPU time): the issue-17 "busier host".

`keep_freed_memory()` sets glibc's malloc (mallopt) so that freed memory stays in the process for the next call:
  * M_ARENA_MAX 1: every thread allocates from the main (brk) heap. A thread's own arena is a set of 64 MiB
    mmapped heaps, and an allocation larger than that falls back to mmap whatever M_MMAP_MAX says.
  * M_MMAP_MAX 0: no allocation is served by mmap; large blocks come from the heap and return to it.
  * M_TRIM_THRESHOLD -1: the heap's free top is never given back to the kernel (a finite threshold, 2 GiB, was
    crossed every few rounds, and each trim cost a round its faults again).
It is OFF unless RLAIF_JAX_KEEP_FREED_MEMORY=1 is set, because the heap can then fragment without bound: with one
XLA:CPU device, bench_step's GRPO and PPO steps ran with no faults at a steady 2.7-4.0 GiB resident; with two
devices (two programs allocating at once) the GRPO step settled at 3.8 GiB, but the PPO step grew the heap by its
temporaries' size (1 GiB) on most steps, 10.5 GiB after 8 steps and still growing. Use it for one-device CPU runs
on a host where `system_share_of_cpu` (the benchmarks' host line) is large. `rlaif_jax/__init__.py` calls it on
import, before XLA starts its threads. On a C library other than glibc it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h
TRIM_NEVER = -1  # glibc: "setting M_TRIM_THRESHOLD to -1 disables trimming completely"

SETTING = "RLAIF_JAX_KEEP_FREED_MEMORY"
# What keep_freed_memory() did: None before the first call, else "glibc" (applied) or why it did nothing.
state: str | None = None


def setting_error() -> str | None:
    """Why the environment's RLAIF_JAX_KEEP_FREED_MEMORY is not a value this module reads (1, 0 or unset), else
    None. Import cannot refuse it (a library import does not exit); the training program does, before anything
    loads (train.launch)."""
    value = os.environ.get(SETTING, "")
    if value in ("", "0", "1"):
        return None
    return f"{SETTING}={value!r} must be 1 (keep freed memory) or 0 / unset (glibc's defaults)"


def keep_freed_memory() -> str:
    """Apply the settings above once per process if RLAIF_JAX_KEEP_FREED_MEMORY=1; returns "glibc" when applied,
    else the reason it did nothing."""
    global state
    if state is not None:
        return state
    error = setting_error()
    if error is not None:
        state = f"off ({error})"
    elif os.environ.get(SETTING, "") in ("", "0"):
        state = f"off ({SETTING} unset)"
    elif not sys.platform.startswith("linux") or (libc_name := ctypes.util.find_library("c")) is None:
        state = f"not glibc ({sys.platform})"
    else:
        libc = ctypes.CDLL(libc_name)
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            state = "not glibc (no mallopt)"
        else:
            ok = all(libc.mallopt(param, value) == 1 for param, value in
                     ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_NEVER)))
            state = "glibc" if ok else "mallopt refused a setting"
    return state
