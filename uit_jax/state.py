"""The train state and what it is made of: compute dtype, the UIT model from config, parameter init, the optimiser,
the sharded abstract state, and a fresh state built directly on the mesh.

No TensorFlow, no data: tools/benchmark.py builds its state with these functions on accelerator images that have
neither. The config is read here and turned into keyword arguments; the models never see it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uit_jax import config as config_lib
from uit_jax import optim, sharding, steps
from uit_jax.models import uit as uit_lib


def compute_dtype(name: str):
    """`config.model.dtype` as a jnp dtype: 'auto' is bfloat16 on GPU/TPU and float32 on CPU."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    try:
        return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]
    except KeyError:
        raise ValueError(f"config.model.dtype={name!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.") from None


def make_model(config, clip_config, num_classes: int) -> uit_lib.UIT:
    """The UIT model of `config`: a module exists only for the objectives whose weight is > 0."""
    m, loss = config.model, config.loss
    return uit_lib.UIT(
        clip_config=clip_config,
        num_classes=num_classes,
        drop_ratio=m.drop_ratio,
        decoder_width=m.decoder_width,
        decoder_heads=m.decoder_heads,
        decoder_layers=m.decoder_layers,
        decoder_residual=m.decoder_residual,
        use_id=loss.id > 0,
        use_restoration=loss.restoration > 0,
        use_mlm=loss.mlm > 0,
        mlm_layers=m.mlm_layers,
        dtype=compute_dtype(m.dtype),
        scan=m.get("scan_layers", False),
        remat=m.get("remat", "none"),
        attention=m.get("attention", "auto"),
    )


def init_params(model: uit_lib.UIT, rng) -> Any:
    """A random init of the whole model (pretrained CLIP weights are put in by `fresh_state`)."""
    cfg = model.clip_config
    h, w = cfg.image_size
    images = jnp.zeros((1, h, w, 3), jnp.float32)
    text = jnp.zeros((1, cfg.text_len), jnp.int32)
    mlm_text = text if model.use_mlm else None
    return model.init({"params": rng, "dropout": rng}, images, text, rng=rng, mlm_text=mlm_text)["params"]


def make_optimizer(config, params, num_train_pairs: int):
    """(tx, schedule): SEN's Adam and parameter groups, warm-up then cosine over the run's length in epochs."""
    spe = config_lib.steps_per_epoch(config, num_train_pairs)
    epochs = config_lib.total_steps(config, num_train_pairs) / spe
    sched = config.schedule
    schedule = optim.make_schedule(
        base_lr=config.optim.lr,
        steps_per_epoch=spe,
        epochs=epochs,
        warmup_epochs=min(sched.warmup_epochs, epochs),
        warmup_factor=sched.warmup_factor,
        end_lr_factor=sched.end_lr_factor,
    )
    return optim.make_optimizer(params, schedule=schedule, **optim.config_kwargs(config.optim)), schedule


def abstract_state(model, tx, mesh, rules, rng, *, params=None):
    """(abstract state, its shardings): shapes and dtypes from `jax.eval_shape`, shardings from the regex `rules`,
    so that a checkpoint restores straight into them and `fresh_state` builds them on the mesh. `params`: the
    abstract parameters when the caller has them already."""
    if params is None:
        params = jax.eval_shape(lambda r: init_params(model, r), rng)
    abstract = jax.eval_shape(lambda p: steps.init_state(p, tx), params)
    shardings = sharding.shardings_for(sharding.param_partition_specs(abstract, rules, mesh), mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def train_state_spec(config, model, mesh, rng, num_train_pairs: int):
    """(abstract state, shardings, tx, schedule) of a training run of `config`."""
    params = jax.eval_shape(lambda r: init_params(model, r), rng)
    tx, schedule = make_optimizer(config, params, num_train_pairs)
    rules = tuple(tuple(r) for r in config.sharding_rules)
    abstract, shardings = abstract_state(model, tx, mesh, rules, rng, params=params)
    return abstract, shardings, tx, schedule


def fresh_state(model, tx, shardings, rng, clip_params=None):
    """A new state on the mesh: a jitted random init (each device makes its own shards), then the pretrained CLIP
    weights (`clip_params`, host arrays) put in place of the random ones."""
    params = jax.jit(lambda r: init_params(model, r), out_shardings=shardings["params"])(rng)
    if clip_params is not None:
        params = dict(params)
        ref, got = jax.tree.structure(params["clip"]), jax.tree.structure(clip_params)
        if ref != got:
            raise ValueError(f"Loaded CLIP parameters do not match the model's tree:\n  model: {ref}\n  loaded: {got}")
        params["clip"] = jax.tree.map(
            lambda x, s: jax.device_put(np.asarray(x, np.float32), s), clip_params, shardings["params"]["clip"]
        )
    return jax.jit(lambda p: steps.init_state(p, tx), out_shardings=shardings)(params)
