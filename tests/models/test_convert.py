"""Checkpoint conversion: position-embedding resize vs torch; OpenAI, Flax, .bin layouts; errors; the CLI."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import serialization
from safetensors.numpy import load_file

from uit_jax.models import clip, convert

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
from tools import convert_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def hf(tiny_hf_clip_dir):
    sd = load_file(os.path.join(tiny_hf_clip_dir, "model.safetensors"))
    with open(os.path.join(tiny_hf_clip_dir, "config.json")) as f:
        return sd, json.load(f)


def _assert_trees_equal(a, b):
    fa, ta = jax.tree_util.tree_flatten_with_path(a)
    fb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    for (path, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def _to_openai(sd):
    """HF keys -> OpenAI keys, written independently of convert.py (fused q/k/v, (in, out) projections)."""
    top = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm": "ln_final",
        "vision_model.embeddings.class_embedding": "visual.class_embedding",
        "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
        "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
        "vision_model.pre_layrnorm": "visual.ln_pre",
        "vision_model.post_layernorm": "visual.ln_post",
        "logit_scale": "logit_scale",
    }
    out = {"text_projection": sd["text_projection.weight"].T, "visual.proj": sd["visual_projection.weight"].T}
    for key, v in sd.items():
        for a, b in top.items():
            if key == a or key.startswith(a + "."):
                out[b + key[len(a) :]] = v
    for tower, prefix in [("text_model", "transformer"), ("vision_model", "visual.transformer")]:
        i = 0
        while f"{tower}.encoder.layers.{i}.layer_norm1.weight" in sd:
            src, dst = f"{tower}.encoder.layers.{i}.", f"{prefix}.resblocks.{i}."
            for leaf in ("weight", "bias"):
                qkv = [sd[f"{src}self_attn.{c}_proj.{leaf}"] for c in "qkv"]
                out[f"{dst}attn.in_proj_{leaf}"] = np.concatenate(qkv, 0)
                out[f"{dst}attn.out_proj.{leaf}"] = sd[f"{src}self_attn.out_proj.{leaf}"]
                for a, b in [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")]:  # fmt: skip
                    out[f"{dst}{b}.{leaf}"] = sd[f"{src}{a}.{leaf}"]
            i += 1
    out.update(input_resolution=np.array(32), context_length=np.array(77), vocab_size=np.array(5))
    return out


def _to_hf_flax(sd):
    """HF PyTorch keys -> the nested params of transformers' FlaxCLIPModel (as in flax_model.msgpack)."""
    tree = {}
    for key, v in sd.items():
        *mods, leaf = key.split(".")
        if leaf == "weight":
            if mods[-1] in ("token_embedding", "position_embedding"):
                leaf = "embedding"
            elif "norm" in mods[-1] or "layrnorm" in mods[-1]:
                leaf = "scale"
            else:
                leaf, v = "kernel", (v.transpose(2, 3, 1, 0) if v.ndim == 4 else v.T)
        node = tree
        for m in mods:
            node = node.setdefault(m, {})
        node[leaf] = v
    return tree


@pytest.mark.parametrize("g,new", [(4, (6, 3)), (14, (24, 8)), (5, (3, 7)), (4, (4, 4)), (7, (1, 2))])
def test_resize_pos_embed_matches_torch_interpolate(g, new):
    pos = np.random.default_rng(g).standard_normal((1 + g * g, 6)).astype(np.float32)
    got = convert.resize_pos_embed(pos, new)
    grid = torch.from_numpy(pos[1:]).reshape(1, g, g, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    assert got.shape == (1 + new[0] * new[1], 6) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], pos[0])
    np.testing.assert_allclose(got[1:], ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="square"):
        convert.resize_pos_embed(pos[:-1], new)


@pytest.mark.parametrize("image_size", [(32, 32), (48, 24)])
def test_openai_keys_give_identical_params(hf, image_size):
    sd, hf_config = hf
    config = convert.config_from_hf(hf_config, image_size, None)
    ref = convert.from_hf_state_dict(sd, config)
    openai = _to_openai(sd)
    _assert_trees_equal(convert.from_openai_state_dict(openai, config), ref)
    # The config inferred from the OpenAI dict matches, except heads (not stored; OpenAI uses width / 64)
    # and pooling (OpenAI pools at argmax(ids)).
    inferred = convert.config_from_openai_state_dict(openai, image_size, None, text_heads=5, vision_heads=4)
    assert inferred == clip.CLIPConfig(**{**convert.config_dict(config), "eot_token_id": None})


def test_openai_config_inference_follows_build_model():
    zeros = lambda *s: np.zeros(s, np.float32)
    sd = {
        "visual.proj": zeros(128, 64),
        "ln_final.weight": zeros(192),
        "visual.conv1.weight": zeros(128, 3, 16, 16),
        "text_projection": zeros(192, 64),
        "token_embedding.weight": zeros(1000, 192),
        "positional_embedding": zeros(77, 192),
        "visual.positional_embedding": zeros(1 + 14 * 14, 128),
    }
    for prefix, width, n in [("transformer", 192, 3), ("visual.transformer", 128, 2)]:
        for i in range(n):
            sd[f"{prefix}.resblocks.{i}.mlp.c_fc.weight"] = zeros(4 * width, width)
            sd[f"{prefix}.resblocks.{i}.ln_1.weight"] = zeros(width)
    c = convert.config_from_openai_state_dict(sd, (384, 128), 12)
    assert (c.text_width, c.text_heads, c.text_layers, c.vision_width, c.vision_heads, c.vision_layers) == (
        192, 3, 3, 128, 2, 2,
    )  # fmt: skip
    assert (c.embed_dim, c.vocab_size, c.patch_size, c.stride, c.grid) == (64, 1000, 16, 12, (31, 10))
    assert c.act == "quick_gelu" and c.eot_token_id is None
    with pytest.raises(ValueError, match="ResNet"):
        convert.config_from_openai_state_dict({"visual.layer1.0.conv1.weight": zeros(1)}, (224, 224))


def test_openai_pt_file(hf, tmp_path):
    sd, hf_config = hf
    openai = _to_openai(sd)
    path = str(tmp_path / "ViT-tiny.pt")
    # OpenAI ships fp16 weights; the loader widens them to float32.
    torch.save({k: torch.from_numpy(np.asarray(v)).half() for k, v in openai.items()}, path)
    loaded, cfg = convert.load_state_dict(path)
    assert cfg is None and loaded["visual.conv1.weight"].dtype == np.float32
    np.testing.assert_array_equal(loaded["visual.proj"], openai["visual.proj"].astype(np.float16))
    config = convert.config_from_hf(hf_config, (32, 32), None)
    params = convert.from_openai_state_dict(loaded, config)
    ref = convert.from_hf_state_dict(sd, config)
    err = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), params, ref)))
    assert 0 < err < 1e-2  # fp16 rounding only


def test_flax_msgpack_and_pytorch_bin_folders(tiny_hf_clip_dir, hf, tmp_path):
    sd, _ = hf
    _, ref = convert.load(tiny_hf_clip_dir, image_size=(48, 24))
    flax_dir, bin_dir = tmp_path / "flax", tmp_path / "bin"
    for d in (flax_dir, bin_dir):
        d.mkdir()
        shutil.copy(os.path.join(tiny_hf_clip_dir, "config.json"), d)
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(_to_hf_flax(sd)))
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, bin_dir / "pytorch_model.bin")
    for d in (flax_dir, bin_dir):
        model, params = convert.load(str(d), image_size=(48, 24))
        assert model.config.grid == (6, 3)
        _assert_trees_equal(params, ref)


def test_errors(hf, tmp_path, monkeypatch):
    sd, hf_config = hf
    with pytest.raises(FileNotFoundError, match="model.safetensors") as e:
        convert.load_state_dict(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(FileNotFoundError, match="No such"):
        convert.load_state_dict(str(tmp_path / "missing.pt"))
    # Shape mismatch: names the checkpoint key, our param, expected and got shapes.
    wrong = clip.CLIPConfig(**{**convert.config_dict(convert.config_from_hf(hf_config, (32, 32))), "embed_dim": 32})
    with pytest.raises(ValueError, match=r"text_projection.weight.*expected \(40, 32\), got \(40, 24\)"):
        convert.from_hf_state_dict(sd, wrong)
    config = convert.config_from_hf(hf_config, (32, 32))
    with pytest.raises(ValueError, match="missing params.*logit_scale"):
        convert.from_hf_state_dict({k: v for k, v in sd.items() if k != "logit_scale"}, config)
    with pytest.raises(ValueError, match="unexpected keys.*extra.weight"):
        convert.from_hf_state_dict({**sd, "extra.weight": np.zeros(3)}, config)
    with pytest.raises(OSError, match="HF_HOME"):
        convert.load_state_dict("no-such-org/no-such-clip")
    # A .pt file with Hugging Face keys is not an OpenAI state dict.
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, tmp_path / "hf.bin")
    with pytest.raises(ValueError, match="folder holding config.json"):
        convert.load_state_dict(str(tmp_path / "hf.bin"))
    # Without torch, .pt files fail with an explanation.
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        convert.load_state_dict(str(tmp_path / "hf.bin"))


@pytest.mark.parametrize("ext", ["msgpack", "npz"])
def test_convert_checkpoint_cli(tiny_hf_clip_dir, tmp_path, ext):
    out = str(tmp_path / f"clip.{ext}")
    assert convert_checkpoint.main([tiny_hf_clip_dir, out, "--image-size", "48", "24"]) == 0
    _, ref = convert.load(tiny_hf_clip_dir, image_size=(48, 24))
    with open(out + ".config.json") as f:
        config = clip.CLIPConfig(**json.load(f))
    assert config.image_size == (48, 24) and config.grid == (6, 3)
    if ext == "msgpack":
        with open(out, "rb") as f:
            got = serialization.msgpack_restore(f.read())
    else:
        got = {}
        for k, v in np.load(out).items():
            node = got
            *mods, leaf = k.split("/")
            for m in mods:
                node = node.setdefault(m, {})
            node[leaf] = v
    _assert_trees_equal(got, ref)


def test_hub_id_resolves_from_a_prefilled_cache(tiny_hf_clip_dir, tmp_path, monkeypatch):
    """A hub id goes through huggingface_hub's cache (offline here): the layout HF_HOME/hub would hold."""
    import huggingface_hub.constants

    snapshot = tmp_path / "models--tiny-org--tiny-clip" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_hf_clip_dir, name), snapshot)
    (tmp_path / "models--tiny-org--tiny-clip" / "refs").mkdir()
    (tmp_path / "models--tiny-org--tiny-clip" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _, params = convert.load("tiny-org/tiny-clip", image_size=(32, 32))
    _, ref = convert.load(tiny_hf_clip_dir, image_size=(32, 32))
    _assert_trees_equal(params, ref)
