"""Entry point: flags (--config, --workdir, --mode), jax.distributed, TensorFlow kept off accelerators, dispatch.

  python -m uit_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m uit_jax.main --config=configs/cuhk.py --workdir=runs/cuhk --config.data.manual_dir=/data/CUHK-PEDES
  python -m uit_jax.main --config=configs/cuhk.py --workdir=runs/cuhk --mode=eval
  python -m uit_jax.main --workdir=runs/cuhk --mode=eval --eval_dataset=icfg --eval_manual_dir=/data/ICFG-PEDES

Multi-host (Cloud TPU pods, multi-node GPU): run the same command on every host. With --distributed the JAX
runtime finds its peers from the environment (TPU metadata, SLURM, Open MPI); or pass --coordinator_address,
--num_processes and --process_id explicitly.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Config file, e.g. configs/cuhk.py[:vit-l14]. Optional with --mode=eval: the run's WORKDIR/config.json is used.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results.json go.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if workdir has checkpoints) or eval.")
_EVAL_STEP = flags.DEFINE_integer("eval_step", None, "--mode=eval: checkpoint step (default: best by validation R1).")
# Cross-domain --mode=eval (the flags of config.eval.dataset / manual_dir / data_dir / tagger): they need no config,
# so they work on a workdir without retyping its config, and on an exported model folder, which has none.
_EVAL_DATASET = flags.DEFINE_string(
    "eval_dataset", "", "--mode=eval: evaluate on this dataset's test split instead (cuhk, icfg, rstp): cross-domain."
)
_EVAL_MANUAL_DIR = flags.DEFINE_string("eval_manual_dir", "", "With --eval_dataset: that dataset's official folder.")
_EVAL_DATA_DIR = flags.DEFINE_string("eval_data_dir", "", "With --eval_dataset: where its tfds build goes.")
_EVAL_TAGGER = flags.DEFINE_string("eval_tagger", "", "With --eval_dataset: its POS tagger at build (data.tagger).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detects the cluster).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for jax.distributed.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes for jax.distributed.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index for jax.distributed.")
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout",
    100,
    "Multi-process: seconds without a heartbeat after which a process is declared dead and the others exit with an "
    "error (JAX's distributed runtime; its default is 100).",
)
_LIB_LOGS = flags.DEFINE_bool("library_logs", False, "Show INFO logs of orbax, tfds, jax (hidden by default).")

flags.mark_flags_as_required(["workdir"])


def _hide_accelerators_from_tf():
    # TensorFlow only feeds data; it must not grab GPU memory or TPU cores that JAX needs.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    try:
        tf.config.set_visible_devices([], "TPU")
    except (ValueError, RuntimeError):
        pass


class _OwnInfoOnly(pylogging.Filter):
    """Keeps INFO lines from uit_jax and CLU's metric writers; libraries' INFO chatter (orbax writes a dozen
    lines per checkpoint) is dropped. Warnings and errors always pass."""

    KEEP = (os.sep + "uit_jax" + os.sep, os.sep + "clu" + os.sep)

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or any(k in record.pathname for k in self.KEEP)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from uit_jax import host_memory

    try:
        malloc = host_memory.enable()  # first: before TensorFlow and JAX start their threads
    except ValueError as e:  # a bad UIT_JAX_MALLOC: one sentence, no traceback
        _fatal(e)
    if not _LIB_LOGS.value:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _hide_accelerators_from_tf()
    import jax

    from uit_jax import compile_cache

    cache = compile_cache.enable()
    if _COORD.value or _DISTRIBUTED.value:
        jax.distributed.initialize(
            coordinator_address=_COORD.value,
            num_processes=_NPROC.value,
            process_id=_PID.value,
            heartbeat_timeout_seconds=_HEARTBEAT.value,
        )
    logging.info(
        "JAX %s: process %d of %d, %d local / %d global %s devices",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.default_backend(),
    )
    logging.info("Compilation cache: %s", cache or f"off ({compile_cache.ENV} is empty)")
    logging.info("Host malloc: %s", malloc)
    from uit_jax import evaluate, train

    try:
        if _MODE.value == "train" and _EVAL_DATASET.value:
            raise app.UsageError("--eval_dataset is for --mode=eval (cross-domain evaluation of a trained run).")
        if _MODE.value == "eval" and _EVAL_DATASET.value:
            # Cross-domain needs the model, not the training config: a workdir or an exported model folder.
            given = _CONFIG.value  # --config, if any, sets the batch size and compute dtype
            evaluate.evaluate_transfer(
                _WORKDIR.value,
                _EVAL_DATASET.value,
                manual_dir=_EVAL_MANUAL_DIR.value,
                data_dir=_EVAL_DATA_DIR.value or None,
                tagger=_EVAL_TAGGER.value,
                step=_EVAL_STEP.value if _EVAL_STEP.value is not None else "best",
                batch_size=given.eval.batch_size if given is not None else 256,
                dtype=given.model.dtype if given is not None else "auto",
            )
            return
        config = _config()
        if _MODE.value == "train":
            train.train_and_evaluate(config, _WORKDIR.value)
        else:
            evaluate.evaluate_run(config, _WORKDIR.value, step=_EVAL_STEP.value)
    except Exception as e:  # noqa: BLE001 - every fatal error: one clear message, then a prompt exit
        _fatal(e)


def _config():
    """--config, or with --mode=eval and no --config, the config the run stored in WORKDIR/config.json."""
    if _CONFIG.value is not None:
        return _CONFIG.value
    if _MODE.value == "train":
        raise app.UsageError("--config is required for training (e.g. --config=configs/synthetic.py).")
    import ml_collections

    from uit_jax import rundir

    stored = rundir.read_config(_WORKDIR.value)
    if stored is None:
        raise FileNotFoundError(
            f"{os.path.join(_WORKDIR.value, rundir.CONFIG_FILE)} does not exist: pass --config (runs trained before "
            "config.json was written need it), or fix --workdir."
        )
    logging.info("Using the config stored in %s", os.path.join(_WORKDIR.value, rundir.CONFIG_FILE))
    return ml_collections.ConfigDict(stored)


def _describe(e: BaseException) -> str:
    """The error a user should read: a background thread's error re-raised by CLU or Orbax is unwrapped."""
    while type(e).__name__ == "AsyncError" and e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}"


def _fatal(e: BaseException) -> None:
    """Logs the error (message first, traceback after) and exits with status 1 at once.

    A plain raise would let Python wait at exit for Orbax's and CLU's background threads, which can hang for
    minutes after a failed save; os._exit does not wait. Nothing is lost: checkpoints are finalised or discarded
    atomically by Orbax, and the logs are flushed first.
    """
    logging.error("Fatal: %s", _describe(e), exc_info=e)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def run():
    # Show absl INFO logs (progress, metrics) on stderr unless the user chose otherwise.
    if not any(a.startswith(("--verbosity", "-v", "--logtostderr", "--stderrthreshold")) for a in sys.argv):
        sys.argv.append("--stderrthreshold=info")
    app.run(main)


if __name__ == "__main__":
    run()
