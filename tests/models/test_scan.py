"""Options that change how the model runs, not what it computes: same parameters, same function, same grads.

Layers under jax.lax.scan and rematerialisation (`layers.blocks`), and the attention kernel (`model.attention`).
The reference is the plain Python loop over the blocks (scan=False, remat='none', attention='xla'), which the CLIP
parity tests check against transformers. Tolerances: the programs differ only in float32 summation order, so values
agree to a few float32 ulps of the largest magnitude compared (1e-5 relative to it, float32 eps being 1.2e-7).

cuDNN's attention cannot run on a CPU, so the 'cudnn' branch is checked here with `jax.nn.dot_product_attention`
patched to run XLA's kernel on exactly the arguments that branch passes (no mask; caption lengths instead; causal
flag); on a GPU, tests/models/test_cudnn_attention.py compares the real cuDNN kernel with XLA's against a float32
reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uit_jax.models import clip as clip_lib
from uit_jax.models import decoder as decoder_lib
from uit_jax.models import layers
from uit_jax.models import uit as uit_lib

RTOL = 1e-5  # of the largest |value| in the compared tree


def _close(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    scale = max(float(jnp.max(jnp.abs(x))) for x in a)
    worst = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(a, b, strict=True))
    assert worst <= RTOL * scale, f"max |diff| {worst:.3g} > {RTOL} x {scale:.3g}"


@pytest.fixture(scope="module")
def setup():
    cfg = clip_lib.config_from_preset("tiny")
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
    text = jnp.asarray(rng.integers(1, 98, (3, 77)), jnp.int32)
    key = jax.random.key(0)
    model = uit_lib.UIT(clip_config=cfg, num_classes=7, attention="xla")
    params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, images, text, rng=k))(key)["params"]
    reference = _value_and_grad(model, params, images, text, key)  # the plain loop, computed once
    return cfg, images, text, key, params, reference


def _value_and_grad(model, params, images, text, key):
    def f(p):
        out = model.apply({"params": p}, images, text, rng=key)
        return sum(jnp.sum(jnp.square(v)) for k, v in out.items() if k != "patch_mask"), out

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize(
    "scan,remat,attention",
    [
        (True, "none", "xla"),
        (True, "dots", "xla"),
        (False, "full", "xla"),
        (False, "none", "einsum"),
        (True, "full", "einsum"),
    ],
)
def test_scan_remat_and_kernel_match_the_loop(setup, scan, remat, attention):
    cfg, images, text, key, params, ((loss_ref, out_ref), g_ref) = setup
    model = uit_lib.UIT(clip_config=cfg, num_classes=7, scan=scan, remat=remat, attention=attention)
    # Same parameter tree: checkpoints, conversion, lr groups and sharding rules see no difference.
    init = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, images, text, rng=key))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    (loss, out), g = _value_and_grad(model, params, images, text, key)
    _close(out, out_ref)
    _close(g, g_ref)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=RTOL)
    # The gradient reaches every layer (a scan that read the parameters wrongly would leave some at zero).
    fc1 = g["clip"]["vision_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    assert fc1.shape[0] == cfg.vision_layers and float(jnp.abs(fc1).max(axis=(1, 2)).min()) > 0


def test_scan_compiles_one_layer(setup):
    """Under scan the program holds one copy of the block: its matmuls do not grow with depth (the loop's do)."""
    cfg, images, text, *_ = setup

    def program_size(layers_n, scan):
        c = clip_lib.config_from_preset("tiny", vision_layers=layers_n, text_layers=layers_n)
        m = clip_lib.CLIP(c, scan=scan)
        p = jax.eval_shape(lambda: m.init(jax.random.key(0), images, text))
        return len(jax.jit(lambda p: m.apply(p, images, text)).lower(p).compile().as_text())

    # Rolled, one copy of the block whatever the depth (the text differs only in trip counts and shapes);
    # unrolled, a copy per layer.
    assert program_size(8, True) < 1.1 * program_size(2, True)
    assert program_size(8, False) > 2 * program_size(2, False)


def test_decoder_scan_matches(setup):
    rng = np.random.default_rng(1)
    img = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
    ids_restore = jnp.asarray(np.stack([rng.permutation(16) for _ in range(2)]), jnp.int32)
    txt = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[4], [7]]))
    kw = dict(grid=(4, 4), patch_dim=12, width=24, heads=2, layers=3)
    p = decoder_lib.RestorationDecoder(**kw).init(jax.random.key(0), img, ids_restore, txt, mask)
    ref = decoder_lib.RestorationDecoder(**kw).apply(p, img, ids_restore, txt, mask)
    assert p["params"]["cross_layers"]["mlp"]["fc1"]["kernel"].shape[0] == 3  # stacked
    out = decoder_lib.RestorationDecoder(**kw, scan=True, remat="full").apply(p, img, ids_restore, txt, mask)
    _close(out, ref)


def test_cudnn_attention_branch_matches_xla(setup, monkeypatch):
    cfg, images, text, key, params, ((loss_ref, out_ref), g_ref) = setup
    # The captions end (end-of-text: the row's largest id) at different positions, so the decoder's
    # cross-attention mask matters.
    lengths = np.asarray(jnp.argmax(text, -1)) + 1
    assert len(set(lengths.tolist())) == len(lengths) and lengths.max() < text.shape[1], lengths
    real, calls = jax.nn.dot_product_attention, []

    def fake(q, k, v, bias=None, mask=None, *, is_causal=False, key_value_seq_lengths=None, implementation=None):
        assert implementation == "cudnn" and mask is None and bias is None
        # JAX's cuDNN path refuses odd lengths in training: the branch pads them and masks the extra key.
        assert q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0, (q.shape, k.shape)
        calls.append((is_causal, q.shape[1], k.shape[1], key_value_seq_lengths))
        return real(q, k, v, is_causal=is_causal, key_value_seq_lengths=key_value_seq_lengths, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    model = uit_lib.UIT(clip_config=cfg, num_classes=7, attention="cudnn")
    (loss, out), g = _value_and_grad(model, params, images, text, key)
    # Every attention took the branch: the text tower (causal), the vision tower twice (the image, then the
    # grayscale kept patches), the decoder's cross-attention (caption lengths) and its blocks. (Each layer stack
    # is traced as one block, so these are the kinds of call, not one per layer.)
    n_patches = (cfg.image_size[0] // cfg.patch_size) * (cfg.image_size[1] // cfg.patch_size)
    n_kept = n_patches - int(n_patches * model.drop_ratio)
    n_dec = 1 + n_patches + (1 + n_patches) % 2
    kinds = {c[:3] for c in calls}
    text_len = text.shape[1] + text.shape[1] % 2
    assert kinds == {
        (True, text_len, text_len),
        (False, 1 + n_patches + (1 + n_patches) % 2, 1 + n_patches + (1 + n_patches) % 2),
        (False, 1 + n_kept + (1 + n_kept) % 2, 1 + n_kept + (1 + n_kept) % 2),
        (False, n_dec, text_len),
        (False, n_dec, n_dec),
    }, kinds
    assert (1 + n_patches) % 2 and text.shape[1] % 2  # odd lengths in this model: padding is exercised
    cross = [c for c in calls if c[2] == text.shape[1] + 1 and c[1] != c[2]]
    assert len(cross) == 1 and cross[0][3] is not None  # the caption mask reaches cuDNN as lengths
    _close(out, out_ref)
    _close(g, g_ref)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=RTOL)


def test_prefix_lengths_brute_force():
    lengths = np.random.default_rng(0).integers(0, 9, 6)
    mask = np.arange(9)[None] < lengths[:, None]
    np.testing.assert_array_equal(np.asarray(layers.prefix_lengths(jnp.asarray(mask))), lengths)


def test_unknown_attention_kernel_is_named():
    with pytest.raises(ValueError, match="Unknown attention kernel 'flash'"):
        layers.check_attention("flash")


def test_unknown_remat_is_named():
    with pytest.raises(ValueError, match="Unknown remat policy 'some'"):
        layers.check_remat("some")
