"""JAX's persistent compilation cache, on by default: a second run of the same command (same shapes, same jax and
XLA flags) loads its compiled programs instead of recompiling them.

The folder is `$UIT_JAX_CACHE`, else `$XDG_CACHE_HOME/uit_jax/xla`, else `~/.cache/uit_jax/xla`; set UIT_JAX_CACHE
to move it, or to an empty string to turn the cache off. Entries are keyed by program, jax/XLA version and device,
so a stale entry is never used; deleting the folder only costs a recompile.
"""

from __future__ import annotations

import os

ENV = "UIT_JAX_CACHE"


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "uit_jax", "xla")


def enable(path: str | None = None) -> str | None:
    """Turns the cache on (before the first compile); returns its folder, or None when turned off."""
    import jax  # noqa: PLC0415

    path = os.environ.get(ENV, default_dir()) if path is None else path
    if not path:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None  # a read-only home: compile every time rather than fail the run
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)  # small programs are not worth a file
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
