"""models/uit.py: the training forward pass's outputs, its grayscale restoration input, the optional heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uit_jax.models import clip, layers, uit

B, H, W, L, CLASSES = 3, 32, 16, 12, 7


def _model(**kw):
    cfg = clip.config_from_preset("tiny", image_size=(H, W), vocab_size=64, text_len=L, eot_token_id=63)
    return uit.UIT(clip_config=cfg, num_classes=CLASSES, drop_ratio=0.75, decoder_layers=1, **kw), cfg


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.uniform(0.1, 0.9, (B, H, W, 3))
    text = rng.integers(1, 60, (B, L)).astype(np.int32)
    text[:, 6], text[:, 7:] = 63, 0
    return rgb, text


def _normalise(rgb):
    return jnp.asarray((rgb - np.array(layers.CLIP_MEAN)) / np.array(layers.CLIP_STD), jnp.float32)


def test_call_outputs_and_encoders():
    model, cfg = _model(use_mlm=True)
    rgb, text = _inputs()
    images = _normalise(rgb)
    params = model.init(jax.random.key(0), images, text, rng=jax.random.key(1), mlm_text=text)["params"]
    out = model.apply({"params": params}, images, text, rng=jax.random.key(2), mlm_text=text)
    n, p = cfg.num_patches, cfg.patch_size
    shapes = {k: v.shape for k, v in out.items()}
    assert shapes == {
        "z_img": (B, cfg.embed_dim),
        "z_txt": (B, cfg.embed_dim),
        "logits_img": (B, CLASSES),
        "logits_txt": (B, CLASSES),
        "pixels_pred": (B, n, p * p * 3),
        "patch_mask": (B, n),
        "mlm_logits": (B, L, 64),
    }
    assert all(v.dtype == jnp.float32 for v in out.values())
    np.testing.assert_array_equal(np.asarray(out["patch_mask"]).sum(1), [round(0.75 * n)] * B)  # exactly 75% dropped
    # The retrieval embeddings are the encoders' (what evaluation uses).
    z_img = model.apply({"params": params}, images, method=model.encode_image)
    z_txt = model.apply({"params": params}, text, method=model.encode_text)
    np.testing.assert_array_equal(np.asarray(out["z_img"]), np.asarray(z_img))
    np.testing.assert_array_equal(np.asarray(out["z_txt"]), np.asarray(z_txt))
    with pytest.raises(ValueError, match="mlm_text"):
        model.apply({"params": params}, images, text, rng=jax.random.key(2))


def test_restoration_sees_only_the_grayscale_image():
    """Two images with the same luma and different colours: same restoration output, different embeddings."""
    model, _ = _model()
    rgb, text = _inputs()
    chroma = np.array([0.5870, -0.2989, 0.0]) * 0.15  # orthogonal to the luma weights (0.2989, 0.5870, 0.1140)
    other = rgb + chroma
    params = model.init(jax.random.key(0), _normalise(rgb), text, rng=jax.random.key(1))["params"]
    a = model.apply({"params": params}, _normalise(rgb), text, rng=jax.random.key(2))
    b = model.apply({"params": params}, _normalise(other), text, rng=jax.random.key(2))
    scale = float(np.abs(np.asarray(a["pixels_pred"])).max())
    # same grey input up to float32 rounding of the (un)normalisation: a few ulps of the output's scale
    np.testing.assert_allclose(a["pixels_pred"], b["pixels_pred"], atol=64 * np.finfo(np.float32).eps * scale)
    assert float(jnp.abs(a["z_img"] - b["z_img"]).max()) > 1e-3  # the retrieval branch sees the colours


def test_switched_off_heads_are_not_built():
    model, _ = _model(use_id=False, use_restoration=False)
    rgb, text = _inputs()
    variables = model.init(jax.random.key(0), _normalise(rgb), text)
    assert set(variables["params"]) == {"clip"}
    out = model.apply(variables, _normalise(rgb), text)
    assert set(out) == {"z_img", "z_txt"}
