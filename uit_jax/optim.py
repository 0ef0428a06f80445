"""Optimiser and lr schedule: warm-up + cosine, torch-style Adam, regex lr multipliers and decay masks.

Reference: SEN ``solver/build.py`` and ``solver/lr_scheduler.py`` (from IRRA).

Adam. SEN trains with ``torch.optim.Adam(betas=(0.9, 0.999), eps=1e-3, weight_decay=4e-5)``. torch's
Adam couples the decay: it adds ``wd * param`` to the gradient *before* the moment estimates (L2
regularisation), unlike AdamW. We build the same: ``add_decayed_weights`` (masked) -> ``scale_by_adam``
-> ``-lr(step) * factor``.

Parameter groups. SEN makes one group per tensor: lr x5 for names containing ``cross``, then biases get
lr x2 (``bias_lr_factor``) and weight decay 0 (``weight_decay_bias``), then ``classifier`` / ``mlm_head``
get lr x5 again (so their biases are x5, cross-attention biases x2). Here a parameter's lr factor is that
of the first rule in ``lr_rules`` whose regex ``re.search``-es its '/'-joined path (for example
``decoder/cross_attn/kernel``), 1 if none matches; it gets no weight decay when any regex in
``no_decay_rules`` matches. The rules live in one table, the config's (``configs/common.py``: ``LR_RULES``,
``NO_DECAY_RULES``, SEN's grouping); ``config_kwargs(config.optim)`` is the one path from config to optimiser.

Schedule. SEN steps its scheduler once per epoch, so epoch e (0-based) runs at ``lr(e)``: linear warm-up
``base * (warmup_factor * (1 - e/W) + e/W)`` for e < W, then
``end + (base - end) * (1 + cos(pi * (e - W) / (E - W))) / 2``. We evaluate the same formula at the
fractional epoch ``step / steps_per_epoch`` (smooth per step; at the first step of each epoch it equals
SEN's value for that epoch). The end lr is
``end_lr_factor * base_lr`` (SEN: ``target_lr`` = 0) and, like everything, is scaled by the group factor.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'/'-joined names of a pytree key path, e.g. ``decoder/cross_attn/kernel``."""
    return "/".join(_key_name(k) for k in path)


def _compile(rules, what: str):
    out = []
    for rule in rules:
        try:
            pattern, factor = rule
            out.append((re.compile(pattern), float(factor)))
        except (TypeError, ValueError, re.error) as e:
            raise ValueError(
                f"optim: bad {what} entry {rule!r}: expected (regex, factor) with a valid regex ({e})"
            ) from e
    return out


def _lr_factor_fn(lr_rules) -> Callable[[str], tuple[float, str]]:
    compiled = _compile(lr_rules, "lr_rules")

    def factor(path: str) -> tuple[float, str]:
        for regex, f in compiled:
            if regex.search(path):
                return f, regex.pattern
        return 1.0, "default"

    return factor


def _decay_fn(no_decay_rules) -> Callable[[str], bool]:
    try:
        compiled = [re.compile(r) for r in no_decay_rules]
    except (TypeError, re.error) as e:
        raise ValueError(f"optim: bad no_decay_rules {no_decay_rules!r}: expected a list of regexes ({e})") from e
    return lambda path: not any(r.search(path) for r in compiled)


def lr_multipliers(params, rules: Sequence[tuple[str, float]]):
    """Pytree like ``params`` of Python floats: each parameter's lr factor under the rules above."""
    f = _lr_factor_fn(rules)
    return jax.tree_util.tree_map_with_path(lambda p, _: f(path_str(p))[0], params)


def decay_mask(params, no_decay_rules: Sequence[str]):
    """Pytree like ``params`` of bools: True where weight decay applies."""
    f = _decay_fn(no_decay_rules)
    return jax.tree_util.tree_map_with_path(lambda p, _: f(path_str(p)), params)


def describe_groups(
    params,
    *,
    lr_rules: Sequence[tuple[str, float]] = (),
    no_decay_rules: Sequence[str] = (),
    weight_decay: float = 0.0,
    **_optimizer_kwargs,
) -> str:
    """A text table for logging: one row per (matched rule, lr factor, weight decay), with counts.

    ``params`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``). Takes
    ``config_kwargs(config.optim)`` as it is (the other optimiser keywords are ignored).
    """
    lr_f = _lr_factor_fn(lr_rules)
    dec_f = _decay_fn(no_decay_rules)
    groups: dict[tuple[str, float, float], list[int]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = path_str(path)
        factor, rule = lr_f(name)
        wd = weight_decay if dec_f(name) else 0.0
        entry = groups.setdefault((rule, factor, wd), [0, 0])
        entry[0] += 1
        entry[1] += int(math.prod(getattr(leaf, "shape", ())))
    rows = [("group", "tensors", "params", "lr factor", "weight decay")]
    rows += [(g, str(c), f"{n:,}", f"{f:g}", f"{wd:g}") for (g, f, wd), (c, n) in sorted(groups.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def make_schedule(
    *,
    base_lr: float,
    steps_per_epoch: int,
    epochs: float,
    warmup_epochs: float = 5,
    warmup_factor: float = 0.1,
    end_lr_factor: float = 0.0,
) -> optax.Schedule:
    """Step -> lr: linear warm-up from ``warmup_factor * base_lr``, then cosine down to ``end_lr_factor * base_lr``.

    See the module docstring for the formula and how it relates to SEN's per-epoch scheduler.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"optim.make_schedule: steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if not 0 <= warmup_epochs <= epochs or epochs <= 0:
        raise ValueError(
            f"optim.make_schedule: need 0 <= warmup_epochs ({warmup_epochs}) <= epochs ({epochs}), and epochs > 0"
        )
    end_lr = end_lr_factor * base_lr
    decay_epochs = epochs - warmup_epochs

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) / steps_per_epoch
        if warmup_epochs > 0:
            alpha = t / warmup_epochs
            warm = base_lr * (warmup_factor * (1.0 - alpha) + alpha)
        else:
            warm = base_lr
        ratio = jnp.clip((t - warmup_epochs) / max(decay_epochs, 1e-12), 0.0, 1.0)
        after = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * ratio))
        return jnp.where(t < warmup_epochs, warm, after).astype(jnp.float32)

    return schedule


def scale_by_path(factor_of_path: Callable[[str], float]) -> optax.GradientTransformation:
    """Multiply each update by ``factor_of_path('/'-joined path)``; resolved at trace time, no state."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def scale(path, u):
            f = factor_of_path(path_str(path))
            return u if f == 1.0 else u * jnp.asarray(f, u.dtype)

        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(
    params,
    *,
    schedule: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-3,
    weight_decay: float = 4e-5,
    lr_rules: Sequence[tuple[str, float]] = (),
    no_decay_rules: Sequence[str] = (),
    grad_clip: float | None = None,
) -> optax.GradientTransformation:
    """torch.optim.Adam with coupled (L2) weight decay, per-parameter lr factors and decay mask, from regexes.

    ``params`` (arrays or shape structs) is only used to check the rules: a rule that matches no parameter is
    logged as a warning (a typo, or a module switched off). ``grad_clip`` (global norm) applies to the raw
    gradient, before the decay term; SEN does not clip. ``update`` needs ``params`` (for the decay term).
    """
    lr_f = _lr_factor_fn(lr_rules)
    dec_f = _decay_fn(no_decay_rules)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    if not paths:
        raise ValueError("optim.make_optimizer: params is empty")
    for pattern, _ in lr_rules:
        if not any(re.search(pattern, p) for p in paths):
            logging.warning(
                "optim.make_optimizer: lr rule %r matches no parameter (e.g. %r); check optim.lr_rules",
                pattern,
                paths[0],
            )

    chain = []
    if grad_clip:
        chain.append(optax.clip_by_global_norm(grad_clip))
    if weight_decay:
        # A callable mask follows the structure of whatever tree is passed at init/update time.
        mask = lambda tree: jax.tree_util.tree_map_with_path(lambda p, _: dec_f(path_str(p)), tree)
        chain.append(optax.add_decayed_weights(weight_decay, mask=mask))
    chain.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    chain.append(optax.scale_by_learning_rate(schedule))
    chain.append(scale_by_path(lambda path: lr_f(path)[0]))
    return optax.chain(*chain)


def config_kwargs(optim_config: Mapping[str, Any]) -> dict[str, Any]:
    """The make_optimizer keyword arguments present in a mapping-like config (e.g. ``config.optim``)."""
    keys = ("b1", "b2", "eps", "weight_decay", "lr_rules", "no_decay_rules", "grad_clip")
    out = {k: optim_config[k] for k in keys if k in optim_config}
    if "lr_rules" in out:
        out["lr_rules"] = tuple(tuple(r) for r in out["lr_rules"])
    if "no_decay_rules" in out:
        out["no_decay_rules"] = tuple(out["no_decay_rules"])
    if "grad_clip" in out:
        out["grad_clip"] = out["grad_clip"] or None
    return out
