"""Tests for uit_jax/models/decoder.py: sin-cos positions, unshuffle, text conditioning, parity with SEN."""

import math
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from tests import numerics
from uit_jax.models import stacking
from uit_jax.models.decoder import RestorationDecoder, sincos_pos_embed_2d

# Tiny config shared by the tests: 3 x 2 patch grid, 2 x 2 patches.
GRID = (3, 2)
N = GRID[0] * GRID[1]
PATCH_DIM = 2 * 2 * 3
WIDTH, HEADS = 32, 2


# ---------------------------------------------------------------- position embedding references


def _sincos_brute_force(dim, h, w):
    """Position by position with math.sin/cos: column in the first half, row in the second."""
    quarter = dim // 4
    out = np.zeros((1 + h * w, dim))
    for i in range(h):
        for j in range(w):
            row = 1 + i * w + j
            for k in range(quarter):
                omega = 10000.0 ** (-k / quarter)
                out[row, k] = math.sin(j * omega)
                out[row, quarter + k] = math.cos(j * omega)
                out[row, 2 * quarter + k] = math.sin(i * omega)
                out[row, 3 * quarter + k] = math.cos(i * omega)
    return out


def _sincos_sen(dim, size):
    """SEN's / MAE's get_2d_sincos_pos_embed for a square grid, re-written: meshgrid with w first, float32."""

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(size, dtype=np.float32)
    g = np.stack(np.meshgrid(coords, coords), axis=0).reshape(2, 1, size, size)  # g[0] varies along w
    emb = np.concatenate([one_d(dim // 2, g[0]), one_d(dim // 2, g[1])], axis=1)
    return np.concatenate([np.zeros([1, dim]), emb], axis=0)


def test_sincos_matches_brute_force_on_non_square_grid():
    got = sincos_pos_embed_2d(16, (3, 5), cls_token=True)
    assert got.shape == (16, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, _sincos_brute_force(16, 3, 5), atol=1e-6)
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(sincos_pos_embed_2d(16, (3, 5), cls_token=False), got[1:])


def test_sincos_matches_sen_on_square_grid():
    np.testing.assert_allclose(sincos_pos_embed_2d(64, (7, 7)), _sincos_sen(64, 7), atol=1e-5)


def test_sincos_rejects_bad_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, (2, 2))


# ---------------------------------------------------------------- helpers


def _drop(rng, b, n):
    """MAE's random_masking on indices: ids_shuffle (kept first), ids_restore = its inverse permutation."""
    ids_shuffle = np.argsort(rng.random((b, n)), axis=1)
    return ids_shuffle, np.argsort(ids_shuffle, axis=1)


def _inputs(seed=0, b=2, keep=2, l_txt=5, e_img=WIDTH, e_txt=WIDTH):
    rng = np.random.default_rng(seed)
    ids_shuffle, ids_restore = _drop(rng, b, N)
    img = rng.standard_normal((b, 1 + keep, e_img)).astype(np.float32)
    txt = rng.standard_normal((b, l_txt, e_txt)).astype(np.float32)
    return img, ids_shuffle, ids_restore, txt


def _init(model, img, ids_restore, txt, seed=0):
    """Initialise, then perturb every parameter so LayerNorms, biases and the mask token are not trivial."""
    mask = jnp.ones(txt.shape[:2], bool)
    params = model.init(jax.random.key(seed), img, ids_restore, txt, mask)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, leaves)


def _model(**kw):
    cfg = dict(grid=GRID, patch_dim=PATCH_DIM, width=WIDTH, heads=HEADS, layers=2)
    cfg.update(kw)
    return RestorationDecoder(**cfg)


# ---------------------------------------------------------------- behaviour


def test_output_shape_and_dtype():
    img, _, ids_restore, txt = _inputs(e_img=24, e_txt=16)
    model = _model()
    params = _init(model, img, ids_restore, txt)
    out = model.apply({"params": params}, img, ids_restore, txt, jnp.ones(txt.shape[:2], bool))
    assert out.shape == (2, N, PATCH_DIM) and out.dtype == jnp.float32
    assert params["mask_token"].shape == (WIDTH,)
    assert params["cross_attn"]["k_proj"]["kernel"].shape == (16, WIDTH)  # text width projected to WIDTH


def test_mask_token_starts_at_zero():
    img, _, ids_restore, txt = _inputs()
    model = _model()
    params = model.init(jax.random.key(0), img, ids_restore, txt, jnp.ones(txt.shape[:2], bool))["params"]
    np.testing.assert_array_equal(params["mask_token"], 0.0)


def test_unshuffle_puts_kept_tokens_back_at_their_positions():
    keep = 2
    img, ids_shuffle, ids_restore, txt = _inputs(keep=keep)
    model = _model()
    params = _init(model, img, ids_restore, txt)
    _, state = model.apply(
        {"params": params},
        img,
        ids_restore,
        txt,
        jnp.ones(txt.shape[:2], bool),
        mutable=["intermediates"],
    )
    restored = np.asarray(state["intermediates"]["restored"][0])  # (B, 1+N, W)

    # numpy: LayerNorm (eps 1e-5) then the embedding Dense, by hand.
    p = params
    mu = img.mean(-1, keepdims=True)
    var = img.var(-1, keepdims=True)
    ln = (img - mu) / np.sqrt(var + 1e-5) * np.asarray(p["ln_img"]["scale"]) + np.asarray(p["ln_img"]["bias"])
    emb = ln @ np.asarray(p["embed"]["kernel"]) + np.asarray(p["embed"]["bias"])  # (B, 1+K, W)
    expected = np.broadcast_to(np.asarray(p["mask_token"]), (img.shape[0], 1 + N, WIDTH)).copy()
    expected[:, 0] = emb[:, 0]
    for b in range(img.shape[0]):
        for j in range(keep):  # kept token j came from patch ids_shuffle[b, j]
            expected[b, 1 + ids_shuffle[b, j]] = emb[b, 1 + j]
    np.testing.assert_allclose(restored, expected, atol=1e-5)


def test_prediction_depends_on_caption():
    img, ids_shuffle, ids_restore, txt = _inputs(keep=2)
    model = _model()
    params = _init(model, img, ids_restore, txt)
    mask = jnp.ones(txt.shape[:2], bool)
    out_a = model.apply({"params": params}, img, ids_restore, txt, mask)
    out_b = model.apply({"params": params}, img, ids_restore, txt[::-1].copy(), mask)  # swap captions
    dropped = ids_shuffle[:, 2:]
    diff = np.abs(np.take_along_axis(np.asarray(out_a - out_b), dropped[:, :, None], axis=1))
    assert diff.max() > 1e-2


def test_padding_tokens_are_ignored():
    img, _, ids_restore, txt = _inputs(l_txt=6)
    lengths = [4, 2]
    mask = np.arange(6)[None, :] < np.asarray(lengths)[:, None]
    model = _model()
    params = _init(model, img, ids_restore, txt)
    out = model.apply({"params": params}, img, ids_restore, txt, mask)

    junk = np.where(mask[:, :, None], txt, 100.0 * np.random.default_rng(5).standard_normal(txt.shape))
    out_junk = model.apply({"params": params}, img, ids_restore, junk.astype(np.float32), mask)
    np.testing.assert_allclose(out_junk, out, atol=1e-6)

    # And each row equals the same row decoded with its padding cut off.
    for b, n_real in enumerate(lengths):
        alone = model.apply(
            {"params": params},
            img[b : b + 1],
            ids_restore[b : b + 1],
            txt[b : b + 1, :n_real],
            jnp.ones((1, n_real), bool),
        )
        np.testing.assert_allclose(alone[0], out[b], atol=1e-5)


def test_residual_switch_changes_output_not_params():
    img, _, ids_restore, txt = _inputs()
    params = _init(_model(), img, ids_restore, txt)
    mask = jnp.ones(txt.shape[:2], bool)
    with_res = _model(residual=True)
    res_params = with_res.init(jax.random.key(0), img, ids_restore, txt, mask)["params"]
    assert jax.tree.structure(res_params) == jax.tree.structure(params)
    a = _model().apply({"params": params}, img, ids_restore, txt, mask)
    b = with_res.apply({"params": params}, img, ids_restore, txt, mask)
    assert np.abs(np.asarray(a - b)).max() > 1e-2  # numerical agreement with SEN's maths: parity test below


def test_bf16_close_to_f32():
    img, _, ids_restore, txt = _inputs()
    params = _init(_model(), img, ids_restore, txt)
    mask = jnp.ones(txt.shape[:2], bool)
    f32 = _model().apply({"params": params}, img, ids_restore, txt, mask)
    bf16 = _model(dtype=jnp.bfloat16).apply({"params": params}, img, ids_restore, txt, mask)
    assert bf16.dtype == jnp.float32
    scale = float(np.abs(np.asarray(f32)).max())
    assert float(np.abs(np.asarray(f32 - bf16)).max()) < 0.05 * scale


def test_rejects_ids_restore_for_another_grid():
    img, _, ids_restore, txt = _inputs()
    model = _model(grid=(2, 2))
    with pytest.raises(ValueError, match="grid"):
        model.init(jax.random.key(0), img, ids_restore, txt, jnp.ones(txt.shape[:2], bool))


# ---------------------------------------------------------------- parity with SEN (PyTorch)


class _LayerNorm(tnn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class _QuickGELU(tnn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResBlock(tnn.Module):
    """CLIP / SEN ResidualAttentionBlock: sequence-first MultiheadAttention."""

    def __init__(self, d, heads):
        super().__init__()
        self.attn = tnn.MultiheadAttention(d, heads)
        self.ln_1 = _LayerNorm(d)
        self.mlp = tnn.Sequential(
            OrderedDict([("c_fc", tnn.Linear(d, 4 * d)), ("gelu", _QuickGELU()), ("c_proj", tnn.Linear(4 * d, d))])
        )
        self.ln_2 = _LayerNorm(d)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _SenDecoder(tnn.Module):
    """SEN's cross_former_mae and the modules it uses (model/build.py), float32, optional residual."""

    def __init__(self, d, heads, layers, patch_dim, pos, residual, kdim):
        super().__init__()
        self.norm_1, self.norm_2, self.norm_4 = _LayerNorm(d), _LayerNorm(kdim), _LayerNorm(d)
        self.norm_6, self.norm_7 = _LayerNorm(d), _LayerNorm(d)
        self.decoder_embed = tnn.Linear(d, d)
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos_embed", torch.from_numpy(pos).float()[None])
        self.cross_attn_Text = tnn.MultiheadAttention(d, heads, batch_first=True, kdim=kdim, vdim=kdim)
        self.resblocks = tnn.Sequential(*[_ResBlock(d, heads) for _ in range(layers)])
        self.decoder_pred = tnn.Linear(d, patch_dim)
        self.residual = residual

    def forward(self, image_feats, text_feats, ids_restore):
        image_feats = self.norm_1(image_feats)
        text_feats = self.norm_2(text_feats)
        x = self.decoder_embed(image_feats)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        need_text = self.cross_attn_Text(self.norm_4(x), text_feats, text_feats, need_weights=False)[0]
        x = self.norm_6(x + need_text) if self.residual else self.norm_6(need_text)
        x = self.resblocks(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.decoder_pred(self.norm_7(x))
        return x[:, 1:, :]


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


def _copy_ln(dst, src):
    dst.weight.data, dst.bias.data = _t(src["scale"]), _t(src["bias"])


def _copy_linear(dst, src):
    dst.weight.data, dst.bias.data = _t(np.asarray(src["kernel"]).T), _t(src["bias"])


def _copy_mha(dst, src):
    q, k, v = (np.asarray(src[f"{n}_proj"]["kernel"]).T for n in "qkv")
    if dst._qkv_same_embed_dim:
        dst.in_proj_weight.data = _t(np.concatenate([q, k, v], axis=0))
    else:
        dst.q_proj_weight.data, dst.k_proj_weight.data, dst.v_proj_weight.data = _t(q), _t(k), _t(v)
    dst.in_proj_bias.data = _t(np.concatenate([np.asarray(src[f"{n}_proj"]["bias"]) for n in "qkv"]))
    _copy_linear(dst.out_proj, src["out_proj"])


def _sen_from_ours(params, layers, residual, kdim):
    params = stacking.unstack(params)  # one subtree per layer, as SEN's resblocks
    ref = _SenDecoder(WIDTH, HEADS, layers, PATCH_DIM, sincos_pos_embed_2d(WIDTH, GRID), residual, kdim)
    for ours, theirs in [("ln_img", "norm_1"), ("ln_txt", "norm_2"), ("ln_q", "norm_4")]:
        _copy_ln(getattr(ref, theirs), params[ours])
    _copy_ln(ref.norm_6, params["ln_cross"])
    _copy_ln(ref.norm_7, params["ln_post"])
    _copy_linear(ref.decoder_embed, params["embed"])
    _copy_linear(ref.decoder_pred, params["pred"])
    ref.mask_token.data = _t(params["mask_token"])[None, None]
    _copy_mha(ref.cross_attn_Text, params["cross_attn"])
    for i, block in enumerate(ref.resblocks):
        p = params[f"cross_layers_{i}"]
        _copy_ln(block.ln_1, p["layer_norm1"])
        _copy_ln(block.ln_2, p["layer_norm2"])
        _copy_mha(block.attn, p["self_attn"])
        _copy_linear(block.mlp.c_fc, p["mlp"]["fc1"])
        _copy_linear(block.mlp.c_proj, p["mlp"]["fc2"])
    return ref.eval()


@pytest.mark.parametrize(
    "residual,e_txt,layers",
    [(False, WIDTH, 2), (True, WIDTH, 2), (False, 16, 1)],
    ids=["sen", "residual", "narrow-text"],
)
def test_parity_with_sen_torch(residual, e_txt, layers):
    img, _, ids_restore, txt = _inputs(seed=3, b=3, keep=2, l_txt=7, e_txt=e_txt)
    model = _model(residual=residual, layers=layers)
    params = _init(model, img, ids_restore, txt, seed=7)
    ours = model.apply({"params": params}, img, ids_restore, txt, jnp.ones(txt.shape[:2], bool))

    ref = _sen_from_ours(params, layers, residual, e_txt)
    with torch.no_grad():
        theirs = ref(_t(img), _t(txt), torch.from_numpy(ids_restore)).numpy()
    err = np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max()
    print(f"parity residual={residual} e_txt={e_txt}: max diff {err:.2e} of max |out| {np.abs(theirs).max():.2f}")
    # Relative to the output's scale (was an absolute 1e-4; measured 1.07e-6 absolute): sums of < 256 terms.
    assert err < numerics.reduction_rtol(256)
