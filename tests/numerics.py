"""Tolerances for comparing float32 results computed in different reduction orders (devices, processes, ISAs).

Two programs that compute the same sums in a different order (8 shards instead of 1, an all-reduce tree instead
of a local loop, AVX-512 instead of AVX2 lanes) agree only to rounding. Higham's a-priori bound for a float32 sum
of n terms is gamma_n = n * eps / (1 - n * eps) times the sum of the magnitudes, so two orders differ by at most
2 * gamma_n of the largest partial magnitude. A tolerance must therefore be *relative to the size of the quantity
compared* (a parameter update, a loss), never an absolute number that one CPU happened to meet: the same commit
measured 1.7e-6 of the update here (Intel, AVX-512) and 3.6e-6 on an AMD EPYC (AVX2), which an absolute 1e-4 on
a ~32-sized update turned into a pass on one machine and a failure on the other.

A genuine sharding or gradient bug (a missing or doubled all-reduce, a gradient from part of the batch, a wrong
transpose) changes an update by a fraction of its own size (1/2, 1/8, a sign), i.e. by 1e-1 or more of it, so a
bound of ~1e-4 of the update still separates rounding from a bug by three orders of magnitude.
"""

import jax
import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 1.19e-7


def reduction_rtol(n: int) -> float:
    """2 * gamma_n: how far two float32 sums of n terms, taken in different orders, can drift (relative)."""
    return 2 * n * F32_EPS / (1 - n * F32_EPS)


def max_abs(tree) -> float:
    return max(float(np.max(np.abs(np.asarray(x)))) for x in jax.tree.leaves(tree))


def max_abs_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def assert_updates_close(p_ref, p_got, p_start, rtol: float, steps: int = 1) -> tuple[float, float]:
    """Parameters after the same update(s) computed in two reduction orders agree to rounding.

    Per element: |ref - got| <= rtol * move + steps * eps * |ref|, where move = max |ref - start| over all
    parameters. The first term is the update's own rounding (the largest move is the scale: leaves whose update
    is ~0 carry pure rounding noise, so a per-leaf ratio would prove nothing); the second is the rounding of
    `p + update` itself, one ulp of the parameter per step, which dominates when the update is tiny next to the
    parameter (a LayerNorm scale of 1 moved by 1e-4 differs by 1.2e-7 whenever the two updates straddle a rounding
    boundary). Returns (max error / move, move) for the message.
    """
    move = max_abs_diff(p_ref, p_start)
    assert move > 0, "the update did not move the parameters: the comparison would be vacuous"
    worst = 0.0
    for path, a, b in zip(
        jax.tree_util.tree_leaves_with_path(p_ref), jax.tree.leaves(p_ref), jax.tree.leaves(p_got), strict=True
    ):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        excess = np.abs(a - b) - (rtol * move + steps * F32_EPS * np.abs(a))
        assert np.all(excess <= 0), (
            f"{jax.tree_util.keystr(path[0])}: |diff| {np.abs(a - b).max():.3g} exceeds rtol {rtol:.3g} x move "
            f"{move:.3g} + {steps} ulp of the parameter"
        )
        worst = max(worst, float(np.abs(a - b).max()))
    return worst / move, move
