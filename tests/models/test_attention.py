"""`layers.einsum_attention` (the 'einsum' kernel) against a float64 numpy loop and `jax.nn.dot_product_attention`.

The forward pass is checked against a brute-force loop over batch, head and query in float64; the hand-written
gradient against JAX's autodiff of `jax.nn.dot_product_attention(implementation='xla')`, the kernel it replaces on
CPU. Tolerances are relative to the largest magnitude compared: float32 sums of n terms taken in another order
differ by 2 * gamma_n (tests/numerics.py); bfloat16 by its unit roundoff, 2^-8, a few times over.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.numerics import max_abs, max_abs_diff, reduction_rtol
from uit_jax.models import layers

B, T, S, N, H = 3, 5, 7, 2, 4
LARGE_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)


def _inputs(seed, t, s, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in ((B, t, N, H), (B, s, N, H), (B, s, N, H)))
    dy = jnp.asarray(rng.standard_normal((B, t, N, H)), dtype)
    return q, k, v, dy


def _key_mask(s):
    # Row 0 attends to nothing (a fully masked row: uniform weights, as jax.nn.dot_product_attention gives),
    # row 1 to a prefix, row 2 to every key.
    lengths = np.array([0, 2, s])
    return jnp.asarray(np.arange(s)[None] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)


def _numpy_attention(q, k, v, mask, causal):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for n in range(q.shape[2]):
            for t in range(q.shape[1]):
                logits = np.array([q[b, t, n] @ k[b, s, n] for s in range(k.shape[1])]) / np.sqrt(q.shape[-1])
                keep = np.ones(k.shape[1], bool)
                if mask is not None:
                    keep &= np.asarray(mask)[b, 0, 0]
                if causal:
                    keep &= np.arange(k.shape[1]) <= t
                logits = np.where(keep, logits, LARGE_NEGATIVE)
                w = np.exp(logits - logits.max())
                out[b, t, n] = (w / w.sum()) @ v[b, :, n]
    return out


CASES = [
    dict(causal=False, masked=False, cross=False),
    dict(causal=True, masked=False, cross=False),
    dict(causal=False, masked=True, cross=True),  # the decoder's cross-attention over caption tokens
    dict(causal=True, masked=True, cross=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(k for k, v in c.items() if v) or "plain")
def test_einsum_attention_matches_numpy_and_xla(case):
    s = S if case["cross"] else T
    q, k, v, dy = _inputs(0, T, s, jnp.float32)
    mask = _key_mask(s) if case["masked"] else None
    causal = case["causal"]

    def loss(kernel):
        return lambda q, k, v: jnp.vdot(kernel(q, k, v), dy)

    ours = lambda q, k, v: layers.einsum_attention(q, k, v, mask, causal)
    xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="xla")
    y = jax.jit(ours)(q, k, v)
    ref = _numpy_attention(q, k, v, mask, causal)
    # Each output is two float32 sums (H terms for a logit, S for the softmax and the weighted values).
    tol = 4 * reduction_rtol(max(s, H))
    assert y.shape == ref.shape and y.dtype == jnp.float32
    assert np.max(np.abs(np.asarray(y, np.float64) - ref)) <= tol * np.max(np.abs(ref)), "forward"

    g = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g, g_ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert max_abs_diff(a, b) <= tol * max_abs(g_ref), f"d{name}"
    if case["masked"]:  # the fully masked row has uniform weights: a finite output, gradients finite everywhere
        assert all(bool(jnp.all(jnp.isfinite(a))) for a in g)


def test_einsum_attention_bfloat16_within_its_roundoff():
    q, k, v, dy = _inputs(1, T, T, jnp.bfloat16)
    mask = _key_mask(T)

    def run(kernel):
        f = lambda q, k, v: jnp.vdot(kernel(q, k, v).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)

    (val, g) = run(lambda q, k, v: layers.einsum_attention(q, k, v, mask, True))
    (val_ref, g_ref) = run(
        lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
    )
    assert all(a.dtype == jnp.bfloat16 for a in g)
    bound = 8 * 2.0**-8  # a few bfloat16 roundings of the compared magnitude
    for a, b in zip(g, g_ref, strict=True):
        assert max_abs_diff(a.astype(jnp.float32), b.astype(jnp.float32)) <= bound * max_abs(b.astype(jnp.float32))
    assert abs(float(val) - float(val_ref)) <= bound * max(1.0, abs(float(val_ref)))


def test_attention_layer_kernels_agree():
    """The Attention module with 'einsum' and with 'xla': the same parameters, output and parameter gradients."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)
    kv = jnp.asarray(rng.standard_normal((2, 6, 12)), jnp.float32)
    kv_mask = jnp.asarray(np.arange(6)[None] < np.array([[3], [6]]))

    dy = jnp.asarray(rng.standard_normal((2, 9, 16)), jnp.float32)

    def run(attention, causal, cross):
        model = layers.Attention(16, 4, causal=causal, attention=attention)
        args = (kv, kv_mask) if cross else ()
        params = model.init(jax.random.key(0), x, *args)
        y = jax.jit(lambda p: model.apply(p, x, *args))(params)
        g = jax.jit(jax.grad(lambda p: jnp.vdot(model.apply(p, x, *args), dy)))(params)
        return y, g

    # Projections (16 terms) around the attention core (sums of 4 and of up to 9 terms), in float32.
    tol = 8 * reduction_rtol(16)
    for causal, cross in ((False, False), (True, False), (False, True)):
        (y_e, g_e), (y_x, g_x) = run("einsum", causal, cross), run("xla", causal, cross)
        assert max_abs_diff(y_e, y_x) <= tol * max_abs(y_x), (causal, cross)
        assert max_abs_diff(g_e, g_x) <= tol * max_abs(g_x), (causal, cross)


def test_check_attention_resolves_auto():
    assert layers.check_attention("auto") == ("einsum" if jax.default_backend() == "cpu" else "xla")
    for kernel in ("xla", "einsum", "cudnn"):
        assert layers.check_attention(kernel) == kernel
    with pytest.raises(ValueError, match="Unknown attention kernel 'flash'"):
        layers.check_attention("flash")
