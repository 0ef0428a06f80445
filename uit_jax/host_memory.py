"""glibc malloc settings for XLA:CPU: keep each execution's buffers mapped from one step to the next.

XLA:CPU allocates an execution's temporaries as one block on a worker thread, and glibc serves a worker thread's
block over 64 MB by mmap: every step the kernel faults in and zeroes gigabytes afresh. `enable()` sends every
thread to the main arena (M_ARENA_MAX 1), serves large blocks from its heap (M_MMAP_MAX 0) and never trims it
(M_TRIM_THRESHOLD), so later steps reuse the same pages (docs/benchmarks.md has the step and compile figures).

The cost: the process keeps its peak heap, and all threads share one arena lock, which slows cold compiles (XLA
compiles on three threads) by about 1.5x; cache loads are unaffected. It cannot be lifted for the compile alone
(glibc fixes its arena limit at a second thread's first allocation), so 'auto' applies it only where JAX computes
on the CPU: `JAX_PLATFORMS` is cpu, or no GPU/TPU plugin is installed. It must run before other threads start: the
entry points call it first. `UIT_JAX_MALLOC=0` turns it off, `1` forces it.
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
