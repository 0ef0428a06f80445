"""uit_jax.host_memory: glibc malloc settings that keep XLA:CPU's per-execution buffers mapped."""

import os
import platform
import subprocess
import sys

import pytest

from uit_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
# The settings are glibc's mallopt; on another C library enable() leaves malloc alone (tested below), so the two
# tests of their effect have nothing to measure there.
NOT_GLIBC = "glibc's mallopt only: other C libraries are left alone (test_other_c_libraries_are_left_alone)"

# Each call returns a fresh 128 MiB array (an output buffer XLA:CPU allocates per execution) and the previous one
# is deleted; minor page faults per call count the pages the kernel had to map and zero for it. The first calls
# grow the heap (with the settings on, too), so only the last 8 of 14 are printed.
FAULTS = """
import resource, sys
from uit_jax import host_memory
print(host_memory.enable())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x) * 2.0)
x = jnp.ones((32 * 2**20,), jnp.float32)
y = f(x).block_until_ready()
for i in range(14):
    y.delete()
    a = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = f(x).block_until_ready()
    if i >= 6:
        print("faults", resource.getrusage(resource.RUSAGE_SELF).ru_minflt - a)
"""
PAGES = 32 * 2**20 * 4 // 4096  # pages of one output buffer


def _faults(value):
    env = {**os.environ, host_memory.ENV: value, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    return lines[0], [int(line.split()[1]) for line in lines[1:]]


@pytest.mark.skipif(not GLIBC, reason=NOT_GLIBC)
def test_enable_keeps_buffers_mapped_between_executions():
    state_off, off = _faults("0")
    state_on, on = _faults("1")
    assert state_off.startswith("off") and state_on.startswith("on"), (state_off, state_on)
    # Without the settings every call maps its output afresh (glibc mmaps blocks this large), so the measurement
    # sees the buffer. With them a freed block is reused; but small allocations may split a free block, and then
    # the heap grows once more (fresh pages) until it holds enough, so only "some calls map nothing" is certain.
    assert min(off) >= 0.9 * PAGES, off
    assert min(on) <= 0.05 * PAGES, on


MMAPPED = """
import ctypes, threading
from uit_jax import host_memory
print(host_memory.enable())


class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
out = []


def worker():  # XLA:CPU allocates on its worker threads, whose arenas cannot hold 256 MiB
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(256 * 2**20)
    out.append(libc.mallinfo2().hblkhd - before)
    libc.free(p)


t = threading.Thread(target=worker)
t.start()
t.join()
print(out[0])
"""


@pytest.mark.skipif(not GLIBC, reason=NOT_GLIBC)
def test_a_worker_threads_large_block_comes_from_the_heap_not_mmap():
    """The mechanism itself, by glibc's own count (mallinfo2's bytes in mmapped blocks): a 256 MiB block that a
    new thread allocates is mmapped (the count grows by it) without the settings and taken from the heap with them."""
    mmapped = {}
    for value in ("0", "1"):
        env = {**os.environ, host_memory.ENV: value, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run([sys.executable, "-c", MMAPPED], cwd=REPO, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        mmapped[value] = int(out.stdout.split()[-1])
    assert mmapped["0"] >= 256 * 2**20, mmapped
    assert mmapped["1"] == 0, mmapped


def test_off_and_bad_values(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "0")
    assert host_memory.enable() == f"off ({host_memory.ENV}=0)"
    monkeypatch.setenv(host_memory.ENV, "yes")
    with pytest.raises(ValueError, match=r"UIT_JAX_MALLOC='yes': use 0 \(off\), 1 \(on\) or auto"):
        host_memory.enable()


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV, "1")
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert host_memory.enable() == "off (not glibc)"


@pytest.mark.parametrize(
    "platforms, expected", [("cpu", True), ("cuda", False), ("cpu,cuda", False), ("tpu", False), (" cpu ", True)]
)
def test_cpu_backend_from_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_memory._cpu_backend() is expected


def test_cpu_backend_from_installed_plugins(monkeypatch, tmp_path):
    """Without JAX_PLATFORMS, an installed GPU/TPU plugin (entry point, libtpu or a jax_plugins module) means the
    accelerator computes, so 'auto' leaves malloc alone."""
    import importlib.metadata
    import importlib.util
    import types

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real_find_spec = importlib.util.find_spec
    specs = {}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: specs.get(name, real_find_spec(name)))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    specs.update(libtpu=None, jax_plugins=None)
    assert host_memory._cpu_backend() is True
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: ["jax_cuda13_plugin"])
    assert host_memory._cpu_backend() is False
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    specs["libtpu"] = types.SimpleNamespace()
    assert host_memory._cpu_backend() is False
    specs["libtpu"] = None
    (tmp_path / "xla_cuda13").mkdir()
    specs["jax_plugins"] = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    assert host_memory._cpu_backend() is False
    (tmp_path / "xla_cuda13").rmdir()
    assert host_memory._cpu_backend() is True


def test_main_logs_the_setting_and_names_a_bad_value(tmp_path):
    """`python -m uit_jax.main` applies it first and logs it; a bad UIT_JAX_MALLOC stops the run with one sentence
    before any work (the eval here would fail later anyway: the folder holds no run)."""
    cmd = [sys.executable, "-m", "uit_jax.main", "--mode=eval", f"--workdir={tmp_path / 'wd'}"]
    for value, expected in (("auto", "Host malloc: on"), ("yes", "Fatal: ValueError: UIT_JAX_MALLOC='yes': use 0")):
        env = {**os.environ, host_memory.ENV: value, "JAX_PLATFORMS": "cpu"}
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 1, out.stderr[-2000:]
        assert expected in out.stderr, out.stderr[-2000:]
    assert "Host malloc" not in out.stderr  # the bad value stopped it before JAX started
