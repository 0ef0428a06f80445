"""Orbax checkpoints of the train state: save every N steps, keep the latest and the best, resume.

The manager keeps two kinds of checkpoint under `workdir/checkpoints`: the latest one (for resuming) and the best one
by validation R1 (for the final test). Orbax's `max_to_keep` together with `best_fn` can delete the latest
checkpoint (docs/design.md), so preservation is `AnyPreservationPolicy([LatestN(1), BestN(1)])`.

Each checkpoint has two items: `state` (the sharded pytree, restored into an abstract state that carries shapes,
dtypes and shardings, so every process reads only its shards) and `meta` (JSON: the config name, total steps, epoch
and the validation R1 of that step).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

BEST_METRIC = "val_r1"


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
        """Saves asynchronously; `val_r1` marks the checkpoint as a candidate for `best`."""
        metrics = None if val_r1 is None else {BEST_METRIC: float(val_r1)}
        meta = dict(meta, step=int(step), **({BEST_METRIC: float(val_r1)} if val_r1 is not None else {}))
        return self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=force,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best(self) -> tuple[int, float] | None:
        """(step, validation R1) of the kept checkpoint with the highest validation R1; None if none was evaluated.

        The one place that knows which checkpoint is "best" (the trainer tests it, `--mode=eval` restores it).
        """
        best = None
        for step in self.manager.all_steps():
            m = self.manager.metrics(step)
            if m and BEST_METRIC in m and (best is None or m[BEST_METRIC] > best[1]):
                best = (int(step), float(m[BEST_METRIC]))
        return best

    def reached_preemption(self, step: int) -> bool:
        """True when the cluster announced a preemption (Orbax's multi-host sync point): save and stop now."""
        return bool(self.manager.reached_preemption(step))

    def restore(self, step: int, abstract_state) -> Restored:
        """Restores `step` into the shapes, dtypes and shardings of `abstract_state` (from `jax.eval_shape`)."""
        out = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        logging.info("Restored checkpoint %d from %s", step, self.directory)
        return Restored(state=out["state"], step=int(step), meta=dict(out["meta"] or {}))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
