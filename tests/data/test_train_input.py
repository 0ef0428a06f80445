"""data/train_input.py: batch contents, augmentations off, the key-word rate, process slicing, exact resume."""

import itertools

import numpy as np
import pytest

from uit_jax.data import augment, samplers, train_input
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tok_lib


def _take(it, n):
    return list(itertools.islice(it, n))


def test_train_batch_contents(tiny):
    cfg, info, tok, train = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.mlm_outputs = True
    b = next(train_input.make_train_iterator(cfg, tok, global_batch=8, seed=0, data=train))
    assert b["images"].shape == (8, 64, 32, 3) and b["images"].dtype == np.float32
    for k in ("text", "mlm_text", "mlm_labels"):
        assert b[k].shape == (8, 77) and b[k].dtype == np.int32
    assert b["pid"].dtype == np.int32 and b["image_id"].dtype == np.int32
    assert 0 <= b["pid"].min() and b["pid"].max() < info.num_train_ids
    # pid and image_id agree with the split
    assert all(train.pid[train.image_id == i][0] == p for i, p in zip(b["image_id"], b["pid"]))
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
    b = next(train_input.make_train_iterator(cfg, tok, global_batch=4, seed=1, data=train))
    order = samplers.epoch_order(train.pid, sampler="random", global_batch=4, pairs_per_id=2, seed=1, epoch=0)
    i = order[:4]
    np.testing.assert_array_equal(b["text"], tok_lib.tokenize(tok, list(train.caption[i])))
    import tensorflow as tf

    ref = augment.normalize(tf.stack([augment.decode_resize(train.images[j], (64, 32)) for j in train.image_id[i]]))
    np.testing.assert_allclose(b["images"], ref.numpy(), atol=1e-5)


def test_keyword_filter_rate(tiny):
    cfg, _, tok, train = tiny
    cfg = cfg.copy_and_resolve_references()
    cfg.mlm_masking = False
    cfg.sampler = "random"
    b = _take(train_input.make_train_iterator(cfg, tok, global_batch=50, seed=2, data=train), 8)
    full = {tuple(r) for r in tok_lib.tokenize(tok, list(train.caption))}
    texts = np.concatenate([x["text"] for x in b])
    cut = [" ".join(text_lib.keyword_filter(w, t)) for w, t in zip(train.words, train.pos)]
    cut = {tuple(r) for r in tok_lib.tokenize(tok, cut)}
    assert all(tuple(t) in full or tuple(t) in cut for t in texts)
    filtered = np.mean([tuple(t) not in full for t in texts])
    assert 0.13 < filtered < 0.27  # p = 0.2 over 400 rows


def test_two_processes_equal_one_and_resume_is_exact(tiny):
    cfg, _, tok, train = tiny
    kw = dict(global_batch=8, seed=3, data=train)
    single = _take(train_input.make_train_iterator(cfg, tok, **kw), 10)  # 80 rows: past the first epoch (<= 72)
    halves = [
        _take(train_input.make_train_iterator(cfg, tok, **kw, process_index=p, process_count=2), 10) for p in range(2)
    ]
    for s in range(10):
        for k in single[s]:
            np.testing.assert_array_equal(np.concatenate([halves[0][s][k], halves[1][s][k]]), single[s][k])
    resumed = _take(train_input.make_train_iterator(cfg, tok, **kw, start_step=7), 3)
    for s in range(3):
        for k in single[7 + s]:
            np.testing.assert_array_equal(resumed[s][k], single[7 + s][k])
    other = next(train_input.make_train_iterator(cfg, tok, global_batch=8, seed=4, data=train))
    assert not np.array_equal(other["images"], single[0]["images"])


def test_closing_the_train_stream_ends_it(tiny):
    cfg, _, tok, train = tiny
    kw = dict(global_batch=8, seed=3, data=train)
    want = _take(train_input.make_train_iterator(cfg, tok, **kw), 3)
    with train_input.make_train_iterator(cfg, tok, **kw) as it:
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
        train_input.make_train_iterator(cfg, tok, global_batch=50, seed=0, data=train)
    with pytest.raises(ValueError, match="not divisible by process_count 3"):
        train_input.make_train_iterator(cfg, tok, global_batch=8, seed=0, process_count=3, data=train)
