"""Times one training step of SEN's released PyTorch code on CPU in float32, beside ours at the same shapes.

    python tools/bench_sen.py --sen_repo PATH [--batch 8] [--steps 5] [--threads N] [--out sen.json]
        [--ours [--ours_flags='--scan=1' ...] [--order sen,ours|ours,sen]] [--num_classes 11003]
        [--image_size 384,128]

PATH is a work tree of github.com/Delong-liu-bupt/SEN (reference commit 3d887c18; a bare clone can be exported
with `git -C CLONE archive HEAD | tar -x -C PATH`). Nothing of SEN is copied here: its modules are imported from
PATH (no byte code is written there) and patched in this process only.

What is built: SEN's training model as `run_SEN.sh` configures it, through SEN's own `utils/options.get_args`, so
every option the script does not set keeps SEN's default: loss_names 'sdm+mae+id+tri' (SDM, ID, the hard-negative
triplet, and the text-guided restoration branch with its second, masked image pass), --need_MAE, --mask_ratio 0.7,
--mae_loss_weight 10, --tri_loss_weight 10, --mlm_loss_weight 1 (unused: no 'mlm' in loss_names), --lr 1e-5,
--img_aug, --batch_size B; defaults include temperature 0.02, cmt_depth 4, lr_factor 5, bias_lr_factor 2, Adam
(betas 0.9/0.999, eps 1e-3), weight decay 4e-5 (0 on biases). CLIP is ViT-B/16 at --image_size (384x128, patch
and stride 16) with a 77-token, 49408-word text tower; `--num_classes` sets the ID head (CUHK-PEDES: 11003). The
optimizer is SEN's `solver.build_optimizer` (one param group per tensor, x5 lr for 'cross', classifier and MLM
modules, x2 and no decay for biases). The batch holds what SEN's MAE training set yields, collated: `images`
float32 (B, 3, H, W), `caption_ids` int64 (B, 77) as SEN tokenises (start 49406, words, end-of-text 49407 = the
largest id, where SEN pools, then zeros), `pids` int64 (identities in pairs, as its sampler draws up to 2 captions
per identity) and `image_ids` int64.

A step is SEN's `processor.do_train` body: forward, sum of the `*loss` entries, `.item()`, zero_grad, backward,
optimizer step, timed with time.perf_counter; 1 warm-up step (Adam allocates its state), then --steps timed,
each printed with its forward (+ loss sum), backward (+ zero_grad) and optimizer parts.

Patches (from outside, this process only; why):
  1. model.build.build_CLIP_from_openai_pretrained -> builds SEN's own `clip_model.CLIP` with the ViT-B/16
     hyper-parameters, randomly initialised by CLIP's own init: the original downloads OpenAI's checkpoint (no
     network here) and copies it in; weight values do not change the cost of a step.
  2. model.build.convert_weights -> no-op: SEN casts every Conv/Linear/MultiheadAttention weight and the
     projections to float16 (LayerNorms and embeddings stay float32, no autocast); float16 is not a compute path
     on CPU, and we compare float32 to float32.
  3. a forward pre-hook on `classifier` casting its input to float32: SEN's forward feeds it `i_feats.half()` and
     `t_feats.half()` (to match the halved head), which a float32 head rejects. The casts still run (B x 512).
  4. a forward pre-hook on `norm_4` casting its input to float32: `cross_former_mae` casts the decoder tokens with
     `x.to(torch.float16)` and they reach `cross_attn_Text` only through norm_4, SEN's LayerNorm, which returns
     its input's dtype. The cast still runs (B x 193 x 512).
  The fuse branch's float16 casts are not patched: 'fuse' is not among run_SEN.sh's objectives, so they never run.
  During the warm-up step every module's inputs and outputs are checked to be float16-free (and every parameter
  and gradient afterwards); the script stops if one is not.

What differs from SEN's real training step: float32 weights and compute (SEN: float16 weights, float32
LayerNorms and losses) on CPU (SEN: one GPU); random weights; the batch is random and in memory, so there is no
image decoding, augmentation (--img_aug: flip, pad + crop, random erasing), tokenisation, key-word filtering or
SEN's per-token POS-tagged caption masking (all in its data loader workers), no host-to-device copy and no
per-step meter updates; the lr schedule steps per epoch, so it is not part of a step. torch's Adam runs its
per-tensor loop on CPU (its multi-tensor `foreach` path is the default on CUDA only); that part of the step does
not grow with the batch, so at small batches it weighs more than it does at SEN's 128.

--ours then runs `tools/benchmark.py --preset=vit-b16 --dtype=float32` at the same batch, image size, class
count and step count in a subprocess (its own 2 warm-up steps after compiling; compile time is not in its step
time), and prints a markdown table with our step / SEN's step. Each --ours_flags adds a row of ours with those
benchmark flags (e.g. --ours_flags='' --ours_flags='--scan=1': layers unrolled, then rolled under scan). --order
picks which runs first, so repeated runs can alternate. Our XLA step uses all cores whatever --threads says.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# SEN's files this script imports or reads; their presence identifies a checkout.
SEN_FILES = ("model/build.py", "model/clip_model.py", "model/objectives.py", "solver/build.py", "utils/options.py")

# The command line of SEN's run_SEN.sh (paths and names aside); --batch_size is appended.
RUN_SEN_FLAGS = [
    "--img_aug",
    "--need_MAE",
    "--mlm_loss_weight=1.0",
    "--mae_loss_weight=10",
    "--tri_loss_weight=10",
    "--mask_ratio=0.7",
    "--lr=1e-5",
    "--dataset_name=CUHK-PEDES",
    "--loss_names=sdm+mae+id+tri",
    "--num_epoch=60",
    "--lrscheduler=cosine",
]

# OpenAI CLIP ViT-B/16, as SEN reads it from the checkpoint (context length and vocabulary included).
VIT_B16 = dict(
    embed_dim=512,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=16,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)
SOT, EOT = 49406, 49407  # CLIP's start- and end-of-text ids; EOT is the largest id, where SEN pools


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sen_repo", default=None, help="work tree of github.com/Delong-liu-bupt/SEN (required)")
    p.add_argument("--batch", type=int, default=8, help="pairs per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--num_classes", type=int, default=11003, help="ID-head classes (CUHK-PEDES train ids)")
    p.add_argument("--image_size", default="384,128", help="H,W")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: os.cpu_count())")
    p.add_argument("--ours", action="store_true", help="also run tools/benchmark.py at the same shapes")
    p.add_argument(
        "--ours_flags",
        action="append",
        default=None,
        help="more tools/benchmark.py flags for a row of ours, e.g. '--scan=1'; repeat for several rows (each its own "
        "process, in order)",
    )
    p.add_argument(
        "--order",
        default="sen,ours",
        choices=("sen,ours", "ours,sen"),
        metavar="sen,ours|ours,sen",
        help="which runs first",
    )
    p.add_argument("--out", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    if not args.sen_repo:
        p.error("--sen_repo is required: a work tree of github.com/Delong-liu-bupt/SEN")
    if args.ours_flags and not args.ours:
        p.error("--ours_flags only applies with --ours")
    if args.order != "sen,ours" and not args.ours:
        p.error(f"--order={args.order} only applies with --ours")
    if args.batch < 2 or args.steps < 1 or args.warmup < 1:
        p.error("--batch must be >= 2 (SEN's losses compare pairs), --steps and --warmup >= 1")
    try:
        args.size = tuple(int(x) for x in args.image_size.split(","))
        assert len(args.size) == 2 and all(x % VIT_B16["vision_patch_size"] == 0 for x in args.size)
    except (ValueError, AssertionError):
        p.error(f"--image_size={args.image_size!r}: expected H,W, both multiples of 16 (e.g. 384,128)")
    args.threads = args.threads or os.cpu_count()
    return args


def check_sen_repo(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise SystemExit(f"--sen_repo {path}: no such directory; expected a work tree of SEN ({', '.join(SEN_FILES)})")
    missing = [f for f in SEN_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        bare = os.path.isfile(os.path.join(path, "HEAD")) and os.path.isdir(os.path.join(path, "objects"))
        hint = (
            " It looks like a bare git directory; export a work tree: git -C PATH archive HEAD | tar -x -C DIR"
            if bare
            else ""
        )
        raise SystemExit(
            f"--sen_repo {path}: not a SEN checkout (github.com/Delong-liu-bupt/SEN): "
            f"missing {', '.join(missing)}.{hint}"
        )
    return path


def import_sen(path: str):
    """SEN's modules, imported from its checkout (its top-level packages are model, solver, utils)."""
    sys.dont_write_bytecode = True  # leave the checkout as it is
    sys.path.insert(0, path)
    import model.build as sen_build  # noqa: PLC0415
    import model.clip_model as sen_clip  # noqa: PLC0415
    import solver as sen_solver  # noqa: PLC0415
    import utils.options as sen_options  # noqa: PLC0415

    if not os.path.abspath(sen_build.__file__).startswith(path):
        raise SystemExit(f"--sen_repo {path}: 'model' was imported from {sen_build.__file__}, not from the checkout")
    return sen_build, sen_clip, sen_solver, sen_options


def sen_args(sen_options, args):
    """SEN's options for run_SEN.sh at this batch, parsed by SEN's own parser (its defaults for the rest)."""
    argv = sys.argv
    sys.argv = ["train.py", *RUN_SEN_FLAGS, f"--batch_size={args.batch}"]
    try:
        opts = sen_options.get_args()
    finally:
        sys.argv = argv
    opts.img_size = args.size  # a tuple option SEN's command line cannot set
    return opts


def patch_sen(sen_build, sen_clip):
    """Patches 1 and 2 of the docstring (module level, before the model is built)."""
    import torch  # noqa: PLC0415

    def random_clip(name, image_size, stride_size, jit=False, download_root=None):
        if name != "ViT-B/16":
            raise SystemExit(f"bench_sen builds ViT-B/16 only, SEN asked for {name!r}")
        cfg = dict(VIT_B16, image_resolution=image_size, stride_size=stride_size)
        return sen_clip.CLIP(**cfg), cfg

    sen_build.build_CLIP_from_openai_pretrained = random_clip
    sen_build.convert_weights = lambda model: None
    return torch


def _to_f32(module, inputs):
    import torch  # noqa: PLC0415

    return tuple(x.float() if torch.is_tensor(x) and x.dtype == torch.float16 else x for x in inputs)


def patch_model(model):
    """Patches 3 and 4 of the docstring (hooks on the built model)."""
    for name in ("classifier", "norm_4"):
        if not hasattr(model, name):
            raise SystemExit(f"SEN's model has no {name!r}: not the SEN code bench_sen was written for (3d887c18)")
        getattr(model, name).register_forward_pre_hook(_to_f32)


def audit_dtypes(model):
    """Forward hooks that record every module whose tensors (in or out) are float16; returns (found, remove)."""
    import torch  # noqa: PLC0415

    found = []

    def flat(x):
        if torch.is_tensor(x):
            yield x
        elif isinstance(x, (tuple, list)):
            for y in x:
                yield from flat(y)
        elif isinstance(x, dict):
            for y in x.values():
                yield from flat(y)

    def hook(module, inputs, output, name):
        if any(t.dtype == torch.float16 for t in (*flat(inputs), *flat(output))):
            found.append(name or type(module).__name__)

    handles = [m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n, m in model.named_modules()]
    return found, lambda: [h.remove() for h in handles]


def random_batch(torch, opts, args):
    """What SEN's MAE train set yields, collated (see datasets/bases.py, datasets/build.py)."""
    b, (h, w), n_ctx = args.batch, args.size, opts.text_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, SOT - 1, (b, n_ctx), generator=g)  # word ids (SEN's mask id 49405 is below SOT too)
    ids[:, 0] = SOT
    ends = torch.randint(8, n_ctx, (b,), generator=g)  # end-of-text position per caption, zeros after
    pos = torch.arange(n_ctx)[None]
    ids = torch.where(pos == ends[:, None], EOT, torch.where(pos > ends[:, None], 0, ids))
    return {
        "images": torch.randn(b, 3, h, w, generator=g),
        "caption_ids": ids,
        "pids": (torch.arange(b) // 2 + torch.randint(0, args.num_classes, (1,), generator=g)) % args.num_classes,
        "image_ids": torch.arange(b),
    }


def run_sen(args) -> dict:
    path = check_sen_repo(args.sen_repo)
    sen_build, sen_clip, sen_solver, sen_options = import_sen(path)
    torch = patch_sen(sen_build, sen_clip)
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)  # SEN's train.py seed
    opts = sen_args(sen_options, args)
    model = sen_build.build_model(opts, args.num_classes)
    patch_model(model)
    model.train()
    optimizer = sen_solver.build_optimizer(opts, model)
    batch = random_batch(torch, opts, args)
    n_params = sum(p.numel() for p in model.parameters())  # as SEN's train.py logs it
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"SEN {model.current_task}: {n_params / 1e6:.2f}M params ({n_train / 1e6:.2f}M trainable), batch {args.batch}, "
        f"images {tuple(batch['images'].shape)}, torch {torch.__version__}, {args.threads} threads",
        flush=True,
    )

    def step():
        """One step; its time and the part of it spent in forward (+ loss sum), backward, optimizer."""
        t0 = time.perf_counter()
        ret = model(batch)
        total = sum(v for k, v in ret.items() if "loss" in k)
        total.item()  # the meters' read of the loss
        t1 = time.perf_counter()
        optimizer.zero_grad()
        total.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        losses = {k: v.item() for k, v in ret.items() if "loss" in k}
        return t3 - t0, dict(fwd=t1 - t0, bwd=t2 - t1, opt=t3 - t2), losses

    found, remove = audit_dtypes(model)
    warm = []
    for i in range(args.warmup):
        dt, parts, losses = step()
        warm.append(dt)
        if i == 0:
            remove()
            bad = sorted({n for n, p in model.named_parameters() if p.dtype != torch.float32})
            bad += sorted(
                {n for n, p in model.named_parameters() if p.grad is not None and p.grad.dtype != torch.float32}
            )
            if found or bad:
                raise SystemExit(f"float16 left in SEN's step: modules {sorted(set(found))}, parameters/grads {bad}")
            print("float32 check: no float16 tensor in any module's inputs or outputs, parameters or gradients")
        print(f"warm-up step {i}: {dt:.3f} s, " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()), flush=True)
    times, phases = [], []
    for i in range(args.steps):
        dt, parts, _ = step()
        times.append(dt)
        phases.append(parts)
        print(f"step {i}: {dt:.3f} s (" + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()) + ")", flush=True)
    med = statistics.median(times)
    print(f"SEN median step {med:.3f} s, {args.batch / med:.2f} pairs/s", flush=True)
    out = dict(
        impl="sen-pytorch",
        batch=args.batch,
        median_step_s=round(med, 5),
        pairs_per_s=round(args.batch / med, 3),
        steps_s=[round(t, 5) for t in times],
        params=n_params,
        trainable_params=n_train,
        torch=torch.__version__,
        threads=args.threads,
        dtype="float32",
        image_size=list(args.size),
        text_len=opts.text_length,
        num_classes=args.num_classes,
        loss_names=opts.loss_names,
        warmup_s=[round(t, 5) for t in warm],
        median_phase_s={k: round(statistics.median(p[k] for p in phases), 5) for k in phases[0]},
    )
    return out  # the model, its optimizer state and the batch are freed with this frame


def run_ours(args, extra: str = "") -> dict:
    """tools/benchmark.py at the same shapes (plus the `extra` flags), in a subprocess; its JSON record."""
    if args.threads != os.cpu_count():
        print(f"note: --threads={args.threads} limits SEN only; our XLA step uses all {os.cpu_count()} cores")
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    h, w = args.size
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "benchmark.py"),
        "--preset=vit-b16",
        f"--image_size={h},{w}",
        f"--batch={args.batch}",
        "--dtype=float32",
        f"--steps={args.steps}",
        f"--num_classes={args.num_classes}",
        f"--out={path}",
        *extra.split(),
    ]
    print("ours:", " ".join(cmd[1:]), flush=True)
    try:
        rc = subprocess.run(cmd, cwd=REPO).returncode
        if rc != 0:
            raise SystemExit(f"tools/benchmark.py failed (exit {rc}): {' '.join(cmd)}")
        with open(path) as f:
            rec = json.load(f)
    finally:
        os.remove(path)
    med = rec["step_s_median"]
    return dict(
        impl="uit_jax",
        flags=extra,
        scan=rec["scan"],
        batch=args.batch,
        median_step_s=med,
        pairs_per_s=round(args.batch / med, 3),
        params=round(rec["params_millions"] * 1e6),
        compile_s=rec["compile_s"],
        dtype=rec["dtype"],
        backend=rec["backend"],
    )


def table(sen: dict, ours: list[dict]) -> str:
    rows = [("SEN (PyTorch)", sen)] + [(f"ours (JAX) {o['flags']}".rstrip(), o) for o in ours]
    lines = ["| impl | median step s | pairs/s | step / SEN's step |", "| --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['median_step_s']:.3f} | {r['pairs_per_s']:.2f} | "
            f"{r['median_step_s'] / sen['median_step_s']:.2f} |"
        )
    return "\n".join(lines)


def cpu_model() -> str:
    """The host's CPU, for the record: the SEN ratio differs from host to host (docs/benchmarks.md)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    vendor = fields.get("vendor_id")
    isa = [x for x in ("avx2", "avx512f", "amx_tile") if x in fields.get("flags", "").split()]
    return f"{name}{f' ({vendor})' if vendor else ''}, {os.cpu_count()} cores, {' '.join(isa) or 'no avx2'}"


def main(argv=None):
    args = parse_args(argv)
    check_sen_repo(args.sen_repo)  # before a long run of ours
    sen, ours = None, []
    for impl in args.order.split(",") if args.ours else ["sen"]:
        if impl == "sen":
            sen = run_sen(args)
            gc.collect()  # before ours runs beside this process
        else:
            ours = [run_ours(args, extra) for extra in args.ours_flags or [""]]
    out = dict(sen, cpu=cpu_model())
    if ours:
        text = table(sen, ours)
        print(f"\nbatch {args.batch}, {args.size[0]}x{args.size[1]}, float32, {out['cpu']}, order {args.order}\n{text}")
        for o in ours:
            o["over_sen_step"] = round(o["median_step_s"] / sen["median_step_s"], 4)
        out.update(ours=ours, ours_over_sen_step=ours[0]["over_sen_step"])
        out["order"] = args.order
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
