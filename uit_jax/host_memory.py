"""glibc malloc settings for XLA:CPU: keep each execution's buffers mapped from one step to the next.

XLA:CPU allocates the temporaries of an execution as one block and frees it when the execution ends (ViT-B/16,
batch 8, float32: 2.3 GB for the gradient program and 0.8 GB for the update, every step). The execution runs on a
worker thread, and a glibc worker-thread arena cannot hold a block over 64 MB, so glibc maps a fresh one with mmap
and unmaps it on free: every step the kernel faults in and zeroes those gigabytes page by page (2.0-3.8 s of system
CPU time per ViT-B/16 batch-8 step on 2 cores, by getrusage). `enable()` sends every thread to the main arena
(M_ARENA_MAX 1), serves large blocks from its heap (M_MMAP_MAX 0) and never gives the heap's top back
(M_TRIM_THRESHOLD), so later steps reuse the same pages. The mini default's step gains 12-13%; README
"Benchmarks", "Host memory on CPU", has the figures.

The cost: the process keeps its peak heap (RSS does not shrink after a large free), and all threads share one arena
lock (small allocations stay in glibc's lock-free per-thread cache). XLA's compiler allocates on three threads at
once, so a cold compile runs 1.5-1.6x slower (ViT-B/16 batch 128: 21.8-22.4 s against 14.0-14.1 s; loads from the
compilation cache are unaffected; README, "The setting's price: cold compiles"). It cannot be lifted for the
compile alone: glibc fixes its arena limit at a second thread's first allocation, and threads keep their arenas.
So 'auto' applies it only where JAX computes on the CPU: `JAX_PLATFORMS` is cpu, or no GPU/TPU plugin is
installed. It must run before other threads start (a thread that already has its own arena keeps it): the entry
points call it first. `UIT_JAX_MALLOC=0` turns it off, `1` forces it.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

ENV = "UIT_JAX_MALLOC"

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt takes an int; glibc stores it as size_t, so -1 is SIZE_MAX: never trim


def _cpu_backend() -> bool:
    """Whether JAX will compute on the CPU, decided without starting JAX (which would start its threads)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return all(p.strip() == "cpu" for p in platforms.split(","))
    if importlib.metadata.entry_points(group="jax_plugins"):
        return False
    if importlib.util.find_spec("libtpu") is not None:
        return False
    try:
        plugins = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        plugins = None
    return plugins is None or not any(
        os.path.isdir(p) and any(not n.startswith(("_", ".")) for n in os.listdir(p))
        for p in (plugins.submodule_search_locations or [])
    )


def enable() -> str:
    """Applies the settings when they help (see the module docstring); returns what was done, for the log."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in ("auto", "1", "0"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 0 (off), 1 (on) or auto (on when JAX computes on the CPU)")
    if value == "0":
        return f"off ({ENV}=0)"
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    if value == "auto" and not _cpu_backend():
        return f"off (JAX computes on an accelerator: JAX_PLATFORMS or a GPU/TPU plugin; {ENV}=1 forces it)"
    libc = ctypes.CDLL(None)
    ok = [libc.mallopt(M_ARENA_MAX, 1), libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, _NEVER_TRIM)]
    if not all(ok):
        return f"not fully applied (mallopt returned {ok} for arena, mmap, trim)"
    return "on (one arena, no mmap, no trim: step buffers stay mapped)"
