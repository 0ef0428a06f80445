"""One attention layer's forward and backward, per kernel (`layers.ATTENTION_IMPLS`), beside PyTorch's.

    python tools/bench_attention.py --batch 8 --tokens 193 --heads 12 --head_dim 64 --reps 15
    python tools/bench_attention.py ... --layer     # the whole layers.Attention: q/k/v/out projections too

Times the gradient of <attention(q, k, v), dy> with respect to q, k and v (or, with --layer, of the
`layers.Attention` module with respect to its parameters and input) for each JAX kernel in --kernels, float32,
and, when PyTorch is importable, the same for `torch.nn.functional.scaled_dot_product_attention` and for
PyTorch's plain softmax(q k^T) v. The kernels run in turn within each repetition, so a slow spell of the shared
machine hits them alike; the medians over --reps and each one's ratio to the first row are printed as one JSON
line and a markdown table. --causal uses a causal mask. Runs without TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=193, help="sequence length (ViT-B/16 at 384x128: 1 + 192 patches)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layer", action="store_true", help="time the whole layers.Attention (projections included)")
    p.add_argument("--kernels", default="xla,einsum", help="JAX kernels, ','-separated (layers.ATTENTION_IMPLS)")
    p.add_argument("--torch", default="auto", help="auto (when importable) | 0")
    p.add_argument("--reps", type=int, default=15, help="timed repetitions after one warm-up")
    return p.parse_args(argv)


def _jax_runs(args):
    """{name: zero-argument callable that runs one forward and backward and waits for it}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from uit_jax.models import layers

    b, t, n, h = args.batch, args.tokens, args.heads, args.head_dim
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((b, t, n * h)), jnp.float32)
    q, k, v, dy = (jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32) for _ in range(4))
    runs = {}
    for kernel in dict.fromkeys(layers.check_attention(k) for k in args.kernels.split(",")):  # 'auto' resolved
        if args.layer:
            module = layers.Attention(n * h, n, causal=args.causal, attention=kernel)
            params = module.init(jax.random.key(0), x)
            loss = lambda p, x, m=module: jnp.vdot(m.apply(p, x), dy.reshape(x.shape))
            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
            inputs = (params, x)
        else:
            attn = lambda q, k, v, i=kernel: layers.attend(i, q, k, v, causal=args.causal)
            grad = jax.jit(jax.grad(lambda q, k, v, f=attn: jnp.vdot(f(q, k, v), dy), argnums=(0, 1, 2)))
            inputs = (q, k, v)
        runs[f"jax {kernel}"] = lambda g=grad, a=inputs: jax.block_until_ready(g(*a))
    return runs


def _torch_runs(args):
    try:
        import torch
    except ImportError:
        return {}
    import numpy as np

    b, t, n, h = args.batch, args.tokens, args.heads, args.head_dim
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(t, t, dtype=torch.bool).tril() if args.causal else None
    if args.layer:  # torch's own multi-head attention module, batch first
        mha = torch.nn.MultiheadAttention(n * h, n, batch_first=True)
        x = torch.randn(b, t, n * h, generator=gen, requires_grad=True)
        dy = torch.randn(b, t, n * h, generator=gen)
        causal = None if mask is None else ~mask

        def sdpa():
            y = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
            (y * dy).sum().backward()

        return {"torch MultiheadAttention (SDPA)": sdpa}
    q, k, v = (torch.randn(b, n, t, h, generator=gen, requires_grad=True) for _ in range(3))
    dy = torch.randn(b, n, t, h, generator=gen)

    def sdpa():
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
        (y * dy).sum().backward()

    def math():
        logits = q @ k.transpose(-1, -2) / np.sqrt(h)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        ((torch.softmax(logits, -1) @ v) * dy).sum().backward()

    return {"torch sdpa": sdpa, "torch softmax(qk^T)v": math}


def main(argv=None) -> dict:
    args = parse_args(argv)
    runs = _jax_runs(args)
    if args.torch != "0":
        runs.update(_torch_runs(args))
    for run in runs.values():  # warm-up (compiles the JAX ones)
        run()
    times = {name: [] for name in runs}
    for _ in range(args.reps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    first = next(iter(medians.values()))
    shape = dict(batch=args.batch, tokens=args.tokens, heads=args.heads, head_dim=args.head_dim, causal=args.causal)
    rows = [dict(name=k, ms_median=round(1e3 * v, 3), x_first=round(v / first, 3)) for k, v in medians.items()]
    out = dict(**shape, layer=args.layer, reps=args.reps, rows=rows)
    print(json.dumps(out), flush=True)
    what = "layers.Attention (projections included)" if args.layer else "attention core"
    print(f"\n{what}, forward + backward, float32, {shape}")
    print("| kernel | ms (median) | x first |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['name']} | {r['ms_median']:.2f} | {r['x_first']:.2f} |")
    return out


if __name__ == "__main__":
    main()
