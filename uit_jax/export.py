"""Export a trained run as a self-contained model folder, and load such a folder.

    python -m uit_jax.export --workdir=runs/synthetic --out=models/synthetic [--step=best|latest|N]

The folder holds what search needs and nothing else (no dataset, no optimiser state, no TensorFlow):
  model.safetensors   the CLIP towers' weights, Hugging Face key names (`vision_model.encoder.layers.0...`)
  uit_model.json      the towers' config (CLIPConfig), the input image size and pixel mean/std, the source run
  tokenizer files     as `transformers.CLIPTokenizerFast.save_pretrained` writes them

It is not a transformers `CLIPModel` folder: a person-retrieval model sees non-square images (384x128) and may use
overlapping patches, which transformers' CLIP cannot describe. `load_model` reads it (and `retrieval.Retriever`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys

import numpy as np

MODEL_FILE = "uit_model.json"
WEIGHTS_FILE = "model.safetensors"


@dataclasses.dataclass
class Exported:
    """A loaded model folder: the CLIP module, its float32 numpy params, the tokenizer and the preprocessing."""

    model: object  # uit_jax.models.clip.CLIP
    params: dict
    tokenizer: object
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    info: dict


def export_workdir(workdir: str, out: str, which: str | int = "best") -> dict:
    """Writes the model folder `out` from the checkpoint `which` ('best', 'latest' or a step) of `workdir`."""
    from uit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
    from uit_jax import rundir  # noqa: PLC0415
    from uit_jax.data import tokenizer as tok_lib  # noqa: PLC0415

    workdir = os.path.abspath(workdir)
    desc = rundir.read_model(workdir)
    restored = ckpt_lib.read_state(os.path.join(workdir, "checkpoints"), which)
    params = restored.state["params"]
    if "clip" not in params:
        raise ValueError(f"The checkpoint of {workdir} has no 'clip' parameters (found {sorted(params)}).")
    tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, rundir.TOKENIZER_DIR))
    info = {
        "source": workdir,
        "step": restored.step,
        "val_r1": restored.meta.get("val_r1"),
        "exported": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    write_folder(out, params["clip"], desc["clip"], tokenizer, desc["image_size"], desc["mean"], desc["std"], info)
    return info


def write_folder(out: str, clip_params, clip_config: dict, tokenizer, image_size, mean, std, info: dict) -> None:
    """Writes the folder atomically (a temporary folder renamed into place)."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from uit_jax.models import convert  # noqa: PLC0415

    out = os.path.abspath(out)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    sd = convert.to_hf_state_dict(_to_numpy(clip_params))
    save_file(sd, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "uit_jax"})
    tokenizer.save_pretrained(tmp)
    desc = {
        "clip": {k: list(v) if isinstance(v, tuple) else v for k, v in clip_config.items()},
        "image_size": [int(s) for s in image_size],
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "resize": "bilinear, antialiased when shrinking (as the evaluation pipeline)",
        **info,
    }
    with open(os.path.join(tmp, MODEL_FILE), "w") as f:
        json.dump(desc, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree, np.float32)


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_FILE)) and os.path.isfile(os.path.join(path, WEIGHTS_FILE))


def load_model(folder: str, dtype=None) -> Exported:
    """Reads a folder written by `export_workdir` / `write_folder`."""
    import jax.numpy as jnp  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    from uit_jax.data import tokenizer as tok_lib  # noqa: PLC0415
    from uit_jax.models import clip as clip_lib  # noqa: PLC0415
    from uit_jax.models import convert  # noqa: PLC0415

    path = os.path.join(folder, MODEL_FILE)
    if not is_model_folder(folder):
        raise FileNotFoundError(
            f"{folder} is not an exported uit_jax model folder (no {MODEL_FILE} and {WEIGHTS_FILE}); make one "
            "with `python -m uit_jax.export --workdir=RUN --out=DIR`."
        )
    with open(path) as f:
        desc = json.load(f)
    try:
        config = clip_lib.CLIPConfig(**desc["clip"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: field 'clip' is not a valid CLIP config ({e}).") from e
    params = convert.from_hf_state_dict(load_file(os.path.join(folder, WEIGHTS_FILE)), config)
    tokenizer = tok_lib.load_tokenizer(folder)
    model = clip_lib.CLIP(config, dtype=dtype or jnp.float32)
    info = {k: v for k, v in desc.items() if k not in ("clip", "image_size", "mean", "std")}
    return Exported(model, params, tokenizer, tuple(desc["image_size"]), tuple(desc["mean"]), tuple(desc["std"]), info)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description="Export a trained uit_jax run as a self-contained model folder.")
    p.add_argument("--workdir", required=True, help="the training run's folder")
    p.add_argument("--out", required=True, help="the model folder to write (replaced if it exists)")
    p.add_argument("--step", default="best", help="best (by validation R1; default), latest, or a step number")
    a = p.parse_args(argv)
    from uit_jax import checkpoint as ckpt_lib  # noqa: PLC0415

    try:
        which = ckpt_lib.parse_step(a.step)
    except ValueError as e:
        p.error(str(e))
    try:
        info = export_workdir(a.workdir, a.out, which)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(f"exported step {info['step']} of {info['source']} to {os.path.abspath(a.out)}")
    return info


if __name__ == "__main__":
    main()
