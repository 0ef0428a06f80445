"""The two layouts of a layer stack's parameters: stacked in memory, unrolled on disk; conversions both ways.

Stacked (what the models hold, `layers.blocks`): one subtree per group, `layers` (the CLIP towers' encoders) or
`cross_layers` (the restoration decoder's and the MLM head's blocks), whose leaves carry a leading layer axis. The
program and the optimiser then see one tensor per kind of weight instead of one per layer (ViT-B/16 with its
decoder: 87 parameter tensors instead of 487), which is what makes its compile and warm start fast (docs/design.md,
"Layer stacks").
Unrolled (on disk and in Hugging Face's key paths): `layers_0`, `layers_1`, ..., one subtree per layer. Checkpoints
(`checkpoint.py`) and Hugging Face / OpenAI state dicts (`convert.py`) use it, so checkpoints written before the
stacked layout still load.

Every `{name}_{i}` group with a name in `STACKED` is a stack of blocks, so the conversions need no model: they walk
any pytree (optimiser states included: their moments mirror the parameters) and take numpy arrays, jax arrays
(also under `jit`) or `jax.ShapeDtypeStruct`s, whose NamedShardings gain or lose the layer axis (never sharded).
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The names of the stacked groups: `layers.blocks` names a group by its prefix without the trailing '_'.
STACKED = ("layers", "cross_layers")
_UNROLLED = re.compile(rf"({'|'.join(STACKED)})_(\d+)")


def stacked_name(prefix: str) -> str:
    """The stacked group's name for a `layers.blocks` prefix ('layers_' -> 'layers')."""
    name = prefix.rstrip("_")
    if name not in STACKED:
        raise ValueError(f"layers.blocks prefix {prefix!r}: a stacked group must be named one of {STACKED}.")
    return name


def _map_dicts(fn, tree):
    """`fn` applied to each outermost dict of `tree` (the tree itself when it is one); other nodes are kept."""
    if isinstance(tree, dict):
        return fn(tree)
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree and isinstance(x, dict))
    if treedef.num_nodes == 1:  # a leaf
        return tree
    return treedef.unflatten([_map_dicts(fn, x) if isinstance(x, dict) else x for x in leaves])


def _with_spec(sharding, spec):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _layer(leaf, i: int):
    """Layer `i` of a stacked leaf; a ShapeDtypeStruct's NamedSharding drops the (unsharded) layer axis."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        return leaf[i]
    sharding = leaf.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        if spec and spec[0] is not None:
            raise ValueError(f"stacking: the layer axis of a stacked leaf is sharded ({sharding.spec}); unshard it.")
        sharding = _with_spec(sharding, spec[1:])
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)


def _stack(*parts):
    """The layers `parts` as one leaf; ShapeDtypeStructs get the first one's sharding with an unsharded layer axis."""
    if any(tuple(p.shape) != tuple(parts[0].shape) for p in parts):
        raise ValueError(f"layer shapes differ: {[tuple(p.shape) for p in parts]}")
    if all(isinstance(p, jax.ShapeDtypeStruct) for p in parts):
        sharding = parts[0].sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = _with_spec(sharding, (None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(parts), *parts[0].shape), parts[0].dtype, sharding=sharding)
    if all(isinstance(p, np.ndarray | np.generic) for p in parts):
        return np.stack(parts)
    return jnp.stack(parts)


def _depth(group: dict, name: str) -> int:
    sizes = {int(x.shape[0]) if len(x.shape) else -1 for x in jax.tree.leaves(group)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"stacking: {name!r} is not a stack of layers (its leading sizes are {sorted(sizes)}).")
    return sizes.pop()


def stack(tree):
    """Each unrolled group `{name}_0` ... `{name}_{n-1}` of `tree` as one stacked `{name}`; the rest unchanged."""

    def on_dict(d):
        groups: dict[str, dict[int, Any]] = {}
        out = {}
        for k, v in d.items():
            m = _UNROLLED.fullmatch(k) if isinstance(k, str) else None
            if m:
                groups.setdefault(m[1], {})[int(m[2])] = _map_dicts(on_dict, v)
            else:
                out[k] = _map_dicts(on_dict, v)
        for name, layers in groups.items():
            if name in d:
                raise ValueError(f"stacking: both {name!r} and {name}_i are present; the tree mixes layouts.")
            missing = sorted(set(range(max(layers) + 1)) - set(layers))
            if missing:
                raise ValueError(f"stacking: {name}_{missing[0]} is missing between {name}_0 and {name}_{max(layers)}.")
            try:
                out[name] = jax.tree.map(_stack, *(layers[i] for i in range(len(layers))))
            except ValueError as e:
                raise ValueError(f"stacking: the layers {name}_i do not stack: {e}") from e
        return out

    return _map_dicts(on_dict, tree)


def unstack(tree):
    """Each stacked group `{name}` of `tree` as `{name}_0` ... `{name}_{n-1}`; the rest unchanged."""

    def on_dict(d):
        out = {}
        for k, v in d.items():
            if k not in STACKED or not isinstance(v, dict):
                out[k] = _map_dicts(on_dict, v)
                continue
            for i in range(_depth(v, k)):
                if f"{k}_{i}" in d:
                    raise ValueError(f"stacking: both {k!r} and {k}_{i!r} are present; the tree mixes layouts.")
                out[f"{k}_{i}"] = _map_dicts(on_dict, jax.tree.map(lambda x, i=i: _layer(x, i), v))
        return out

    return _map_dicts(on_dict, tree)


def in_group(path) -> bool:
    """Whether a leaf's key path (`jax.tree_util` keys) lies inside a stacked group: a dict under a `STACKED` key."""
    dict_key = jax.tree_util.DictKey
    return any(
        isinstance(k, dict_key) and k.key in STACKED and isinstance(nxt, dict_key)
        for k, nxt in zip(path, path[1:], strict=False)
    )


def has_stacked(tree) -> bool:
    """Whether `tree` holds a stacked group anywhere."""
    found = []

    def visit(d):
        for k, v in d.items():
            if k in STACKED and isinstance(v, dict):
                found.append(k)
            else:
                _map_dicts(visit, v)
        return d

    _map_dicts(visit, tree)
    return bool(found)
