"""Layers under jax.lax.scan and rematerialisation (`layers.blocks`): same parameters, same function, same grads.

The reference is the plain Python loop over the blocks (scan=False, remat='none'), which the CLIP parity tests
check against transformers. Tolerances: the two programs differ only in float32 summation order, so values agree to
a few float32 ulps of the largest magnitude compared (1e-5 relative to it, float32 eps being 1.2e-7).
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
    model = uit_lib.UIT(clip_config=cfg, num_classes=7)
    params = jax.jit(lambda k: model.init({"params": k, "dropout": k}, images, text, rng=k))(key)["params"]
    reference = _value_and_grad(model, params, images, text, key)  # the plain loop, computed once
    return cfg, images, text, key, params, reference


def _value_and_grad(model, params, images, text, key):
    def f(p):
        out = model.apply({"params": p}, images, text, rng=key)
        return sum(jnp.sum(jnp.square(v)) for k, v in out.items() if k != "patch_mask"), out

    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)


@pytest.mark.parametrize("scan,remat", [(True, "none"), (True, "dots"), (False, "full")])
def test_scan_and_remat_match_the_loop(setup, scan, remat):
    cfg, images, text, key, params, ((loss_ref, out_ref), g_ref) = setup
    model = uit_lib.UIT(clip_config=cfg, num_classes=7, scan=scan, remat=remat)
    # Same parameter tree: checkpoints, conversion, lr groups and sharding rules see no difference.
    init = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, images, text, rng=key))["params"]
    assert jax.tree.structure(init) == jax.tree.structure(params)
    assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
    (loss, out), g = _value_and_grad(model, params, images, text, key)
    _close(out, out_ref)
    _close(g, g_ref)
    np.testing.assert_allclose(float(loss), float(loss_ref), rtol=RTOL)
    # The gradient reaches every layer (a scan that read the parameters wrongly would leave some at zero).
    for i in range(cfg.vision_layers):
        assert float(jnp.abs(g["clip"]["vision_model"]["encoder"][f"layers_{i}"]["mlp"]["fc1"]["kernel"]).max()) > 0


def test_scan_compiles_one_layer(setup):
    """Under scan the program holds one copy of the block: its matmuls do not grow with depth (the loop's do)."""
    cfg, images, text, *_ = setup

    def matmuls(layers_n, scan):
        c = clip_lib.config_from_preset("tiny", vision_layers=layers_n, text_layers=layers_n)
        m = clip_lib.CLIP(c, scan=scan)
        p = jax.eval_shape(lambda: m.init(jax.random.key(0), images, text))
        return jax.jit(lambda p: m.apply(p, images, text)).lower(p).as_text().count("dot_general")

    assert matmuls(8, True) == matmuls(2, True)
    assert matmuls(8, False) > 3 * matmuls(2, False)


def test_decoder_scan_matches(setup):
    rng = np.random.default_rng(1)
    img = jnp.asarray(rng.standard_normal((2, 5, 24)), jnp.float32)
    ids_restore = jnp.asarray(np.stack([rng.permutation(16) for _ in range(2)]), jnp.int32)
    txt = jnp.asarray(rng.standard_normal((2, 7, 24)), jnp.float32)
    mask = jnp.asarray(np.arange(7)[None] < np.array([[4], [7]]))
    kw = dict(grid=(4, 4), patch_dim=12, width=24, heads=2, layers=3)
    p = decoder_lib.RestorationDecoder(**kw).init(jax.random.key(0), img, ids_restore, txt, mask)
    ref = decoder_lib.RestorationDecoder(**kw).apply(p, img, ids_restore, txt, mask)
    out = decoder_lib.RestorationDecoder(**kw, scan=True, remat="full").apply(p, img, ids_restore, txt, mask)
    _close(out, ref)


def test_unknown_remat_is_named():
    with pytest.raises(ValueError, match="Unknown remat policy 'some'"):
        layers.check_remat("some")
