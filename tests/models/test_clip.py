"""CLIP towers against PyTorch CLIPModel (transformers) on the same weights; patch dropping, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from tests import numerics
from tests.models import random_clip_params
from uit_jax.data import tokenizer as tk
from uit_jax.models import clip, convert

# float32 against torch, max abs difference relative to the largest |value| of the reference: the towers' longest
# sums (77-token attention, 80-wide MLPs, chained over 2 layers) stay under n = 256 terms, so 2 * gamma_256 = 6.1e-5.
# Was an absolute 1e-4; measured ~1e-6 absolute (~3e-7 relative).
TOL = numerics.reduction_rtol(256)


@pytest.fixture(scope="module")
def torch_clip(tiny_hf_clip_dir):
    return transformers.CLIPModel.from_pretrained(tiny_hf_clip_dir).eval()


@pytest.fixture(scope="module")
def native(tiny_hf_clip_dir):
    return convert.load(tiny_hf_clip_dir, image_size=(32, 32))


def _encode(model, method, **kw):
    """Jitted `model.apply(..., method=...)`: one compile is cheaper than op-by-op dispatch on CPU."""
    return jax.jit(lambda p, x, **a: model.apply({"params": p}, x, method=getattr(model, method), **kw, **a))


def _t(x):
    return torch.from_numpy(np.asarray(x))


def _features(out):
    return out.pooler_output if hasattr(out, "pooler_output") else out  # tensor in some transformers versions


def _maxdiff(a, b):
    """Max |a - b| relative to max |b| (b: the torch reference)."""
    ref = b.detach().numpy()
    return float(np.max(np.abs(np.asarray(a, np.float32) - ref)) / np.max(np.abs(ref)))


def _images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _torch_vision(tm, images_nhwc, stride, keep=None):
    """The HF vision tower built by hand from its modules, for any size / stride / subset of patches.

    Position embeddings are resized with F.interpolate (bilinear, align_corners=False), as IRRA does; `keep`
    (B, K) selects patch tokens after position embeddings are added.
    """
    v, e = tm.vision_model, tm.vision_model.embeddings
    x = _t(images_nhwc).permute(0, 3, 1, 2)
    patches = F.conv2d(x, e.patch_embedding.weight, stride=stride)  # (B, D, gh, gw)
    b, d, gh, gw = patches.shape
    pos = e.position_embedding.weight
    g = int(round((pos.shape[0] - 1) ** 0.5))
    grid = pos[1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, d)])
    tokens = torch.cat([e.class_embedding.expand(b, 1, d), patches.flatten(2).transpose(1, 2)], 1) + pos
    if keep is not None:
        kept = torch.gather(tokens[:, 1:], 1, _t(keep).long()[..., None].expand(-1, -1, d))
        tokens = torch.cat([tokens[:, :1], kept], 1)
    hidden = v.encoder(inputs_embeds=v.pre_layrnorm(tokens)).last_hidden_state
    return hidden, tm.visual_projection(v.post_layernorm(hidden))


def _ids(tok, vocab, seed=0):
    texts = ["A man wearing a red shirt and blue jeans, carrying a black backpack", "she is walking",
             "zebra stripes everywhere " * 30]  # fmt: skip
    ids = tk.tokenize(tok, texts, 77)
    # Plus random ids with the end-of-text token at a random place (pad after it is random, not 0).
    rng = np.random.default_rng(seed)
    rand = rng.integers(0, vocab - 2, (2, 77)).astype(np.int32)
    rand[:, 0] = tk.sot_id(tok)
    rand[0, 9], rand[1, 40] = tk.eot_id(tok), tk.eot_id(tok)
    rand[1, 60] = tk.eot_id(tok)  # a second end-of-text: pooling must take the first
    return np.concatenate([ids, rand])


def test_text_parity(tiny_hf_clip_dir, torch_clip, native):
    model, params = native
    tok = tk.load_tokenizer(tiny_hf_clip_dir)
    ids = _ids(tok, model.config.vocab_size)
    out = _encode(model, "encode_text")(params, ids)
    with torch.no_grad():
        ref = torch_clip.text_model(input_ids=_t(ids).long())
        ref_embed = _features(torch_clip.get_text_features(input_ids=_t(ids).long()))
        ref_tokens = torch_clip.text_projection(ref.last_hidden_state)
    diffs = {
        "embed": _maxdiff(out["embed"], ref_embed),
        "hidden": _maxdiff(out["hidden"], ref.last_hidden_state),
        "tokens": _maxdiff(out["tokens"], ref_tokens),
    }
    print("text parity max relative diff", diffs)
    assert max(diffs.values()) < TOL, diffs
    eot = np.argmax(ids == tk.eot_id(tok), axis=1)
    np.testing.assert_array_equal(np.asarray(out["mask"]), np.arange(77)[None] <= eot[:, None])
    assert out["embed"].shape == (5, 24) and out["tokens"].shape == (5, 77, 24) and out["hidden"].shape == (5, 77, 40)


def test_image_parity_native(torch_clip, native):
    model, params = native
    images = _images((3, 32, 32, 3))
    out = _encode(model, "encode_image")(params, images)
    with torch.no_grad():
        pixels = _t(images).permute(0, 3, 1, 2)
        ref = torch_clip.vision_model(pixel_values=pixels)
        ref_embed = _features(torch_clip.get_image_features(pixel_values=pixels))
        _, ref_tokens = _torch_vision(torch_clip, images, stride=8)
    diffs = {
        "embed": _maxdiff(out["embed"], ref_embed),
        "hidden": _maxdiff(out["hidden"], ref.last_hidden_state),
        "tokens": _maxdiff(out["tokens"], ref_tokens),
    }
    print("image parity (32x32) max relative diff", diffs)
    assert max(diffs.values()) < TOL, diffs
    assert out["hidden"].shape == (3, 17, 48) and out["tokens"].shape == (3, 17, 24)
    np.testing.assert_array_equal(out["mask"], np.zeros((3, 16)))
    np.testing.assert_array_equal(out["ids_restore"], np.tile(np.arange(16), (3, 1)))


@pytest.mark.parametrize("size,stride,grid", [((48, 24), None, (6, 3)), ((40, 24), 6, (6, 3))])
def test_image_parity_non_square_and_stride(tiny_hf_clip_dir, torch_clip, size, stride, grid):
    model, params = convert.load(tiny_hf_clip_dir, image_size=size, stride=stride)
    assert model.config.grid == grid
    images = _images((2, *size, 3), seed=1)
    out = _encode(model, "encode_image")(params, images)
    with torch.no_grad():
        ref_hidden, ref_tokens = _torch_vision(torch_clip, images, stride=stride or 8)
    diffs = {
        "embed": _maxdiff(out["embed"], ref_tokens[:, 0]),
        "hidden": _maxdiff(out["hidden"], ref_hidden),
        "tokens": _maxdiff(out["tokens"], ref_tokens),
    }
    print(f"image parity {size} stride {stride} max relative diff", diffs)
    assert max(diffs.values()) < TOL, diffs


def test_patch_dropping(tiny_hf_clip_dir, torch_clip):
    model, params = convert.load(tiny_hf_clip_dir, image_size=(48, 24))  # N = 18 patches
    images = _images((3, 48, 24, 3), seed=2)
    enc = _encode(model, "encode_image", drop_ratio=0.3)
    out = enc(params, images, rng=jax.random.key(0))
    n_drop = round(0.3 * 18)  # 5
    mask, restore = np.asarray(out["mask"]), np.asarray(out["ids_restore"])
    assert out["tokens"].shape == (3, 1 + 18 - n_drop, 24) and out["hidden"].shape == (3, 1 + 18 - n_drop, 48)
    np.testing.assert_array_equal(mask.sum(1), [n_drop] * 3)
    assert set(np.unique(mask)) == {0.0, 1.0} and restore.dtype == np.int32
    # ids_restore inverts the shuffle: shuffle = argsort(restore) lists [kept..., dropped...] in patch order.
    shuffle = np.argsort(restore, axis=1)
    np.testing.assert_array_equal(np.take_along_axis(shuffle, restore, 1), np.tile(np.arange(18), (3, 1)))
    for b in range(3):
        assert set(shuffle[b, : 18 - n_drop]) == set(np.flatnonzero(mask[b] == 0))
    # The kept tokens, in that order, run through torch's tower give the same outputs.
    with torch.no_grad():
        ref_hidden, ref_tokens = _torch_vision(torch_clip, images, stride=8, keep=shuffle[:, : 18 - n_drop])
    assert _maxdiff(out["hidden"], ref_hidden) < TOL
    assert _maxdiff(out["embed"], ref_tokens[:, 0]) < TOL
    # Images in a batch get different draws; different rngs give different draws.
    assert len({tuple(m) for m in mask}) > 1
    other = enc(params, images, rng=jax.random.key(1))
    assert not np.array_equal(np.asarray(other["mask"]), mask)
    # Ratio 0 is the plain forward pass.
    plain = _encode(model, "encode_image")(params, images)
    zero = _encode(model, "encode_image", drop_ratio=0.0)(params, images, rng=jax.random.key(0))
    for k in plain:
        np.testing.assert_allclose(np.asarray(zero[k]), np.asarray(plain[k]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="rng"):
        model.apply({"params": params}, images, drop_ratio=0.5, method=model.encode_image)
    with pytest.raises(ValueError, match="at least one"):
        _encode(model, "encode_image", drop_ratio=1.0)(params, images, rng=jax.random.key(0))


def test_bf16_close_to_float32(native, tiny_hf_clip_dir):
    model, params = native
    m16 = clip.CLIP(model.config, dtype=jnp.bfloat16)
    images = _images((2, 32, 32, 3), seed=3)
    ids = tk.tokenize(tk.load_tokenizer(tiny_hf_clip_dir), ["a woman with long hair", "a man"], 77)
    for method, x in [("encode_image", images), ("encode_text", ids)]:
        ref = _encode(model, method)(params, x)["embed"]
        got = _encode(m16, method)(params, x)["embed"]
        assert got.dtype == jnp.bfloat16
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        assert err < 3e-2, (method, err)


def test_random_init_matches_loaded_shapes(native):
    model, loaded = native
    fresh = random_clip_params(model, jax.random.key(0))
    shapes = lambda t: jax.tree_util.tree_map(lambda a: a.shape, t)
    assert shapes(fresh) == shapes(loaded)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(fresh))
    emb = fresh["text_model"]["embeddings"]["token_embedding"]["embedding"]
    assert 0.015 < float(jnp.std(emb)) < 0.025  # normal(0.02), as OpenAI initialises token embeddings
    # Vision position embeddings: normal(width^-0.5), as OpenAI's CLIP (README, "From scratch"). The sample std of n
    # normal draws has a relative standard error of 1/sqrt(2n); six of them bound the check.
    pos = np.asarray(fresh["vision_model"]["embeddings"]["position_embedding"]["embedding"])
    target, rel_se = pos.shape[-1] ** -0.5, 1 / np.sqrt(2 * pos.size)
    assert abs(pos.std() / target - 1) < 6 * rel_se, (pos.std(), target, pos.shape)
    # The from-scratch preset builds for 384x128 inputs.
    small = clip.CLIP(clip.config_from_preset("small", vocab_size=500))
    abstract = jax.eval_shape(lambda: random_clip_params(small, jax.random.key(0)))
    pos = abstract["vision_model"]["embeddings"]["position_embedding"]["embedding"]
    assert pos.shape == (1 + 24 * 8, 256)
    tiny = jax.eval_shape(lambda: random_clip_params(clip.CLIP(clip.PRESETS["tiny"]), jax.random.key(1)))
    # The layers stacked: (layers, in, out).
    assert tiny["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].shape == (
        clip.PRESETS["tiny"].text_layers,
        40,
        72,
    )


def test_config():
    c = clip.config_from_preset("vit-b16", image_size=(384, 128))
    assert c.grid == (24, 8) and c.stride == 16 and c.text_mlp == 2048 and c.vision_mlp == 3072
    assert clip.config_from_preset("vit-b16", image_size=(384, 128), stride=12).grid == (31, 10)
    assert clip.config_from_preset("vit-b16", patch_size=32).stride == 32
    assert clip.config_from_preset("small", text_width=128, text_heads=2).text_mlp == 512
    with pytest.raises(KeyError, match="vit-b16"):
        clip.config_from_preset("vit-h99")
    with pytest.raises(TypeError, match="widht"):
        clip.config_from_preset("tiny", widht=3)
    with pytest.raises(ValueError, match="divisible"):
        clip.config_from_preset("tiny", text_heads=3)
    with pytest.raises(ValueError, match="act"):
        clip.config_from_preset("tiny", act="relu")


def test_wrong_image_size_is_reported(native):
    model, params = native
    with pytest.raises(ValueError, match="image_size"):
        model.apply({"params": params}, _images((1, 48, 24, 3)), method=model.encode_image)
