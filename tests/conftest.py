"""Shared test setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, in a fresh folder that is removed at exit, so still hermetic:
# many tests train the same tiny model, in this process and in the subprocesses they start, and the second
# compile of the same program becomes a load (keyed by the program, so a cache hit runs the very same code).
# UIT_JAX_CACHE='' before pytest turns it off; tests/test_train.py tests the cache itself.
if "UIT_JAX_CACHE" not in os.environ:
    os.environ["UIT_JAX_CACHE"] = tempfile.mkdtemp(prefix="uit_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["UIT_JAX_CACHE"], ignore_errors=True)

from uit_jax import compile_cache  # noqa: E402  (after the environment above; imports jax)

compile_cache.enable()


# ----------------------------------------------------------------------------- slow tests: additive

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (in addition, not instead)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- tiny CLIP checkpoint (models)

TINY_WORDS = (
    "a an the man woman person he she his her is wearing with and carrying holding walking "
    "red blue black white green yellow gray brown pink purple orange dark light "
    "shirt t-shirt jacket coat pants jeans shorts skirt dress shoes boots bag backpack hat hair long short"
).split()


@pytest.fixture(scope="session")
def tiny_hf_clip_dir(tmp_path_factory) -> str:
    """A tiny random transformers `CLIPModel` plus its tokenizer, saved with save_pretrained (safetensors).

    Sizes are odd on purpose (text 40 wide / 5 heads, vision 48 / 4 heads, 32x32 images, patch 8, embed 24),
    so a wrong transpose cannot pass. Text pools at the first end-of-text token (eos_token_id is its real id).
    Load with `uit_jax.models.convert.load(path, image_size=...)` and
    `uit_jax.data.tokenizer.load_tokenizer(path)`.
    """
    import torch
    import transformers

    from uit_jax.data import tokenizer as tk

    out = tmp_path_factory.mktemp("tiny_hf_clip")
    tk.write_bpe_tokenizer(TINY_WORDS, out)
    tok = tk.load_tokenizer(str(out))
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=40, intermediate_size=72, num_hidden_layers=2,
            num_attention_heads=5, max_position_embeddings=77, bos_token_id=tk.sot_id(tok),
            eos_token_id=tk.eot_id(tok), pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8,
        ),
        projection_dim=24,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # the default init leaves LayerNorms at identity: randomise them so they are tested
        for name, p in model.named_parameters():
            if "norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return str(out)


# ----------------------------------------------------------------------------- a tiny trained run (search, probes)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """(config, workdir, dataset root) of a tiny trained run (4 steps) whose raw images are 32x16 but the model
    sees 24x16 (so the resize is exercised). Shared by the search and research-tool tests."""
    from tests.test_train import tiny_config
    from uit_jax import train

    root = tmp_path_factory.mktemp("trained_run")
    config = tiny_config(root)
    config.data.image_size = (24, 16)
    wd = root / "run"
    train.train_and_evaluate(config, str(wd))
    return config, wd, root
