"""The residual-gradient barrier (`layers.residual_grad_barrier`) on one tower: compiled program and gradient time.

    python tools/bench_grad_barrier.py --width 768 --layers 12 --batch 8 --tokens 193 --barrier 0 --steps 3
    python tools/bench_grad_barrier.py ... --barrier 1

Compiles the gradient (parameters and input) of a stack of `--layers` CLIP blocks (`layers.blocks`, unrolled,
float32) with the barrier off or on, and prints one JSON line: compile time, the compiled entry
computation's fusion count, the most operands any fusion takes (it grows with depth where XLA:CPU re-sums the
residual gradient in every consumer), the HLO text's line count, and the median gradient time over --steps runs
after one warm-up (0: compile only). Run the two settings in separate processes, alternated, to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=193, help="sequence length (ViT-B/16 at 384x128: 1 + 192 patches)")
    p.add_argument("--barrier", default="1", help="1 (on) | 0 (off) | auto (on for CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed gradient runs after one warm-up; 0: compile only")
    return p.parse_args(argv)


def fusion_stats(hlo: str) -> dict:
    """Fusions of the compiled module's entry computation: how many, and the most operands one takes."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    calls = re.findall(r"= [^=]*? fusion\(([^)]*)\)", entry)
    operands = [len([a for a in args.split(",") if "%" in a]) for args in calls]
    return dict(fusions=len(calls), max_fusion_operands=max(operands, default=0), hlo_lines=hlo.count("\n"))


def tower_grad(width: int, depth: int, batch: int, tokens: int):
    """The jitted, compiled gradient (parameters and input) of `depth` CLIP blocks at these shapes, with the barrier
    setting in force now (read when it is traced); returns (compiled, params, x, compile seconds)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from uit_jax.models import layers

    class Tower(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = layers.blocks(self, x, depth, "layers_", width=width, heads=max(width // 64, 1), mlp=4 * width)
            return layers.LayerNorm(name="ln_final")(x)

    tower = Tower()
    x = jax.random.normal(jax.random.key(0), (batch, tokens, width))
    params = tower.init(jax.random.key(1), x)
    # A fixed linear readout of the first token, as a projection head: the squared norm of a LayerNorm output is
    # almost constant, so its gradient would be nearly all rounding (tests compare these gradients).
    readout = jax.random.normal(jax.random.key(2), (batch, width))

    def loss(p, x):
        return jnp.sum(tower.apply(p, x)[:, 0] * readout)

    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    return compiled, params, x, time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    import jax

    from uit_jax.models import layers

    os.environ[layers.GRAD_BARRIER_ENV] = args.barrier
    barrier = layers.grad_barrier_enabled()
    grad, params, x, compile_s = tower_grad(args.width, args.layers, args.batch, args.tokens)
    out = dict(width=args.width, layers=args.layers, batch=args.batch, tokens=args.tokens, barrier=barrier)
    out.update(compile_s=round(compile_s, 2), **fusion_stats(grad.as_text()))
    if args.steps:
        jax.block_until_ready(grad(params, x))
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(params, x))
            times.append(time.perf_counter() - t0)
        out.update(grad_s_median=round(statistics.median(times), 4), grad_s=[round(t, 4) for t in times])
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
