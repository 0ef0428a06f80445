"""The analytic FLOP count (`uit_jax.flops`) against the matmuls of the traced program.

Reference: a walk over the jaxpr of the forward loss that adds 2 x (output size) x (contracted size) for every
`dot_general` and convolution, multiplying by the trip count inside scans. It counts what the program does, so the
two must agree exactly (integers); any model change that adds a matmul without counting it fails here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uit_jax import flops, steps
from uit_jax.models import clip as clip_lib
from uit_jax.models import uit as uit_lib


def _matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out = eqn.outvars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod([lhs[d] for d in lc]))
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # (kh, kw, in, out) in our NHWC/HWIO convolutions
            out = eqn.outvars[0].aval.shape
            total += 2 * int(np.prod(out)) * int(np.prod(rhs[:-1])) // eqn.params["feature_group_count"]
        mult = eqn.params["length"] if name == "scan" else 1
        for sub in jax.core.jaxprs_in_params(eqn.params):
            total += mult * _matmul_flops(sub)
    return total


@pytest.mark.parametrize("restoration,scan", [(True, False), (True, True), (False, True)])
def test_forward_count_matches_the_program(restoration, scan):
    # Odd sizes: a width or token count used in the wrong place changes the total.
    cfg = clip_lib.config_from_preset(
        "tiny", image_size=(40, 24), patch_size=8, text_len=11, embed_dim=20, text_width=30, vision_width=36
    )
    b, classes = 6, 13
    model = uit_lib.UIT(
        clip_config=cfg, num_classes=classes, use_restoration=restoration, decoder_width=32, decoder_layers=3, scan=scan
    )
    weights = dict(sdm=1.0, id=1.0, triplet=10.0, restoration=10.0 if restoration else 0.0, itc=0.0, mlm=0.0)
    loss_fn = steps.make_loss_fn(model, weights, logit_scale=50.0, patch_size=cfg.patch_size)
    batch = {
        "images": jnp.zeros((b, 40, 24, 3), jnp.float32),
        "text": jnp.ones((b, 11), jnp.int32),
        "pid": jnp.arange(b, dtype=jnp.int32),
    }
    key = jax.random.key(0)
    params = jax.eval_shape(lambda: model.init({"params": key, "dropout": key}, batch["images"], batch["text"]))
    jaxpr = jax.make_jaxpr(lambda p: loss_fn(p["params"], batch, key))(params)
    counted = _matmul_flops(jaxpr.jaxpr)
    analytic = flops.train_step(
        cfg, b, num_classes=classes, restoration=restoration, decoder_width=32, decoder_layers=3, triplet=True
    )
    assert analytic.forward == counted, (analytic.components, counted)
    assert analytic.train == 3 * counted


def test_vit_b16_figures():
    """Hand arithmetic for one ViT-B/16 layer on 384x128 (1 + 192 tokens, width 768, MLP 3072)."""
    cfg = clip_lib.config_from_preset("vit-b16", image_size=(384, 128))
    t, d = 193, 768
    layer = 2 * (4 * t * d * d + 2 * t * t * d + 2 * t * d * 4 * d)
    assert flops.block(t, d, 4 * d) == layer
    assert flops.vision_tower(cfg) == 2 * 192 * 768 * 768 + 12 * layer + 2 * 193 * 768 * 512
    step = flops.train_step(cfg, 128, num_classes=11003)
    # The towers dominate; the restoration pass runs the vision tower on 1 + 58 tokens.
    assert step.components["vision_tower"] > step.components["restoration_vision"] > 0
    assert step.train == 3 * sum(step.components.values())
