"""Train-step benchmark on random in-memory inputs: step time, pairs/s, compile time, peak memory, FLOPs and MFU.

Runs without TensorFlow (model, losses and the train step only), so it works on accelerator images that lack it.

  python tools/benchmark.py --preset=vit-b16 --image_size=384,128 --batch=128 --steps=20       # on a GPU/TPU
  python tools/benchmark.py --preset=small --image_size=128,64 --batch=64 --dtype=float32      # on CPU

Prints one JSON line with the medians (and per-step times) so runs can be compared; MFU is reported when the
device's peak bf16 FLOP/s is known (or given with --peak_tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

# Peak dense bf16 TFLOP/s per chip, from vendor data sheets.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
}

OBJECTIVES = dict(sdm=1.0, id=1.0, triplet=10.0, restoration=10.0, itc=0.0, mlm=0.0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit-b16", help="CLIP preset (vit-b16, vit-b32, vit-l14, small, tiny).")
    p.add_argument("--image_size", default="384,128", help="H,W")
    p.add_argument("--text_len", type=int, default=77)
    p.add_argument("--batch", type=int, default=128, help="global batch (pairs)")
    p.add_argument("--num_classes", type=int, default=11003, help="ID-head classes (CUHK-PEDES train ids)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after 2 warm-up steps")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto|float32|bfloat16")
    p.add_argument("--objectives", default="full", help="'full' (SDM+ID+triplet+restoration) or 'align' (no TIR)")
    p.add_argument("--fsdp", type=int, default=1, help="size of the fsdp mesh axis")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def build(args):
    """Model, mesh, sharded train state and the jitted step for the benchmarked configuration.

    No lr groups: a group's factor is one elementwise multiply per tensor, which does not change the cost.
    """
    import jax
    import jax.numpy as jnp

    from uit_jax import optim, sharding, steps
    from uit_jax.models import clip as clip_lib
    from uit_jax.models import uit as uit_lib

    h, w = (int(x) for x in args.image_size.split(","))
    if args.dtype == "auto":
        dtype = jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    else:
        dtype = getattr(jnp, args.dtype)
    weights = dict(OBJECTIVES, restoration=0.0 if args.objectives == "align" else OBJECTIVES["restoration"])
    cfg = clip_lib.config_from_preset(args.preset, image_size=(h, w), text_len=args.text_len)
    model = uit_lib.UIT(
        clip_config=cfg, num_classes=args.num_classes, use_restoration=weights["restoration"] > 0, dtype=dtype
    )
    mesh = sharding.make_mesh({"data": -1, "fsdp": args.fsdp})
    sharding.check_batch_divisible(args.batch, mesh)

    images = jnp.zeros((1, h, w, 3), jnp.float32)
    text = jnp.zeros((1, cfg.text_len), jnp.int32)

    def init(r):
        return model.init({"params": r, "dropout": r}, images, text, rng=r)["params"]

    rng = jax.random.key(0)
    params_shape = jax.eval_shape(init, rng)
    schedule = optim.make_schedule(base_lr=1e-5, steps_per_epoch=100, epochs=60)
    tx = optim.make_optimizer(params_shape, schedule=schedule)
    abstract = jax.eval_shape(lambda p: steps.init_state(p, tx), params_shape)
    state_sh = sharding.shardings_for(sharding.param_partition_specs(abstract, ((".*", "fsdp"),), mesh), mesh)
    state = jax.jit(lambda r: steps.init_state(init(r), tx), out_shardings=state_sh)(rng)
    loss_fn = steps.make_loss_fn(model, weights, logit_scale=50.0, patch_size=cfg.patch_size)
    step_fn = steps.jit_train_step(loss_fn, tx, schedule, state_sh, mesh)
    return dict(cfg=cfg, mesh=mesh, state=state, abstract=abstract, step_fn=step_fn, dtype=dtype, size=(h, w))


def random_batch(args, cfg, size, mesh):
    """A global batch of random images, captions (end-of-text last) and identities."""
    import numpy as np

    from uit_jax import sharding

    rng = np.random.default_rng(0)
    batch = {
        "images": rng.standard_normal((args.batch, *size, 3), np.float32),
        "text": rng.integers(1, cfg.vocab_size - 1, (args.batch, cfg.text_len)).astype(np.int32),
        "pid": rng.integers(0, args.num_classes, (args.batch,)).astype(np.int32),
    }
    batch["text"][:, -1] = cfg.eot_token_id if cfg.eot_token_id is not None else cfg.vocab_size - 1
    return sharding.host_batch_to_global(batch, mesh)


def time_steps(step_fn, state, batch, mesh, n_steps):
    """Compiles (timed, with XLA's cost and memory analysis), runs 2 warm-up steps, then times `n_steps`."""
    import jax

    rng = jax.random.key(0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, batch, rng).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) if cost else 0.0
        mem = compiled.memory_analysis()
        for _ in range(2):
            state, m = step_fn(state, batch, rng)
        jax.block_until_ready(m)
        times = []
        for _ in range(n_steps):
            t = time.perf_counter()
            state, m = step_fn(state, batch, rng)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    return dict(compile_s=compile_s, flops=flops, mem=mem, times=times, loss=float(m["loss"]))


def report(args, built, timed) -> dict:
    """The JSON record: medians, pairs/s, FLOPs, MFU (when the peak is known), memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    mesh, times, flops, mem = built["mesh"], timed["times"], timed["flops"], timed["mem"]
    med = statistics.median(times)
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)
    # cost_analysis counts the FLOPs of the whole (global) program on one device's share when sharded.
    flops_per_step = flops * (mesh.size if flops else 0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(built["abstract"]["params"]))
    out = dict(
        device=kind,
        backend=jax.default_backend(),
        num_devices=mesh.size,
        preset=args.preset,
        image_size=list(built["size"]),
        batch=args.batch,
        dtype=jnp.dtype(built["dtype"]).name,
        objectives=args.objectives,
        params_millions=round(n_params / 1e6, 2),
        compile_s=round(timed["compile_s"], 2),
        step_s_median=round(med, 5),
        step_s_min=round(min(times), 5),
        step_s_max=round(max(times), 5),
        pairs_per_s=round(args.batch / med, 1),
        gflops_per_pair=round(flops_per_step / args.batch / 1e9, 4) if flops else None,
        tflops_per_s=round(flops_per_step / med / 1e12, 2) if flops else None,
        mfu=round(flops_per_step / med / (peak * 1e12 * mesh.size), 4) if (flops and peak) else None,
        temp_mib=round(mem.temp_size_in_bytes / 2**20, 1) if mem else None,
        args_mib=round(mem.argument_size_in_bytes / 2**20, 1) if mem else None,
        loss=timed["loss"],
    )
    stats = getattr(dev, "memory_stats", lambda: None)()
    if stats and "peak_bytes_in_use" in stats:
        out["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out


def main(argv=None):
    args = parse_args(argv)
    from uit_jax import compile_cache  # noqa: PLC0415

    compile_cache.enable()  # a second run of the same benchmark loads its programs (UIT_JAX_CACHE= turns it off)
    built = build(args)
    batch = random_batch(args, built["cfg"], built["size"], built["mesh"])
    out = report(args, built, time_steps(built["step_fn"], built["state"], batch, built["mesh"], args.steps))
    line = json.dumps(out)
    print(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
