"""`layers.residual_grad_barrier`: the identity whose gradient XLA:CPU must write once per block.

Checked three ways: the gradient is the cotangent bit for bit (signed zeros, infinities, NaN, both branches of
its conditional; subnormals become zeros as in every XLA:CPU addition, the residual sum's own included); a
tower's gradients with and without it agree; and the compiled program no longer grows with depth squared:
without the barrier the largest fusion of a tower's gradient takes more operands the deeper the tower (XLA:CPU
re-sums every later block's terms in each consumer) and the program grows faster than the depth, with it the
program grows as the depth. The last check is about the compiled HLO, not a time, so it is exact.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tests import numerics
from uit_jax.models import layers

SPECIAL = [0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan, 3.4e38, 1.2e-38]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("first", [1.0, -1.0, 0.0, np.nan], ids=["pos", "neg", "zero", "nan"])
def test_the_gradient_is_the_cotangent_bit_for_bit(dtype, first):
    g = jnp.asarray([first, *SPECIAL], dtype).reshape(1, -1)  # the first element picks the conditional's branch
    x = jnp.ones_like(g)
    y, vjp = jax.vjp(layers.residual_grad_barrier, x)
    assert y is x or np.array_equal(np.asarray(y), np.asarray(x))
    (dx,) = jax.jit(vjp)(g)
    assert dx.dtype == g.dtype and dx.shape == g.shape
    # Compare the bits: -0.0 == 0.0 and NaN != NaN would hide a difference from a value comparison.
    bits = lambda a: np.asarray(a).view(np.uint16 if a.dtype == jnp.bfloat16 else np.uint32)
    np.testing.assert_array_equal(bits(dx), bits(g))


def test_subnormals_flush_as_in_any_xla_cpu_addition():
    g = jnp.asarray([1.0, 1e-45, -1e-45, 1e-39], jnp.float32)
    (dx,) = jax.jit(jax.vjp(layers.residual_grad_barrier, jnp.ones_like(g))[1])(g)
    # The residual gradient reaching the barrier is itself a sum, which XLA:CPU (flush-to-zero) computes the same way.
    same_as_a_sum = jax.jit(lambda a, b: a + b)(g, jnp.full_like(g, -0.0))
    np.testing.assert_array_equal(np.asarray(dx).view(np.uint32), np.asarray(same_as_a_sum).view(np.uint32))


def _fusion_stats(hlo: str) -> dict:
    """Fusions of the compiled module's entry computation: how many, and the most operands one takes."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    calls = re.findall(r"= [^=]*? fusion\(([^)]*)\)", entry)
    operands = [len([a for a in args.split(",") if "%" in a]) for args in calls]
    return dict(fusions=len(calls), max_fusion_operands=max(operands, default=0), hlo_lines=hlo.count("\n"))


def _grad(depth, monkeypatch, barrier, width=16, batch=2, tokens=5):
    """The compiled gradient (parameters and input) of `depth` CLIP blocks with the barrier setting given (read
    when it is traced), evaluated once: (gradients, compiled HLO text)."""
    monkeypatch.setenv(layers.GRAD_BARRIER_ENV, barrier)

    class Tower(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = layers.blocks(self, x, depth, "layers_", width=width, heads=max(width // 64, 1), mlp=4 * width)
            return layers.LayerNorm(name="ln_final")(x)

    tower = Tower()
    x = jax.random.normal(jax.random.key(0), (batch, tokens, width))
    params = tower.init(jax.random.key(1), x)
    # A fixed linear readout of the first token, as a projection head: the squared norm of a LayerNorm output is
    # almost constant, so its gradient would be nearly all rounding.
    readout = jax.random.normal(jax.random.key(2), (batch, width))
    loss = lambda p, x: jnp.sum(tower.apply(p, x)[:, 0] * readout)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled(params, x), compiled.as_text()


def _lines(hlo: str) -> int:
    return _fusion_stats(hlo)["hlo_lines"]


def _largest_fusion(hlo: str) -> int:
    """The most operands any fusion of the compiled program's entry computation takes."""
    stats = _fusion_stats(hlo)
    assert stats["fusions"], "no fusion found: the HLO text format changed"
    return stats["max_fusion_operands"]


def test_tower_gradients_agree_with_and_without(monkeypatch):
    (g_on, hlo_on), (g_off, hlo_off) = _grad(6, monkeypatch, "1"), _grad(6, monkeypatch, "0")
    assert hlo_on.count("conditional(") == 6 and "conditional(" not in hlo_off  # one before each block
    # Same maths; XLA may still order a fused sum differently, so rounding of the largest gradient's size.
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_off), strict=True):
        scale = numerics.max_abs(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=numerics.reduction_rtol(64) * scale)


def test_the_compiled_gradient_does_not_grow_with_depth_squared(monkeypatch):
    off = {d: _grad(d, monkeypatch, "0")[1] for d in (4, 12)}
    on = {d: _grad(d, monkeypatch, "1")[1] for d in (4, 12)}
    # Without the barrier the residual chain's fusion takes more operands the deeper the tower, and the program
    # grows faster than the depth (x3 here); with it, the program grows as the depth at most.
    assert _largest_fusion(off[12]) > 2 * _largest_fusion(off[4])  # the test can fail
    assert _lines(off[12]) > 4 * _lines(off[4]), {d: _lines(h) for d, h in off.items()}
    assert _lines(on[12]) <= 3 * _lines(on[4]), {d: _lines(h) for d, h in on.items()}
    assert _largest_fusion(on[12]) < _largest_fusion(off[12]) / 3


def test_on_by_default_on_cpu_and_a_bad_setting_is_named(monkeypatch):
    monkeypatch.delenv(layers.GRAD_BARRIER_ENV, raising=False)
    assert layers.grad_barrier_enabled() == (jax.default_backend() == "cpu")
    monkeypatch.setenv(layers.GRAD_BARRIER_ENV, "0")
    assert not layers.grad_barrier_enabled()
    monkeypatch.setenv(layers.GRAD_BARRIER_ENV, "maybe")
    with pytest.raises(ValueError, match=r"UIT_JAX_GRAD_BARRIER='maybe': use 1 \(on\), 0 \(off\) or auto"):
        layers.grad_barrier_enabled()
