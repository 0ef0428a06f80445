"""`layers.Dense` and `layers.param` against Flax's own `nn.Dense` / `Module.param`, the reference they replace.

The same parameters from the same key and the same program, so equality is exact: only Flax's per-apply trace of
each initializer (its shape check) is gone, replaced by a direct comparison of shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from uit_jax.models import layers

CASES = [
    dict(features=5),
    dict(features=5, use_bias=False),
    dict(features=3, kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.normal(0.5)),
    dict(features=4, dtype=jnp.bfloat16),
    dict(features=4, param_dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}" for k in kw))
def test_dense_is_flax_dense(kw):
    x = jax.random.normal(jax.random.key(1), (2, 6, 7))
    ours, flax_dense = layers.Dense(**kw), nn.Dense(**kw)
    p_ours = ours.init(jax.random.key(0), x)
    p_flax = flax_dense.init(jax.random.key(0), x)
    assert jax.tree.structure(p_ours) == jax.tree.structure(p_flax)
    for a, b in zip(jax.tree.leaves(p_ours), jax.tree.leaves(p_flax), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    y_ours, y_flax = ours.apply(p_ours, x), flax_dense.apply(p_flax, x)
    assert y_ours.dtype == y_flax.dtype and y_ours.shape == y_flax.shape
    np.testing.assert_array_equal(np.asarray(y_ours, np.float32), np.asarray(y_flax, np.float32))
    # The same program, equation for equation (so the same compiled step and cache key).
    assert str(jax.make_jaxpr(ours.apply)(p_ours, x)) == str(jax.make_jaxpr(flax_dense.apply)(p_flax, x))


def test_apply_traces_no_initializer():
    calls = []

    def counting_init(key, shape, dtype=jnp.float32):
        calls.append(shape)
        return nn.initializers.lecun_normal()(key, shape, dtype)

    x = jnp.ones((2, 3))
    params = layers.Dense(4, kernel_init=counting_init).init(jax.random.key(0), x)
    assert calls == [(3, 4)]  # created once
    jax.jit(layers.Dense(4, kernel_init=counting_init).apply)(params, x)
    assert calls == [(3, 4)]  # Flax's nn.Dense would trace it again here, once per apply
    nn.Dense(4, kernel_init=counting_init).apply(params, x)
    assert len(calls) == 2  # ... as it does: the test can tell the two apart


def test_a_parameter_of_another_shape_is_named():
    x = jnp.ones((2, 3))
    params = layers.Dense(4).init(jax.random.key(0), x)
    wrong = jax.tree.map(lambda a: a, params)
    wrong["params"]["kernel"] = jnp.zeros((3, 5))
    with pytest.raises(ValueError, match=r"kernel has shape \(3, 5\), but this model expects \(3, 4\)"):
        layers.Dense(4).apply(wrong, x)
    # In a model: the message carries the parameter's path.
    mlp = layers.MLP(hidden=6)
    p = mlp.init(jax.random.key(0), jnp.ones((2, 8)))
    p["params"]["fc2"]["bias"] = jnp.ones((7,))
    with pytest.raises(ValueError, match=r"Parameter fc2/bias has shape \(7,\), but this model expects \(8,\)"):
        mlp.apply(p, jnp.ones((2, 8)))
