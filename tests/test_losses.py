"""Tests for uit_jax/losses.py: torch re-statements of the SEN/IRRA formulas, numpy and python loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uit_jax import losses
from uit_jax.models import layers, uit


def _feats(seed, b=8, d=16):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(b, d)).astype(np.float32), rng.normal(size=(b, d)).astype(np.float32)


# ---------------------------------------------------------------- torch references (SEN / IRRA formulas)


def torch_sdm(img, txt, pid, scale, eps=1e-8):
    img, txt, pid = torch.tensor(img), torch.tensor(txt), torch.tensor(pid).reshape(-1, 1)
    labels = (pid == pid.t()).float()
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    t2i = scale * txt @ img.t()
    dist = labels / labels.sum(dim=1)  # the reference's broadcast, kept on purpose
    total = 0.0
    for logits in (t2i.t(), t2i):
        p = F.softmax(logits, dim=1)
        total = total + (p * (F.log_softmax(logits, dim=1) - torch.log(dist + eps))).sum(1).mean()
    return float(total)


def torch_sen_triplet(img, txt, pid, margin=0.05):
    """SEN forward's 'tri' branch: pick on detached (cos+1)/2, same id masked; TripletLoss both ways."""
    img, txt = torch.tensor(img), torch.tensor(txt)
    pid = torch.tensor(pid).reshape(-1, 1)
    labels = (pid == pid.t()).float()
    score = ((F.normalize(txt, dim=1) @ F.normalize(img, dim=1).t()).detach() + 1) / 2
    score[labels == 1] = float("-inf")
    neg_img = img[score.max(dim=1)[1]]
    neg_txt = txt[score.t().max(dim=1)[1]]

    def tri(anchor, positive, negative):
        d_pos = 1 - F.cosine_similarity(anchor, positive, dim=1)
        d_neg = 1 - F.cosine_similarity(anchor, negative, dim=1)
        return torch.relu(d_pos - d_neg + margin).mean()

    return float(tri(txt, img, neg_img) + tri(img, txt, neg_txt))


# ---------------------------------------------------------------- SDM


PIDS = [[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 1, 1, 1, 2, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5]]


@pytest.mark.parametrize("pid", PIDS)
def test_sdm_matches_torch_reference(pid):
    img, txt = _feats(0)
    pid = np.asarray(pid)
    got = float(losses.sdm(img, txt, pid, 50.0))
    np.testing.assert_allclose(got, torch_sdm(img, txt, pid, 50.0), rtol=1e-5, atol=1e-5)


def test_sdm_numpy_by_hand_several_positives():
    img, txt = _feats(1, b=6, d=4)
    pid = np.array([3, 3, 7, 7, 7, 9])
    ni = img / np.linalg.norm(img, axis=1, keepdims=True)
    nt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    total = 0.0
    for s in (10.0 * ni @ nt.T, 10.0 * nt @ ni.T):
        for i in range(6):
            p = np.exp(s[i] - s[i].max())
            p /= p.sum()
            q = (pid == pid[i]) / np.sum(pid == pid[i])
            total += np.sum(p * (np.log(p) - np.log(q + 1e-8))) / 6
    np.testing.assert_allclose(float(losses.sdm(img, txt, pid, 10.0)), total, rtol=1e-5)


def test_sdm_is_small_when_perfect():
    e = np.eye(4, dtype=np.float32)
    pid = np.arange(4)
    assert float(losses.sdm(e, e, pid, 100.0)) < 1e-6


# ---------------------------------------------------------------- triplet


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triplet_matches_sen(seed):
    img, txt = _feats(seed, b=10, d=8)
    pid = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    got = float(losses.triplet(img, txt, pid, margin=0.05))
    np.testing.assert_allclose(got, torch_sen_triplet(img, txt, pid, 0.05), rtol=1e-5, atol=1e-6)


def test_triplet_skips_same_id_even_if_hardest():
    # text 0 is closest to image 1 (same id 7) and then to image 2 (id 8): the negative must be image 2.
    txt = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
    img = np.array([[0.6, 0.8], [0.99, 0.141], [0.8, 0.6]], np.float32)
    pid = np.array([7, 7, 8])
    idx, valid = losses.hardest_negatives(losses.l2_normalize(txt) @ losses.l2_normalize(img).T, pid)
    assert int(idx[0]) == 2 and int(idx[1]) == 2 and bool(valid.all())
    # brute force: every anchor in both directions against its hardest other-id partner
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    s = n(txt) @ n(img).T
    ref = 0.0
    for mat in (s, s.T):
        for i in range(3):
            negs = [mat[i, j] for j in range(3) if pid[j] != pid[i]]
            ref += max(0.0, max(negs) - mat[i, i] + 0.05) / 3
    np.testing.assert_allclose(float(losses.triplet(img, txt, pid)), ref, rtol=1e-5)
    assert ref > 0  # the case is not trivially zero


def test_triplet_rows_without_negative_contribute_zero():
    img, txt = _feats(3, b=4, d=4)
    assert float(losses.triplet(img, txt, np.zeros(4, int))) == 0.0
    # with two identities every anchor has a negative again, and the mean runs over all four rows
    pid = np.array([0, 0, 0, 1])
    n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    s = n(txt) @ n(img).T
    ref = 0.0
    for mat in (s, s.T):
        for i in range(4):
            negs = [mat[i, j] for j in range(4) if pid[j] != pid[i]]
            ref += max(0.0, max(negs) - mat[i, i] + 0.05) / 4
    np.testing.assert_allclose(float(losses.triplet(img, txt, pid)), ref, rtol=1e-5)


# ---------------------------------------------------------------- id, itc, mlm


def test_id_itc_mlm_match_torch():
    rng = np.random.default_rng(4)
    li, lt = rng.normal(size=(6, 11)).astype(np.float32), rng.normal(size=(6, 11)).astype(np.float32)
    pid = rng.integers(0, 11, size=6)
    tp = torch.tensor(pid)
    ref = (F.cross_entropy(torch.tensor(li), tp) + F.cross_entropy(torch.tensor(lt), tp)) / 2
    np.testing.assert_allclose(float(losses.id_loss(li, lt, pid)), float(ref), rtol=1e-5)

    img, txt = _feats(5, b=6, d=8)
    ti, tt = F.normalize(torch.tensor(img), dim=1), F.normalize(torch.tensor(txt), dim=1)
    lg = 20.0 * ti @ tt.t()
    lab = torch.arange(6)
    ref = (F.cross_entropy(lg, lab) + F.cross_entropy(lg.t(), lab)) / 2
    np.testing.assert_allclose(float(losses.itc(img, txt, 20.0)), float(ref), rtol=1e-5)

    logits = rng.normal(size=(3, 5, 13)).astype(np.float32)
    labels = rng.integers(1, 13, size=(3, 5))
    labels[rng.random((3, 5)) < 0.6] = 0
    labels[0, 0] = 4
    tl = torch.tensor(labels).reshape(-1)
    ref = F.cross_entropy(torch.tensor(logits).reshape(-1, 13), tl, ignore_index=0)
    np.testing.assert_allclose(float(losses.mlm(logits, labels)), float(ref), rtol=1e-5)
    assert float(losses.mlm(logits, np.zeros((3, 5), int))) == 0.0


# ---------------------------------------------------------------- restoration, patchify, grayscale


def test_patchify_matches_sen_layout_and_inverts():
    rng = np.random.default_rng(6)
    imgs = rng.normal(size=(2, 3, 8, 12)).astype(np.float32)  # NCHW as SEN sees them
    t = torch.tensor(imgs).reshape(2, 3, 2, 4, 3, 4)
    ref = torch.einsum("nchpwq->nhwpqc", t).reshape(2, 6, 48).numpy()
    nhwc = imgs.transpose(0, 2, 3, 1)
    got = np.asarray(losses.patchify(nhwc, 4))
    np.testing.assert_array_equal(got, ref)
    back = got.reshape(2, 2, 3, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(nhwc.shape)  # the inverse, by hand
    np.testing.assert_array_equal(back, nhwc)
    with pytest.raises(ValueError, match="multiple of patch"):
        losses.patchify(nhwc, 5)


def test_grayscale_normalized():
    """The restoration branch's input: grey pixels (torchvision's luma weights), CLIP-normalised again."""
    mean, std = np.array(layers.CLIP_MEAN), np.array(layers.CLIP_STD)
    rgb = np.random.default_rng(7).uniform(size=(2, 4, 5, 3))
    got = np.asarray(uit.grayscale_normalized(jnp.asarray((rgb - mean) / std, jnp.float32)))
    g = 0.2989 * rgb[..., 0] + 0.5870 * rgb[..., 1] + 0.1140 * rgb[..., 2]
    ref = (g[..., None] - mean) / std
    # float32 inputs of magnitude <= 1/std ~ 3.8, a handful of operations: a few ulps of that scale.
    np.testing.assert_allclose(got, ref, atol=16 * np.finfo(np.float32).eps * 4)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_restoration_counts_only_dropped(norm_pix):
    rng = np.random.default_rng(8)
    pred = rng.normal(size=(2, 5, 6)).astype(np.float32)
    target = rng.normal(size=(2, 5, 6)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], np.float32)
    tgt = target
    if norm_pix:
        var = target.var(-1, ddof=1, keepdims=True)
        tgt = (target - target.mean(-1, keepdims=True)) / np.sqrt(var + 1e-6)
    errs = [np.mean((pred[b, n] - tgt[b, n]) ** 2) for b in range(2) for n in range(5) if mask[b, n]]
    got = float(losses.restoration(pred, target, mask, norm_pix=norm_pix))
    np.testing.assert_allclose(got, np.mean(errs), rtol=1e-5)
    # changing a kept patch's prediction must not change the loss
    pred2 = pred.copy()
    pred2[0, 1] += 100.0
    again = float(losses.restoration(pred2, target, mask, norm_pix=norm_pix))
    np.testing.assert_allclose(again, got, rtol=1e-6)
    assert float(losses.restoration(pred, target, np.zeros_like(mask))) == 0.0


# ---------------------------------------------------------------- gradients, jit, bf16 inputs


def test_all_losses_jit_and_have_finite_gradients():
    img, txt = _feats(9, b=8, d=16)
    pid = np.array([0, 0, 1, 1, 2, 3, 3, 3])
    logits = np.random.default_rng(9).normal(size=(8, 5)).astype(np.float32)

    def total(img, txt, logits):
        pred = jnp.tile(img[:, None, :4], (1, 3, 1))
        return (
            losses.sdm(img, txt, pid, 50.0)
            + losses.triplet(img, txt, pid)
            + losses.id_loss(logits, logits * 0.5, pid % 5)
            + losses.itc(img, txt, 50.0)
            + losses.restoration(pred, jnp.zeros_like(pred), jnp.ones(pred.shape[:2]), norm_pix=False)
        )

    val, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))(img, txt, logits)
    np.testing.assert_allclose(
        float(val), float(total(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(logits))), rtol=1e-5
    )
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).sum() > 0
    # a zero feature vector must not produce NaN gradients
    zero = jnp.zeros_like(img).at[1:].set(img[1:])
    g = jax.grad(lambda a: losses.sdm(a, txt, pid, 50.0) + losses.triplet(a, txt, pid))(zero)
    assert np.all(np.isfinite(np.asarray(g)))


def test_triplet_gradient_matches_torch():
    img, txt = _feats(10, b=6, d=5)
    pid = np.array([0, 1, 1, 2, 3, 3])
    ti = torch.tensor(img, requires_grad=True)
    tt = torch.tensor(txt, requires_grad=True)
    labels = torch.tensor(pid).reshape(-1, 1)
    labels = (labels == labels.t()).float()
    score = ((F.normalize(tt, dim=1) @ F.normalize(ti, dim=1).t()).detach() + 1) / 2
    score[labels == 1] = float("-inf")

    def tri(a, p, n):
        return torch.relu(F.cosine_similarity(a, n, dim=1) - F.cosine_similarity(a, p, dim=1) + 0.05).mean()

    loss = tri(tt, ti, ti[score.max(1)[1]]) + tri(ti, tt, tt[score.t().max(1)[1]])
    loss.backward()
    gi, gt = jax.grad(losses.triplet, argnums=(0, 1))(img, txt, pid)
    np.testing.assert_allclose(np.asarray(gi), ti.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gt), tt.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_bf16_inputs_compute_in_float32():
    img, txt = _feats(11)
    pid = np.arange(8) // 2
    out = losses.sdm(jnp.asarray(img, jnp.bfloat16), jnp.asarray(txt, jnp.bfloat16), pid, 50.0)
    assert out.dtype == jnp.float32
    as_bf16_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    ref = losses.sdm(as_bf16_f32(img), as_bf16_f32(txt), pid, 50.0)
    np.testing.assert_allclose(float(out), float(ref), rtol=1e-6)


def test_global_batch_sharded_over_devices_matches_single_device():
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    b = 2 * devices.size
    img, txt = _feats(12, b=b, d=8)
    pid = np.arange(b) // 3  # positives and hardest negatives cross shard boundaries
    row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    fn = lambda i, t, p: (losses.sdm(i, t, p, 50.0), losses.triplet(i, t, p), losses.itc(i, t, 50.0))
    sharded = jax.jit(fn)(*(jax.device_put(x, row) for x in (img, txt, pid)))
    for got, ref in zip(sharded, fn(img, txt, pid)):
        np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
