"""Training objectives of UIT/SEN: SDM, ID, cross-modal hard triplet, restoration, ITC, MLM, and helpers.

Every loss takes arrays of the *global* batch and returns a float32 scalar; inputs are cast to float32 first,
so the model may run in bf16. Symbols (paper -> code): image embedding f^v -> ``z_img`` (B, D), text
embedding f^t -> ``z_txt`` (B, D), person identity -> ``pid`` (B,), inverse temperature 1/tau ->
``logit_scale``.

The reference behaviour is SEN (Delong-liu-bupt/SEN, ``model/objectives.py`` and ``model/build.py``),
itself built on IRRA (anosorae/IRRA). Differences, all deliberate:
- ``triplet`` gives 0 to an anchor whose batch holds no other identity; the reference would pick index 0
  (all candidates masked to -inf) and may use a same-identity "negative". The mean still runs over the
  whole batch, as the reference's ``loss.mean()`` does.
- ``restoration`` returns 0 when no patch is dropped, and ``mlm`` returns 0 when no position is a target,
  where the reference divides 0 by 0.
- Features are L2-normalised with a floor on the squared norm (1e-12), so an all-zero vector gives finite
  gradients; the reference divides by the raw norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def l2_normalize(x, axis: int = -1):
    """x / ||x|| along ``axis`` in float32 (squared norm floored at 1e-12)."""
    x = _f32(x)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), 1e-12))


def pair_labels(pid, pid_other=None):
    """(B, B') float32 matrix, 1 where row and column share a person id (the SDM / mining ground truth)."""
    pid = jnp.asarray(pid).reshape(-1)
    pid_other = pid if pid_other is None else jnp.asarray(pid_other).reshape(-1)
    return (pid[:, None] == pid_other[None, :]).astype(jnp.float32)


def sdm(z_img, z_txt, pid, logit_scale, eps: float = 1e-8):
    """Similarity distribution matching (IRRA eq. 3-5), image-to-text plus text-to-image.

    For each row the predicted distribution is softmax(logit_scale * cos) over the batch, and the target
    spreads its mass evenly over every column of the same identity (several positives per row when pids
    repeat). The loss is KL(pred || target) with ``eps`` added inside the log of the target, as IRRA does;
    rows are averaged and the two directions summed (not averaged), as in the reference.
    """
    img = l2_normalize(z_img)
    txt = l2_normalize(z_txt)
    labels = pair_labels(pid)  # (B, B), symmetric
    # IRRA divides by ``labels.sum(dim=1)`` broadcast over columns; labels is symmetric and a positive column
    # has the same count as its row, so this equals the row-normalised target.
    target = labels / jnp.sum(labels, axis=1, keepdims=True)
    log_target = jnp.log(target + eps)
    scale = _f32(logit_scale)
    t2i = scale * (txt @ img.T)  # (B_txt, B_img)

    def kl(logits):
        logp = jax.nn.log_softmax(logits, axis=1)
        return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - log_target), axis=1))

    return kl(t2i.T) + kl(t2i)


def _cross_entropy(logits, labels):
    """Softmax cross-entropy with integer labels, float32: one value per row (callers take the mean)."""
    logp = jax.nn.log_softmax(_f32(logits), axis=-1)
    labels = jnp.asarray(labels).astype(jnp.int32)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


def id_loss(logits_img, logits_txt, pid):
    """Identity (instance) loss: (CE(image logits, pid) + CE(text logits, pid)) / 2, each a batch mean."""
    return 0.5 * (jnp.mean(_cross_entropy(logits_img, pid)) + jnp.mean(_cross_entropy(logits_txt, pid)))


def hardest_negatives(sim, pid):
    """Index of the most similar column of *another* identity for each row of ``sim`` (B, B), and validity.

    Same-identity columns (the paired one included) are never chosen. A row with no other identity in the
    batch gets index 0 and ``valid = False``.
    """
    same = pair_labels(pid) > 0
    masked = jnp.where(same, -jnp.inf, jax.lax.stop_gradient(_f32(sim)))
    return jnp.argmax(masked, axis=1), jnp.any(~same, axis=1)


def triplet(z_img, z_txt, pid, margin: float = 0.05):
    """SEN's cross-modal hard-negative triplet loss, text-anchored plus image-anchored.

    Anchor text i, positive image i (its own pair), negative the in-batch image of another identity most
    similar to text i; distance is 1 - cosine; loss relu(d_pos - d_neg + margin), averaged over the batch.
    Symmetrically for image anchors against texts. The negative is picked on cosine similarity with no
    gradient (SEN picks on the detached (cos + 1) / 2, which orders the same), but the gradient flows through
    the chosen negative's distance. Anchors with no valid negative contribute 0 to the mean.
    """
    img = l2_normalize(z_img)
    txt = l2_normalize(z_txt)
    sim = txt @ img.T  # (B_txt, B_img) cosine
    pos = jnp.diagonal(sim)

    def one_way(s):
        idx, valid = hardest_negatives(s, pid)
        neg = jnp.take_along_axis(s, idx[:, None], axis=1)[:, 0]
        # (1 - pos) - (1 - neg) + margin
        return jnp.mean(jnp.where(valid, jax.nn.relu(neg - pos + margin), 0.0))

    return one_way(sim) + one_way(sim.T)


def patchify(images, patch: int):
    """(B, H, W, C) images -> (B, N, patch*patch*C): grid in row-major order, each patch flattened (p, q, c).

    This is the layout of SEN's / MAE's ``patchify`` (einsum 'nchpwq->nhwpqc'), written for NHWC input.
    """
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"losses.patchify: image size {h}x{w} is not a multiple of patch={patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))  # (B, gh, gw, p, q, C)
    return x.reshape(b, gh * gw, patch * patch * c)


def restoration(pred, target, mask, norm_pix: bool = False, count=None):
    """Masked-patch reconstruction loss: per-patch MSE (mean over patch dims), averaged over dropped patches.

    pred, target: (B, N, P), ``target`` from :func:`patchify`; mask: (B, N), 1 = dropped (scored), 0 = kept.
    ``norm_pix`` normalises each target patch by its mean and unbiased variance (+1e-6), as MAE / SEN do.
    Returns 0 if no patch is dropped. ``count``: the number of dropped patches to average over, when these rows
    are one piece of a larger batch (the piece's share of the batch's loss); default, this mask's.
    """
    pred, target, mask = _f32(pred), _f32(target), _f32(mask)
    if norm_pix:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)  # torch .var() is unbiased
        target = (target - mean) * jax.lax.rsqrt(var + 1e-6)
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)  # (B, N)
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask) if count is None else _f32(count), 1.0)


def itc(z_img, z_txt, logit_scale):
    """CLIP InfoNCE: the i-th image and i-th text are the only positives; (CE_i2t + CE_t2i) / 2."""
    logits = _f32(logit_scale) * (l2_normalize(z_img) @ l2_normalize(z_txt).T)  # (B_img, B_txt)
    labels = jnp.arange(logits.shape[0])
    return 0.5 * (jnp.mean(_cross_entropy(logits, labels)) + jnp.mean(_cross_entropy(logits.T, labels)))


def mlm(logits, labels, ignore_id: int = 0, count=None):
    """Masked-language-model CE over target positions only (labels != ignore_id), mean over those positions.

    logits: (..., V); labels: (...) integer. As torch ``CrossEntropyLoss(ignore_index=0)``; 0 if no targets.
    ``count``: the number of targets to average over when these rows are one piece of a larger batch (default,
    these labels' own), as in :func:`restoration`.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    keep = (labels != ignore_id).astype(jnp.float32)
    ce = _cross_entropy(logits, jnp.where(labels == ignore_id, 0, labels))
    return jnp.sum(ce * keep) / jnp.maximum(jnp.sum(keep) if count is None else _f32(count), 1.0)
