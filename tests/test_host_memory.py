"""host_memory.keep_freed_memory: with RLAIF_JAX_KEEP_FREED_MEMORY=1, after `import rlaif_jax` a large block freed by
one call is reused by the next without page faults (XLA:CPU's per-call temporaries); by default glibc's settings
stay (the same probe then faults every page again, which shows the probe can fail)."""
import json
import os
import subprocess
import sys

import pytest

# Runs in a fresh interpreter: the settings must be made before any thread allocates, as on a real import.
PROBE = r"""
import ctypes, json, resource, threading
import rlaif_jax
from rlaif_jax import host_memory

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 << 20  # larger than glibc's mmap threshold and a thread arena's 64 MiB heap

def call_faults():
    # One "compiled call": allocate its temporaries, write them, free them; the page faults this thread took.
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)
    libc.free(p)
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

faults = []
def worker():  # XLA runs its calls on pool threads, not the main thread
    faults.extend(call_faults() for _ in range(3))
t = threading.Thread(target=worker); t.start(); t.join()
print(json.dumps({"state": host_memory.state, "faults": faults}))
"""

PAGES = (256 << 20) // 4096


def probe(**env):
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux only)")
def test_freed_memory_is_reused_without_page_faults():
    kept = probe(RLAIF_JAX_KEEP_FREED_MEMORY="1")
    assert kept["state"] == "glibc"
    first, *later = kept["faults"]
    assert first >= PAGES * 0.9  # the first call faults its pages in
    assert max(later) < PAGES * 0.02, kept  # later calls reuse them

    system = probe(RLAIF_JAX_KEEP_FREED_MEMORY="")
    assert system["state"] == "off (RLAIF_JAX_KEEP_FREED_MEMORY unset)"
    assert min(system["faults"]) >= PAGES * 0.9, system  # glibc's default: mmap, unmap, fault in afresh
