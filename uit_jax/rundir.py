"""A run's workdir: one run at a time (`WorkdirLock`), and it describes itself: `config.json` (the full resolved
config), `model.json` (the CLIP towers' shape and the preprocessing) and `tokenizer/` (the tokenizer files), written
when training starts.

`--mode=eval`, `uit_jax.export` and `uit_jax.retrieval` read them, so nothing has to be retyped and a trained run can
be searched without its dataset. Plain JSON and the standard library only: importable without TensorFlow or
ml_collections (the accelerator image has neither).

On resume the stored config is compared with the new one, field by field: a change that alters parameter shapes or
the data a checkpoint was trained on is refused (`ConfigChangedError`), any other change is reported and recorded.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
TOKENIZER_DIR = "tokenizer"
CHANGES_FILE = "config_changes.jsonl"

# Fields whose change makes the checkpoint's parameters the wrong shape (or the wrong dataset's classifier), or the
# kept checkpoints' selection scores incomparable (eval.select_on): a resume with any of these changed is refused.
SHAPE_FIELDS = (
    "eval.select_on",
    "model_init",
    "model.preset",
    "model.stride",
    "model.decoder_width",
    "model.decoder_heads",
    "model.decoder_layers",
    "model.mlm_layers",
    "data.name",
    "data.image_size",
    "data.text_len",
)
# Objectives whose modules exist only when their weight is > 0: turning one on or off changes the parameters.
MODULE_WEIGHTS = ("loss.restoration", "loss.mlm", "loss.id")


class ConfigChangedError(ValueError):
    pass


class WorkdirInUseError(RuntimeError):
    pass


class WorkdirLock:
    """One training run per workdir: an exclusive `flock` on WORKDIR/.lock, held for the whole run (process 0).

    The kernel releases the lock when its holder dies, so a lock file left by a killed run (a stale lock) is taken
    over, with a warning naming the dead holder; a live holder makes a second run refuse at once, naming it.
    """

    def __init__(self, workdir: str, *, holder: bool = True):
        self.path = os.path.join(workdir, ".lock")
        self.holder = holder  # False on processes other than 0: they take no lock
        self._f = None

    def __enter__(self):
        if not self.holder:
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


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level, keys joined by dots (`model.stride`)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def config_to_dict(config) -> dict:
    """An ml_collections ConfigDict (or a dict) as plain JSON types; tuples become lists."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return _jsonable(d)


def read_config(workdir: str) -> dict | None:
    """The stored config of a run as a plain dict, or None when the workdir has none (a run before this file)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not readable JSON ({e}); restore it from a backup or delete it.") from e


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) for every flattened field that differs (added or removed fields too)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k, "<absent>"), b.get(k, "<absent>")) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# What a field absent from an older run's config.json meant then (it was added later with this behaviour).
ADDED_FIELDS = {"eval.select_on": "val"}


def _changes_shapes(key: str, old, new) -> bool:
    if key in ADDED_FIELDS and ADDED_FIELDS[key] in (old, new) and "<absent>" in (old, new):
        return False
    if key in MODULE_WEIGHTS:
        return _positive(old) != _positive(new)
    return any(key == f or key.startswith(f + ".") for f in SHAPE_FIELDS)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


def check_resume(workdir: str, config) -> dict:
    """Compares `config` with the workdir's stored one before a resume.

    Returns the new config as a dict. Raises ConfigChangedError naming every changed field that alters shapes or
    data; logs (and appends to config_changes.jsonl) the other changes.
    """
    new = config_to_dict(config)
    old = read_config(workdir)
    if old is None:
        return new
    changes = config_changes(old, new)
    fatal = [c for c in changes if _changes_shapes(*c)]
    if fatal:
        lines = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in fatal)
        raise ConfigChangedError(
            f"{os.path.join(workdir, CONFIG_FILE)} was written by a run with other model or data settings; its "
            f"checkpoints do not fit this config:\n  {lines}\nUse another --workdir, or pass the stored values."
        )
    if changes:
        logging.warning(
            "Resuming %s with a changed config (recorded in %s):\n  %s",
            workdir,
            CHANGES_FILE,
            "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changes),
        )
    return new


def write_config(workdir: str, config) -> None:
    """Writes config.json (atomically), recording any change from the previous one in config_changes.jsonl."""
    new = config_to_dict(config)
    old = read_config(workdir)
    if old is not None:
        changes = config_changes(old, new)
        if not changes:
            return
        row = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "changes": [{"field": k, "old": a, "new": b} for k, a, b in changes],
        }
        with open(os.path.join(workdir, CHANGES_FILE), "a") as f:
            f.write(json.dumps(row) + "\n")
    _write_json(os.path.join(workdir, CONFIG_FILE), new)


def write_model(workdir: str, clip_config, tokenizer, *, image_size, num_classes: int | None = None) -> None:
    """model.json (the CLIP towers' config, image size and pixel normalisation) and tokenizer/."""
    from uit_jax.models import layers  # noqa: PLC0415 - jax-only import, kept out of the module's import

    desc = {
        "clip": dataclasses.asdict(clip_config),
        "image_size": [int(s) for s in image_size],
        "mean": list(layers.CLIP_MEAN),
        "std": list(layers.CLIP_STD),
        "num_classes": num_classes,
    }
    _write_json(os.path.join(workdir, MODEL_FILE), _jsonable(desc))
    tok_dir = os.path.join(workdir, TOKENIZER_DIR)
    tmp = tok_dir + ".partial"
    tokenizer.save_pretrained(tmp)
    if os.path.isdir(tok_dir):
        import shutil  # noqa: PLC0415

        shutil.rmtree(tok_dir)
    os.replace(tmp, tok_dir)


def read_model(workdir: str) -> dict:
    path = os.path.join(workdir, MODEL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: this workdir was not written by uit_jax training (or predates model.json). "
            "Rerun the training command on it once (it resumes and writes the file), or pass a model folder."
        )
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, obj) -> None:
    tmp = path + ".partial"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
