"""data/eval_input.py: the padded gallery and query batches cover every image and caption once, on any number of
processes."""

import numpy as np

from uit_jax.data import eval_input, prepare
from uit_jax.data import tokenizer as tok_lib


def test_eval_batches_cover_everything_once(tiny):
    cfg, _, tok, _ = tiny
    val = prepare.load_split(cfg, "val")
    g, q = eval_input.make_batches(cfg, tok, val, batch_size=4)
    gb, qb = list(g), list(q)
    assert len(gb) == len(g) == 4 and len(qb) == len(q) == 8  # 15 images, 30 captions, batches of 4
    assert all(b["images"].shape == (4, 64, 32, 3) for b in gb)
    gid = np.concatenate([b["image_id"] for b in gb])
    gm = np.concatenate([b["mask"] for b in gb])
    assert sorted(gid[gm].tolist()) == list(range(15)) and (gid[~gm] == -1).all()
    qm = np.concatenate([b["mask"] for b in qb])
    qtext = np.concatenate([b["text"] for b in qb])[qm]
    np.testing.assert_array_equal(qtext, tok_lib.tokenize(tok, list(val.caption)))
    np.testing.assert_array_equal(np.concatenate([b["pid"] for b in qb])[qm], val.pid)
    # re-iterable (the trainer evaluates many times)
    assert len(list(g)) == 4
    # two processes: same number of steps, together the single-process batches at twice the size
    big_g, big_q = eval_input.make_batches(cfg, tok, val, batch_size=8)
    parts = [eval_input.make_batches(cfg, tok, val, batch_size=4, process_index=p, process_count=2) for p in range(2)]
    assert len(parts[0][0]) == len(parts[1][0]) == len(big_g)
    for which in (0, 1):
        big = list((big_g, big_q)[which])
        a, b = list(parts[0][which]), list(parts[1][which])
        for s in range(len(big)):
            for k in big[s]:
                np.testing.assert_allclose(np.concatenate([a[s][k], b[s][k]]), big[s][k])


def test_shard_rows_pads_with_minus_one():
    rows = eval_input.shard_rows(5, 2, process_index=1, process_count=2)
    np.testing.assert_array_equal(rows, [[2, 3], [-1, -1]])
