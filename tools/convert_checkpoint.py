"""Converts a CLIP checkpoint (Hugging Face id / folder, or OpenAI .pt) into uit_jax params on disk.

Usage:
  python tools/convert_checkpoint.py SRC OUT [--image-size H W] [--stride S]

  SRC  a Hugging Face id (openai/clip-vit-base-patch16; downloaded through the hub cache, so it also works
       offline when HF_HOME holds it), a local folder with config.json + model.safetensors /
       flax_model.msgpack / pytorch_model.bin, or an OpenAI state dict file such as ViT-B-16.pt
       (.pt / .bin files need torch).
  OUT  output file: `*.msgpack` (flax.serialization of the params tree) or `*.npz` (one array per
       '/'-joined param path). The CLIPConfig is written next to it as `OUT.config.json`.

  --image-size H W  input size the vision position embeddings are resized for (default 384 128).
  --stride S        patch stride (default: the patch size).

Example:
  python tools/convert_checkpoint.py openai/clip-vit-base-patch16 /tmp/clip_b16.msgpack --image-size 384 128

Reading back:
  params = flax.serialization.msgpack_restore(open(OUT, 'rb').read())
  config = uit_jax.models.clip.CLIPConfig(**json.load(open(OUT + '.config.json')))
  model = uit_jax.models.clip.CLIP(config)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uit_jax.models import convert  # noqa: E402


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield "/".join(prefix + (k,)), np.asarray(v)


def convert_checkpoint(src: str, out: str, image_size=(384, 128), stride: int | None = None):
    """Converts `src`, writes the params to `out` (.msgpack or .npz) and `out.config.json`.

    Returns (CLIPConfig, number of parameters).
    """
    if not out.endswith((".msgpack", ".npz")):
        raise ValueError(f"Output {out!r} must end with .msgpack or .npz.")
    model, params = convert.load(src, image_size=tuple(image_size), stride=stride)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if out.endswith(".msgpack"):
        from flax import serialization

        with open(out, "wb") as f:
            f.write(serialization.msgpack_serialize(params))
    else:
        np.savez(out, **dict(_flatten(params)))
    with open(out + ".config.json", "w") as f:
        json.dump(convert.config_dict(model.config), f, indent=2)
    return model.config, sum(v.size for _, v in _flatten(params))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="HF id, HF-layout folder, or OpenAI .pt file")
    parser.add_argument("out", help="output .msgpack or .npz")
    parser.add_argument("--image-size", type=int, nargs=2, default=(384, 128), metavar=("H", "W"))
    parser.add_argument("--stride", type=int, default=None)
    args = parser.parse_args(argv)
    config, n = convert_checkpoint(args.src, args.out, args.image_size, args.stride)
    print(f"wrote {args.out} ({n / 1e6:.1f}M params; grid {config.grid}) and {args.out}.config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
