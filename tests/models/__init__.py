"""Helpers shared by the model tests."""

import jax
import jax.numpy as jnp


def random_clip_params(model, rng) -> dict:
    """Random parameters of a `clip.CLIP` (what from-scratch training starts from), without a forward pass."""
    c = model.config
    images = jnp.zeros((1, *c.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, c.text_len), jnp.int32)
    return jax.jit(lambda r: model.init(r, images, ids)["params"])(rng)
