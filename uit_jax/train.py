"""The one training loop: mesh -> data -> state -> resume -> steps -> evals -> checkpoints -> results.json.

`train_and_evaluate(config, workdir)` is what `main.py` calls; `evaluate_checkpoint(config, workdir)` backs
`--mode=eval`. Everything that turns config fields into objects lives here (models never read the config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import signal
import socket
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from uit_jax import checkpoint as ckpt_lib
from uit_jax import evaluate as eval_lib
from uit_jax import faults, optim, rundir, sharding, steps
from uit_jax import report as report_lib
from uit_jax.data import defaults as data_defaults
from uit_jax.data import pipeline
from uit_jax.data import tokenizer as tok_lib
from uit_jax.models import clip as clip_lib
from uit_jax.models import convert, layers
from uit_jax.models import uit as uit_lib

# ----------------------------------------------------------------------------------------------------------------
# Config -> objects


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"config.model.dtype={name!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.") from None


def validate_config(config, num_devices: int) -> None:
    """Fails before anything is built or compiled, with a message that says what to change."""
    errors = []
    if config.data.name not in data_defaults.DATASETS:
        names = sorted(data_defaults.DATASETS)
        errors.append(f"config.data.name={config.data.name!r} is not a known dataset; use one of {names}.")
    if config.batch_size <= 0 or config.batch_size % num_devices:
        errors.append(
            f"config.batch_size={config.batch_size} must be a positive multiple of the {num_devices} devices "
            f"(e.g. --config.batch_size={max(1, config.batch_size // num_devices) * num_devices or num_devices})."
        )
    if config.eval.batch_size <= 0 or config.eval.batch_size % num_devices:
        errors.append(
            f"config.eval.batch_size={config.eval.batch_size} must be a positive multiple of the {num_devices} devices."
        )
    if config.batch_size % jax.process_count():
        errors.append(f"config.batch_size={config.batch_size} must divide among {jax.process_count()} processes.")
    size = config.data.image_size
    if not (isinstance(size, tuple | list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(
            f"Invalid config: config.data.image_size={size!r} must be (height, width), two positive integers: "
            "write e.g. --config.data.image_size='(384, 128)'."
        )
    h, w = size
    stride = config.model.stride
    patch = clip_lib.config_from_preset(config.model.preset).patch_size if not config.model_init else None
    for side, name in ((h, "height"), (w, "width")):
        if stride and side % stride:
            errors.append(
                f"Image {name} {side} (config.data.image_size={tuple(config.data.image_size)}) is not a multiple of "
                f"the patch stride {stride} (config.model.stride): pick sizes divisible by {stride}."
            )
    if patch is not None and stride and stride != patch and config.loss.restoration:
        errors.append(f"config.model.stride={stride} != patch size {patch}: restoration needs stride == patch.")
    for k, v in config.loss.items():
        if k in steps.OBJECTIVES and v < 0:
            errors.append(f"config.loss.{k}={v} must be >= 0 (0 turns the objective off).")
    if config.loss.get("triplet_start_epochs", 0.0) < 0:
        errors.append(f"config.loss.triplet_start_epochs={config.loss.triplet_start_epochs} must be >= 0.")
    if not 0.0 <= config.model.drop_ratio < 1.0:
        errors.append(f"config.model.drop_ratio={config.model.drop_ratio} must be in [0, 1).")
    if config.model.get("remat", "none") not in layers.REMAT_POLICIES:
        errors.append(
            f"config.model.remat={config.model.remat!r} is not a remat policy: use one of "
            f"{', '.join(layers.REMAT_POLICIES)}."
        )
    attention = config.model.get("attention", "auto")
    if attention not in layers.ATTENTION_IMPLS:
        errors.append(
            f"config.model.attention={attention!r} is not an attention kernel: use one of "
            f"{', '.join(layers.ATTENTION_IMPLS)}."
        )
    elif attention == "cudnn" and jax.default_backend() != "gpu":
        errors.append(
            f"config.model.attention='cudnn' needs a CUDA GPU, but JAX's backend is {jax.default_backend()!r}: "
            "use --config.model.attention=xla."
        )
    elif attention == "cudnn" and config.model.dtype == "float32":
        errors.append(
            "config.model.attention='cudnn' runs in bfloat16 or float16 only, but config.model.dtype='float32': "
            "use --config.model.dtype=bfloat16 (or auto) or --config.model.attention=xla."
        )
    if config.loss.mlm > 0 and not config.data.mlm_outputs:
        errors.append(
            f"config.loss.mlm={config.loss.mlm} needs the masked captions from the data: set "
            "--config.data.mlm_outputs=True (or --config.loss.mlm=0)."
        )
    if errors:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))


@dataclasses.dataclass
class Setup:
    model: uit_lib.UIT
    clip_config: clip_lib.CLIPConfig
    init_clip_params: Any  # loaded CLIP weights, or None for a random init
    tokenizer: Any
    info: Any


def build(config, *, num_classes: int | None = None) -> Setup:
    """Prepares tokenizer, model (with pretrained CLIP weights when config.model_init is set) and data.

    Cheap checks first: the weights, the tokenizer and the tagger's data are loaded or checked before the dataset
    is generated, built or read, so a wrong path fails in seconds, not after minutes of dataset work.
    """
    dtype = compute_dtype(config.model.dtype)
    image_size = tuple(config.data.image_size)
    tok_src = config.tokenizer or config.model_init
    tokenizer = tok_lib.load_tokenizer(tok_src) if tok_src else None
    if config.model_init:
        clip_model, clip_params = convert.load(
            config.model_init, image_size=image_size, stride=config.model.stride or None, dtype=dtype
        )
    pipeline.check_ready(config.data)
    info = pipeline.prepare(config.data)
    if tokenizer is None:
        if not info.tokenizer_dir:
            raise ValueError("No tokenizer: set config.tokenizer or config.model_init (an HF id or folder).")
        tokenizer = tok_lib.load_tokenizer(info.tokenizer_dir)
    if config.model_init:
        clip_cfg = clip_model.config
    else:
        clip_cfg = clip_lib.config_from_preset(
            config.model.preset,
            vocab_size=len(tokenizer),
            image_size=image_size,
            stride=config.model.stride or None,
            text_len=config.data.text_len,
            eot_token_id=tok_lib.eot_id(tokenizer),
        )
        clip_params = None
    if clip_cfg.text_len != config.data.text_len:
        raise ValueError(
            f"config.data.text_len={config.data.text_len} but the CLIP text tower takes {clip_cfg.text_len} tokens; "
            f"set --config.data.text_len={clip_cfg.text_len}."
        )
    loss = config.loss
    model = uit_lib.UIT(
        clip_config=clip_cfg,
        num_classes=num_classes or info.num_train_ids,
        drop_ratio=config.model.drop_ratio,
        decoder_width=config.model.decoder_width,
        decoder_heads=config.model.decoder_heads,
        decoder_layers=config.model.decoder_layers,
        decoder_residual=config.model.decoder_residual,
        use_id=loss.id > 0,
        use_restoration=loss.restoration > 0,
        use_mlm=loss.mlm > 0,
        mlm_layers=config.model.mlm_layers,
        dtype=dtype,
        scan=config.model.get("scan_layers", False),
        remat=config.model.get("remat", "none"),  # checked by validate_config (and by the model itself)
        attention=config.model.get("attention", "auto"),
    )
    return Setup(model=model, clip_config=clip_cfg, init_clip_params=clip_params, tokenizer=tokenizer, info=info)


def steps_per_epoch(config, info) -> int:
    return max(1, info.num_train_pairs // config.batch_size)


def total_steps(config, info) -> int:
    return config.total_steps if config.total_steps > 0 else int(config.schedule.epochs * steps_per_epoch(config, info))


def make_tx(config, info, params):
    spe = steps_per_epoch(config, info)
    sched = config.schedule
    epochs = total_steps(config, info) / spe
    schedule = optim.make_schedule(
        base_lr=config.optim.lr,
        steps_per_epoch=spe,
        epochs=epochs,
        warmup_epochs=min(sched.warmup_epochs, epochs),
        warmup_factor=sched.warmup_factor,
        end_lr_factor=sched.end_lr_factor,
    )
    tx = optim.make_optimizer(params, schedule=schedule, **optim.config_kwargs(config.optim))
    return tx, schedule


def init_params(setup: Setup, rng) -> Any:
    """Random init of the whole model (the pretrained CLIP weights are put in by `_fresh_state`)."""
    cfg = setup.clip_config
    h, w = cfg.image_size
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    text = jnp.zeros((1, cfg.text_len), jnp.int32)
    mlm_text = text if setup.model.use_mlm else None
    return setup.model.init({"params": rng, "dropout": rng}, images, text, rng=rng, mlm_text=mlm_text)["params"]


class WorkdirInUseError(RuntimeError):
    pass


class _WorkdirLock:
    """One training run per workdir: an exclusive `flock` on WORKDIR/.lock, held for the whole run (process 0).

    The kernel releases the lock when its holder dies, so a lock file left by a killed run (a stale lock) is taken
    over, with a warning naming the dead holder; a live holder makes a second run refuse at once, naming it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self._f = None

    def __enter__(self):
        if jax.process_index() != 0:
            return self
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown holder"
            f.close()
            raise WorkdirInUseError(
                f"{os.path.dirname(self.path)} is in use by another run ({holder}); wait for it to finish, stop it, "
                "or choose another --workdir."
            ) from None
        f.seek(0)
        old = f.read().strip()
        if old:
            logging.warning("Taking over a stale workdir lock (%s): that run is gone.", old)
        f.seek(0)
        f.truncate()
        f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._f = f
        return self

    def __exit__(self, *exc):
        if self._f is not None:
            self._f.seek(0)
            self._f.truncate()  # a clean exit leaves no holder behind
            fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None


class _Preemption:
    """Turns SIGTERM into a flag the loop checks once per step (then it saves and exits cleanly)."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. under some test runners)
            self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step.")
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


# ----------------------------------------------------------------------------------------------------------------
# The loop


class NonFiniteLossError(RuntimeError):
    pass


def _sharded_state(config, setup, mesh, rng):
    """Abstract state, its shardings, and the jitted initialiser that builds it directly on the mesh."""
    params_shape = jax.eval_shape(lambda r: init_params(setup, r), rng)
    tx, schedule = make_tx(config, setup.info, params_shape)
    abstract = jax.eval_shape(lambda p: steps.init_state(p, tx), params_shape)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    specs = sharding.param_partition_specs(abstract, rules, mesh)
    state_sh = sharding.shardings_for(specs, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    return abstract, state_sh, tx, schedule


def _fresh_state(setup, tx, state_sh, rng):
    """A new state built on the mesh: jitted random init (fast), then the pretrained CLIP weights dropped in."""
    params = jax.jit(lambda r: init_params(setup, r), out_shardings=state_sh["params"])(rng)
    if setup.init_clip_params is not None:
        params = dict(params)
        ref, got = jax.tree.structure(params["clip"]), jax.tree.structure(setup.init_clip_params)
        if ref != got:
            raise ValueError(f"Loaded CLIP parameters do not match the model's tree:\n  model: {ref}\n  loaded: {got}")
        params["clip"] = jax.tree.map(
            lambda x, s: jax.device_put(np.asarray(x, np.float32), s),
            setup.init_clip_params,
            state_sh["params"]["clip"],
        )
    init = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)
    return init(params)


def _eval_split(config, setup, enc_img, enc_txt, params, mesh, split, details: bool = False):
    """Metrics of `split`; with details, (metrics, per-query rankings, gallery path -> encoded image)."""
    data = pipeline.load_split(config.data, split)
    gallery, queries = pipeline.make_eval_iterators(
        config.data,
        setup.tokenizer,
        split=split,
        batch_size=config.eval.batch_size // jax.process_count(),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        data=data,
    )
    keep = {} if details else None
    res = eval_lib.evaluate(enc_img, enc_txt, params, gallery, queries, mesh, keep=keep)
    if not details:
        return res
    first = np.unique(data["image_id"], return_index=True)[1]  # the gallery order of make_eval_iterators
    paths = [str(p) for p in data["file_path"][first]]
    ranked = report_lib.rankings(keep["similarity"], keep["query_pids"], keep["gallery_pids"], data["caption"], paths)
    by_path = dict(zip(paths, (data["images"][i] for i in data["image_id"][first]), strict=True))
    return res, ranked, by_path.__getitem__


def epochs_to_steps(epochs: float, spe: int) -> int:
    """The one unit rule: a cadence or start given in (fractional) epochs, as a step count (0 stays 0)."""
    return int(round(epochs * spe)) if epochs > 0 else 0


def _start(setup, ckpt, abstract, state_sh, tx, rng):
    """Resume from the newest intact checkpoint (damaged ones are reported and set aside), or a fresh state:
    (state, start step)."""
    restored = ckpt.restore_latest_intact(abstract)
    if restored is None:
        return _fresh_state(setup, tx, state_sh, rng), 0
    best = ckpt.best()
    logging.info(
        "Resuming from step %d (best val R1 so far: %s)", restored.step, "none" if best is None else f"{best[1]:.2f}"
    )
    return restored.state, restored.step


class _Loop:
    """The training loop's named pieces: log, evaluate-if-due, check non-finite steps, save-or-stop.

    Cadences are steps (`log.every_steps`, `checkpoint.every_steps`) or epochs (`eval.every_epochs`), turned into
    steps once by `epochs_to_steps`. "Best" and preemption belong to the Checkpointer.
    """

    def __init__(self, config, setup, mesh, workdir, writer, ckpt, enc, n_steps, stop_after):
        self.config, self.setup, self.mesh, self.workdir = config, setup, mesh, workdir
        self.writer, self.ckpt, self.enc, self.n_steps, self.stop_after = writer, ckpt, enc, n_steps, stop_after
        self.spe = steps_per_epoch(config, setup.info)
        self.eval_every = epochs_to_steps(config.eval.every_epochs, self.spe)
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

    def evaluate_if_due(self, step, params, report) -> float | None:
        """Validation R1 when an evaluation is due at `step` (every `eval.every_epochs`, and at the end)."""
        if not self.eval_every or (step % self.eval_every and step != self.n_steps):
            return None
        split = self.config.data.val_split
        with report.timed("eval"):
            res = _eval_split(self.config, self.setup, *self.enc, params, self.mesh, split)
        names = ("R1", "R5", "R10", "mAP", "mINP")
        self.writer.write_scalars(step, {f"eval/{split}/t2i_{_key(k)}": res[k] for k in names})
        _append_val_curve(self.workdir, step, step / self.spe, res)
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

    def save_or_stop(self, step, state, val_r1, preempted) -> bool:
        """Saves when due (an evaluation, `checkpoint.every_steps`, the end) or when stopping; True = stop now."""
        due = val_r1 is not None or step % self.config.checkpoint.every_steps == 0 or step == self.n_steps
        stop = preempted or step == self.stop_after or self.ckpt.reached_preemption(step)
        if due or stop:
            self.ckpt.save(step, state, dict(self.meta, epoch=step / self.spe), val_r1=val_r1)
        if stop:
            self.ckpt.wait()
            logging.warning("Stopped at step %d on request; rerun the same command to resume.", step)
            return True
        return False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
    """Trains, evaluates on validation periodically, tests at the best-validation checkpoint; returns results.

    Rerunning with the same workdir resumes from the latest checkpoint. `stop_after` ends this run (with a
    checkpoint) once that many steps are done, as a preemption would: for job schedulers with time limits.
    One run per workdir: a second one refuses at once (WorkdirInUseError), naming the first.
    """
    mesh = sharding.make_mesh(dict(config.mesh))
    validate_config(config, mesh.size)
    sharding.check_batch_divisible(config.batch_size, mesh)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    with _WorkdirLock(workdir):
        if jax.process_index() == 0:
            rundir.check_resume(workdir, config)  # before any dataset work: a wrong workdir fails in seconds
        _check_writable(os.path.join(workdir, "checkpoints"))
        return _train(config, workdir, mesh, stop_after)


def _check_writable(folder: str) -> None:
    """Creates `folder` and writes a probe file in it, so that an unwritable checkpoint folder (permissions, a
    read-only or full disk, a file in its place) stops the run before any dataset work or training."""
    probe = os.path.join(folder, f".write_probe.{socket.gethostname()}.{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok\n")
        os.remove(probe)
    except OSError as e:
        raise ckpt_lib.CheckpointError(
            f"Cannot write checkpoints to {folder}: {e.strerror or e} ({type(e).__name__}). Fix its permissions or "
            "free the disk, or choose another --workdir; nothing was trained."
        ) from e


def _make_train_step(config, setup, spe, tx, schedule, state_sh, mesh):
    """The jitted train step of the configured objectives (weights, temperature, triplet start)."""
    loss_fn = steps.make_loss_fn(
        setup.model,
        {k: config.loss[k] for k in steps.OBJECTIVES},
        logit_scale=1.0 / config.model.temperature,
        patch_size=setup.clip_config.patch_size,
        triplet_margin=config.loss.triplet_margin,
        norm_pix=config.loss.norm_pix,
        start_steps={"triplet": epochs_to_steps(config.loss.triplet_start_epochs, spe)},
    )
    split = bool(config.get("split_train_step", True))
    return steps.jit_train_step(loss_fn, tx, schedule, state_sh, mesh, split=split)


# How long a process waits for the others after compiling the train step: first compiles of a large model on a busy
# host take minutes; a process that died is reported sooner, by the coordination service's heartbeat.
_COMPILE_BARRIER_TIMEOUT_S = 1800


def _compile_then_meet(train_step, state, batch, rng) -> None:
    """Multi-process runs: compiles the train step's program(s) for these arguments (jit then reuses them), then
    waits for every process at a coordination-service barrier, so the first collective starts on all of them
    together. On CPU, gloo gives the processes a fixed 30 s to meet at a program's first collective, and the skew
    of process start-up plus compile exceeded it under CI load (tests/test_multiprocess_train.py)."""
    if jax.process_count() == 1:
        return
    t0 = time.perf_counter()
    lowered = train_step.lower(state, batch, rng)
    for x in lowered if isinstance(lowered, list) else [lowered]:
        x.compile()
    logging.info("Train step compiled in %.1f s; waiting for the other processes", time.perf_counter() - t0)
    t0 = time.perf_counter()
    sharding.wait_for_all_processes("uit_jax: train step compiled", _COMPILE_BARRIER_TIMEOUT_S)
    logging.info("All %d processes ready after %.1f s", jax.process_count(), time.perf_counter() - t0)


def _train(config, workdir, mesh, stop_after) -> dict:
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)

    setup = build(config)
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
    n_steps, spe = total_steps(config, info), steps_per_epoch(config, info)
    logging.info(
        "Dataset %s: %d train pairs, %d train ids; %d steps/epoch, %d steps",
        config.data.name,
        info.num_train_pairs,
        info.num_train_ids,
        spe,
        n_steps,
    )
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    abstract, state_sh, tx, schedule = _sharded_state(config, setup, mesh, init_rng)
    logging.info(
        "Optimizer groups:\n%s", optim.describe_groups(abstract["params"], **optim.config_kwargs(config.optim))
    )
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=config.checkpoint.async_save)
    state, start = _start(setup, ckpt, abstract, state_sh, tx, init_rng)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    if start == 0:
        hp = {k: v for k, v in _flat(config.to_dict()).items() if isinstance(v, (int, float, str, bool))}
        writer.write_hparams(hp)
    logging.info("Model: %.1fM parameters, compute dtype %s", n_params / 1e6, setup.model.dtype.__name__)

    train_step = _make_train_step(config, setup, spe, tx, schedule, state_sh, mesh)
    enc = eval_lib.jit_encoders(*steps.make_encode_fns(setup.model), mesh)
    data = pipeline.make_train_iterator(
        config.data,
        setup.tokenizer,
        global_batch=config.batch_size,
        seed=config.seed,
        start_step=start,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    report = periodic_actions.ReportProgress(num_train_steps=n_steps, writer=writer, every_steps=config.log.every_steps)
    loop = _Loop(config, setup, mesh, workdir, writer, ckpt, enc, n_steps, stop_after)

    step, pending = start, None  # pending: the previous step's metrics, read after the next step is dispatched
    with _Preemption() as preempt, jax.set_mesh(mesh), contextlib.closing(data):  # stops the input stream promptly
        while step < n_steps:
            batch = sharding.host_batch_to_global(next(data), mesh)
            if step == start:
                faults.point("compile")
                _compile_then_meet(train_step, state, batch, step_rng)
            state, metrics = train_step(state, batch, step_rng)
            step += 1
            if pending is not None:
                loop.check_nonfinite(*pending)
            pending = (step, metrics)
            report(step)
            loop.log(step, metrics)
            val_r1 = loop.evaluate_if_due(step, state["params"], report)
            if loop.save_or_stop(step, state, val_r1, preempt.requested):
                writer.flush()
                return {"stopped_at_step": step}
    ckpt.wait()
    if pending is not None:
        loop.check_nonfinite(*pending)

    results = final_evaluation(config, setup, ckpt, abstract, state, *enc, mesh, step, workdir, writer)
    results["nonfinite_steps"] = int(jax.device_get(state["nonfinite_total"]))
    writer.flush()
    ckpt.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def _append_val_curve(workdir: str, step: int, epoch: float, res: dict) -> None:
    """One line per validation in workdir/val_curve.jsonl (kept across resumes; tools/curves.py reads it)."""
    if jax.process_index() != 0:
        return
    row = dict(
        step=step, epoch=round(epoch, 3), **{k: round(float(res[k]), 2) for k in ("R1", "R5", "R10", "mAP", "mINP")}
    )
    with open(os.path.join(workdir, "val_curve.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def final_evaluation(config, setup, ckpt, abstract, state, enc_img, enc_txt, mesh, step, workdir=None, writer=None):
    """Test at the last step and at the best-validation checkpoint (the reported figure); the rankings and HTML
    report of the reported one go to WORKDIR/eval, and a few ranked queries to TensorBoard."""
    faults.point("final_eval")
    test = config.data.test_split
    results: dict[str, Any] = {"dataset": config.data.name, "steps": int(step)}
    rows = {}
    best_r1 = ckpt.best()
    best_is_last = best_r1 is not None and best_r1[0] == step  # then one evaluation serves both rows
    with jax.set_mesh(mesh):
        # The rankings and report are of the reported checkpoint: the best one when there is one, else the last.
        details = best_r1 is None or best_is_last
        last = _eval_split(config, setup, enc_img, enc_txt, state["params"], mesh, test, details=details)
        if details:
            last, ranked, source = last
        label = f"last (step {step})"
        results["test_at_last"] = last
        rows[f"{test} @ {label}"] = last
        if best_r1 is not None:
            best, r1 = best_r1
            results["best_step"] = best
            results["val_at_best"] = {"R1": r1}
            if best_is_last:
                res = last
            else:
                best_params = ckpt.restore(best, abstract).state["params"]
                res, ranked, source = _eval_split(
                    config, setup, enc_img, enc_txt, best_params, mesh, test, details=True
                )
            label = f"best val (step {best})"
            results["test_at_best"] = res
            rows[f"{test} @ {label}"] = res
    table = eval_lib.format_table(rows)
    results["table"] = table
    if jax.process_index() == 0:
        print(f"\nText-to-image retrieval on {config.data.name} ({test}):\n{table}\n", flush=True)
        if workdir is not None:
            title = f"{config.data.name} {test} @ {label}"
            out = report_lib.write_split_report(os.path.join(workdir, "eval"), test, ranked, source, title=title)
            results["report"] = list(out)
            logging.info("Rankings and report of %s: %s", test, ", ".join(out))
        if writer is not None:
            grid = report_lib.grid_image(report_lib.sample(ranked, 2), source)
            writer.write_images(int(step), {f"{test}/ranked_queries": grid[None]})
    return results


def evaluate_checkpoint(config, workdir: str, step: int | None = None, which: str = "best") -> dict:
    """`--mode=eval`: restores a checkpoint (best by validation, latest, or `step`) and evaluates val and test.

    With no checkpoint in the workdir and `model_init` set, evaluates those weights as they are (the zero-shot
    baseline: what fine-tuning buys). Also writes the per-query rankings and an HTML report under WORKDIR/eval.
    """
    workdir = os.path.abspath(workdir)
    ck_dir = os.path.join(workdir, "checkpoints")
    has_ckpt = os.path.isdir(ck_dir) and any(name.isdigit() for name in os.listdir(ck_dir))
    if not has_ckpt and (step is not None or not config.model_init):
        # Before anything is built or created (an Orbax manager would create the folder).
        raise FileNotFoundError(
            f"No checkpoint under {ck_dir}; train first (--mode=train) or fix --workdir"
            + ("" if config.model_init else ", or set --config.model_init to evaluate pre-trained weights zero-shot")
            + "."
        )
    if has_ckpt and jax.process_index() == 0:
        rundir.check_resume(workdir, config)
    mesh = sharding.make_mesh(dict(config.mesh))
    validate_config(config, mesh.size)
    setup = build(config)
    enc_img, enc_txt = eval_lib.jit_encoders(*steps.make_encode_fns(setup.model), mesh)
    if has_ckpt:
        ckpt = ckpt_lib.Checkpointer(ck_dir, async_save=False)
        if step is None:
            best = ckpt.best() if which == "best" else None
            step = best[0] if best is not None else ckpt.latest_step()
        abstract, _, _, _ = _sharded_state(config, setup, mesh, jax.random.key(config.seed))
        params = ckpt.restore(step, abstract).state["params"]
        ckpt.close()
        label = f"step {step}"
    else:
        logging.info("No checkpoint in %s: evaluating %s zero-shot (no fine-tuning).", workdir, config.model_init)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put({"clip": setup.init_clip_params}, replicated)
        label, step = "zero-shot", 0
    rows = {}
    with jax.set_mesh(mesh):
        for split in (config.data.val_split, config.data.test_split):
            res, ranked, source = _eval_split(config, setup, enc_img, enc_txt, params, mesh, split, details=True)
            rows[f"{split} @ {label}"] = res
            if jax.process_index() == 0:
                out = report_lib.write_split_report(
                    os.path.join(workdir, "eval"), split, ranked, source, title=f"{config.data.name} {split} @ {label}"
                )
                logging.info("Rankings and report of %s: %s", split, ", ".join(out))
    table = eval_lib.format_table(rows)
    if jax.process_index() == 0:
        print("\n" + table + "\n", flush=True)
        name = f"eval_step{step}.json" if has_ckpt else "eval_zero_shot.json"
        with open(os.path.join(workdir, name), "w") as f:
            json.dump({"step": step, "results": rows}, f, indent=2)
    return {"step": step, "results": rows, "table": table}


def _key(k: str) -> str:
    return {"R1": "r1", "R5": "r5", "R10": "r10", "mAP": "map", "mINP": "minp"}[k]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
