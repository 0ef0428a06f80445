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
from uit_jax.models import clip as clip_lib

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


class LossFn:
    """The training objective: `loss_fn(params, batch, rng, step=None) -> (total, parts)`, built by `make_loss_fn`.

    Its two halves are what `make_gradcache_grad_step` assembles the same objective from, chunk by chunk: the
    objectives of the embeddings (`embedding_parts`: SDM, ITC and the triplet compare every row of the batch with
    every other; the ID head is a function of the embedding, so it is computed there too) and those of each row
    (`row_parts`: restoration, MLM), which the re-run of every chunk adds up.
    """

    def __init__(self, model, w, starts, *, logit_scale, patch_size, triplet_margin, norm_pix):
        self.model, self.w, self.starts = model, w, starts
        self.logit_scale, self.patch_size = logit_scale, patch_size
        self.triplet_margin, self.norm_pix = triplet_margin, norm_pix

    def weight(self, name, step):
        if name not in self.starts:
            return self.w[name]
        if step is None:
            raise ValueError(f"loss '{name}' starts at step {self.starts[name]}: call loss_fn(..., step=...).")
        return jnp.where(step >= self.starts[name], self.w[name], 0.0)

    def embedding_parts(self, z_img, z_txt, logits_img, logits_txt, pid) -> dict:
        """The enabled objectives of the batch's embeddings (and identity logits), in `EMBEDDING_OBJECTIVES` order."""
        w, parts = self.w, {}
        if w["sdm"]:
            parts["sdm"] = losses.sdm(z_img, z_txt, pid, self.logit_scale)
        if w["itc"]:
            parts["itc"] = losses.itc(z_img, z_txt, self.logit_scale)
        if w["id"]:
            parts["id"] = losses.id_loss(logits_img, logits_txt, pid)
        if w["triplet"]:
            parts["triplet"] = losses.triplet(z_img, z_txt, pid, margin=self.triplet_margin)
        return parts

    def row_parts(self, out, batch, counts=None) -> dict:
        """The enabled per-row objectives of the model's outputs `out` for `batch`. `counts` (restoration: dropped
        patches, mlm: targets) are the whole batch's when `batch` is one chunk of it; default, this batch's own."""
        w, counts, parts = self.w, counts or {}, {}
        if w["restoration"]:
            target = losses.patchify(batch["images"].astype(jnp.float32), self.patch_size)
            parts["restoration"] = losses.restoration(
                out["pixels_pred"], target, out["patch_mask"], norm_pix=self.norm_pix, count=counts.get("restoration")
            )
        if w["mlm"]:
            parts["mlm"] = losses.mlm(out["mlm_logits"], batch["mlm_labels"], count=counts.get("mlm"))
        return parts

    def total(self, parts, step):
        return sum(self.weight(k, step) * v for k, v in parts.items())

    def __call__(self, params, batch, rng, step=None):
        out = self.model.apply(
            {"params": params}, batch["images"], batch["text"], rng=rng, mlm_text=batch.get("mlm_text")
        )
        parts = self.embedding_parts(
            out["z_img"], out["z_txt"], out.get("logits_img"), out.get("logits_txt"), batch["pid"]
        )
        parts.update(self.row_parts(out, batch))
        return self.total(parts, step), parts


def make_loss_fn(
    model,
    weights: Mapping[str, float],
    *,
    logit_scale: float,
    patch_size: int,
    triplet_margin: float = 0.05,
    norm_pix: bool = False,
    start_steps: Mapping[str, int] | None = None,
) -> LossFn:
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
    return LossFn(
        model,
        w,
        starts,
        logit_scale=logit_scale,
        patch_size=patch_size,
        triplet_margin=triplet_margin,
        norm_pix=norm_pix,
    )


def make_grad_step(loss_fn: Callable, micro_batch: int = 0, mesh=None, param_sharding=None) -> Callable:
    """Returns `grad_step(params, batch, rng, step) -> (loss, parts, grads)`: the forward and backward pass, in one
    go, or with `micro_batch` > 0 in chunks of that many rows per device (`make_gradcache_grad_step`)."""
    if micro_batch:
        return make_gradcache_grad_step(loss_fn, micro_batch, mesh, param_sharding)

    def grad_step(params, batch, rng, step):
        rng = jax.random.fold_in(rng, step)
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng, step)
        return loss, parts, grads

    return grad_step


def check_micro_batch(micro_batch: int, batch: int, shards: int) -> int:
    """The number of chunks of a gradient-cached step; a ValueError saying what to change when `micro_batch` does
    not divide the per-device batch."""
    per_device = batch // shards
    if micro_batch < 0 or (micro_batch and (batch % shards or per_device % micro_batch)):
        fits = [d for d in range(1, per_device + 1) if per_device % d == 0]
        raise ValueError(
            f"config.micro_batch={micro_batch} must divide the per-device batch {per_device} (config.batch_size="
            f"{batch} over {shards} devices): set --config.micro_batch to one of {fits}, or to 0 for the whole batch "
            "at once."
        )
    return per_device // micro_batch if micro_batch else 1


def _chunk_layout(mesh, shards: int, m: int):
    """(to_chunks, from_chunks): (B, ...) <-> (chunks, D * m, ...), chunk k holding rows k*m..(k+1)*m-1 of each
    device's shard, so no row changes device; both keep the batch's sharding (None: no mesh)."""
    rows_sh = batch_sh = None
    if mesh is not None:
        batch_sh = sharding.batch_sharding(mesh)
        rows_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *batch_sh.spec))
    constrain = lambda x, sh: x if sh is None else jax.lax.with_sharding_constraint(x, sh)

    def to_chunks(x):
        n = x.shape[0] // shards // m
        x = x.reshape(shards, n, m, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x.reshape(n, shards * m, *x.shape[3:]), rows_sh)

    def from_chunks(x):
        n = x.shape[0]
        x = x.reshape(n, shards, m, *x.shape[2:]).swapaxes(0, 1)
        return constrain(x.reshape(n * shards * m, *x.shape[3:]), batch_sh)

    return to_chunks, from_chunks


def _embedding_grads(loss_fn: LossFn, params, z_img, z_txt, pid, step):
    """((loss, parts), (head grads, dL/dz_img, dL/dz_txt)) of the objectives that see the whole batch's embeddings;
    the ID head (the only parameters they reach) is applied here to the embeddings."""
    model, use_id = loss_fn.model, bool(loss_fn.w["id"])

    def embedding_loss(head, zi, zt):
        logits = [model.apply({"params": head}, z, method=model.classify) for z in (zi, zt)] if use_id else (None,) * 2
        parts = loss_fn.embedding_parts(zi, zt, *logits, pid)
        return loss_fn.total(parts, step) if parts else jnp.zeros((), jnp.float32), parts

    head = {"classifier": params["classifier"]} if use_id else {}
    return jax.value_and_grad(embedding_loss, (0, 1, 2), has_aux=True)(head, z_img, z_txt)


def make_gradcache_grad_step(
    loss_fn: LossFn, micro_batch: int, mesh=None, param_sharding=None, *, with_aux: bool = False
) -> Callable:
    """`grad_step` of the same objective with the batch in chunks of `micro_batch` rows per device: gradient caching
    (Gao et al., 2021), exact for the objectives that see the whole batch.

      1. embed every chunk without gradients (`UIT.embed`; a `lax.scan`, so one chunk's activations at a time);
      2. compute the embedding objectives (SDM, ID, triplet, ITC) on the whole batch's embeddings, with their
         gradients with respect to the embeddings (and to the identity head);
      3. re-run every chunk (another `lax.scan`): the full forward pass with its per-row objectives (restoration,
         MLM, averaged over the whole batch's counts), pulled back with the embedding gradients as cotangents,
         summed into one gradient.
    The same losses and gradients as `make_grad_step(loss_fn)`, to float32 rounding. The model's only randomness,
    the restoration branch's patch-drop noise, is drawn for the whole batch exactly as the one-shot step draws it
    (`clip.patch_noise`) and each chunk is given its rows; the first pass draws nothing (it has no random layer).

    With the batch split over D devices, chunk k is rows k*m..(k+1)*m-1 of every device's shard (m = micro_batch),
    so each device runs its own rows and nothing moves between devices but what the one-shot step moves: the
    embeddings, gathered for the batch-wide objectives, and each chunk's gradient, reduced over the devices.
    `with_aux`: the step also returns what the tests check (both passes' embeddings, the patch masks used).
    """
    if not isinstance(loss_fn, LossFn):
        raise TypeError("micro_batch > 0 needs the objective from steps.make_loss_fn (it is assembled from its parts).")
    model = loss_fn.model
    shards = 1 if mesh is None else sharding.data_shards(mesh)
    to_chunks, from_chunks = _chunk_layout(mesh, shards, micro_batch)
    constrain = lambda x, sh: x if sh is None else jax.lax.with_sharding_constraint(x, sh)
    m = micro_batch

    def grad_step(params, batch, rng, step):
        rng = jax.random.fold_in(rng, step)
        b = batch["pid"].shape[0]
        check_micro_batch(m, b, shards)
        fields = [k for k in ("images", "text", "pid", "mlm_text", "mlm_labels") if k in batch]
        chunks = {k: to_chunks(batch[k]) for k in fields}

        # 1. The embeddings, chunk by chunk, nothing kept for a backward pass.
        def embed(_, c):
            return None, model.apply({"params": params}, c["images"], c["text"], method=model.embed)

        _, (z_img, z_txt) = jax.lax.scan(embed, None, chunks)
        z_img, z_txt = from_chunks(z_img), from_chunks(z_txt)  # (B, E), the batch's order

        # 2. The batch-wide objectives and their gradients: with respect to the embeddings, and the identity head's.
        use_id = bool(loss_fn.w["id"])
        (loss, parts), (g_head, dz_img, dz_txt) = _embedding_grads(loss_fn, params, z_img, z_txt, batch["pid"], step)

        # 3. Each chunk again, forward and backward, the embeddings' cotangents given, the per-row objectives added.
        counts = {}
        noise = None
        if model.use_restoration:  # the one-shot step's draw (clip.drop_patches), each chunk its rows
            n = model.clip_config.num_patches
            noise = to_chunks(clip_lib.patch_noise(rng, b, n))
            counts["restoration"] = b * clip_lib.num_dropped(model.drop_ratio, n)
        if loss_fn.w["mlm"]:
            counts["mlm"] = jnp.sum(batch["mlm_labels"] != 0)

        def rerun(acc, xs):
            c, dzi, dzt, nz = xs

            def forward(p):
                out = model.apply({"params": p}, c["images"], c["text"], noise=nz, mlm_text=c.get("mlm_text"))
                rows = loss_fn.row_parts(out, c, counts)
                local = loss_fn.total(rows, step) if rows else jnp.zeros((), jnp.float32)
                return (out["z_img"], out["z_txt"], local), (rows, out.get("patch_mask"), out["z_img"], out["z_txt"])

            (_, _, local), pullback, (rows, mask, zi, zt) = jax.vjp(forward, params, has_aux=True)
            (g,) = pullback((dzi, dzt, jnp.ones_like(local)))
            acc = constrain(jax.tree.map(jnp.add, acc, g), param_sharding)
            return acc, (local, rows, (mask, zi, zt) if with_aux else None)

        acc = constrain(jax.tree.map(jnp.zeros_like, params), param_sharding)
        xs = (chunks, to_chunks(dz_img), to_chunks(dz_txt), noise)
        grads, (local, rows, extra) = jax.lax.scan(rerun, acc, xs)
        if use_id:  # the head's gradient comes from step 2 alone (the re-run's is zero: it does not reach it)
            grads = dict(grads, classifier=jax.tree.map(jnp.add, grads["classifier"], g_head["classifier"]))
        parts.update({k: jnp.sum(v) for k, v in rows.items()})
        loss = loss + jnp.sum(local)
        if not with_aux:
            return loss, parts, grads
        mask, zi, zt = extra
        aux = dict(z_pass1=(z_img, z_txt), z_pass2=(from_chunks(zi), from_chunks(zt)))
        if mask is not None:
            aux["patch_mask"] = from_chunks(mask)
        return loss, parts, grads, aux

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


def make_train_step(
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule: Callable | None = None,
    *,
    micro_batch: int = 0,
    mesh=None,
    param_sharding=None,
):
    """Returns `train_step(state, batch, rng) -> (state, metrics)`; jit it with shardings and donation.
    `micro_batch` > 0: the gradient in chunks of that many rows per device (`make_gradcache_grad_step`)."""
    grad_step = make_grad_step(loss_fn, micro_batch, mesh, param_sharding)
    update_step = make_update_step(tx, schedule)

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
    loss_fn: Callable,
    tx: optax.GradientTransformation,
    schedule,
    state_sharding,
    mesh,
    *,
    split: bool = False,
    micro_batch: int = 0,
):
    """The train step jitted for `mesh`: state in `state_sharding` (donated), batch split over the data axes,
    rng and metrics replicated; `split`: as a `SplitTrainStep` (two programs); `micro_batch` > 0: the gradient
    in chunks of that many rows per device (`make_gradcache_grad_step`). Shared by the trainer and
    tools/benchmark.py."""
    repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    data = sharding.batch_sharding(mesh)
    params_sh = state_sharding["params"]
    chunked = dict(micro_batch=micro_batch, mesh=mesh, param_sharding=params_sh) if micro_batch else {}
    if not split:
        return jax.jit(
            make_train_step(loss_fn, tx, schedule, **chunked),
            in_shardings=(state_sharding, data, repl),
            out_shardings=(state_sharding, repl),
            donate_argnums=(0,),
        )
    grad_step = jax.jit(
        make_grad_step(loss_fn, **chunked),
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
