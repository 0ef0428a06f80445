"""The training loop: mesh -> build -> state -> resume -> steps and validations -> checkpoints -> final test.

`train_and_evaluate(config, workdir)` is what `main.py --mode=train` calls. What a run is built from lives in
build.py (tokenizer, weights, dataset, model) and state.py (optimiser, sharded state); the train step in steps.py;
evaluation in evaluate.py; checkpoints, "best" and preemption in checkpoint.py; the workdir in rundir.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metric_writers, periodic_actions

from uit_jax import build as build_lib
from uit_jax import checkpoint as ckpt_lib
from uit_jax import config as config_lib
from uit_jax import evaluate as eval_lib
from uit_jax import faults, optim, rundir, sharding, steps
from uit_jax import report as report_lib
from uit_jax import state as state_lib
from uit_jax.data import train_input


class NonFiniteLossError(RuntimeError):
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains, validates periodically, tests at the best-validation checkpoint; returns the results.

    Rerunning with the same workdir resumes from the latest checkpoint. `stop_after` ends this run (with a
    checkpoint) once that many steps are done, as a preemption would: for job schedulers with time limits.
    One run per workdir: a second one refuses at once (`rundir.WorkdirInUseError`), naming the first.
    """
    mesh = sharding.make_mesh(dict(config.mesh))
    config_lib.validate(config, mesh.size)
    sharding.check_batch_divisible(config.batch_size, mesh)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with rundir.WorkdirLock(workdir, holder=jax.process_index() == 0):
        if jax.process_index() == 0:
            rundir.check_resume(workdir, config)  # before any dataset work: a wrong workdir fails in seconds
        ckpt_lib.check_writable(os.path.join(workdir, "checkpoints"))
        return _train(config, workdir, mesh, stop_after)


def _train(config, workdir, mesh, stop_after) -> dict:
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    setup = build_lib.build(config)
    info = setup.info
    if jax.process_index() == 0:
        rundir.write_config(workdir, config)
        rundir.write_model(
            workdir,
            setup.clip_config,
            setup.tokenizer,
            image_size=config.data.image_size,
            num_classes=info.num_train_ids,
        )
    n_steps = config_lib.total_steps(config, info.num_train_pairs)
    spe = config_lib.steps_per_epoch(config, info.num_train_pairs)
    logging.info(
        "Dataset %s: %d train pairs, %d train ids; %d steps/epoch, %d steps",
        config.data.name,
        info.num_train_pairs,
        info.num_train_ids,
        spe,
        n_steps,
    )

    # The state: resumed from the newest intact checkpoint, or fresh (pretrained CLIP weights put in).
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    abstract, shardings, tx, schedule = state_lib.train_state_spec(
        config, setup.model, mesh, init_rng, info.num_train_pairs
    )
    logging.info(
        "Optimizer groups:\n%s", optim.describe_groups(abstract["params"], **optim.config_kwargs(config.optim))
    )
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=config.checkpoint.async_save)
    state, start = _start(setup, ckpt, abstract, shardings, tx, init_rng)
    if start == 0:
        hp = {k: v for k, v in rundir.flatten(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}
        writer.write_hparams(hp)
    n_params = sum(x.size for x in jax.tree.leaves(abstract["params"]))
    logging.info("Model: %.1fM parameters, compute dtype %s", n_params / 1e6, setup.model.dtype.__name__)

    train_step = _make_train_step(config, setup, spe, tx, schedule, shardings, mesh)
    encoders = eval_lib.jit_encoders(*steps.make_encode_fns(setup.model), mesh)
    every = config_lib.epochs_to_steps(config.eval.every_epochs, spe)
    val = None
    if every:  # the split that selects the best checkpoint: validation, or test under the papers' protocol
        val = eval_lib.Evaluator.from_config(
            config, setup.model, setup.tokenizer, mesh, selection_split(config), encoders=encoders, every_steps=every
        )
    data = train_input.make_train_iterator(
        config.data,
        setup.tokenizer,
        global_batch=config.batch_size,
        seed=config.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    report = periodic_actions.ReportProgress(num_train_steps=n_steps, writer=writer, every_steps=config.log.every_steps)
    loop = _Loop(config, workdir, writer, ckpt, val, n_steps, spe, stop_after)

    step, pending = start, None  # pending: the previous step's metrics, read after the next step is dispatched
    with ckpt_lib.Preemption(), jax.set_mesh(mesh), contextlib.closing(data):  # closing: stops the input promptly
        while step < n_steps:
            batch = sharding.host_batch_to_global(next(data), mesh)
            if step == start:
                faults.point("compile")
                sharding.compile_then_meet(train_step, state, batch, step_rng)
            state, metrics = train_step(state, batch, step_rng)
            step += 1
            if pending is not None:
                loop.check_nonfinite(*pending)
            pending = (step, metrics)
            report(step)
            loop.log(step, metrics)
            val_r1 = loop.validate_if_due(step, state["params"], report)
            if loop.save_or_stop(step, state, val_r1):
                writer.flush()
                return {"stopped_at_step": step}
    ckpt.wait()
    if pending is not None:
        loop.check_nonfinite(*pending)

    test = eval_lib.Evaluator.from_config(
        config, setup.model, setup.tokenizer, mesh, config.data.test_split, encoders=encoders
    )
    results = final_test(config, test, ckpt, abstract, state, mesh, step, workdir, writer)
    results["nonfinite_steps"] = int(jax.device_get(state["nonfinite_total"]))
    writer.flush()
    ckpt.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def _start(setup, ckpt, abstract, shardings, tx, rng):
    """(state, start step): the newest intact checkpoint (damaged ones are reported and set aside), or a new state."""
    restored = ckpt.restore_latest_intact(abstract)
    if restored is None:
        return state_lib.fresh_state(setup.model, tx, shardings, rng, setup.init_clip_params), 0
    best = ckpt.best()
    logging.info(
        "Resuming from step %d (best val R1 so far: %s)", restored.step, "none" if best is None else f"{best[1]:.2f}"
    )
    return restored.state, restored.step


def _make_train_step(config, setup, spe, tx, schedule, shardings, mesh):
    """The jitted train step of the configured objectives (weights, temperature, triplet start)."""
    loss_fn = steps.make_loss_fn(
        setup.model,
        {k: config.loss[k] for k in steps.OBJECTIVES},
        logit_scale=1.0 / config.model.temperature,
        patch_size=setup.clip_config.patch_size,
        triplet_margin=config.loss.triplet_margin,
        norm_pix=config.loss.norm_pix,
        start_steps={"triplet": config_lib.epochs_to_steps(config.loss.triplet_start_epochs, spe)},
    )
    split = bool(config.get("split_train_step", True))
    micro_batch = int(config.get("micro_batch", 0))
    return steps.jit_train_step(loss_fn, tx, schedule, shardings, mesh, split=split, micro_batch=micro_batch)


def selection_split(config) -> str:
    """The split whose R1 picks the reported checkpoint: validation, or test under the papers' protocol."""
    return config.data.test_split if config.eval.get("select_on", "val") == "test" else config.data.val_split


def selection(config) -> dict:
    """How the reported checkpoint was chosen, as every output states it."""
    if config.eval.get("select_on", "val") == "test":
        return dict(
            rule="best_test_epoch",
            split=config.data.test_split,
            label="best TEST epoch (the papers' protocol: selected on the test split, optimistic)",
        )
    return dict(rule="best_val", split=config.data.val_split, label="best val")


class _Loop:
    """The loop's named pieces: log, validate-if-due, check non-finite steps, save-or-stop."""

    def __init__(self, config, workdir, writer, ckpt, val, n_steps, spe, stop_after):
        self.config, self.workdir, self.writer, self.ckpt, self.val = config, workdir, writer, ckpt, val
        self.n_steps, self.spe, self.stop_after = n_steps, spe, stop_after
        self.meta = dict(config_name=config.data.name, total_steps=n_steps)
        self.t_log, self.n_log = time.time(), 0

    def log(self, step, metrics):
        """Every `log.every_steps` and at the end: train scalars (the only device->host read of metrics)."""
        self.n_log += 1
        if step % self.config.log.every_steps and step != self.n_steps:
            return
        m = jax.device_get(metrics)
        dt = time.time() - self.t_log
        scalars = {f"train/{k}": float(v) for k, v in m.items()}
        scalars["train/pairs_per_sec"] = self.n_log * self.config.batch_size / max(dt, 1e-9)
        scalars["train/temperature"] = self.config.model.temperature
        scalars["train/epoch"] = step / self.spe
        self.writer.write_scalars(step, scalars)
        self.t_log, self.n_log = time.time(), 0

    def validate_if_due(self, step, params, report) -> float | None:
        """R1 of the selecting split (validation by default) when its Evaluator is due at `step`; its figures go to
        TensorBoard and to WORKDIR/val_curve.jsonl (one line per evaluation, kept across resumes)."""
        if self.val is None or not self.val.due(step, self.n_steps):
            return None
        with report.timed("eval"):
            res = self.val(params)
        split = self.val.split
        scalars = {f"eval/{split}/t2i_{k.lower()}": res[k] for k in eval_lib.METRICS}
        scalars.update({f"eval/{split}/{k.lower()}": res[k] for k in eval_lib.I2T_METRICS})
        self.writer.write_scalars(step, scalars)
        if jax.process_index() == 0:
            names = (*eval_lib.METRICS, "i2t_R1")
            row = dict(step=step, epoch=round(step / self.spe, 3), split=split, **{k: round(res[k], 2) for k in names})
            with open(os.path.join(self.workdir, "val_curve.jsonl"), "a") as f:
                f.write(json.dumps(row) + "\n")
        return res["R1"]

    def check_nonfinite(self, step, metrics):
        """Called with the previous step's metrics (read after the next step is dispatched, so the device keeps
        busy): warns on a skipped update, stops after `checkpoint.max_nonfinite_in_row` in a row."""
        run = int(metrics["nonfinite_run"])
        if run:
            logging.warning("Step %d: non-finite loss or gradients, update skipped (%d in a row).", step, run)
        max_bad = self.config.checkpoint.max_nonfinite_in_row
        if max_bad and run >= max_bad:
            self.ckpt.wait()
            raise NonFiniteLossError(
                f"{run} non-finite steps in a row (up to step {step}); stopped. The last good checkpoint "
                f"is step {self.ckpt.latest_step()} in {self.ckpt.directory}. Lower config.optim.lr or check the data."
            )

    def save_or_stop(self, step, state, val_r1) -> bool:
        """Saves when due (a validation, `checkpoint.every_steps`, the end) or when stopping; True = stop now."""
        due = val_r1 is not None or step % self.config.checkpoint.every_steps == 0 or step == self.n_steps
        stop = step == self.stop_after or self.ckpt.reached_preemption(step)
        if due or stop:
            self.ckpt.save(step, state, dict(self.meta, epoch=step / self.spe), val_r1=val_r1)
        if stop:
            self.ckpt.wait()
            logging.warning("Stopped at step %d on request; rerun the same command to resume.", step)
            return True
        return False


def final_test(config, test, ckpt, abstract, state, mesh, step, workdir=None, writer=None) -> dict[str, Any]:
    """The test split at the last step and at the best checkpoint by the selecting split (the reported figure:
    best validation, or the papers' best test epoch, labelled); the rankings, error analysis and HTML report of the
    reported one go to WORKDIR/eval, and a few ranked queries to TensorBoard."""
    faults.point("final_eval")
    split = test.split
    chosen = selection(config)
    results: dict[str, Any] = {"dataset": config.data.name, "steps": int(step), "selection": chosen}
    best = ckpt.best()
    best_is_last = best is not None and best[0] == step  # then one evaluation serves both rows
    with jax.set_mesh(mesh):
        last = test.run(state["params"])
        results["test_at_last"] = last.metrics
        rows = {f"{split} @ last (step {step})": last.metrics}
        reported, label = last, f"last (step {step})"
        if best is not None:
            best_step, r1 = best
            results["best_step"] = best_step
            results["val_at_best" if chosen["rule"] == "best_val" else "selected_on_test"] = {"R1": r1}
            if not best_is_last:
                reported = test.run(ckpt.restore(best_step, abstract).state["params"])
            label = f"{chosen['label']} (step {best_step})"
            results["test_at_best"] = reported.metrics
            rows[f"{split} @ {label}"] = reported.metrics
    table = eval_lib.format_table(rows)
    results["table"] = table
    if jax.process_index() == 0:
        print(f"\nRetrieval on {config.data.name} ({split}; R1 ... mINP text-to-image, i2t image-to-text):", flush=True)
        print(f"{table}\n", flush=True)
        ranked = test.rankings(reported)
        results["test_rank_buckets"] = report_lib.rank_buckets(ranked)
        if workdir is not None:
            out = test.write_report(ranked, os.path.join(workdir, "eval"), f"{config.data.name} {split} @ {label}")
            results["report"] = list(out)
            logging.info("Rankings and report of %s: %s", split, ", ".join(out))
        if writer is not None:
            writer.write_images(int(step), {f"{split}/ranked_queries": test.grid(ranked)[None]})
    return results
