"""tf.data pipelines: batch contents, sampler guarantees, process slicing, resume, eval padding."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from uit_jax.data import augment, defaults, pipeline, synthetic
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tok_lib


def _take(it, n):
    return list(itertools.islice(it, n))


def test_data_config_fields():
    for name in ("synthetic", "cuhk", "icfg", "rstp"):
        c = defaults.data_config(name)
        assert c.name == name and c.text_len == 77 and c.crop_pad == 10 and c.sampler == "identity"
    assert defaults.data_config("cuhk").image_size == (384, 128)
    assert defaults.data_config("synthetic").synthetic.out_dir == defaults.data_config("synthetic").manual_dir
    with pytest.raises(ValueError, match="unknown dataset 'coco'"):
        defaults.data_config("coco")


def test_one_dataset_registry_and_data_root_read_at_build(monkeypatch, tmp_path):
    from uit_jax.data import builders

    assert set(builders.BUILDERS) == set(defaults.DATASETS)
    monkeypatch.setenv("UIT_DATA_ROOT", str(tmp_path))  # after import: still honoured
    assert defaults.data_config("cuhk").manual_dir == str(tmp_path / "CUHK-PEDES")
    monkeypatch.delenv("UIT_DATA_ROOT")
    assert defaults.data_config("rstp").manual_dir == os.path.join(os.path.expanduser("~"), "uit_data", "RSTPReid")


def test_train_batch_contents(tiny):
    cfg, info, tok, train = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.mlm_outputs = True
    b = next(pipeline.make_train_iterator(cfg, tok, global_batch=8, seed=0, data=train))
    assert b["images"].shape == (8, 64, 32, 3) and b["images"].dtype == np.float32
    for k in ("text", "mlm_text", "mlm_labels"):
        assert b[k].shape == (8, 77) and b[k].dtype == np.int32
    assert b["pid"].dtype == np.int32 and b["image_id"].dtype == np.int32
    assert 0 <= b["pid"].min() and b["pid"].max() < info.num_train_ids
    # pid and image_id agree with the split
    assert all(train["pid"][train["image_id"] == i][0] == p for i, p in zip(b["image_id"], b["pid"]))
    # normalised range; masking on: text is the masked caption, labels where chosen
    lo = (0 - np.array(augment.CLIP_MEAN)) / np.array(augment.CLIP_STD)
    hi = (1 - np.array(augment.CLIP_MEAN)) / np.array(augment.CLIP_STD)
    assert (b["images"] >= lo - 1e-5).all() and (b["images"] <= hi + 1e-5).all()
    np.testing.assert_array_equal(b["text"], b["mlm_text"])
    assert (b["mlm_labels"] > 0).any(axis=1).all()
    assert (b["text"] == text_lib.mask_token_id(tok)).any()
    # every row still has its start and end of text
    assert (b["text"][:, 0] == tok_lib.sot_id(tok)).all()
    assert ((b["text"] == tok_lib.eot_id(tok)).sum(1) == 1).all()


def test_augmentations_off_give_the_clean_image_and_caption(tiny):
    cfg, _, tok, train = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.flip, cfg.crop_pad, cfg.erasing_prob, cfg.keyword_prob, cfg.mlm_masking = False, 0, 0.0, 0.0, False
    cfg.sampler = "random"
    b = next(pipeline.make_train_iterator(cfg, tok, global_batch=4, seed=1, data=train))
    order = pipeline.epoch_order(train["pid"], sampler="random", global_batch=4, pairs_per_id=2, seed=1, epoch=0)
    i = order[:4]
    np.testing.assert_array_equal(b["text"], tok_lib.tokenize(tok, list(train["caption"][i])))
    import tensorflow as tf

    ref = augment.normalize(
        tf.stack([augment.decode_resize(train["images"][j], (64, 32)) for j in train["image_id"][i]])
    ).numpy()
    np.testing.assert_allclose(b["images"], ref, atol=1e-5)


def test_keyword_filter_rate(tiny):
    cfg, _, tok, train = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.mlm_masking = False
    cfg.sampler = "random"
    b = _take(pipeline.make_train_iterator(cfg, tok, global_batch=50, seed=2, data=train), 8)
    full = {tuple(r) for r in tok_lib.tokenize(tok, list(train["caption"]))}
    texts = np.concatenate([x["text"] for x in b])
    cut = [" ".join(text_lib.keyword_filter(w, t)) for w, t in zip(train["words"], train["pos"])]
    cut = {tuple(r) for r in tok_lib.tokenize(tok, cut)}
    assert all(tuple(t) in full or tuple(t) in cut for t in texts)
    filtered = np.mean([tuple(t) not in full for t in texts])
    assert 0.13 < filtered < 0.27  # p = 0.2 over 400 rows


def test_identity_sampler_guarantees(tiny):
    _, _, _, train = tiny
    pids = train["pid"]
    rng = np.random.default_rng(0)
    rounds = pipeline.identity_rounds(pids, rng, ids_per_round=4, pairs_per_id=2)
    seen = []
    for r in rounds:
        assert len(r) == 4
        ids = [int(pids[c[0]]) for c in r]
        assert len(set(ids)) == 4  # distinct identities per round
        for c in r:
            assert 1 <= len(c) <= 2 and len(set(pids[c])) == 1  # a chunk: 1 or 2 pairs of one id
            seen.extend(c.tolist())
    assert len(seen) == len(set(seen))  # no pair twice in an epoch (every id has >= 2 pairs here)
    # each round is global_batch // pairs_per_id ids; the stream is cut into global batches
    order = pipeline.epoch_order(pids, sampler="identity", global_batch=8, pairs_per_id=2, seed=0, epoch=0)
    assert len(order) >= len(pids) // 2 and len(set(order.tolist())) == len(order)
    # epochs differ, and are a function of (seed, epoch)
    o2 = pipeline.epoch_order(pids, sampler="identity", global_batch=8, pairs_per_id=2, seed=0, epoch=1)
    assert not np.array_equal(order[: len(o2)], o2[: len(order)])
    np.testing.assert_array_equal(
        order, pipeline.epoch_order(pids, sampler="identity", global_batch=8, pairs_per_id=2, seed=0, epoch=0)
    )
    with pytest.raises(ValueError, match="'sequential'"):
        pipeline.epoch_order(pids, sampler="sequential", global_batch=8, pairs_per_id=2, seed=0, epoch=0)


def test_random_sampler_is_a_permutation(tiny):
    pids = tiny[3]["pid"]
    o = pipeline.epoch_order(pids, sampler="random", global_batch=8, pairs_per_id=2, seed=0, epoch=3)
    assert sorted(o.tolist()) == list(range(len(pids)))


def test_stream_rows_processes_disjoint_and_complete():
    pids = np.repeat(np.arange(10), 3)
    kw = dict(sampler="identity", global_batch=8, pairs_per_id=2, seed=5)
    one = next(pipeline.stream_rows(pids, **kw))
    parts = [next(pipeline.stream_rows(pids, **kw, process_index=p, process_count=4)) for p in range(4)]
    pos = np.concatenate([p[0] for p in parts])
    assert len(set(pos.tolist())) == len(pos)  # no overlap
    np.testing.assert_array_equal(np.sort(pos), one[0])  # together: everything
    for p, (ps, idx) in enumerate(parts):
        assert ((ps % 8) // 2 == p).all()
        np.testing.assert_array_equal(idx, one[1][np.searchsorted(one[0], ps)])


def test_two_processes_equal_one_and_resume_is_exact(tiny):
    cfg, _, tok, train = tiny
    kw = dict(global_batch=8, seed=3, data=train)
    single = _take(pipeline.make_train_iterator(cfg, tok, **kw), 10)  # 80 rows: past the first epoch (<= 72)
    halves = [
        _take(pipeline.make_train_iterator(cfg, tok, **kw, process_index=p, process_count=2), 10) for p in range(2)
    ]
    for s in range(10):
        for k in single[s]:
            np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), single[s][k])
    resumed = _take(pipeline.make_train_iterator(cfg, tok, **kw, start_step=7), 3)
    for s in range(3):
        for k in single[7 + s]:
            np.testing.assert_array_equal(resumed[s][k], single[7 + s][k])
    other = next(pipeline.make_train_iterator(cfg, tok, global_batch=8, seed=4, data=train))
    assert not np.array_equal(other["images"], single[0]["images"])


def test_closing_the_train_stream_ends_it(tiny):
    cfg, _, tok, train = tiny
    kw = dict(global_batch=8, seed=3, data=train)
    want = _take(pipeline.make_train_iterator(cfg, tok, **kw), 3)
    with pipeline.make_train_iterator(cfg, tok, **kw) as it:
        got = _take(it, 3)
    for a, b in zip(want, got):  # the stream is unchanged by being closable
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["text"], b["text"])
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent


def test_bad_process_and_sampler_arguments(tiny):
    cfg, _, tok, train = tiny
    with pytest.raises(ValueError, match="a round needs 25 identities"):
        pipeline.make_train_iterator(cfg, tok, global_batch=50, seed=0, data=train)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        pipeline.make_train_iterator(cfg, tok, global_batch=8, seed=0, process_count=3, data=train)


def test_eval_iterators_cover_everything_once(tiny):
    cfg, info, tok, _ = tiny
    val = pipeline.load_split(cfg, "val")
    assert pipeline.load_split(cfg, "val") is val  # kept: periodic evaluation does not re-read the files
    g, q = pipeline.make_eval_iterators(cfg, tok, split="val", batch_size=4, data=val)
    gb, qb = list(g), list(q)
    assert len(gb) == len(g) == 4 and len(qb) == len(q) == 8  # 15 images, 30 captions, batches of 4
    assert all(b["images"].shape == (4, 64, 32, 3) for b in gb)
    gid = np.concatenate([b["image_id"] for b in gb])
    gm = np.concatenate([b["mask"] for b in gb])
    assert sorted(gid[gm].tolist()) == list(range(15)) and (gid[~gm] == -1).all()
    qm = np.concatenate([b["mask"] for b in qb])
    qtext = np.concatenate([b["text"] for b in qb])[qm]
    np.testing.assert_array_equal(qtext, tok_lib.tokenize(tok, list(val["caption"])))
    np.testing.assert_array_equal(np.concatenate([b["pid"] for b in qb])[qm], val["pid"])
    # re-iterable (the trainer evaluates many times)
    assert len(list(g)) == 4
    # two processes: same number of steps, together the single-process batches at twice the size
    big_g, big_q = pipeline.make_eval_iterators(cfg, tok, split="val", batch_size=8, data=val)
    parts = [
        pipeline.make_eval_iterators(cfg, tok, split="val", batch_size=4, process_index=p, process_count=2, data=val)
        for p in range(2)
    ]
    assert len(parts[0][0]) == len(parts[1][0]) == len(big_g)
    for which in (0, 1):
        big = list((big_g, big_q)[which])
        a, b = list(parts[0][which]), list(parts[1][which])
        for s in range(len(big)):
            for k in big[s]:
                np.testing.assert_allclose(np.concatenate([a[s][k], b[s][k]]), big[s][k])


def test_prepare_rejects_a_stale_synthetic_folder(tiny, tmp_path):
    cfg = tiny[0].copy_and_resolve_references()
    cfg.manual_dir, cfg.data_dir = str(tmp_path), str(tmp_path / "tfds")
    root = pipeline.synthetic_dir(cfg)
    synthetic.generate(root, synthetic.Spec(train_ids=2, val_ids=1, test_ids=1, images_per_id=1, height=32, width=16))
    with pytest.raises(ValueError, match="Delete the folder"):
        pipeline.prepare(cfg)
    # other sizes or seeds live in their own folder under manual_dir
    cfg.synthetic.seed = 5
    assert os.path.dirname(pipeline.synthetic_dir(cfg)) == str(tmp_path) and pipeline.synthetic_dir(cfg) != root


def test_synthetic_generation_is_atomic(tiny, tmp_path, monkeypatch):
    """A generation killed mid-way leaves no set (only a .partial folder, removed by the next run)."""
    cfg = tiny[0].copy_and_resolve_references()
    cfg.manual_dir, cfg.data_dir = str(tmp_path), str(tmp_path / "tfds")
    root = pipeline.synthetic_dir(cfg)
    real = synthetic.generate

    def killed(out_dir, spec):
        real(out_dir, spec)
        raise KeyboardInterrupt  # after the images, before the tokenizer and the rename

    monkeypatch.setattr(synthetic, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.prepare(cfg)
    assert not os.path.exists(root) and os.path.isdir(root + ".partial")
    monkeypatch.setattr(synthetic, "generate", real)
    info = pipeline.prepare(cfg)
    assert info.num_train_pairs > 0 and not os.path.exists(root + ".partial")
    assert os.path.isfile(os.path.join(root, "tokenizer", "tokenizer.json"))


_PREPARE = """
import sys
sys.path.insert(0, {repo!r})
from tests.data.conftest import tiny_config
from uit_jax.data import pipeline
import pathlib
info = pipeline.prepare(tiny_config(pathlib.Path({root!r})))
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
        pipeline.load_split(cfg, "dev")
