"""Device mesh, regex -> PartitionSpec rules for parameters, and host batches -> global jax.Arrays.

The shape of big_vision's sharding: a mesh with a `data` axis (and optionally `fsdp`), parameters replicated
unless a rule says otherwise, the `fsdp` rule shards the largest divisible dimension, and each process feeds
its own slice of the global batch. Two traps of our pinned jax (see docs/design.md): meshes are built with Auto
axis types (Explicit breaks Linen under a batch-sharded jit), and `np.asarray` on an array that spans
processes fails, so host copies go through `gather_to_host`.
"""

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from uit_jax.models import stacking

DATA_AXES = ("data", "fsdp")  # mesh axes the batch's leading dimension is split over, when present
FSDP = "fsdp"  # rule keyword and mesh axis name
REPLICATE = "replicate"  # rule keyword: explicitly replicated


def make_mesh(
    mesh_shape: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Builds a mesh with Auto axis types over `devices` (default: all devices of all processes).

    Args:
      mesh_shape: axis name -> size, e.g. {'data': -1} (the default) or [('data', 2), ('fsdp', -1)];
        at most one size may be -1, meaning "the devices that are left".
      devices: devices to use; default `jax.devices()`.
    """
    devices = list(jax.devices() if devices is None else devices)
    n_dev = len(devices)
    if isinstance(mesh_shape, Mapping):
        mesh_shape = list(mesh_shape.items())
    items = list(mesh_shape or [("data", -1)])
    names = [str(name) for name, _ in items]
    sizes = [int(size) for _, size in items]
    if len(set(names)) != len(names):
        raise ValueError(f"make_mesh: mesh axis names repeat in {items}")
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"make_mesh: axis sizes must be positive, with at most one -1 ('the rest'); got {items}")

    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n_dev % fixed:
            raise ValueError(
                f"make_mesh: {n_dev} devices cannot be split into {items}: the fixed axes multiply to "
                f"{fixed}, which does not divide {n_dev}; set config.mesh sizes whose product divides {n_dev}"
            )
        sizes[sizes.index(-1)] = n_dev // fixed
    elif fixed != n_dev:
        raise ValueError(
            f"make_mesh: mesh {items} multiplies to {fixed} devices but {n_dev} are available; set the sizes "
            f"so they multiply to {n_dev}, or make one of them -1"
        )
    # create_device_mesh orders devices for the physical topology on TPU; on CPU/GPU it keeps jax.devices()
    # order, which is process-major, so each process owns a contiguous block of the data axis.
    grid = mesh_utils.create_device_mesh(sizes, devices=devices, allow_split_physical_axes=True)
    return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def _path_name(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Shards the largest dimension divisible by the fsdp axis size (first such on ties); else replicated."""
    size = mesh.shape.get(FSDP, 1)
    if size == 1:
        return PartitionSpec()
    candidates = [i for i in range(len(shape)) if shape[i] % size == 0]
    if not candidates:
        return PartitionSpec()
    dim = max(candidates, key=lambda i: (shape[i], -i))
    return PartitionSpec(*([None] * dim + [FSDP]))


def _check_spec(name: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, pattern: str) -> None:
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r}: spec {spec} has more entries than {name} has dims {shape}")
    for dim, axes in enumerate(spec):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        for axis in axes:
            if axis not in mesh.shape:
                raise ValueError(
                    f"sharding rule {pattern!r}: mesh axis {axis!r} for {name} is not in the mesh {dict(mesh.shape)}"
                )
        n = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if shape[dim] % n:
            raise ValueError(
                f"sharding rule {pattern!r}: {name} dim {dim} of size {shape[dim]} is not divisible by {n} "
                f"(mesh axes {axes}); change the rule's spec or use 'fsdp', which picks a divisible dim"
            )


def param_partition_specs(
    params: Any,
    rules: Sequence[tuple[str, PartitionSpec | str]],
    mesh: Mesh,
) -> Any:
    """PartitionSpec for every leaf of `params` (arrays or ShapeDtypeStructs), from regex rules.

    Each rule is (pattern, spec). `pattern` must match the whole '/'-joined path (e.g.
    'clip/vision/.*/kernel'); the first matching rule wins; unmatched leaves are replicated. `spec` is a
    PartitionSpec, 'replicate', or 'fsdp': shard the largest dimension divisible by the mesh's fsdp axis
    (replicated when none is, or when the mesh has no fsdp axis, so one rule set serves data-only meshes).
    Inside a layer stack (`models/stacking.py`: the `layers` and `cross_layers` groups) a rule's spec is for one
    layer's shape, and the leading layer axis is left unsharded.
    """
    compiled = []
    for pattern, spec in rules:
        if not (isinstance(spec, PartitionSpec) or spec in (FSDP, REPLICATE)):
            raise ValueError(
                f"sharding rule {pattern!r}: spec {spec!r} must be a PartitionSpec, {FSDP!r} or {REPLICATE!r}"
            )
        compiled.append((re.compile(pattern), pattern, spec))

    def layer_spec(name, shape):
        for regex, pattern, spec in compiled:
            if regex.fullmatch(name):
                if spec == REPLICATE:
                    return PartitionSpec()
                if spec == FSDP:
                    return _fsdp_spec(shape, mesh)
                _check_spec(name, shape, spec, mesh, pattern)
                return spec
        return PartitionSpec()

    def spec_for(path, leaf):
        name = _path_name(path)
        shape = tuple(np.shape(leaf))
        if not stacking.in_group(path):
            return layer_spec(name, shape)
        # A layer stack: the rule describes one layer; the layer axis stays whole, as each step of the scan reads
        # one layer.
        spec = layer_spec(name, shape[1:])
        return PartitionSpec(None, *spec) if spec else spec

    return jax.tree_util.tree_map_with_path(spec_for, params)


def shardings_for(tree_of_specs: Any, mesh: Mesh) -> Any:
    """NamedSharding on `mesh` for each PartitionSpec leaf (PartitionSpec is a tuple: not traversed)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        tree_of_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def _data_axes(mesh: Mesh) -> tuple[str, ...]:
    axes = tuple(a for a in DATA_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} include none of {DATA_AXES} to split the batch over")
    return axes


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the mesh's data axes ('data', and 'fsdp' if present)."""
    axes = _data_axes(mesh)
    return NamedSharding(mesh, PartitionSpec(axes if len(axes) > 1 else axes[0]))


def data_shards(mesh: Mesh) -> int:
    """How many pieces the batch is cut into: the product of the data axes' sizes."""
    return int(np.prod([mesh.shape[a] for a in _data_axes(mesh)]))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
    """Raises a ValueError saying what to change when `global_batch` cannot be split over the mesh."""
    shards = data_shards(mesh)
    procs = jax.process_count()
    if global_batch <= 0 or global_batch % shards:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {shards} data shards of the mesh "
            f"{dict(mesh.shape)} ({mesh.devices.size} devices); set the batch size (config.batch_size) "
            f"to a multiple of {shards}, e.g. {max(shards, global_batch // shards * shards)}, or change "
            f"config.mesh"
        )
    if global_batch % procs:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {procs} processes; set it (config.data."
            f"batch_size) to a multiple of {procs}"
        )


def host_batch_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of the batch (a dict of numpy arrays, possibly nested) -> global jax.Arrays.

    Each process passes its own consecutive slice (global batch / process count rows); the result has the
    global batch as its leading dimension, sharded by `batch_sharding(mesh)`.
    """
    sharding = batch_sharding(mesh)
    local_shards = data_shards(mesh) // jax.process_count()

    def to_global(path, x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % max(local_shards, 1):
            raise ValueError(
                f"host_batch_to_global: batch field {_path_name(path)!r} has shape {x.shape}; its leading "
                f"dimension must be a multiple of this process's {local_shards} data shards"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map_with_path(to_global, dict(batch))


def gather_to_host(x: Any) -> Any:
    """Full value of a (possibly multi-process) jax.Array, or a pytree of them, as numpy on every host.

    In a multi-process run, arrays that live only on this process's devices (and numpy inputs) are
    concatenated across processes along axis 0 (scalars are stacked), as `process_allgather(tiled=True)` does.
    """
    if jax.process_count() > 1:
        # np.asarray would fail on arrays with shards on other processes; this all-gathers them.
        return multihost_utils.process_allgather(x, tiled=True)
    return jax.tree.map(np.asarray, x)


def wait_for_all_processes(name: str, timeout_s: float) -> None:
    """Blocks until every process of a multi-process run has called this with the same `name` (no-op in one process).

    A barrier of JAX's coordination service (through Orbax's public `multihost.get_barrier_sync_fn`), not a
    collective: on CPU a collective's first run gives the processes gloo's fixed 30 s to meet, this waits
    `timeout_s`. A process that dies meanwhile is reported by the service's heartbeat, as everywhere else. Each
    `name` may be used once per run.
    """
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp  # noqa: PLC0415 - only multi-process runs need it

    try:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
    except Exception as e:  # the service's XlaRuntimeError: DEADLINE_EXCEEDED, or a peer's error
        raise RuntimeError(
            f"Process {jax.process_index()} of {jax.process_count()} waited at barrier {name!r} for up to "
            f"{timeout_s:.0f} s and not every process arrived ({type(e).__name__}: {e}). Check the other "
            "processes' logs for the error that stopped or delayed them."
        ) from e


# How long a process waits for the others after compiling: a first compile of a large model on a busy host takes
# minutes; a process that died is reported sooner, by the coordination service's heartbeat.
COMPILE_BARRIER_TIMEOUT_S = 1800


def compile_then_meet(step_fn, *args) -> None:
    """Multi-process runs: compiles `step_fn`'s program(s) for these arguments (jit then reuses them), then waits for
    every process at a coordination-service barrier, so that the first collective starts on all of them together.

    On CPU, gloo gives the processes a fixed 30 s to meet at a program's first collective, and the skew of process
    start-up plus compile exceeded it under CI load (tests/test_multiprocess_train.py). No-op in one process.
    """
    if jax.process_count() == 1:
        return
    t0 = time.perf_counter()
    lowered = step_fn.lower(*args)
    for x in lowered if isinstance(lowered, list) else [lowered]:
        x.compile()
    logging.info("Train step compiled in %.1f s; waiting for the other processes", time.perf_counter() - t0)
    t0 = time.perf_counter()
    wait_for_all_processes("uit_jax: train step compiled", COMPILE_BARRIER_TIMEOUT_S)
    logging.info("All %d processes ready after %.1f s", jax.process_count(), time.perf_counter() - t0)
