"""Shared fixtures for the data tests: a tiny synthetic set built once per session, in a temporary folder."""

import pytest

from uit_jax.data import defaults, prepare
from uit_jax.data import tokenizer as tok_lib


def tiny_config(root) -> "ml_collections.ConfigDict":  # noqa: F821
    """The synthetic data config shrunk to a few identities and 64x32 images."""
    cfg = defaults.data_config("synthetic")
    cfg.manual_dir = str(root / "raw")
    cfg.data_dir = str(root / "tfds")
    cfg.image_size = (64, 32)
    s = cfg.synthetic
    s.train_ids, s.val_ids, s.test_ids, s.images_per_id = 12, 5, 4, 3
    s.height, s.width = 64, 32
    return cfg


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(cfg, DatasetInfo, tokenizer, train split in memory) of the tiny synthetic set."""
    cfg = tiny_config(tmp_path_factory.mktemp("synth"))
    info = prepare.prepare(cfg)
    tok = tok_lib.load_tokenizer(info.tokenizer_dir)
    return cfg, info, tok, prepare.load_split(cfg, "train")
