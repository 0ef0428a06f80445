"""data/samplers.py: the identity sampler's guarantees, the random sampler, process slicing of the stream."""

import numpy as np
import pytest

from uit_jax.data import samplers


def test_identity_sampler_guarantees(tiny):
    pids = tiny[3].pid
    rng = np.random.default_rng(0)
    rounds = samplers.identity_rounds(pids, rng, ids_per_round=4, pairs_per_id=2)
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
    kw = dict(sampler="identity", global_batch=8, pairs_per_id=2, seed=0)
    order = samplers.epoch_order(pids, **kw, epoch=0)
    assert len(order) >= len(pids) // 2 and len(set(order.tolist())) == len(order)
    # epochs differ, and are a function of (seed, epoch)
    o2 = samplers.epoch_order(pids, **kw, epoch=1)
    assert not np.array_equal(order[: len(o2)], o2[: len(order)])
    np.testing.assert_array_equal(order, samplers.epoch_order(pids, **kw, epoch=0))
    with pytest.raises(ValueError, match="'sequential'"):
        samplers.epoch_order(pids, **dict(kw, sampler="sequential"), epoch=0)


def test_random_sampler_is_a_permutation(tiny):
    pids = tiny[3].pid
    o = samplers.epoch_order(pids, sampler="random", global_batch=8, pairs_per_id=2, seed=0, epoch=3)
    assert sorted(o.tolist()) == list(range(len(pids)))


def test_stream_rows_processes_disjoint_and_complete():
    pids = np.repeat(np.arange(10), 3)
    kw = dict(sampler="identity", global_batch=8, pairs_per_id=2, seed=5)
    one = next(samplers.stream_rows(pids, **kw))
    parts = [next(samplers.stream_rows(pids, **kw, process_index=p, process_count=4)) for p in range(4)]
    pos = np.concatenate([p[0] for p in parts])
    assert len(set(pos.tolist())) == len(pos)  # no overlap
    np.testing.assert_array_equal(np.sort(pos), one[0])  # together: everything
    for p, (ps, idx) in enumerate(parts):
        assert ((ps % 8) // 2 == p).all()
        np.testing.assert_array_equal(idx, one[1][np.searchsorted(one[0], ps)])


def test_a_round_needs_enough_identities(tiny):
    with pytest.raises(ValueError, match="a round needs 25 identities"):
        samplers.epoch_order(tiny[3].pid, sampler="identity", global_batch=50, pairs_per_id=2, seed=0, epoch=0)
