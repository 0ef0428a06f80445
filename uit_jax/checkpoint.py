"""Orbax checkpoints of the train state: save, keep the latest and the best, resume; what "best" means; SIGTERM.

The manager keeps two kinds of checkpoint under `workdir/checkpoints`: the latest one (for resuming) and the best one
by validation R1 (for the final test). Orbax's `max_to_keep` together with `best_fn` can delete the latest
checkpoint (docs/design.md), so preservation is `AnyPreservationPolicy([LatestN(1), BestN(1)])`.

Each checkpoint has two items: `state` (the sharded pytree, restored into an abstract state that carries shapes,
dtypes and shardings, so every process reads only its shards; with one subtree per layer, as Hugging Face names them,
though the model stacks its layers: `models/stacking.py`) and `meta` (JSON: the config name, total steps, epoch, the
validation R1 of that step, and a fingerprint of the state).

Trust: the fingerprint (per leaf, a weighted sum of its raw bits as uint32, modulo 2^32: exact and independent of the
reduction order) is taken on the device when saving and checked after every restore, so bytes changed on disk are
caught even where Orbax reads them without complaint. A state whose parameters are not all finite is never saved
(the newest checkpoint on disk stays a good one). `restore_latest_intact` resumes from the newest checkpoint that
restores and checks out, moving damaged ones aside (`N.damaged`) with a warning naming the step and the damage.

"Best" is one rule (`best_step`), used by training, `--mode=eval` and export alike. Preemption is one question
(`Checkpointer.reached_preemption`): a SIGTERM inside `Preemption`, or the cluster's announcement through Orbax.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import socket
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from uit_jax import faults
from uit_jax.models import stacking

BEST_METRIC = "val_r1"


class CheckpointError(RuntimeError):
    pass


@jax.jit
def _fingerprint(tree):
    """Per leaf: sum_i mix(bits_i) * w_i (mod 2^32) over its elements' raw bits as uint32, w_i odd weights.

    Exact integer arithmetic, so independent of the reduction order; `mix` is a bijection and the weights are
    odd, so any change to a single element changes the sum.
    """

    def one(x):
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
            u = x.astype(jnp.uint32)
        elif x.dtype.itemsize == 2:
            u = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
        else:  # 4 bytes: one uint32 word per element; 8 bytes: two
            u = jax.lax.bitcast_convert_type(x, jnp.uint32)
        u = u.reshape(-1) * jnp.uint32(0x9E3779B1)  # a bijective mix (odd multiply, xorshift) of each word,
        u = u ^ (u >> 15)  # so that a float's low-entropy bit patterns do not vanish modulo 2^32
        w = jnp.arange(u.shape[0], dtype=jnp.uint32) * jnp.uint32(0x85EBCA6B) | jnp.uint32(1)
        return jnp.sum(u * w, dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(tree)]


@jax.jit
def _all_finite(tree):
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind an exception (Orbax and CLU re-raise a background thread's error wrapped; tensorstore
    reports a failed write as ValueError('RESOURCE_EXHAUSTED ... [os_error_code=\'28\']'))."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        m = re.search(r"os_error_code='(\d+)'", str(e))
        if m:
            code = int(m.group(1))
            return OSError(code, os.strerror(code))
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


_unstack = jax.jit(stacking.unstack)


def _stack(tree, shardings):
    return jax.jit(stacking.stack, out_shardings=shardings)(tree)


def _unrolled(state):
    """`state` in the layout checkpoints keep, one subtree per layer (a copy on the devices when it is stacked)."""
    return _unstack(state) if stacking.has_stacked(state) else state


def fingerprint(tree) -> list[int]:
    return [int(v) for v in jax.device_get(_fingerprint(tree))]


def _check_fingerprint(step, state, meta: dict) -> None:
    want = meta.get("fingerprint")
    if want is None:
        return
    got = fingerprint(state)
    bad = [i for i, (a, b) in enumerate(zip(want, got, strict=True)) if a != b]
    if bad:
        raise CheckpointError(
            f"checkpoint step {step}: {len(bad)} of {len(got)} arrays differ from what was written "
            "(checksum mismatch: the files were changed or corrupted on disk)"
        )


def parse_step(text: str) -> str | int:
    """A `--step` flag: 'best', 'latest' or a step number (int); anything else is a ValueError naming the value."""
    if text in ("best", "latest"):
        return text
    if not text.isdigit():
        raise ValueError(f"--step must be best, latest or a step number, got {text!r}")
    return int(text)


def best_step(manager: ocp.CheckpointManager) -> tuple[int, float] | None:
    """The one rule for "best": (step, validation R1) of the kept checkpoint with the highest validation R1, the
    earliest step on ties; None when no kept checkpoint was evaluated. Damaged metrics are not candidates."""
    best = None
    for step in sorted(int(s) for s in manager.all_steps()):
        try:
            m = manager.metrics(step) or {}
        except Exception:  # noqa: BLE001 - a damaged checkpoint's metrics: it cannot be the best
            continue
        if BEST_METRIC in m and (best is None or m[BEST_METRIC] > best[1]):
            best = (step, float(m[BEST_METRIC]))
    return best


class Preemption:
    """Turns SIGTERM into a flag that `Checkpointer.reached_preemption` reports, for as long as the `with` block
    runs: the loop then saves a checkpoint and stops cleanly after the step in flight."""

    requested = False  # class-wide: a signal handler has one process-wide meaning

    def __enter__(self):
        Preemption.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners)
            self._old = None
        return self

    @staticmethod
    def _handle(signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        Preemption.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        Preemption.requested = False


def check_writable(folder: str) -> None:
    """Creates `folder` and writes a probe file in it, so that an unwritable checkpoint folder (permissions, a
    read-only or full disk, a file in its place) stops the run before any work: Orbax fails only at the first save."""
    probe = os.path.join(folder, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"Cannot write checkpoints to {folder}: {e.strerror or e} ({type(e).__name__}). Fix its permissions or "
            "free the disk, or choose another --workdir; nothing was trained."
        ) from e


def read_state(directory: str, which: str | int = "best") -> Restored:
    """Reads a checkpoint without knowing the model: `which` is 'best' (by validation R1), 'latest' or a step.

    For export and search: opens the folder read-only (creates and deletes nothing), restores the state as
    single-device arrays in the shapes it was written with (any mesh it was trained on), checks its fingerprint,
    and stacks its layers as the models hold them. Raises FileNotFoundError when there is no such checkpoint.
    """
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"No checkpoint folder {directory}; train first, or fix the workdir.")
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, create=False),
    )
    try:
        steps = sorted(int(s) for s in manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"No checkpoint in {directory}; train first, or fix the workdir.")
        if which == "latest":
            step = steps[-1]
        elif which == "best":
            best = best_step(manager)
            step = best[0] if best is not None else steps[-1]
        else:
            step = int(which)
            if step not in steps:
                raise FileNotFoundError(f"No checkpoint step {step} in {directory}; there are steps {steps}.")
        tree = manager.item_metadata(step)["state"]
        dev = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), tree)
        out = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        meta = dict(out["meta"] or {})
        _check_fingerprint(step, out["state"], meta)
        return Restored(state=stacking.stack(out["state"]), step=step, meta=meta)
    finally:
        manager.close()


@dataclasses.dataclass
class Restored:
    state: Any
    step: int
    meta: dict


class Checkpointer:
    """Thin owner of an Orbax `CheckpointManager` with the resume order of the trainer."""

    def __init__(self, directory: str, *, async_save: bool = True, keep_best: bool = True):
        self.directory = os.path.abspath(directory)
        policies = [ocp.checkpoint_managers.LatestN(1)]
        if keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC], n=1, keep_checkpoints_without_metrics=False
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            # Orbax writes a checkpoint's metrics only when best_fn is set (preservation is the policy above).
            best_fn=(lambda m: m[BEST_METRIC]) if keep_best else None,
            best_mode="max",
            enable_async_checkpointing=async_save,
            create=True,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state, meta: dict, *, val_r1: float | None = None, force: bool = True) -> bool:
        """Saves asynchronously; `val_r1` marks the checkpoint as a candidate for `best`.

        Refuses (warns, returns False) when the parameters are not all finite: such a checkpoint would replace the
        last good one under the keep-latest retention.
        """
        params = state["params"] if isinstance(state, dict) and "params" in state else state
        if not bool(jax.device_get(_all_finite(params))):
            logging.warning(
                "Step %d: the parameters are not all finite; not saving it (the last good checkpoint, step %s, is "
                "kept).",
                step,
                self.latest_step(),
            )
            return False
        state = _unrolled(state)
        metrics = None if val_r1 is None else {BEST_METRIC: float(val_r1)}
        meta = dict(meta, step=int(step), **({BEST_METRIC: float(val_r1)} if val_r1 is not None else {}))
        meta["fingerprint"] = fingerprint(state)
        last_good = self.latest_step()
        faults.point("save")
        try:
            saved = self.manager.save(
                int(step),
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=force,
            )
        except Exception as e:
            raise self._io_error(e, step, last_good) from e
        faults.point("saved")
        return saved

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best(self) -> tuple[int, float] | None:
        """(step, validation R1) of the best kept checkpoint (`best_step`); None if none was evaluated."""
        return best_step(self.manager)

    def reached_preemption(self, step: int) -> bool:
        """True when a SIGTERM arrived (`Preemption`) or the cluster announced a preemption (Orbax's multi-host
        sync point): save and stop now."""
        return Preemption.requested or bool(self.manager.reached_preemption(step))

    def restore(self, step: int, abstract_state) -> Restored:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (from `jax.eval_shape`), and
        checks its fingerprint; raises CheckpointError when it does not match what was written.

        Checkpoints hold the layers unrolled (`save`); a state with stacked layers (every model's since the stacked
        layout) is read unrolled and stacked on the devices, so checkpoints written before it load as well."""
        faults.point("restore")
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(stacking.unstack(abstract_state)), meta=ocp.args.JsonRestore()
            ),
        )
        meta = dict(out["meta"] or {})
        state = out["state"]
        _check_fingerprint(step, state, meta)
        if stacking.has_stacked(abstract_state):
            state = _stack(state, jax.tree.map(lambda x: x.sharding, abstract_state))
        logging.info("Restored checkpoint %d from %s", step, self.directory)
        return Restored(state=state, step=int(step), meta=meta)

    def restore_latest_intact(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores and checks out; None when there is none at all.

        A damaged one (unreadable, truncated, missing files, checksum mismatch) is reported with its step and the
        damage, moved aside to `N.damaged` (so new saves and retention work as before), and the next older one is
        tried. Raises CheckpointError, listing each, when checkpoints exist but none is intact.
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - Orbax/tensorstore/json raise many types for damaged files
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                damaged.append(f"step {step}: {why}")
                logging.warning(
                    "Checkpoint step %d in %s is damaged (%s); trying an older one.", step, self.directory, why
                )
                self._set_aside(step)
        if damaged:
            raise CheckpointError(
                f"No intact checkpoint in {self.directory}; each was damaged:\n  " + "\n  ".join(damaged) + "\n"
                "Delete the folder to start over (the damaged ones were kept as N.damaged)."
            )
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = os.path.join(self.directory, str(step))
            dst = f"{src}.damaged"
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}.damaged{n}", n + 1
            if os.path.exists(src):
                os.rename(src, dst)
        if jax.process_count() > 1:  # every process sees the rename before it re-reads the folder
            from jax.experimental import multihost_utils  # noqa: PLC0415

            multihost_utils.sync_global_devices(f"uit_jax set aside checkpoint {step}")
        self.manager.reload()

    def _io_error(self, e: BaseException, step, last_good) -> BaseException:
        """A disk error while saving, said in one sentence (what, where, what is still safe); other errors as is."""
        err = _os_error(e)
        if err is None:
            return e
        what = {28: "No space left on device", 13: "Permission denied", 30: "Read-only file system"}.get(
            err.errno, err.strerror or type(err).__name__
        )
        return CheckpointError(
            f"{what} while saving checkpoint step {step if step is not None else '(pending)'} to {self.directory}; "
            f"the last good checkpoint is {'step ' + str(last_good) if last_good is not None else 'none'}. "
            "Free space or fix permissions, then rerun the same command to resume."
        )

    def wait(self):
        last_good = self.latest_step()
        faults.point("finalize")
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._io_error(e, None, last_good) from e

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
