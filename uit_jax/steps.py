"""Pure builders of the jitted computations: the train step and the encoders used for retrieval. No I/O.

State is a small pytree `{params, opt_state, step, nonfinite_run, nonfinite_total}`. The train step folds the step
into the rng, computes every enabled objective on the global batch (XLA inserts the collectives when the batch is
sharded), and skips an update whose loss or gradients are not finite: parameters and optimiser state are kept, the
step still advances (so the data stays in step), and the skip is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from uit_jax import losses, sharding

State = dict[str, Any]

OBJECTIVES = ("sdm", "id", "triplet", "restoration", "itc", "mlm")


def init_state(params, tx: optax.GradientTransformation) -> State:
    return dict(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def make_loss_fn(
    model,
    weights: Mapping[str, float],
    *,
    logit_scale: float,
    patch_size: int,
    triplet_margin: float = 0.05,
    norm_pix: bool = False,
    start_steps: Mapping[str, int] | None = None,
) -> Callable:
    """Returns `loss_fn(params, batch, rng, step=None) -> (total, parts)`; objectives with weight 0 are not computed.

    `start_steps` maps an objective to the first step whose total includes it (before that it is still computed
    and logged, with weight 0). From scratch, the hardest-negative triplet collapses the embedding (every distance
    equal, loss = 2 x margin) unless SDM has shaped it first; the synthetic config starts it after a few epochs.
    """
    unknown = (set(weights) | set(start_steps or {})) - set(OBJECTIVES)
    if unknown:
        raise ValueError(f"Unknown loss weights {sorted(unknown)}; known objectives: {OBJECTIVES}.")
    w = {k: float(weights.get(k, 0.0)) for k in OBJECTIVES}
    starts = {k: int(v) for k, v in (start_steps or {}).items() if int(v) > 0 and w[k]}

    def weight(name, step):
        if name not in starts:
            return w[name]
        if step is None:
            raise ValueError(f"loss '{name}' starts at step {starts[name]}: call loss_fn(..., step=...).")
        return jnp.where(step >= starts[name], w[name], 0.0)

    def loss_fn(params, batch, rng, step=None):
        out = model.apply({"params": params}, batch["images"], batch["text"], rng=rng, mlm_text=batch.get("mlm_text"))
        pid = batch["pid"]
        parts = {}
        if w["sdm"]:
            parts["sdm"] = losses.sdm(out["z_img"], out["z_txt"], pid, logit_scale)
        if w["itc"]:
            parts["itc"] = losses.itc(out["z_img"], out["z_txt"], logit_scale)
        if w["id"]:
            parts["id"] = losses.id_loss(out["logits_img"], out["logits_txt"], pid)
        if w["triplet"]:
            parts["triplet"] = losses.triplet(out["z_img"], out["z_txt"], pid, margin=triplet_margin)
        if w["restoration"]:
            target = losses.patchify(batch["images"].astype(jnp.float32), patch_size)
            parts["restoration"] = losses.restoration(out["pixels_pred"], target, out["patch_mask"], norm_pix=norm_pix)
        if w["mlm"]:
            parts["mlm"] = losses.mlm(out["mlm_logits"], batch["mlm_labels"])
        total = sum(weight(k, step) * v for k, v in parts.items())
        return total, parts

    return loss_fn


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable | None = None):
    """Returns `train_step(state, batch, rng) -> (state, metrics)`; jit it with shardings and donation."""

    def train_step(state: State, batch, rng):
        rng = jax.random.fold_in(rng, state["step"])
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, rng, state["step"])
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        new_state = dict(
            params=keep(params, state["params"]),
            opt_state=keep(opt_state, state["opt_state"]),
            step=state["step"] + 1,
            nonfinite_run=jnp.where(finite, 0, state["nonfinite_run"] + 1),
            nonfinite_total=state["nonfinite_total"] + (~finite).astype(jnp.int32),
        )
        metrics = {"loss": loss, **{f"loss_{k}": v for k, v in parts.items()}}
        metrics.update(
            grad_norm=grad_norm,
            param_norm=optax.global_norm(new_state["params"]),
            skipped=(~finite).astype(jnp.int32),
            nonfinite_run=new_state["nonfinite_run"],
            nonfinite_total=new_state["nonfinite_total"],
        )
        if schedule is not None:
            metrics["lr"] = schedule(state["step"])
        return new_state, metrics

    return train_step


def jit_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, state_sharding, mesh):
    """The train step jitted for `mesh`: state in `state_sharding` (donated), batch split over the data axes,
    rng and metrics replicated. Shared by the trainer and tools/benchmark.py."""
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.jit(
        make_train_step(loss_fn, tx, schedule),
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )


def make_encode_fns(model):
    """Returns `(encode_images(params, images), encode_texts(params, ids))`, both giving unit-norm (B, E) float32."""

    def _norm(z):
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)

    def encode_images(params, images):
        return _norm(model.apply({"params": params}, images, method=model.encode_image))

    def encode_texts(params, ids):
        return _norm(model.apply({"params": params}, ids, method=model.encode_text))

    return encode_images, encode_texts
