"""Loading CLIP: Hugging Face / OpenAI state dicts (numpy) to our Linen params, position-embedding resize, `load`.

Everything here works on numpy arrays; torch is imported only to read `.bin` / `.pt` files, TensorFlow never.
An OpenAI state dict is first renamed to Hugging Face keys, so one function (`from_hf_state_dict`) builds
params. State dicts list each layer apart (`layers.3.`); our params stack a tower's layers (`stacking.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from uit_jax.models import stacking
from uit_jax.models.clip import CLIP, CLIPConfig

HF_WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")
_LAYER_NORMS = {"layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm"}
_EMBEDDINGS = {"token_embedding", "position_embedding"}
_IGNORED = re.compile(r"(^|\.)position_ids$")  # non-persistent buffers some exports still contain


# --------------------------------------------------------------------------- position embeddings


def _linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation as torch computes it with align_corners=False."""
    # float32 arithmetic as in torch's CPU kernel, so the weights match it to the last bit.
    f = np.float32
    scale = f(n_in) / f(n_out)
    src = np.maximum(scale * (np.arange(n_out, dtype=f) + f(0.5)) - f(0.5), f(0))  # negatives clamp to 0
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0.astype(f)).astype(np.float64)
    w = np.zeros((n_out, n_in))
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def resize_pos_embed(pos: np.ndarray, new_grid) -> np.ndarray:
    """Resizes (1 + G*G, D) position embeddings to (1 + h*w, D); the class row is kept as is.

    Matches `torch.nn.functional.interpolate(grid, size=(h, w), mode='bilinear', align_corners=False)` without
    anti-aliasing (what IRRA / SEN do for 384x128 inputs). Bilinear is separable, so rows then columns.
    """
    pos = np.asarray(pos)
    h, w = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n, d = pos.shape[0] - 1, pos.shape[1]
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"Position embeddings {pos.shape} do not hold a class row plus a square grid.")
    grid = pos[1:].reshape(g, g, d).astype(np.float64)
    grid = np.einsum("hi,wj,ijd->hwd", _linear_weights(g, h), _linear_weights(g, w), grid)
    return np.concatenate([pos[:1], grid.reshape(h * w, d).astype(pos.dtype)], axis=0)


# --------------------------------------------------------------------------- configs


def _same(a, b, what):
    if a != b:
        raise ValueError(
            f"Text and vision towers use different {what} ({a} vs {b}); CLIPConfig has one {what} for both towers."
        )
    return a


def config_from_hf(hf_config_dict: dict, image_size, stride: int | None = None) -> CLIPConfig:
    """CLIPConfig from a Hugging Face CLIP `config.json` dict (missing fields take transformers' defaults)."""
    t, v = hf_config_dict.get("text_config") or {}, hf_config_dict.get("vision_config") or {}
    t_width, v_width = t.get("hidden_size", 512), v.get("hidden_size", 768)
    eos = t.get("eos_token_id", 49407)
    act = _same(t.get("hidden_act", "quick_gelu"), v.get("hidden_act", "quick_gelu"), "activations")
    return CLIPConfig(
        embed_dim=hf_config_dict.get("projection_dim", 512),
        vocab_size=t.get("vocab_size", 49408),
        text_len=t.get("max_position_embeddings", 77),
        text_width=t_width,
        text_layers=t.get("num_hidden_layers", 12),
        text_heads=t.get("num_attention_heads", 8),
        text_mlp=t.get("intermediate_size", 2048),
        image_size=image_size,
        patch_size=v.get("patch_size", 32),
        stride=stride,
        vision_width=v_width,
        vision_layers=v.get("num_hidden_layers", 12),
        vision_heads=v.get("num_attention_heads", 12),
        vision_mlp=v.get("intermediate_size", 3072),
        act=act,
        layer_norm_eps=_same(t.get("layer_norm_eps", 1e-5), v.get("layer_norm_eps", 1e-5), "layer_norm_eps"),
        # transformers keeps old configs' eos_token_id == 2 meaning "pool at argmax(ids)"; so do we.
        eot_token_id=None if eos == 2 else eos,
    )


def config_from_openai_state_dict(sd: dict, image_size, stride: int | None = None, **overrides) -> CLIPConfig:
    """CLIPConfig inferred from an OpenAI ViT state dict, as OpenAI's `build_model` does (heads = width / 64).

    `overrides` replace inferred fields (e.g. heads of a model whose width is not a multiple of 64).
    """
    if "visual.proj" not in sd:
        raise ValueError("Not an OpenAI CLIP ViT state dict: 'visual.proj' is missing (ResNet CLIP is not supported).")

    def layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    t_width = sd["ln_final.weight"].shape[0]
    v_width = sd["visual.conv1.weight"].shape[0]
    fields = dict(
        embed_dim=sd["text_projection"].shape[1],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_len=sd["positional_embedding"].shape[0],
        text_width=t_width,
        text_layers=layers("transformer.resblocks"),
        text_heads=max(t_width // 64, 1),
        text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        image_size=image_size,
        patch_size=sd["visual.conv1.weight"].shape[-1],
        stride=stride,
        vision_width=v_width,
        vision_layers=layers("visual.transformer.resblocks"),
        vision_heads=max(v_width // 64, 1),
        vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        act="quick_gelu",
        layer_norm_eps=1e-5,
        eot_token_id=None,  # OpenAI pools at argmax(ids): end-of-text is the largest id
    )
    fields.update(overrides)
    return CLIPConfig(**fields)


# --------------------------------------------------------------------------- state dict -> params


def _expected_shapes(config: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    model = CLIP(config)
    images = jnp.zeros((1, *config.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, config.text_len), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), images, ids)["params"])
    flat = jax.tree_util.tree_flatten_with_path(stacking.unstack(abstract))[0]  # by layer, as state dicts are
    return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _hf_key_to_path(key: str, value: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    parts = re.sub(r"\blayers\.(\d+)", r"layers_\1", key).split(".")
    *mods, leaf = parts
    parent = mods[-1] if mods else ""
    if leaf == "weight":
        if parent in _LAYER_NORMS:
            leaf = "scale"
        elif parent in _EMBEDDINGS:
            leaf = "embedding"
        elif value.ndim == 4:  # conv (out, in, kh, kw) -> (kh, kw, in, out)
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)
        else:  # torch Linear (out, in) -> Dense (in, out)
            leaf, value = "kernel", value.T
    return (*mods, leaf), value


def from_hf_state_dict(sd: dict[str, np.ndarray], config: CLIPConfig) -> dict:
    """Params (nested dict of float32 numpy arrays, each tower's layers stacked) from a Hugging Face `CLIPModel`
    state dict.

    Vision position embeddings on a different grid than `config.grid` are resized (`resize_pos_embed`).
    """
    expected = _expected_shapes(config)
    pos_path = ("vision_model", "embeddings", "position_embedding", "embedding")
    params, unexpected = {}, []
    for key, value in sd.items():
        if _IGNORED.search(key):
            continue
        path, value = _hf_key_to_path(key, np.asarray(value, np.float32))
        if path not in expected:
            unexpected.append(key)
            continue
        if path == pos_path and value.shape != expected[path] and value.shape[1:] == expected[path][1:]:
            value = resize_pos_embed(value, config.grid)
        if value.shape != expected[path]:
            raise ValueError(
                f"Shape mismatch for {key!r} (our param {'/'.join(path)}): expected {expected[path]}, "
                f"got {value.shape} (after transposing to our layout). Does the config match the checkpoint?"
            )
        params[path] = value.copy(order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
    missing = sorted("/".join(p) for p in expected if p not in params)
    if missing or unexpected:
        raise ValueError(
            f"State dict does not fit the CLIP config: missing params {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}; unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}."
        )
    nested: dict = {}
    for path, value in params.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return stacking.stack(nested)


_OPENAI_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_OPENAI_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENAI_SKIP = {"input_resolution", "context_length", "vocab_size"}  # metadata in OpenAI's JIT archives


def openai_to_hf_state_dict(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Renames an OpenAI CLIP ViT state dict to Hugging Face keys (splitting the fused q/k/v projection)."""
    out, unknown = {}, []
    for key, value in sd.items():
        value = np.asarray(value)
        if key in _OPENAI_SKIP:
            continue
        if key in _OPENAI_TOP:
            out[_OPENAI_TOP[key]] = value
        elif key in ("text_projection", "visual.proj"):  # stored (in, out): x @ proj
            name = "text_projection" if key == "text_projection" else "visual_projection"
            out[f"{name}.weight"] = value.T
        elif m := re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", key):
            tower = "vision_model" if m[1] else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m[2]}", m[3]
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]  # weight | bias
                for name, part in zip("qkv", np.split(value, 3, axis=0)):
                    out[f"{prefix}.self_attn.{name}_proj.{kind}"] = part
            elif rest.startswith("attn.out_proj."):
                out[f"{prefix}.self_attn.{rest[len('attn.') :]}"] = value
            else:
                mod, leaf = rest.rsplit(".", 1)
                if mod not in _OPENAI_BLOCK:
                    unknown.append(key)
                    continue
                out[f"{prefix}.{_OPENAI_BLOCK[mod]}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unknown keys in the OpenAI CLIP state dict (ViT only): {unknown[:8]}.")
    return out


def from_openai_state_dict(sd: dict[str, np.ndarray], config: CLIPConfig) -> dict:
    """Params from an OpenAI-format state dict (`visual.conv1.weight`, `transformer.resblocks.N...`)."""
    return from_hf_state_dict(openai_to_hf_state_dict(sd), config)


def hf_flax_to_hf_state_dict(tree: dict) -> dict[str, np.ndarray]:
    """Flattens the params of a transformers `FlaxCLIPModel` (flax_model.msgpack) to PyTorch-style HF keys."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + (str(k),))
                continue
            v = np.asarray(v)
            leaf = str(k)
            if leaf == "kernel":
                leaf, v = "weight", (v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T)
            elif leaf in ("scale", "embedding"):
                leaf = "weight"
            out[".".join(prefix + (leaf,))] = v

    walk(tree.get("params", tree), ())
    return out


# --------------------------------------------------------------------------- reading files


def _to_numpy(sd) -> dict[str, np.ndarray]:
    # float() also widens the fp16 weights of OpenAI's archives.
    tensor = lambda v: v.detach().float().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
    return {k: tensor(v) for k, v in sd.items()}


def _import_torch(path: str):
    try:
        import torch  # noqa: PLC0415  (optional dependency)
    except ImportError as e:
        raise ImportError(
            f"Reading {path!r} needs PyTorch (pip install torch). Without it, use a folder holding "
            "model.safetensors or flax_model.msgpack, or convert the checkpoint elsewhere with "
            "tools/convert_checkpoint.py."
        ) from e
    return torch


def _load_torch_file(path: str) -> dict[str, np.ndarray]:
    """OpenAI `.pt` (TorchScript archive or plain state dict) or a pytorch_model.bin."""
    torch = _import_torch(path)
    try:
        sd = torch.jit.load(path, map_location="cpu").state_dict()
    except RuntimeError:  # not TorchScript: a pickled state dict
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("model", "state_dict"):  # IRRA / SEN save {"model": state_dict, "optimizer": ...}
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
                break
    return _to_numpy(sd)


TRAINED_PREFIX = "base_model."


def split_trained_state_dict(sd: dict[str, np.ndarray], source: str = "") -> dict[str, np.ndarray]:
    """IRRA / SEN state dicts keep the CLIP towers under `base_model.` (OpenAI names) beside their own heads
    (classifier, cross-modal transformer, MLM head, restoration decoder). Returns the towers' state dict and logs,
    by module, the tensors it leaves out. A state dict without the prefix is returned as is."""
    if not any(k.startswith(TRAINED_PREFIX) for k in sd):
        return sd
    towers = {k[len(TRAINED_PREFIX) :]: v for k, v in sd.items() if k.startswith(TRAINED_PREFIX)}
    rest: dict[str, int] = {}
    for k in sd:
        if not k.startswith(TRAINED_PREFIX):
            rest[k.split(".")[0]] = rest.get(k.split(".")[0], 0) + 1
    if rest:
        logging.warning(
            "%s: using the CLIP towers (%d tensors under %r); not used for retrieval: %s",
            source or "state dict",
            len(towers),
            TRAINED_PREFIX,
            ", ".join(f"{m} ({n} tensors)" for m, n in sorted(rest.items())),
        )
    return towers


def _load_weights_file(path: str) -> dict[str, np.ndarray]:
    name = os.path.basename(path)
    if name.endswith(".safetensors"):
        from safetensors.numpy import load_file  # noqa: PLC0415

        return load_file(path)
    if name.endswith(".msgpack"):
        from flax import serialization  # noqa: PLC0415

        with open(path, "rb") as f:
            return hf_flax_to_hf_state_dict(serialization.msgpack_restore(f.read()))
    return _load_torch_file(path)


def _load_hf_folder(folder: str):
    files = [f for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))]
    if not os.path.isfile(os.path.join(folder, "config.json")) or not files:
        raise FileNotFoundError(
            f"Folder {folder!r} is not a Hugging Face CLIP checkpoint: looked for config.json and one of "
            f"{list(HF_WEIGHT_FILES)}; found {sorted(os.listdir(folder))}."
        )
    with open(os.path.join(folder, "config.json")) as f:
        hf_config = json.load(f)
    # Prefer formats that need no torch; pytorch_model.bin is the last resort.
    return _load_weights_file(os.path.join(folder, files[0])), hf_config


def _download_hf(repo_id: str) -> str:
    """Fetches config.json and the first available weights file of a hub repo (or finds them in the cache)."""
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import errors  # noqa: PLC0415

    hint = (
        "Without network access, pass a local folder with config.json + model.safetensors (e.g. written by "
        "CLIPModel.save_pretrained), or set HF_HOME to a cache that already holds this model."
    )
    try:
        config_path = huggingface_hub.hf_hub_download(repo_id, "config.json")
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, OSError) as e:
        raise OSError(f"Could not get config.json of {repo_id!r} from the hub: {e} {hint}") from e
    except ValueError as e:  # malformed repo id
        raise OSError(f"{repo_id!r} is neither a local folder / file nor a valid hub id ({e}).") from e
    for name in HF_WEIGHT_FILES:
        try:
            huggingface_hub.hf_hub_download(repo_id, name)
            return os.path.dirname(config_path)
        except (errors.EntryNotFoundError, errors.LocalEntryNotFoundError):
            continue
    raise OSError(f"Hub repo {repo_id!r} provides none of {list(HF_WEIGHT_FILES)}. {hint}")


def load_state_dict(name_or_dir: str) -> tuple[dict[str, np.ndarray], dict | None]:
    """Reads a CLIP checkpoint: returns (numpy state dict, HF config dict or None for OpenAI files).

    Accepts a local Hugging Face folder (config.json + model.safetensors / flax_model.msgpack /
    pytorch_model.bin), an OpenAI `.pt` file (state dict keys `visual.conv1.weight`, ...), or a hub id.
    """
    name_or_dir = os.fspath(name_or_dir)
    if os.path.isdir(name_or_dir):
        return _load_hf_folder(name_or_dir)
    if os.path.isfile(name_or_dir):
        sd = split_trained_state_dict(_load_weights_file(name_or_dir), name_or_dir)
        if "visual.conv1.weight" not in sd:
            raise ValueError(
                f"{name_or_dir!r} is neither an OpenAI CLIP state dict (no 'visual.conv1.weight') nor an IRRA/SEN "
                "checkpoint (no 'base_model.visual.conv1.weight'); for a Hugging Face checkpoint pass the folder "
                "holding config.json and the weights."
            )
        return sd, None
    if name_or_dir.endswith((".pt", ".pth", ".bin", ".safetensors", ".msgpack")) or name_or_dir.startswith((".", "/")):
        raise FileNotFoundError(f"No such checkpoint file or folder: {name_or_dir!r}.")
    return _load_hf_folder(_download_hf(name_or_dir))


def config_dict(config: CLIPConfig) -> dict:
    """JSON-ready dict of a CLIPConfig (inverse: `CLIPConfig(**d)`)."""
    return dataclasses.asdict(config)


# --------------------------------------------------------------------------- params -> Hugging Face folder


def to_hf_state_dict(params: dict) -> dict[str, np.ndarray]:
    """Our CLIP params -> a Hugging Face `CLIPModel` state dict (numpy); the inverse of `from_hf_state_dict`."""
    sd = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(stacking.unstack(params))[0]:
        *mods, name = (k.key for k in path)
        value = np.asarray(leaf, np.float32)
        if name == "scale" or name == "embedding":
            name = "weight"
        elif name == "kernel":
            name = "weight"
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        key = ".".join([*mods, name])
        sd[re.sub(r"\blayers_(\d+)\b", r"layers.\1", key)] = value.copy(order="C")  # keeps 0-d arrays 0-d
    return sd


def hf_config_dict(config: CLIPConfig, *, bos_token_id: int, pad_token_id: int = 0) -> dict:
    """A transformers `CLIPConfig` dict for `config`, at its own (square) image size.

    transformers' vision tower is square and has no stride: only configs with H == W and stride == patch size
    can be written (fine-tuning at another size resizes the position embeddings on load, as for OpenAI's CLIP).
    """
    h, w = config.image_size
    if h != w or config.stride != config.patch_size:
        raise ValueError(
            f"A Hugging Face CLIP checkpoint is square with non-overlapping patches; this config has image_size "
            f"{config.image_size} and stride {config.stride} (patch {config.patch_size}). Save at a square size."
        )
    if config.eot_token_id is None:
        raise ValueError("Set CLIPConfig.eot_token_id: the checkpoint must say where text is pooled.")
    common = dict(hidden_act=config.act, layer_norm_eps=config.layer_norm_eps)
    return dict(
        model_type="clip",
        architectures=["CLIPModel"],
        projection_dim=config.embed_dim,
        logit_scale_init_value=2.6592,
        text_config=dict(
            vocab_size=config.vocab_size, hidden_size=config.text_width, intermediate_size=config.text_mlp,
            num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
            max_position_embeddings=config.text_len, bos_token_id=bos_token_id, eos_token_id=config.eot_token_id,
            pad_token_id=pad_token_id, projection_dim=config.embed_dim, **common,
        ),
        vision_config=dict(
            hidden_size=config.vision_width, intermediate_size=config.vision_mlp,
            num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads, image_size=h,
            patch_size=config.patch_size, num_channels=3, projection_dim=config.embed_dim, **common,
        ),
    )  # fmt: skip


def save_hf_folder(out_dir: str, params: dict, config: CLIPConfig, *, bos_token_id: int, pad_token_id: int = 0):
    """Writes `config.json` + `model.safetensors` that `load_state_dict` and transformers' `CLIPModel` read."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    hf_config = hf_config_dict(config, bos_token_id=bos_token_id, pad_token_id=pad_token_id)
    os.makedirs(out_dir, exist_ok=True)
    save_file(to_hf_state_dict(params), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- loading
def load(name_or_dir: str, image_size, stride: int | None = None, dtype=jnp.float32) -> tuple[CLIP, dict]:
    """Builds a CLIP and its parameters from a Hugging Face id / folder or an OpenAI `.pt` state dict.

    The vision position embeddings are resized to the patch grid of `image_size` (H, W) with patch stride
    `stride` (default: the patch size). Parameters are float32 numpy arrays (`dtype` is the compute dtype).
    """
    sd, hf_config = load_state_dict(name_or_dir)
    if hf_config is not None:
        config = config_from_hf(hf_config, image_size, stride)
        params = from_hf_state_dict(sd, config)
    else:
        config = config_from_openai_state_dict(sd, image_size, stride)
        params = from_openai_state_dict(sd, config)
    return CLIP(config, dtype=dtype), params
