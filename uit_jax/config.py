"""What a valid config is, and the one rule that turns epochs into steps.

`validate` fails before anything is built or compiled, with a message that says what to change. Cadences and starts
given in (fractional) epochs become step counts through `epochs_to_steps` alone: the run's length, the evaluation
cadence and the triplet's start. The lr schedule is a function of the fractional epoch `step / steps_per_epoch`.
"""

from __future__ import annotations

import jax

from uit_jax import steps
from uit_jax.data import defaults as data_defaults
from uit_jax.models import clip as clip_lib
from uit_jax.models import layers


def steps_per_epoch(config, num_train_pairs: int) -> int:
    """Whole global batches in one pass over the training pairs (the sampler drops the remainder)."""
    return max(1, num_train_pairs // config.batch_size)


def epochs_to_steps(epochs: float, spe: int) -> int:
    """A length, cadence or start given in (fractional) epochs, as a step count, rounded to the nearest step
    (0 stays 0)."""
    return int(round(epochs * spe)) if epochs > 0 else 0


def total_steps(config, num_train_pairs: int) -> int:
    """The run's length: `config.total_steps` when set (> 0), else `schedule.epochs` epochs."""
    if config.total_steps > 0:
        return config.total_steps
    return epochs_to_steps(config.schedule.epochs, steps_per_epoch(config, num_train_pairs))


def validate(config, num_devices: int) -> None:
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
    errors += _eval_errors(config) + _micro_batch_errors(config, num_devices)
    if errors:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))


def _eval_errors(config) -> list[str]:
    """The evaluation block: the selection rule and a cross-domain target."""
    errors = []
    select_on = config.eval.get("select_on", "val")
    if select_on not in ("val", "test"):
        errors.append(
            f"config.eval.select_on={select_on!r}: use 'val' (select on the validation split) or 'test' (the papers' "
            "protocol, best epoch on test)."
        )
    target = config.eval.get("dataset", "")
    if target and target not in data_defaults.DATASETS:
        errors.append(
            f"config.eval.dataset={target!r} is not a known dataset; use one of {sorted(data_defaults.DATASETS)} "
            "(or '' for the run's own)."
        )
    return errors


def _micro_batch_errors(config, num_devices: int) -> list[str]:
    """Gradient caching's chunk size must divide the per-device batch (checked once the batch divides at all)."""
    if config.batch_size <= 0 or config.batch_size % num_devices:
        return []
    try:
        steps.check_micro_batch(config.get("micro_batch", 0), config.batch_size, num_devices)
    except ValueError as e:
        return [str(e)]
    return []
