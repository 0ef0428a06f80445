"""Checks cuDNN's fused attention (`model.attention='cudnn'`) against XLA's on a GPU, for the whole UIT model.

  python tools/check_attention.py --preset=vit-b16 --image_size=384,128 --batch=8 --layers=2

Runs the model's forward pass and gradient three times on the same random parameters and inputs (captions of
different lengths, so the decoder's cross-attention mask matters): float32 with XLA's attention (the reference),
bfloat16 with XLA's, bfloat16 with cuDNN's. cuDNN runs only in bfloat16/float16, so it cannot match float32 to
float32 rounding; the test is that its error against the reference is of the size bfloat16 itself causes: at most
twice XLA-bfloat16's error, or bfloat16's unit roundoff (2^-8) of the compared magnitude, whichever is larger.
Errors are max |x - ref| over a tree, relative to max |ref| of that tree (outputs per head, all gradients at once).
`--layers` cuts both towers to that many blocks (the attention shapes stay the preset's; three full ViT-B/16
gradients did not compile in 120 s on an H200); 0 keeps the preset's depth.
Prints one JSON line; exit status 0 when cuDNN passes, 1 when it does not, 2 when there is no CUDA GPU.
Runs without TensorFlow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

BF16_ROUNDOFF = 2.0**-8


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit-b16")
    p.add_argument("--image_size", default="384,128", help="H,W")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--num_classes", type=int, default=100)
    p.add_argument("--layers", type=int, default=2, help="blocks per tower (0: the preset's)")
    args = p.parse_args(argv)

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from uit_jax.models import clip as clip_lib  # noqa: PLC0415
    from uit_jax.models import uit as uit_lib  # noqa: PLC0415

    if jax.default_backend() != "gpu":
        print(f"check_attention: cuDNN attention needs a CUDA GPU; JAX's backend here is {jax.default_backend()!r}.")
        return 2
    h, w = (int(x) for x in args.image_size.split(","))
    depth = dict(vision_layers=args.layers, text_layers=args.layers) if args.layers else {}
    cfg = clip_lib.config_from_preset(args.preset, image_size=(h, w), **depth)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((args.batch, h, w, 3)), jnp.float32)
    eot = cfg.eot_token_id if cfg.eot_token_id is not None else cfg.vocab_size - 1
    text = rng.integers(1, min(eot, cfg.vocab_size - 1), (args.batch, cfg.text_len))
    ends = np.linspace(4, cfg.text_len - 1, args.batch).astype(int)  # every caption its own length
    for row, end in enumerate(ends):
        text[row, end], text[row, end + 1 :] = eot, 0
    text = jnp.asarray(text, jnp.int32)
    key = jax.random.key(0)
    kw = dict(clip_config=cfg, num_classes=args.num_classes)
    init = uit_lib.UIT(**kw)
    # A hardware generator for the init (values do not matter): threefry's init compiled for ~80 s on an H200.
    init_key = jax.random.key(0, impl="unsafe_rbg")
    params = jax.jit(lambda k: init.init({"params": k, "dropout": k}, images[:1], text[:1], rng=k))(init_key)
    params = params["params"]

    def run(dtype, attention):
        model = uit_lib.UIT(**kw, dtype=dtype, attention=attention)

        def f(p):
            out = model.apply({"params": p}, images, text, rng=key)
            out = {k: v.astype(jnp.float32) for k, v in out.items() if k != "patch_mask"}
            return sum(jnp.mean(jnp.square(v)) for v in out.values()), out

        (_, out), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
        return jax.device_get(out), jax.device_get(grads)

    def rel_err(a, b):
        a, b = jax.tree.leaves(a), jax.tree.leaves(b)
        scale = max(float(np.max(np.abs(x))) for x in b)
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b, strict=True)) / scale

    ref_out, ref_g = run(jnp.float32, "xla")
    result = dict(
        device=jax.devices()[0].device_kind,
        preset=args.preset,
        layers=cfg.vision_layers,
        image_size=[h, w],
        batch=args.batch,
    )
    errs = {}
    for attention in ("xla", "cudnn"):
        out, g = run(jnp.bfloat16, attention)
        errs[attention] = {k: rel_err(out[k], ref_out[k]) for k in ref_out} | {"grads": rel_err(g, ref_g)}
    ok = True
    for name, ref_err in errs["xla"].items():
        bound = max(2 * ref_err, BF16_ROUNDOFF)
        ok &= errs["cudnn"][name] <= bound
        result[name] = dict(xla_bf16=round(ref_err, 6), cudnn_bf16=round(errs["cudnn"][name], 6), bound=round(bound, 6))
    result["ok"] = bool(ok)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
