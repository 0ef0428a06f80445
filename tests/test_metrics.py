"""Tests for uit_jax/metrics.py: brute-force loops, IRRA's rank formula in torch, and hand-computed cases."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from uit_jax.metrics import retrieval_metrics


def brute_force(sim, q_pids, g_pids):
    """One query at a time, plain python: CMC R@k, AP and INP as IRRA defines them."""
    r = {1: 0.0, 5: 0.0, 10: 0.0}
    aps, inps = [], []
    for i in range(sim.shape[0]):
        order = sorted(range(sim.shape[1]), key=lambda j: -sim[i, j])
        match = [g_pids[j] == q_pids[i] for j in order]
        for k in r:
            r[k] += any(match[:k])
        found, precisions, last = 0, [], 0
        for pos, m in enumerate(match, start=1):
            if m:
                found += 1
                precisions.append(found / pos)
                last = pos
        aps.append(sum(precisions) / found)
        inps.append(found / last)
    n = sim.shape[0]
    return {
        "R1": 100 * r[1] / n,
        "R5": 100 * r[5] / n,
        "R10": 100 * r[10] / n,
        "mAP": 100 * np.mean(aps),
        "mINP": 100 * np.mean(inps),
    }


def irra_rank_torch(sim, q_pids, g_pids):
    """IRRA's vectorised formula (utils/metrics.py::rank) restated in torch."""
    sim, q, g = torch.tensor(sim), torch.tensor(q_pids), torch.tensor(g_pids)
    idx = torch.argsort(sim, dim=1, descending=True)
    matches = g[idx].eq(q.view(-1, 1))
    cmc = (matches[:, :10].cumsum(1) >= 1).float().mean(0) * 100
    cum = matches.cumsum(1)
    last = torch.stack([row.nonzero()[-1, 0] for row in matches])
    minp = (cum[torch.arange(len(q)), last] / (last + 1.0)).mean() * 100
    prec = cum / torch.arange(1, cum.shape[1] + 1) * matches
    mAP = (prec.sum(1) / matches.sum(1)).mean() * 100
    out = {"R1": float(cmc[0]), "R5": float(cmc[4]), "R10": float(cmc[9])}
    return out | {"mAP": float(mAP), "mINP": float(minp)}


def _random_case(seed, q=37, g=53, ids=20):
    rng = np.random.default_rng(seed)
    g_pids = np.concatenate([np.arange(ids), rng.integers(0, ids, size=g - ids)])  # every id in the gallery
    rng.shuffle(g_pids)
    q_pids = rng.integers(0, ids, size=q)
    # ties-free scores with a signal towards the right id, so metrics are neither 0 nor 100
    sim = rng.normal(size=(q, g)) + 1.0 * (q_pids[:, None] == g_pids[None, :])
    return sim, q_pids, g_pids


@pytest.mark.parametrize("block_size", [1, 5, 16, 37, 1024])
def test_matches_brute_force_and_irra(block_size):
    sim, q_pids, g_pids = _random_case(0)
    got = retrieval_metrics(sim, q_pids, g_pids, block_size=block_size)
    ref = brute_force(sim, q_pids, g_pids)
    irra = irra_rank_torch(sim, q_pids, g_pids)
    for key in ref:
        assert isinstance(got[key], float)
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=1e-9, err_msg=key)
        np.testing.assert_allclose(got[key], irra[key], rtol=1e-5, atol=1e-4, err_msg=key)
    # the case is informative (no metric at 0 or 100); mINP and mAP are not ordered in general (below)
    assert 0 < got["R1"] < got["R10"] < 100 and 0 < got["mINP"] < 100 and 0 < got["mAP"] < 100


def test_minp_can_exceed_map():
    """Positives at ranks 2 and 3: AP = (1/2 + 2/3) / 2 = 0.583, INP = 2/3 = 0.667 (so never assert mINP <= mAP)."""
    got = retrieval_metrics(np.array([[0.9, 0.8, 0.7]]), [1], [2, 1, 1])
    assert got["mAP"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2) and got["mINP"] == pytest.approx(100 * 2 / 3)
    assert got["mINP"] > got["mAP"]


def test_jax_input_and_other_seeds():
    for seed in (1, 2):
        sim, q_pids, g_pids = _random_case(seed, q=20, g=70, ids=12)
        got = retrieval_metrics(jnp.asarray(sim, jnp.float32), jnp.asarray(q_pids), g_pids, block_size=7)
        ref = brute_force(sim.astype(np.float32), q_pids, g_pids)
        for key in ref:
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, err_msg=key)


def test_identity_embedding_is_perfect():
    rng = np.random.default_rng(3)
    q_pids = rng.integers(0, 6, size=25)
    g_pids = np.concatenate([np.arange(6), rng.integers(0, 6, size=30)])
    eye = np.eye(6, dtype=np.float32)
    sim = eye[q_pids] @ eye[g_pids].T  # one-hot id embeddings: heavy ties, positives all score 1
    got = retrieval_metrics(sim, q_pids, g_pids, block_size=4)
    assert got == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}


def test_hand_computed():
    # query 0 (id 1): ranking g2(id 2), g0(id 1), g3(id 3), g1(id 1) -> positives at ranks 2 and 4
    # query 1 (id 2): ranking g2(id 2) first -> single positive at rank 1
    sim = np.array([[0.8, 0.1, 0.9, 0.5], [0.2, 0.3, 0.7, 0.1]])
    got = retrieval_metrics(sim, [1, 2], [1, 1, 2, 3])
    ap0 = (1 / 2 + 2 / 4) / 2
    inp0 = 2 / 4
    assert got["R1"] == pytest.approx(50.0)
    assert got["R5"] == pytest.approx(100.0) and got["R10"] == pytest.approx(100.0)
    assert got["mAP"] == pytest.approx(100 * (ap0 + 1.0) / 2)
    assert got["mINP"] == pytest.approx(100 * (inp0 + 1.0) / 2)


def test_errors():
    sim = np.zeros((2, 3))
    with pytest.raises(ValueError, match="no gallery item"):
        retrieval_metrics(sim, [0, 7], [0, 1, 2])
    with pytest.raises(ValueError, match="expected"):
        retrieval_metrics(sim, [0, 1, 2], [0, 1, 2])
    with pytest.raises(ValueError, match="block_size"):
        retrieval_metrics(sim, [0, 1], [0, 1, 2], block_size=0)


def argsort_reference(sim, q_pids, g_pids):
    """The previous implementation's ranking (a stable descending argsort of every row), kept as a reference."""
    order = np.argsort(-sim, axis=1, kind="stable")
    matches = np.asarray(g_pids)[order] == np.asarray(q_pids)[:, None]
    out = {1: 0, 5: 0, 10: 0}
    aps, inps = [], []
    for row in matches:
        ranks = np.flatnonzero(row) + 1
        for k in out:
            out[k] += ranks[0] <= k
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inps.append(len(ranks) / ranks[-1])
    n = len(matches)
    return {"R1": 100 * out[1] / n, "R5": 100 * out[5] / n, "R10": 100 * out[10] / n, "mAP": 100 * np.mean(aps),
            "mINP": 100 * np.mean(inps)}  # fmt: skip


@pytest.mark.parametrize("levels", [3, 20, 1000])
def test_ties_rank_by_gallery_index(levels):
    """Scores on a coarse grid tie often; ranks must be those of a stable argsort (lower gallery index first)."""
    rng = np.random.default_rng(levels)
    sim, q_pids, g_pids = _random_case(levels, q=60, g=90, ids=15)
    sim = np.round(sim * levels / 4) / levels  # many exact ties, positives among them
    got = retrieval_metrics(sim.astype(np.float32), q_pids, g_pids, block_size=int(rng.integers(1, 60)))
    ref = brute_force(sim.astype(np.float32), q_pids, g_pids)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_same_figures_as_the_argsort_ranking():
    rng = np.random.default_rng(7)
    q_pids, g_pids = rng.integers(0, 150, 900), np.concatenate([np.arange(150), rng.integers(0, 150, 650)])
    q = rng.standard_normal((900, 32)).astype(np.float32) + np.eye(150, 32, dtype=np.float32)[q_pids] * 3
    g = rng.standard_normal((800, 32)).astype(np.float32) + np.eye(150, 32, dtype=np.float32)[g_pids] * 3
    sim = q @ g.T
    got = retrieval_metrics(sim, q_pids, g_pids, block_size=256)
    ref = argsort_reference(sim, q_pids, g_pids)
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-12, atol=1e-9, err_msg=key)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.full((2, 3), np.nan), [0, 1], [0, 1, 1])


@pytest.mark.parametrize("levels", [0, 3])  # 0: no ties; 3: scores from three values, so ties everywhere
def test_image_to_text_against_a_brute_force_loop(levels):
    """Image-to-text as the Evaluator computes it (each image ranks every caption, positives by person id) on the
    transposed similarity, against the plain loop on a transposed copy, ties broken by caption index."""
    rng = np.random.default_rng(11 + levels)
    q_pids = np.concatenate([np.arange(9), rng.integers(0, 9, 31)])  # 40 captions, every id among them
    g_pids = rng.integers(0, 9, 23)  # 23 images
    sim = rng.normal(size=(40, 23)) + (q_pids[:, None] == g_pids[None, :])
    if levels:
        sim = np.floor(levels * (sim - sim.min()) / (sim.max() - sim.min() + 1e-9)).astype(np.float32)
    got = retrieval_metrics(sim.T, g_pids, q_pids, block_size=7)  # a strided view, in blocks
    ref = brute_force(np.ascontiguousarray(sim.T), g_pids, q_pids)  # python's sort is stable: ties by index
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-12, atol=1e-9, err_msg=k)


def test_a_strided_block_is_copied_exactly():
    from uit_jax.metrics import _contiguous

    a = np.arange(7 * 11, dtype=np.float32).reshape(7, 11)
    for view in (a.T, a[:, ::2], a.T[1:5]):
        out = _contiguous(view, tile=3)
        assert out.flags.c_contiguous and np.array_equal(out, view)
    assert _contiguous(a) is a or np.shares_memory(_contiguous(a), a)  # no copy when already row-major
