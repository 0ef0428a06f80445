"""cuDNN's fused attention (`model.attention='cudnn'`) against XLA's, for the whole UIT model: a GPU-only test.

On a CUDA GPU (run with JAX_PLATFORMS=cuda; the test suite defaults to the CPU) it runs the model's forward pass and
gradient three times on the same random parameters and inputs (captions of different lengths, so the decoder's
cross-attention mask matters): float32 with XLA's attention (the reference), bfloat16 with XLA's, bfloat16 with
cuDNN's. cuDNN runs only in bfloat16/float16, so it cannot match float32 to float32 rounding; the check is that its
error against the reference is of the size bfloat16 itself causes: at most twice XLA-bfloat16's error, or
bfloat16's unit roundoff (2^-8) of the compared magnitude, whichever is larger. Errors are max |x - ref| over a
tree, relative to max |ref| of that tree (outputs per head, all gradients at once). Each tower is cut to two blocks
(the attention shapes stay ViT-B/16's; three full gradients did not compile in 120 s on an H200).

Images without pytest (the accelerator image) run it as a script: `python -m tests.models.test_cudnn_attention`,
which prints one JSON line and exits 0 when cuDNN passes, 1 when it does not, 2 without a CUDA GPU.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

BF16_ROUNDOFF = 2.0**-8


def check(preset="vit-b16", image_size=(384, 128), batch=8, num_classes=100, layers=2) -> dict:
    """The errors of XLA-bfloat16 and cuDNN-bfloat16 against XLA-float32, per output and for the gradients."""
    from uit_jax.models import clip as clip_lib
    from uit_jax.models import uit as uit_lib

    h, w = image_size
    depth = dict(vision_layers=layers, text_layers=layers) if layers else {}
    cfg = clip_lib.config_from_preset(preset, image_size=(h, w), **depth)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((batch, h, w, 3)), jnp.float32)
    eot = cfg.eot_token_id if cfg.eot_token_id is not None else cfg.vocab_size - 1
    text = rng.integers(1, min(eot, cfg.vocab_size - 1), (batch, cfg.text_len))
    ends = np.linspace(4, cfg.text_len - 1, batch).astype(int)  # every caption its own length
    for row, end in enumerate(ends):
        text[row, end], text[row, end + 1 :] = eot, 0
    text = jnp.asarray(text, jnp.int32)
    key = jax.random.key(0)
    kw = dict(clip_config=cfg, num_classes=num_classes)
    init = uit_lib.UIT(**kw)
    init_key = jax.random.key(0, impl="unsafe_rbg")  # values do not matter; threefry's init compiles slowly on GPU
    params = jax.jit(lambda k: init.init({"params": k, "dropout": k}, images[:1], text[:1], rng=k))(init_key)["params"]

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
    errs = {}
    for attention in ("xla", "cudnn"):
        out, g = run(jnp.bfloat16, attention)
        errs[attention] = {k: rel_err(out[k], ref_out[k]) for k in ref_out} | {"grads": rel_err(g, ref_g)}
    result = dict(device=jax.devices()[0].device_kind, preset=preset, layers=cfg.vision_layers, batch=batch, ok=True)
    for name, ref_err in errs["xla"].items():
        bound = max(2 * ref_err, BF16_ROUNDOFF)
        result["ok"] &= errs["cudnn"][name] <= bound
        result[name] = dict(xla_bf16=round(ref_err, 6), cudnn_bf16=round(errs["cudnn"][name], 6), bound=round(bound, 6))
    return result


def test_cudnn_attention_matches_xla_to_bfloat16_rounding():
    import pytest

    if jax.default_backend() != "gpu":
        pytest.skip(f"cuDNN attention needs a CUDA GPU (JAX_PLATFORMS=cuda); JAX's backend: {jax.default_backend()!r}")
    result = check()
    assert result["ok"], result


if __name__ == "__main__":
    if jax.default_backend() != "gpu":
        print(f"cuDNN attention needs a CUDA GPU; JAX's backend here is {jax.default_backend()!r}.")
        sys.exit(2)
    out = check()
    print(json.dumps(out))
    sys.exit(0 if out["ok"] else 1)
