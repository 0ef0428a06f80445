"""models/stacking.py: the stacked and unrolled layouts of a layer stack convert both ways, losslessly.

The reference is a hand-built pair of trees: layers_i's leaves, written out, against the same values stacked with
numpy. Exact equality: the conversions only move values.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from uit_jax import optim, sharding
from uit_jax.models import stacking


def _unrolled(depth=3, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    layer = lambda: {"attn": {"kernel": normal(4, 6), "bias": normal(6)}, "ln": {}}  # noqa: E731
    enc = {f"layers_{i}": layer() for i in range(depth)}
    return {"tower": {"encoder": enc, "post": {"scale": normal(4)}}, "head": {"w": normal(3)}}


def _by_hand(tree):
    """The stacked form written out: each leaf of layers_0..n-1 stacked with numpy."""
    enc = tree["tower"]["encoder"]
    n = len(enc)
    layers = {
        "attn": {k: np.stack([enc[f"layers_{i}"]["attn"][k] for i in range(n)]) for k in ("kernel", "bias")},
        "ln": {},
    }
    return {"tower": {"encoder": {"layers": layers}, "post": tree["tower"]["post"]}, "head": tree["head"]}


def _equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stack_and_unstack_match_the_hand_built_trees():
    flat, stacked = _unrolled(), _by_hand(_unrolled())
    _equal(stacking.stack(flat), stacked)
    _equal(stacking.unstack(stacked), flat)
    _equal(stacking.stack(stacked), stacked)  # each is a no-op on the other layout
    _equal(stacking.unstack(flat), flat)
    assert stacking.has_stacked(stacked) and not stacking.has_stacked(flat)
    # Jax arrays too, also under jit (how checkpoints convert on the devices).
    _equal(jax.jit(stacking.stack)(jax.tree.map(jnp.asarray, flat)), stacked)
    _equal(jax.jit(stacking.unstack)(jax.tree.map(jnp.asarray, stacked)), flat)


def test_optimiser_states_convert_like_their_parameters():
    """Adam's moments (inside optax's masked and chained states) mirror the parameters: they convert alike."""
    flat = jax.tree.map(jnp.asarray, _unrolled())
    stacked = stacking.stack(flat)
    tx = optim.make_optimizer(stacked, schedule=1e-3, no_decay_rules=[r"bias$"])
    state = jax.tree.map(lambda x: x + 1.5, tx.init(stacked))  # non-zero moments
    unrolled = stacking.unstack(state)
    assert len(jax.tree.leaves(unrolled)) > len(jax.tree.leaves(state))
    assert jax.tree.structure(unrolled) == jax.tree.structure(optim.make_optimizer(flat, schedule=1e-3).init(flat))
    _equal(stacking.stack(unrolled), state)


def test_abstract_trees_carry_the_shardings():
    """ShapeDtypeStructs: a layer's sharding is the stacked leaf's without the (unsharded) layer axis."""
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    stacked = _by_hand(_unrolled(depth=2))
    specs = sharding.param_partition_specs(stacked, ((".*", "fsdp"),), mesh)
    # The fsdp rule sees one layer: (4, 6) shards its dim 0, i.e. the stacked (2, 4, 6)'s dim 1, not the layers.
    assert specs["tower"]["encoder"]["layers"]["attn"]["kernel"] == P(None, "fsdp")
    assert specs["tower"]["encoder"]["layers"]["attn"]["bias"] == P()  # (6,) is not divisible by 4
    shardings = sharding.shardings_for(specs, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), stacked, shardings)
    flat = stacking.unstack(abstract)
    kernel = flat["tower"]["encoder"]["layers_1"]["attn"]["kernel"]
    assert kernel.shape == (4, 6) and kernel.sharding.spec == P("fsdp")
    back = stacking.stack(flat)["tower"]["encoder"]["layers"]["attn"]["kernel"]
    assert back.shape == (2, 4, 6) and back.sharding.spec == P(None, "fsdp")
    bad = jax.ShapeDtypeStruct((2, 4, 6), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, P("fsdp")))
    with pytest.raises(ValueError, match="layer axis of a stacked leaf is sharded"):
        stacking.unstack({"layers": {"kernel": bad}})


def test_explicit_rules_describe_one_layer():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    specs = sharding.param_partition_specs(_by_hand(_unrolled()), [(".*kernel", P("fsdp", None))], mesh)
    assert specs["tower"]["encoder"]["layers"]["attn"]["kernel"] == P(None, "fsdp", None)
    assert specs["head"]["w"] == P()


def test_mismatches_are_named():
    gap = _unrolled(depth=3)
    del gap["tower"]["encoder"]["layers_1"]
    with pytest.raises(ValueError, match="layers_1 is missing between layers_0 and layers_2"):
        stacking.stack(gap)
    mixed = {
        "layers": _by_hand(_unrolled())["tower"]["encoder"]["layers"],
        "layers_0": _unrolled()["tower"]["encoder"]["layers_0"],
    }
    with pytest.raises(ValueError, match="mixes layouts"):
        stacking.unstack(mixed)
    with pytest.raises(ValueError, match="mixes layouts"):
        stacking.stack(mixed)
    wrong = _unrolled()
    wrong["tower"]["encoder"]["layers_1"]["attn"]["kernel"] = np.zeros((5, 6), np.float32)
    with pytest.raises(ValueError, match=r"layers_i do not stack.*\(5, 6\)"):
        stacking.stack(wrong)
    with pytest.raises(ValueError, match="not a stack of layers"):
        stacking.unstack({"layers": {"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}})
    with pytest.raises(ValueError, match="stacked group must be named one of"):
        stacking.stacked_name("blocks_")


def test_trees_without_groups_are_kept():
    tree = (optax.EmptyState(), jnp.zeros(3), {"layers_x": jnp.ones(2), "w": {"cross": jnp.ones(1)}})
    _equal(stacking.unstack(tree), tree)
    _equal(stacking.stack(tree), tree)
