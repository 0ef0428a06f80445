"""Retrieval metrics at evaluation scale: the ranking without argsort against the previous argsort ranking.

    python tools/bench_metrics.py [--queries 19848 --gallery 19848 --ids 1000 --dim 512] [--skip_argsort]

Defaults are ICFG-PEDES's test split (19,848 captions x 19,848 images). Random embeddings with an identity signal;
both methods rank the same similarity matrix; prints seconds, peak RSS and whether the figures are identical, and
the time of `retrieval_metrics_from_embeddings` (blockwise, the (Q, G) matrix never on the host).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uit_jax import metrics  # noqa: E402


def argsort_metrics(sim, q_pids, g_pids, block_size=1024):
    """The previous method: a stable descending argsort of every row, then the ranks of the matches."""
    hits, ap, inp = {1: 0, 5: 0, 10: 0}, 0.0, 0.0
    for start in range(0, len(q_pids), block_size):
        block = sim[start : start + block_size]
        order = np.argsort(-block, axis=1, kind="stable")
        rows, cols = np.nonzero(g_pids[order] == q_pids[start : start + block_size, None])
        ranks = cols + 1
        counts = np.bincount(rows, minlength=len(block))
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        k = np.arange(ranks.size) - first[rows] + 1
        ap += float(np.sum(np.bincount(rows, weights=k / ranks, minlength=len(block)) / counts))
        inp += float(np.sum(counts / ranks[first + counts - 1]))
        for r in hits:
            hits[r] += int(np.sum(ranks[first] <= r))
    n = len(q_pids)
    return {f"R{r}": 100.0 * h / n for r, h in hits.items()} | {"mAP": 100.0 * ap / n, "mINP": 100.0 * inp / n}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=19848)
    p.add_argument("--gallery", type=int, default=19848)
    p.add_argument("--ids", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--skip_argsort", action="store_true")
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    g_pids = np.concatenate([np.arange(a.ids), rng.integers(0, a.ids, a.gallery - a.ids)])
    q_pids = rng.integers(0, a.ids, a.queries)
    centers = rng.standard_normal((a.ids, a.dim)).astype(np.float32)
    q = centers[q_pids] + 5 * rng.standard_normal((a.queries, a.dim)).astype(np.float32)
    g = centers[g_pids] + 5 * rng.standard_normal((a.gallery, a.dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    sim = q @ g.T
    out = {}
    t0 = time.perf_counter()
    new = metrics.retrieval_metrics(sim, q_pids, g_pids)
    out["sort_search_s"] = time.perf_counter() - t0
    print(f"{a.queries} x {a.gallery}: sort + binary search {out['sort_search_s']:.1f} s  {new}")
    if not a.skip_argsort:
        t0 = time.perf_counter()
        old = argsort_metrics(sim, q_pids, g_pids)
        out["argsort_s"] = time.perf_counter() - t0
        out["identical"] = old == new
        print(f"stable argsort {out['argsort_s']:.1f} s; identical figures: {out['identical']}; "
              f"speed-up x{out['argsort_s'] / out['sort_search_s']:.1f}")  # fmt: skip
    del sim
    t0 = time.perf_counter()
    emb = metrics.retrieval_metrics_from_embeddings(q, g, q_pids, g_pids)
    out["from_embeddings_s"] = time.perf_counter() - t0
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"from embeddings (blockwise, jax scores) {out['from_embeddings_s']:.1f} s  {emb}")
    print(
        f"peak RSS {out['peak_rss_gib']:.2f} GiB (the full similarity is {a.queries * a.gallery * 4 / 2**30:.2f} GiB)"
    )
    return out


if __name__ == "__main__":
    main()
