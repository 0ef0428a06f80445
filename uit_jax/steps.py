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


def make_grad_step(loss_fn: Callable) -> Callable:
    """Returns `grad_step(params, batch, rng, step) -> (loss, parts, grads)`: the forward and backward pass."""

    def grad_step(params, batch, rng, step):
        rng = jax.random.fold_in(rng, step)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, step)
        return loss, parts, grads

    return grad_step


def make_update_step(tx: optax.GradientTransformation, schedule: Callable | None = None) -> Callable:
    """Returns `update_step(state, grads, loss, parts) -> (state, metrics)`: the optimiser update, kept only when
    the loss and the gradients are finite, and the step's metrics."""

    def update_step(state: State, grads, loss, parts):
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

    return update_step


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: Callable | None = None):
    """Returns `train_step(state, batch, rng) -> (state, metrics)`; jit it with shardings and donation."""
    grad_step, update_step = make_grad_step(loss_fn), make_update_step(tx, schedule)

    def train_step(state: State, batch, rng):
        loss, parts, grads = grad_step(state["params"], batch, rng, state["step"])
        return update_step(state, grads, loss, parts)

    return train_step


class SplitTrainStep:
    """The train step as two jitted programs run one after the other: the gradient, then the update.

    Same arguments, results, shardings and donation as the single program (`make_train_step`). Why two: XLA:CPU
    loads an executable's fusions in time that grows with its instruction count, so the optimiser's per-tensor
    instructions no longer multiply the gradient's matmul fusions: the two compile faster apart and load from the
    persistent cache three times faster (docs/benchmarks.md).
    """

    def __init__(self, grad_step, update_step):
        self.grad_step, self.update_step = grad_step, update_step

    def __call__(self, state: State, batch, rng):
        loss, parts, grads = self.grad_step(state["params"], batch, rng, state["step"])
        return self.update_step(state, grads, loss, parts)

    def lower(self, state: State, batch, rng) -> list:
        """Both programs lowered for these (concrete or abstract) arguments: `[grad, update]`."""
        grad = self.grad_step.lower(state["params"], batch, rng, state["step"])
        loss, parts, grads = jax.tree.map(
            lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=o.sharding), grad.out_info
        )
        return [grad, self.update_step.lower(state, grads, loss, parts)]


def jit_train_step(
    loss_fn: Callable, tx: optax.GradientTransformation, schedule, state_sharding, mesh, *, split: bool = False
):
    """The train step jitted for `mesh`: state in `state_sharding` (donated), batch split over the data axes,
    rng and metrics replicated; `split`: as a `SplitTrainStep` (two programs). Shared by the trainer and
    tools/benchmark.py."""
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = sharding.batch_sharding(mesh)
    if not split:
        return jax.jit(
            make_train_step(loss_fn, tx, schedule),
            in_shardings=(state_sharding, data, repl),
            out_shardings=(state_sharding, repl),
            donate_argnums=(0,),
        )
    params_sh = state_sharding["params"]
    grad_step = jax.jit(
        make_grad_step(loss_fn),
        in_shardings=(params_sh, data, repl, repl),
        out_shardings=(repl, repl, params_sh),
    )
    update_step = jax.jit(
        make_update_step(tx, schedule),
        in_shardings=(state_sharding, params_sh, repl, repl),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),  # the gradients match no output buffer: donating them would only warn
    )
    return SplitTrainStep(grad_step, update_step)


def make_encode_fns(model):
    """Returns `(encode_images(params, images), encode_texts(params, ids))`, both giving unit-norm (B, E) float32."""

    def _norm(z):
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)

    def encode_images(params, images):
        return _norm(model.apply({"params": params}, images, method=model.encode_image))

    def encode_texts(params, ids):
        return _norm(model.apply({"params": params}, ids, method=model.encode_text))

    return encode_images, encode_texts
