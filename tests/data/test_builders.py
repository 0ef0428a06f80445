"""TFDS builders on small folders in each official layout, and every bad-input error."""

import json
import logging
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from uit_jax.data import builders, synthetic
from uit_jax.data import text as text_lib

TAGGER = text_lib.lexicon_tagger(synthetic.POS_TAGS)  # the captions below use only these words
CAPS = ["A man wears a red coat.", "She is wearing blue jeans and black boots.", "The woman has long hair."]

# (builder, annotation file, path key, {split: original ids})
LAYOUTS = {
    "cuhk": (
        builders.CuhkPedes,
        "reid_raw.json",
        "file_path",
        {"train": [1, 2, 3], "val": [4], "test": [5, 6]},
    ),
    "icfg": (
        builders.IcfgPedes,
        "ICFG-PEDES.json",
        "file_path",
        {"train": list(range(40, 61)), "test": [7, 9]},
    ),
    "rstp": (
        builders.RstpReid,
        "data_captions.json",
        "img_path",
        {"train": [10, 30], "val": [20], "test": [5]},
    ),
}


def write_folder(root, ann_file, path_key, ids_by_split, images_per_id=2, fmt="jpg"):
    """A folder in the official layout: imgs/<split>/<id>_<k>.<fmt> and the annotation JSON."""
    annos = []
    rng = np.random.default_rng(0)
    for split, ids in ids_by_split.items():
        os.makedirs(os.path.join(root, "imgs", split), exist_ok=True)
        for pid in ids:
            for k in range(images_per_id):
                rel = f"{split}/{pid}_{k}.{fmt}"
                Image.fromarray(rng.integers(0, 255, (24, 12, 3), dtype=np.uint8)).save(os.path.join(root, "imgs", rel))
                annos.append(
                    {
                        "split": split,
                        "captions": [CAPS[(pid + k) % 3], CAPS[(pid + k + 1) % 3]],
                        path_key: rel,
                        "id": pid,
                    }
                )
    with open(os.path.join(root, ann_file), "w") as f:
        json.dump(annos, f)
    return annos


def build(cls, root, data_dir, **kw):
    b = cls(data_dir=str(data_dir), tagger=TAGGER, **kw)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return b


def read(b, split):
    ds = b.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
    return sorted(ds.as_numpy_iterator(), key=lambda e: (e["image_id"], e["caption_index"]))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_builder_reads_official_layout(name, tmp_path):
    cls, ann_file, key, ids = LAYOUTS[name]
    annos = write_folder(tmp_path / "raw", ann_file, key, ids)
    b = build(cls, tmp_path / "raw", tmp_path / "tfds")
    held = set(sorted(ids["train"])[:: builders.ICFG_VAL_EVERY]) if name == "icfg" else set()
    expect_ids = {
        "train": [i for i in ids["train"] if i not in held],
        "val": sorted(held) if name == "icfg" else ids["val"],
        "test": ids["test"],
    }
    assert set(b.info.splits) == {"train", "val", "test"}
    for split, want in expect_ids.items():
        ex = read(b, split)
        assert len(ex) == len(want) * 2 * 2  # two images per id, two captions per image
        assert sorted({int(e["orig_id"]) for e in ex}) == sorted(want)
        # pid: ids remapped to 0..N-1 in id order
        remap = {o: i for i, o in enumerate(sorted(want))}
        assert all(int(e["pid"]) == remap[int(e["orig_id"])] for e in ex)
        assert sorted({int(e["image_id"]) for e in ex}) == list(range(len(want) * 2))
        for e in ex:
            src = next(a for a in annos if a[key] == e["file_path"].decode())
            assert e["caption"].decode() == src["captions"][e["caption_index"]]
            with open(tmp_path / "raw" / "imgs" / src[key], "rb") as f:
                assert e["image"] == f.read()  # the encoded file, untouched
            words = [w.decode() for w in e["words"]]
            assert words == text_lib.split_words(e["caption"].decode())
            assert [t.decode() for t in e["pos"]] == TAGGER(words)
    if name == "icfg":
        assert held == {40, 60}  # every 20th training id, from the first


def test_synthetic_builder_uses_the_cuhk_reader(tiny):
    cfg, info, _, train = tiny
    assert issubclass(builders.SyntheticPedes, builders.CuhkPedes)
    assert info.num_train_ids == cfg.synthetic.train_ids
    assert info.splits == {"train": 12 * 3 * 2, "val": 5 * 3 * 2, "test": 4 * 3 * 2}
    assert info.num_images == {"train": 36, "val": 15, "test": 12}
    # tags come from the generator's lexicon
    for ws, ts in zip(train.words[:20], train.pos[:20]):
        assert ts == [synthetic.POS_TAGS[w.lower()] for w in ws]


def _error(tmp_path, mutate, cls=builders.CuhkPedes, ann="reid_raw.json", key="file_path"):
    root = tmp_path / "raw"
    annos = write_folder(root, ann, key, {"train": [1, 2], "val": [3], "test": [4]}, images_per_id=1)
    annos = mutate(root, annos)
    if annos is not None:
        with open(root / ann, "w") as f:
            json.dump(annos, f)
    with pytest.raises(builders.DataError) as e:
        build(cls, root, tmp_path / "tfds")
    return str(e.value)


def test_missing_and_unreadable_images_all_listed(tmp_path):
    def mutate(root, annos):
        os.remove(root / "imgs" / annos[0]["file_path"])
        (root / "imgs" / annos[2]["file_path"]).write_bytes(b"not an image")
        os.remove(root / "imgs" / annos[3]["file_path"])
        return None

    msg = _error(tmp_path, mutate)
    assert "3 problem(s)" in msg
    assert "entry 0" in msg and "entry 2" in msg and "entry 3" in msg and "entry 1" not in msg
    assert "does not exist" in msg and "unreadable" in msg and "train/1_0.jpg" in msg


def test_truncated_jpeg_is_listed_at_build(tmp_path):
    """A JPEG cut short passes PIL's verify() (it reads no pixel data) but not the build's full decode."""

    def mutate(root, annos):
        for k in (1, 3):
            path = root / "imgs" / annos[k]["file_path"]
            Image.fromarray(np.random.default_rng(k).integers(0, 255, (96, 48, 3), dtype=np.uint8)).save(path)
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return None

    msg = _error(tmp_path, mutate)
    assert "2 problem(s)" in msg and "entry 1" in msg and "entry 3" in msg and "unreadable" in msg


def test_malformed_entries_all_listed(tmp_path):
    def mutate(root, annos):
        annos[0]["id"] = "x7"
        del annos[1]["captions"]
        annos[2]["captions"] = "a man"  # not a list
        annos.append(["not", "an", "object"])
        return annos

    msg = _error(tmp_path, mutate)
    assert "4 problem(s)" in msg
    assert "entry 0: field 'id'" in msg and "entry 1: missing field(s) ['captions']" in msg
    assert "entry 2: field 'captions'" in msg and "entry 4: not an object" in msg


def test_unknown_split_is_an_error(tmp_path):
    def mutate(root, annos):
        annos[1]["split"] = "validation"
        return annos

    msg = _error(tmp_path, mutate)
    assert "entry 1: field 'split' is 'validation'" in msg and "['train', 'val', 'test']" in msg
    # ICFG-PEDES files only have train and test
    msg = _error(tmp_path / "icfg", lambda r, a: a, cls=builders.IcfgPedes, ann="ICFG-PEDES.json")
    assert "field 'split' is 'val', expected one of ['train', 'test']" in msg


def test_missing_folder_files_and_bad_json(tmp_path):
    with pytest.raises(builders.DataError, match="missing .*reid_raw.json"):
        (tmp_path / "empty" / "imgs").mkdir(parents=True)
        build(builders.CuhkPedes, tmp_path / "empty", tmp_path / "tfds")
    (tmp_path / "empty" / "reid_raw.json").write_text("[{oops")
    with pytest.raises(builders.DataError, match="not valid JSON"):
        build(builders.CuhkPedes, tmp_path / "empty", tmp_path / "tfds")


def test_empty_captions_dropped_with_a_counted_warning(tmp_path, caplog):
    root = tmp_path / "raw"
    annos = write_folder(root, "reid_raw.json", "file_path", {"train": [1, 2], "val": [3], "test": [4]}, 1)
    annos[0]["captions"][1] = "  "
    annos[2]["captions"][0] = ""
    with open(root / "reid_raw.json", "w") as f:
        json.dump(annos, f)
    with caplog.at_level(logging.WARNING, logger="uit_jax.data.builders"):
        b = build(builders.CuhkPedes, root, tmp_path / "tfds")
    assert "dropped 2 empty caption(s)" in caplog.text and "entry 0 caption 1" in caplog.text
    assert b.info.splits["train"].num_examples == 3 and b.info.splits["val"].num_examples == 1
    # an image left with no caption at all is an error
    annos[3]["captions"] = [""]
    with open(root / "reid_raw.json", "w") as f:
        json.dump(annos, f)
    with pytest.raises(builders.DataError, match="entry 3: field 'captions' has no non-empty caption"):
        build(builders.CuhkPedes, root, tmp_path / "tfds2")


def test_default_tagger_needs_nltk_data(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError("no")))
    write_folder(tmp_path / "raw", "reid_raw.json", "file_path", {"train": [1], "val": [2], "test": [3]}, 1)
    b = builders.CuhkPedes(data_dir=str(tmp_path / "tfds"))
    with pytest.raises(LookupError, match="nltk.downloader averaged_perceptron_tagger_eng"):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))


def test_missing_manual_dir_shows_the_download_instructions(tmp_path):
    b = builders.IcfgPedes(data_dir=str(tmp_path / "tfds"), tagger=TAGGER)
    with pytest.raises(AssertionError, match="ICFG-PEDES.json"):
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "none")))


def test_icfg_reads_sens_file_name_too(tmp_path):
    """SEN names the ICFG-PEDES annotations ICFG_PEDES.json, IRRA ICFG-PEDES.json: both are read."""
    cls, _, path_key, ids = LAYOUTS["icfg"]
    write_folder(tmp_path / "raw", "ICFG_PEDES.json", path_key, ids, images_per_id=1)
    by_split = builders.read_annotations(str(tmp_path / "raw"), cls.ANN_FILE, path_key, cls.FILE_SPLITS)
    assert sorted({e["orig_id"] for e in by_split["test"]}) == ids["test"]
    os.remove(tmp_path / "raw" / "ICFG_PEDES.json")
    with pytest.raises(builders.DataError, match=r"missing .*ICFG-PEDES.json \(or ICFG_PEDES.json\)"):
        builders.read_annotations(str(tmp_path / "raw"), cls.ANN_FILE, path_key, cls.FILE_SPLITS)


def test_check_ready_reports_missing_nltk_data_before_building(tmp_path, monkeypatch):
    import nltk

    from uit_jax.data import defaults, prepare

    cfg = defaults.data_config("cuhk")
    cfg.manual_dir, cfg.data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
    monkeypatch.setattr(nltk.data, "find", lambda *a, **k: (_ for _ in ()).throw(LookupError("no")))
    with pytest.raises(LookupError, match="nltk.downloader"):
        prepare.check_ready(cfg)
    cfg.tagger = str(tmp_path / "tags.tsv")  # a word->tag file needs no NLTK data
    (tmp_path / "tags.tsv").write_text("coat\tNN\n")
    prepare.check_ready(cfg)


# ----------------------------------------------------------------------------- fuzzing the annotation reader

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ODD_TEXT = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=30
)  # any code point, lone surrogates, controls, RTL marks and emoji included
_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
_GOOD = {"split": "train", "captions": ["a man in a red coat."], "file_path": "a.png", "id": 1}


@st.composite
def _entry(draw):
    """A valid entry with some fields replaced by anything, removed, or made huge / empty / odd."""
    e = dict(_GOOD)
    for key in draw(st.lists(st.sampled_from(sorted(_GOOD)), unique=True, max_size=3)):
        how = draw(st.sampled_from(["value", "missing", "caption"]))
        if how == "missing":
            e.pop(key)
        elif how == "caption":
            e["captions"] = [draw(st.sampled_from(["", "   ", "x" * 20_000])), draw(_ODD_TEXT)]
        else:
            e[key] = draw(_JSONISH)
    return draw(st.sampled_from([e, e, e, draw(_JSONISH)]))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(entries=st.lists(_entry(), min_size=1, max_size=6))
def test_any_annotation_file_reads_or_lists_every_offender(tmp_path_factory, entries):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "imgs").mkdir()
    Image.new("RGB", (8, 16), (200, 30, 30)).save(root / "imgs" / "a.png")
    (root / "reid_raw.json").write_text(json.dumps(entries))
    try:
        out = builders.read_annotations(str(root), "reid_raw.json", "file_path", ("train", "val", "test"))
    except builders.DataError as e:
        listed = {int(m) for m in re.findall(r"reid_raw\.json entry (\d+):", str(e))}
        assert listed == {i for i, x in enumerate(entries) if not _is_usable(x)}, str(e)
        return
    assert all(_is_usable(x) for x in entries)
    for rows in out.values():  # read: every kept entry is complete and clean
        for r in rows:
            assert r["captions"] and all(c.strip() for c in r["captions"]) and isinstance(r["orig_id"], int)


def _is_usable(x) -> bool:
    """An independent statement of what the reader must accept."""
    if not isinstance(x, dict) or set(_GOOD) - set(x):
        return False
    caps, ident = x["captions"], x["id"]
    if isinstance(ident, str) and re.fullmatch(r"[+-]?[0-9]+", ident):
        ident = int(ident)
    ok_id = (isinstance(ident, int) and not isinstance(ident, bool) and -(2**63) <= ident < 2**63) or (
        isinstance(ident, float) and ident.is_integer() and abs(ident) < 2**63
    )
    return (
        x["split"] in ("train", "val", "test")
        and ok_id
        and x["file_path"] == "a.png"
        and isinstance(caps, list)
        and all(isinstance(c, str) and len(c) <= 10_000 and _utf8(c) for c in caps)
        and any(c.strip() for c in caps)
    )


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False
