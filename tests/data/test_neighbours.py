"""Caption neighbours (TF-IDF, hashed) against a dictionary reference, and the 'neighbours' sampler's rounds."""

import math
import re
from collections import Counter

import numpy as np
import pytest

from uit_jax.data import defaults, neighbours, pipeline

COLOURS = ["red", "blue", "green", "black", "white", "grey"]


def _captions(rng, n_ids, per_id=3):
    """Each identity: a fixed upper and shoe colour, captions naming a random subset of them."""
    caps, pids = [], []
    for pid in range(n_ids):
        up, shoe, hair = rng.choice(COLOURS, 3)
        for _ in range(per_id):
            parts = [f"a {up} shirt"] + [f"{shoe} shoes"] * int(rng.integers(0, 2)) + [f"{hair} hair"]
            caps.append("A person with " + ", ".join(rng.permutation(parts)) + ".")
            pids.append(pid * 7 + 3)  # pids need not be 0..n-1
    return caps, np.asarray(pids)


def _reference_sims(captions, pids):
    """TF-IDF cosine over words and word pairs, with dictionaries (no hashing): the (n, n) similarity."""
    ids = sorted(set(pids.tolist()))
    counts = {i: Counter() for i in ids}
    for c, p in zip(captions, pids.tolist()):
        words = re.findall(r"[a-z]+", c.lower())
        counts[p].update(words + [f"{a} {b}" for a, b in zip(words, words[1:])])
    df = Counter(f for i in ids for f in counts[i])
    vec = {}
    for i in ids:
        v = {f: math.log1p(n) * math.log((1 + len(ids)) / (1 + df[f])) for f, n in counts[i].items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        vec[i] = {f: x / norm for f, x in v.items()}
    sims = np.array([[sum(x * vec[b].get(f, 0.0) for f, x in vec[a].items()) for b in ids] for a in ids])
    return ids, sims


def test_caption_neighbours_match_a_dictionary_reference():
    caps, pids = _captions(np.random.default_rng(0), 40)
    ids, nb = neighbours.caption_neighbours(caps, pids, k=5, dim=1 << 20, block=16)  # blocks: 16, 16, 8 rows
    ref_ids, sims = _reference_sims(caps, pids)
    assert ids.tolist() == ref_ids and nb.shape == (40, 5)
    index = {p: i for i, p in enumerate(ref_ids)}
    for row, p in enumerate(ref_ids):
        assert p not in nb[row]  # never its own neighbour
        got = [sims[row, index[q]] for q in nb[row]]
        want = sorted(np.delete(sims[row], row), reverse=True)[:5]
        # ties between equally similar identities may come in any order: compare the similarities, in order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert neighbours.caption_neighbours(caps[:6], pids[:6], k=9)[1].shape == (2, 1)  # k capped at n - 1
    with pytest.raises(ValueError, match="at least 2 identities"):
        neighbours.caption_neighbours(caps[:3], pids[:3])


def test_neighbours_sampler_rounds_are_groups_of_neighbours():
    caps, pids = _captions(np.random.default_rng(1), 64, per_id=2)
    ids, nb = neighbours.caption_neighbours(caps, pids, k=8)
    table = {int(i): row for i, row in zip(ids, nb)}
    rng = np.random.default_rng(0)
    rounds = pipeline.identity_rounds(pids, rng, ids_per_round=16, pairs_per_id=2, neighbours=table, group=4)
    seen, close, close_random = [], 0, 0
    for r in rounds:
        round_ids = [int(pids[c[0]]) for c in r]
        assert len(r) == 16 and len(set(round_ids)) == 16
        for c in r:
            assert len(set(pids[c])) == 1
            seen.extend(c.tolist())
        for g in range(0, 16, 4):  # a group: a seed, then members among its neighbours (while they last)
            seed_id, members = round_ids[g], round_ids[g + 1 : g + 4]
            close += sum(m in table[seed_id] for m in members)
            close_random += sum(m in table[seed_id] for m in rng.choice(ids, 3, replace=False))
    assert len(seen) == len(set(seen))  # no pair twice in an epoch
    assert close >= 0.8 * 3 * 4 * len(rounds) > 2 * close_random  # nearly all members are the seed's neighbours
    # epoch_order: a function of (seed, epoch); 'neighbours' without the table is a clear error
    kw = dict(sampler="neighbours", global_batch=32, pairs_per_id=2, seed=0, neighbours=table, group=4)
    np.testing.assert_array_equal(pipeline.epoch_order(pids, epoch=1, **kw), pipeline.epoch_order(pids, epoch=1, **kw))
    order = pipeline.epoch_order(pids, epoch=0, **kw)  # whole rounds only, as the identity sampler
    assert len(order) >= len(pids) // 2 and len(set(order.tolist())) == len(order)
    with pytest.raises(ValueError, match="no caption neighbours"):
        pipeline.epoch_order(pids, **dict(kw, neighbours=None), epoch=0)
    with pytest.raises(ValueError, match="'sequential'"):
        pipeline.epoch_order(pids, **dict(kw, sampler="sequential"), epoch=0)


def test_sampler_neighbours_from_the_data_config():
    caps, pids = _captions(np.random.default_rng(2), 12)
    cfg = defaults.data_config("synthetic")
    assert pipeline.sampler_neighbours(cfg, {"caption": caps, "pid": pids}) is None  # the identity sampler
    cfg.sampler = "neighbours"
    table = pipeline.sampler_neighbours(cfg, {"caption": caps, "pid": pids})
    assert sorted(table) == sorted(set(pids.tolist())) and all(len(v) == 11 for v in table.values())  # k capped
    cfg.neighbour_group = 1
    with pytest.raises(ValueError, match="neighbour_group is 1"):
        pipeline.sampler_neighbours(cfg, {"caption": caps, "pid": pids})
