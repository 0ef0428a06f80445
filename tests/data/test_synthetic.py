"""Synthetic pedestrian set: deterministic, in the official CUHK-PEDES format, a real retrieval problem."""

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from uit_jax.data import synthetic
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tok_lib

SPEC = synthetic.Spec(train_ids=6, val_ids=3, test_ids=3, images_per_id=2, height=64, width=32, seed=3)


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            h.update(f.encode())
            with open(os.path.join(dirpath, f), "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()


def test_deterministic_by_seed(tmp_path):
    synthetic.generate(str(tmp_path / "a"), SPEC)
    synthetic.generate(str(tmp_path / "b"), SPEC)
    synthetic.generate(str(tmp_path / "c"), synthetic.Spec(**{**SPEC.__dict__, "seed": 4}))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    with open(tmp_path / "a" / "reid_raw.json") as f, open(tmp_path / "c" / "reid_raw.json") as g:
        assert json.load(f) != json.load(g)


def test_official_layout_read_by_plain_json(tmp_path):
    synthetic.generate(str(tmp_path), SPEC)
    with open(tmp_path / "reid_raw.json") as f:
        annos = json.load(f)  # exactly how IRRA reads reid_raw.json
    n_ids = SPEC.train_ids + SPEC.val_ids + SPEC.test_ids
    assert len(annos) == n_ids * SPEC.images_per_id
    ids_by_split = {}
    for a in annos:
        assert set(a) == {"split", "captions", "file_path", "processed_tokens", "id"}
        assert isinstance(a["id"], int) and a["id"] >= 1
        assert len(a["captions"]) == 2 and all(isinstance(c, str) and c for c in a["captions"])
        assert len(a["processed_tokens"]) == 2
        img = Image.open(tmp_path / "imgs" / a["file_path"])
        assert img.size == (SPEC.width, SPEC.height) and img.mode == "RGB"
        ids_by_split.setdefault(a["split"], set()).add(a["id"])
    assert {k: len(v) for k, v in ids_by_split.items()} == {"train": 6, "val": 3, "test": 3}
    tr, va, te = ids_by_split["train"], ids_by_split["val"], ids_by_split["test"]
    assert not (tr & va) and not (tr & te) and not (va & te)  # disjoint by identity
    # Training ids are 1..N, as CUHK-PEDES' (IRRA subtracts 1 and asserts they are contiguous).
    assert sorted(tr) == list(range(1, 7))
    assert synthetic.read_spec(str(tmp_path)) == SPEC


def test_every_word_has_a_tag_and_a_token(tmp_path):
    rng = np.random.default_rng(0)
    tok = tok_lib.load_tokenizer(tok_lib.write_bpe_tokenizer(synthetic.VOCABULARY, tmp_path))
    for i in range(200):
        ident = synthetic.sample_identity(np.random.default_rng(i))
        cap = synthetic.make_caption(ident, rng)
        words = text_lib.split_words(cap)
        assert [w.lower() for w in words] == synthetic.caption_words(cap)
        assert all(w.lower() in synthetic.POS_TAGS for w in words), cap
        ids = tok_lib.tokenize(tok, [cap])[0]
        body = ids[1 : int(np.argmax(ids == tok_lib.eot_id(tok)))]
        # The vocabulary covers every word: the tokens spell the caption back (CLIP's unknown is EOT).
        assert tok.decode(body.tolist()).replace(" ", "") == cap.lower().replace(" ", "")


def test_captions_carry_the_colours():
    """Colour words must matter: the upper garment's colour is always said, and the pixels show it."""
    rng = np.random.default_rng(1)
    for i in range(100):
        ident = synthetic.sample_identity(np.random.default_rng(i))
        caps = [synthetic.make_caption(ident, rng) for _ in range(2)]
        for c in caps:
            assert ident.upper_color in c.lower().split() or f"{ident.upper_color}" in c.lower()
        img = synthetic.render_image(ident, np.random.default_rng(i), 128, 64).astype(float)
        target = np.array(synthetic.COLORS[ident.upper_color], float)
        # Some pixels are close to the garment's colour (up to lighting: allow a scale).
        flat = img.reshape(-1, 3)
        cos = flat @ target / (np.linalg.norm(flat, axis=1) * np.linalg.norm(target) + 1e-6)
        assert (cos > 0.98).mean() > 0.01 or ident.upper_color in ("black", "gray", "white")


def _pixel_nn_r1(scene: str, n_ids: int = 30) -> float:
    """Raw-pixel nearest-neighbour identification over 3 views each of n_ids people."""
    feats, labels = [], []
    for i in range(n_ids):
        ident = synthetic.sample_identity(np.random.default_rng([0, i]))
        rng = np.random.default_rng([1, i])
        for _ in range(3):
            img = synthetic.render_image(ident, rng, 32, 16, scene).astype(float)
            feats.append((img / (img.mean() + 1e-6)).ravel())
            labels.append(i)
    f, labels = np.array(feats), np.array(labels)
    d = ((f[:, None] - f[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def test_identities_differ_more_between_than_within():
    """A nearest-neighbour check on raw pixels: views of one person are closer than other people."""
    assert _pixel_nn_r1("crop", n_ids=20) > 1 / 20 * 3  # well above chance: pixels identify people


def test_cli_writes_the_folder(tmp_path):
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--train-ids",
            "2",
            "--val-ids",
            "1",
            "--test-ids",
            "1",
            "--images-per-id",
            "1",
            "--height",
            "32",
            "--width",
            "16",
            "--scene",
            "street",
        ]
    )
    with open(tmp_path / "reid_raw.json") as f:
        assert len(json.load(f)) == 4
    assert synthetic.read_spec(str(tmp_path)).scene == "street"


def test_crop_scene_is_easier_than_street():
    """The default 'crop' scene (centred person, quiet background) keeps views of a person closer together."""
    crop, street = _pixel_nn_r1("crop"), _pixel_nn_r1("street")
    assert crop > street + 0.1, (crop, street)
    assert crop > 0.5, crop


def test_unknown_scene_is_a_clear_error():
    ident = synthetic.sample_identity(np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"scene 'beach'.*\('crop', 'street'\)"):
        synthetic.render_image(ident, np.random.default_rng(0), 32, 16, "beach")


def test_spec_records_the_scene_and_old_folders_read_as_street(tmp_path):
    spec = synthetic.Spec(**{**SPEC.__dict__, "scene": "street"})
    synthetic.generate(str(tmp_path / "s"), spec)
    assert synthetic.read_spec(str(tmp_path / "s")) == spec
    # A folder written before the scene field existed holds street scenes: it must not pass for 'crop'.
    old = {k: v for k, v in SPEC.__dict__.items() if k != "scene"}
    (tmp_path / "old").mkdir()
    with open(tmp_path / "old" / synthetic.SPEC_FILE, "w") as f:
        json.dump(old, f)
    assert synthetic.read_spec(str(tmp_path / "old")).scene == "street"
    assert synthetic.read_spec(str(tmp_path / "old")) != SPEC
