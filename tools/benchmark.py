"""Train-step benchmark on random in-memory inputs: step time, pairs/s, compile time, memory, FLOPs and MFU.

Runs without TensorFlow (model, losses and the train step only), so it works on accelerator images that lack it.

  python tools/benchmark.py --preset=vit-b16 --image_size=384,128 --batch=128 --steps=20       # on a GPU/TPU
  python tools/benchmark.py --preset=small --image_size=128,64 --batch=64 --dtype=float32      # on CPU

Prints one JSON line with the medians so runs can be compared. FLOPs are counted analytically per component
(`uit_jax/flops.py`: towers, restoration pass, decoder, heads and losses; training = 3 x forward), which is what
MFU uses (when the device's peak bf16 FLOP/s is known, or given with --peak_tflops). Without --scan=1, XLA's own
count is printed beside it (`xla_gflops_per_pair`, `xla_over_analytic`): a check on CPU, where it counts every op
(the elementwise ones too, so slightly more), an under-count on GPU, where cuBLAS/cuDNN calls are left out of it,
and meaningless under scan, where it counts the loop body once. `--micro_batch=N` runs the gradient in chunks of N
rows per device (gradient caching, `config.micro_batch`): the analytic count and MFU leave its extra forward pass
out, as they leave out remat's recomputation, and XLA's count is not printed (the chunks are a loop too).

Two more modes:
  --table=VARIANTS  one process, one row per variant, a markdown table with ratios to the first row, e.g.
                    --table='full;align;remat=full;batch=256' (a variant is ';'-separated, its settings
                    ','-separated key=value overriding the command line: objectives, batch, remat, scan, dtype,
                    text_len, preset, image_size, fsdp, attention, split, grad_barrier, micro_batch). 'full'
                    and 'align' are objectives. A variant that fails (a kernel the device lacks, out of memory)
                    gets a 'failed' row; the others run.
  --aot             compile only, from abstract shapes (no weights, nothing run), and print XLA's memory analysis
                    of the step: arguments, outputs, temporaries, and the total a device must hold. With
                    --table, one row per variant: the memory table of docs/benchmarks.md.
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
    p.add_argument(
        "--scan", type=int, default=0, help="1: layers in a rolled jax.lax.scan; 0: unrolled (the default config)"
    )
    p.add_argument("--remat", default="none", help="per-layer rematerialisation: none|full|dots")
    p.add_argument(
        "--split",
        type=int,
        default=1,
        help="1: gradient and update as two programs (the trainer's default); 0: one",
    )
    p.add_argument(
        "--micro_batch",
        type=int,
        default=0,
        help="> 0: the gradient in chunks of this many rows per device (gradient caching, config.micro_batch); 0: "
        "the whole batch at once",
    )
    p.add_argument(
        "--grad_barrier",
        default="auto",
        help="residual-gradient barrier before each block (models/layers.py): auto (CPU only) | 1 | 0",
    )
    p.add_argument(
        "--host_malloc",
        default=None,
        choices=("auto", "0", "1"),
        help="glibc malloc settings for XLA:CPU (uit_jax/host_memory.py; default: $UIT_JAX_MALLOC, else auto)",
    )
    p.add_argument(
        "--attention", default="auto", help="attention kernel: auto|xla|einsum|cudnn (layers.ATTENTION_IMPLS)"
    )
    p.add_argument("--aot", action="store_true", help="compile from abstract shapes and report memory; run nothing")
    p.add_argument("--table", default="", help="';'-separated variants, one table row each (see the docstring)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="override the device's peak TFLOP/s for MFU")
    p.add_argument("--out", default="", help="also write the JSON here")
    return p.parse_args(argv)


def build(args):
    """Model, mesh, sharded train state and the jitted step for the benchmarked configuration.

    No lr groups: a group's factor is one elementwise multiply per tensor, which does not change the cost.
    """
    import jax

    from uit_jax import flops, optim, sharding, steps
    from uit_jax import state as state_lib
    from uit_jax.models import clip as clip_lib
    from uit_jax.models import layers
    from uit_jax.models import uit as uit_lib

    os.environ[layers.GRAD_BARRIER_ENV] = str(args.grad_barrier)  # read when the step is traced
    layers.grad_barrier_enabled()  # a bad value fails here, before any compile
    h, w = (int(x) for x in args.image_size.split(","))
    dtype = state_lib.compute_dtype(args.dtype)
    weights = dict(OBJECTIVES, restoration=0.0 if args.objectives == "align" else OBJECTIVES["restoration"])
    cfg = clip_lib.config_from_preset(args.preset, image_size=(h, w), text_len=args.text_len)
    model = uit_lib.UIT(
        clip_config=cfg,
        num_classes=args.num_classes,
        use_restoration=weights["restoration"] > 0,
        dtype=dtype,
        scan=bool(args.scan),
        remat=args.remat,
        attention=args.attention,
    )
    mesh = sharding.make_mesh({"data": -1, "fsdp": args.fsdp})
    sharding.check_batch_divisible(args.batch, mesh)
    steps.check_micro_batch(args.micro_batch, args.batch, sharding.data_shards(mesh))

    # The initial values do not matter here, so a hardware generator: JAX's default threefry made the ViT-B/16 init
    # the slowest compile of a fresh GPU process (docs/benchmarks.md).
    rng = jax.random.key(0, impl="unsafe_rbg")
    params_shape = jax.eval_shape(lambda r: state_lib.init_params(model, r), rng)
    schedule = optim.make_schedule(base_lr=1e-5, steps_per_epoch=100, epochs=60)
    tx = optim.make_optimizer(params_shape, schedule=schedule)
    abstract, state_sh = state_lib.abstract_state(model, tx, mesh, ((".*", "fsdp"),), rng, params=params_shape)
    init_s = None
    if args.aot:  # abstract state: shapes and shardings only, no memory
        state = abstract
    else:  # its compile is not in compile_s, and on a GPU it is not small: init_s reports it
        t0 = time.perf_counter()
        state = jax.block_until_ready(state_lib.fresh_state(model, tx, state_sh, rng))
        init_s = time.perf_counter() - t0
    loss_fn = steps.make_loss_fn(model, weights, logit_scale=50.0, patch_size=cfg.patch_size)
    step_fn = steps.jit_train_step(
        loss_fn, tx, schedule, state_sh, mesh, split=bool(args.split), micro_batch=args.micro_batch
    )
    analytic = flops.train_step(
        cfg, args.batch, num_classes=args.num_classes, restoration=weights["restoration"] > 0, triplet=True
    )
    return dict(
        cfg=cfg,
        mesh=mesh,
        state=state,
        abstract=abstract,
        step_fn=step_fn,
        dtype=dtype,
        size=(h, w),
        flops=analytic,
        init_s=init_s,
    )


def random_batch(args, cfg, size, mesh):
    """A global batch of random images, captions (end-of-text last) and identities (abstract with --aot)."""
    import jax
    import numpy as np

    from uit_jax import sharding

    if args.aot:
        sh = sharding.batch_sharding(mesh)
        return {
            "images": jax.ShapeDtypeStruct((args.batch, *size, 3), np.float32, sharding=sh),
            "text": jax.ShapeDtypeStruct((args.batch, cfg.text_len), np.int32, sharding=sh),
            "pid": jax.ShapeDtypeStruct((args.batch,), np.int32, sharding=sh),
        }
    rng = np.random.default_rng(0)
    batch = {
        "images": rng.standard_normal((args.batch, *size, 3), np.float32),
        "text": rng.integers(1, cfg.vocab_size - 1, (args.batch, cfg.text_len)).astype(np.int32),
        "pid": rng.integers(0, args.num_classes, (args.batch,)).astype(np.int32),
    }
    batch["text"][:, -1] = cfg.eot_token_id if cfg.eot_token_id is not None else cfg.vocab_size - 1
    return sharding.host_batch_to_global(batch, mesh)


def time_steps(step_fn, state, batch, mesh, n_steps):
    """Compiles (timed, with XLA's cost and memory analysis), runs 2 warm-up steps, then times `n_steps`.

    A split step (`--split=1`) is two programs: compile time and XLA's FLOPs are their sums, memory the peak of
    the two (see `_split_memory`)."""
    import jax

    rng = jax.random.key(0)
    with jax.set_mesh(mesh):
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch, rng)
        compiled = [x.compile() for x in lowered] if isinstance(lowered, list) else [lowered.compile()]
        compile_s = time.perf_counter() - t0
        flops = 0.0
        for c in compiled:
            cost = c.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            flops += float(cost.get("flops", 0.0)) if cost else 0.0
        mems = [c.memory_analysis() for c in compiled]
        mem = _memory(mems[0]) if len(mems) == 1 else _split_memory(mems, state)
        if n_steps == 0:  # --aot: nothing to run
            return dict(compile_s=compile_s, flops=flops, mem=mem, times=[], loss=None)
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


def _memory(mem) -> dict:
    """XLA's buffer assignment of the compiled step, MiB: what one device holds at the peak of the step."""
    if mem is None:
        return {}
    mib = lambda b: round(b / 2**20, 1)
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return dict(
        args_mib=mib(mem.argument_size_in_bytes),
        output_mib=mib(mem.output_size_in_bytes),
        temp_mib=mib(mem.temp_size_in_bytes),
        alias_mib=mib(mem.alias_size_in_bytes),
        total_mib=mib(total),
    )


def _split_memory(mems, state) -> dict:
    """The peak of a split step: while the gradient program runs, the optimiser state (not its argument) is held
    too; the update program's arguments are the whole state and the gradients. `args_mib` and `temp_mib` are those
    of the program that sets the peak (args_mib counting the state it does not take as an argument)."""
    import jax
    import numpy as np

    if any(m is None for m in mems):
        return {}
    grad, update = (_memory(m) for m in mems)
    shard = lambda x: x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    held = sum(int(np.prod(shard(x))) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state["opt_state"]))
    held = round(held / 2**20, 1)  # one device's share
    grad_peak = round(grad["total_mib"] + held, 1)
    if grad_peak >= update["total_mib"]:
        peak = dict(args_mib=round(grad["args_mib"] + held, 1), temp_mib=grad["temp_mib"], total_mib=grad_peak)
    else:
        peak = dict(args_mib=update["args_mib"], temp_mib=update["temp_mib"], total_mib=update["total_mib"])
    return dict(peak, output_mib=update["output_mib"], alias_mib=update["alias_mib"], programs=[grad, update])


def report(args, built, timed) -> dict:
    """The JSON record: medians, pairs/s, analytic and XLA FLOPs, MFU (when the peak is known), memory."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from uit_jax.models import layers

    mesh, times, xla_flops, an = built["mesh"], timed["times"], timed["flops"], built["flops"]
    grad_barrier_on = layers.grad_barrier_enabled() and not args.scan
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k.lower() in kind.lower()), 0.0)
    # cost_analysis counts the FLOPs of one device's share of the (global) program when sharded.
    xla_step = xla_flops * mesh.size
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
        scan=bool(args.scan),
        split=bool(args.split),
        micro_batch=args.micro_batch,
        remat=args.remat,
        attention=layers.check_attention(args.attention),  # the kernel that ran ('auto' resolved)
        grad_barrier=grad_barrier_on,
        host_malloc=args.host_malloc,  # what main() applied (uit_jax.host_memory)
        params_millions=round(n_params / 1e6, 2),
        compile_s=round(timed["compile_s"], 2),
        init_s=None if built["init_s"] is None else round(built["init_s"], 2),
        gflops_per_pair=round(an.per_pair() / 1e9, 4),
        gflops_per_pair_by_component={k: round(3 * v / an.batch / 1e9, 4) for k, v in an.components.items()},
    )
    # XLA's cost analysis counts a while loop's body once, not once per trip: under scan (layers or chunks) its
    # count is meaningless.
    if xla_flops and not args.scan and not args.micro_batch:
        out.update(
            xla_gflops_per_pair=round(xla_step / args.batch / 1e9, 4),
            xla_over_analytic=round(xla_step / an.train, 3),
        )
    if times:
        med = statistics.median(times)
        out.update(
            step_s_median=round(med, 5),
            step_s_min=round(min(times), 5),
            step_s_max=round(max(times), 5),
            pairs_per_s=round(args.batch / med, 1),
            tflops_per_s=round(an.train / med / 1e12, 2),
            mfu=round(an.train / med / (peak * 1e12 * mesh.size), 4) if peak else None,
            loss=timed["loss"],
        )
    out.update(timed["mem"])
    stats = getattr(dev, "memory_stats", lambda: None)()
    if times and stats and "peak_bytes_in_use" in stats:
        out["peak_device_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
    return out


def run_one(args) -> dict:
    built = build(args)
    batch = random_batch(args, built["cfg"], built["size"], built["mesh"])
    timed = time_steps(built["step_fn"], built["state"], batch, built["mesh"], 0 if args.aot else args.steps)
    return report(args, built, timed)


VARIANT_KEYS = dict(objectives=str, batch=int, remat=str, scan=int, dtype=str, text_len=int, preset=str, fsdp=int)
VARIANT_KEYS.update(image_size=str, attention=str, split=int, grad_barrier=str, micro_batch=int)


def parse_variant(spec: str, base: argparse.Namespace) -> tuple[str, argparse.Namespace]:
    """'align' / 'full' / 'batch=256,remat=full' -> (label, the arguments with those settings)."""
    args = argparse.Namespace(**vars(base))
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if not value and key in ("full", "align"):
            key, value = "objectives", key
        if key not in VARIANT_KEYS or not value:
            raise SystemExit(
                f"--table: cannot read {item!r} in variant {spec!r}; use 'full', 'align' or key=value with key one "
                f"of {sorted(VARIANT_KEYS)}"
            )
        setattr(args, key, VARIANT_KEYS[key](value.replace("x", ",") if key == "image_size" else value))
    return spec.strip(), args


def table(rows: list[tuple[str, dict]], aot: bool) -> str:
    """Markdown: one row per variant, with ratios to the first row that ran."""
    ok = [r for _, r in rows if "error" not in r]
    if aot:
        head = "| variant | compile s | args MiB | temp MiB | total MiB | total / first |"
        lines = [head, "| --- | --- | --- | --- | --- | --- |"]
        base = ok[0]["total_mib"] if ok else 0
        for label, r in rows:
            if "error" in r:
                lines.append(f"| {label} | failed: {r['error']} | | | | |")
                continue
            ratio = r["total_mib"] / base
            lines.append(
                f"| {label} | {r['compile_s']} | {r['args_mib']} | {r['temp_mib']} | {r['total_mib']} | {ratio:.2f} |"
            )
        return "\n".join(lines)
    head = "| variant | step s (median) | pairs/s | x first | compile s | GFLOP/pair | TFLOP/s | MFU | temp MiB |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = ok[0]["pairs_per_s"] if ok else 0
    for label, r in rows:
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | | | | |")
            continue
        mfu = "-" if r["mfu"] is None else f"{r['mfu']:.3f}"
        lines.append(
            f"| {label} | {r['step_s_median']} | {r['pairs_per_s']} | {r['pairs_per_s'] / base:.2f} | "
            f"{r['compile_s']} | {r['gflops_per_pair']} | {r['tflops_per_s']} | {mfu} | {r['temp_mib']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    from uit_jax import compile_cache, host_memory  # noqa: PLC0415

    args = parse_args(argv)
    if args.host_malloc is not None:
        os.environ[host_memory.ENV] = args.host_malloc
    args.host_malloc = host_memory.enable()  # before JAX starts its threads: process-wide, not per variant

    compile_cache.enable()  # a second run of the same benchmark loads its programs (UIT_JAX_CACHE= turns it off)
    if args.table:
        rows = []
        for spec in filter(None, (v.strip() for v in args.table.split(";"))):
            label, v_args = parse_variant(spec, args)
            try:
                rows.append((label, run_one(v_args)))
            except Exception as e:  # one variant failing (a kernel the device lacks, memory) keeps the others
                rows.append((label, dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")))
                import jax  # noqa: PLC0415

                jax.clear_caches()
            print(json.dumps(dict(variant=label, **rows[-1][1])), flush=True)
        text = table(rows, args.aot)
        print(text)
        out = dict(rows=[dict(variant=label, **r) for label, r in rows], table=text)
    else:
        out = run_one(args)
        print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(1 if any("error" in r for r in result.get("rows", [])) else 0)
