"""data/prepare.py and data/defaults.py: the data config, the one dataset registry, building under a lock,
atomic generation, reading a split."""

import os
import subprocess
import sys

import numpy as np
import pytest

from uit_jax.data import defaults, prepare, synthetic


def test_data_config_fields():
    for name in ("synthetic", "cuhk", "icfg", "rstp"):
        c = defaults.data_config(name)
        assert c.name == name and c.text_len == 77 and c.crop_pad == 10 and c.sampler == "identity"
    assert defaults.data_config("cuhk").image_size == (384, 128)
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        defaults.data_config("coco")


def test_one_dataset_registry_and_data_root_read_at_build(monkeypatch, tmp_path):
    from uit_jax.data import builders

    assert set(builders.BUILDERS) == set(defaults.DATASETS)
    monkeypatch.setenv("UIT_DATA_ROOT", str(tmp_path))  # after import: still honoured
    assert defaults.data_config("cuhk").manual_dir == str(tmp_path / "CUHK-PEDES")
    monkeypatch.delenv("UIT_DATA_ROOT")
    assert defaults.data_config("rstp").manual_dir == os.path.join(os.path.expanduser("~"), "uit_data", "RSTPReid")


def test_a_split_in_memory(tiny):
    cfg, info, _, train = tiny
    assert len(train) == info.num_train_pairs == 12 * 3 * 2 and info.num_images["train"] == train.num_images == 36
    # ordered by (image_id, caption index); the gallery is each image's first row, in image_id order
    assert (np.diff(train.image_id) >= 0).all()
    np.testing.assert_array_equal(train.image_id[train.gallery_rows], np.arange(36))
    assert train.gallery_paths == [str(p) for p in train.file_path[::2]]
    assert len(train.images) == 36 and all(isinstance(b, bytes) for b in train.images)
    assert train.pid.dtype == np.int32 and train.image_id.dtype == np.int32 and train.orig_id.dtype == np.int64
    assert len(train.words[0]) == len(train.pos[0]) > 0
    bare = prepare.load_split(cfg, "train", with_images=False)
    assert bare.images is None
    np.testing.assert_array_equal(bare.pid, train.pid)


def test_prepare_rejects_a_stale_synthetic_folder(tiny, tmp_path):
    cfg = tiny[0].copy_and_resolve_references()
    cfg.manual_dir, cfg.data_dir = str(tmp_path), str(tmp_path / "tfds")
    root = prepare.synthetic_dir(cfg)
    synthetic.generate(root, synthetic.Spec(train_ids=2, val_ids=1, test_ids=1, images_per_id=1, height=32, width=16))
    with pytest.raises(ValueError, match="Delete the folder"):
        prepare.prepare(cfg)
    # other sizes or seeds live in their own folder under manual_dir
    cfg.synthetic.seed = 5
    assert os.path.dirname(prepare.synthetic_dir(cfg)) == str(tmp_path) and prepare.synthetic_dir(cfg) != root


def test_synthetic_generation_is_atomic(tiny, tmp_path, monkeypatch):
    """A generation killed mid-way leaves no set (only a .partial folder, removed by the next run)."""
    cfg = tiny[0].copy_and_resolve_references()
    cfg.manual_dir, cfg.data_dir = str(tmp_path), str(tmp_path / "tfds")
    root = prepare.synthetic_dir(cfg)
    real = synthetic.generate

    def killed(out_dir, spec):
        real(out_dir, spec)
        raise KeyboardInterrupt  # after the images, before the tokenizer and the rename

    monkeypatch.setattr(synthetic, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg)
    assert not os.path.exists(root) and os.path.isdir(root + ".partial")
    monkeypatch.setattr(synthetic, "generate", real)
    info = prepare.prepare(cfg)
    assert info.num_train_pairs > 0 and not os.path.exists(root + ".partial")
    assert os.path.isfile(os.path.join(root, "tokenizer", "tokenizer.json"))


_PREPARE = """
import sys
sys.path.insert(0, {repo!r})
from tests.data.conftest import tiny_config
from uit_jax.data import prepare
import pathlib
info = prepare.prepare(tiny_config(pathlib.Path({root!r})))
print("pairs", info.num_train_pairs)
"""


@pytest.mark.slow  # ~15 s: two fresh interpreters import TensorFlow; run with --slow
def test_two_processes_prepare_the_same_folder_at_once(tmp_path):
    """The multi-process CPU runs call prepare in every process: one builds, the other waits and reuses it."""
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = _PREPARE.format(repo=repo, root=str(tmp_path))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert "pairs 72" in out


def test_unknown_split(tiny):
    cfg, *_ = tiny
    with pytest.raises(ValueError, match="split 'dev' not in dataset"):
        prepare.load_split(cfg, "dev")
