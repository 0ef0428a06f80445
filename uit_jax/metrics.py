"""Retrieval metrics: CMC rank-k (R1, R5, R10), mAP and mINP of a query x gallery similarity, blockwise.

Definitions follow IRRA's ``utils/metrics.py::rank`` (used by SEN), per query with the gallery sorted by
descending similarity and ``matches`` the gallery items of the query's person id:
- R@k (CMC): 100 if any of the top-k items matches, averaged over queries.
- AP: mean over matching items of (matches at or above its rank) / its rank; mAP is its mean over queries.
- INP: (number of matches) / (rank of the last match); mINP is its mean over queries.

Differences from the reference: ties are broken by gallery index (a stable sort), where torch's argsort leaves
them unspecified; a query with no matching gallery item is an error here (the reference returns NaN or fails).

Speed and memory: queries are processed ``block_size`` rows at a time; each row is sorted by value (no argsort)
and each positive's rank found by binary search, so peak extra memory is about ``block_size * G * 4`` bytes
(1024 x 100k: ~0.4 GB). A jax.Array similarity is sliced on its device and only each block is copied to the host.
"""

from __future__ import annotations

import numpy as np

RANKS = (1, 5, 10)


def _block_ranks(sim_block: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, offset: int):
    """Ranks (1-based) of each query row's matching gallery items: (row, rank) pairs in row order, ranks ascending
    within a row; and the number of matches per row.

    No argsort of the gallery: each row is sorted by value (SIMD quicksort, several times faster than a stable
    argsort), and a positive's rank is 1 + the items scoring above it (a binary search) + the items scoring exactly
    the same with a lower gallery index (counted directly, only where a tie exists). Equal to the rank a stable
    descending argsort gives.
    """
    b, g = sim_block.shape
    rows, cols = np.nonzero(q_pids[:, None] == g_pids[None, :])  # positives, row-major
    counts = np.bincount(rows, minlength=b)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0) + offset
        raise ValueError(
            f"metrics.retrieval_metrics: {missing.size} queries have no gallery item with their person id "
            f"(first query indices: {missing[:5].tolist()}, pids: {q_pids[missing[:5] - offset].tolist()}); "
            "every query id must appear in the gallery: check the split's query and gallery pids."
        )
    if np.isnan(sim_block).any():
        raise ValueError("metrics.retrieval_metrics: the similarity holds NaN; the embeddings are not finite.")
    scores = sim_block[rows, cols]
    ascending = np.sort(sim_block, axis=1)
    above, ties = np.empty(rows.size, np.int64), np.empty(rows.size, np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    for r in range(b):
        lo, hi = bounds[r], bounds[r + 1]
        left = np.searchsorted(ascending[r], scores[lo:hi], side="left")
        right = np.searchsorted(ascending[r], scores[lo:hi], side="right")
        above[lo:hi], ties[lo:hi] = g - right, right - left
    ranks = above + 1
    for i in np.flatnonzero(ties > 1):  # exact ties: the stable order puts lower gallery indices first
        ranks[i] += int(np.count_nonzero(sim_block[rows[i], : cols[i]] == scores[i]))
    order = np.lexsort((ranks, rows))
    return rows[order], ranks[order], counts


def retrieval_metrics(similarity, query_pids, gallery_pids, *, block_size: int = 1024) -> dict[str, float]:
    """R1, R5, R10, mAP, mINP (percent, Python floats) of ranking the gallery for each query.

    similarity: (Q, G) scores, higher is closer (numpy or jax array); query_pids: (Q,); gallery_pids: (G,).
    Raises ValueError for shape mismatches and for queries whose id is absent from the gallery.
    """
    if not hasattr(similarity, "ndim"):
        similarity = np.asarray(similarity)
    q_pids = np.asarray(query_pids).reshape(-1)
    g_pids = np.asarray(gallery_pids).reshape(-1)
    if similarity.ndim != 2 or similarity.shape != (q_pids.size, g_pids.size):
        raise ValueError(
            f"metrics.retrieval_metrics: similarity has shape {tuple(similarity.shape)}, expected "
            f"(len(query_pids), len(gallery_pids)) = ({q_pids.size}, {g_pids.size})"
        )
    if block_size < 1:
        raise ValueError(f"metrics.retrieval_metrics: block_size must be >= 1, got {block_size}")
    num_q = q_pids.size
    if num_q == 0:
        raise ValueError("metrics.retrieval_metrics: no queries")

    blocks = ((start, _contiguous(similarity[start : start + block_size])) for start in range(0, num_q, block_size))
    return _metrics_over_blocks(blocks, q_pids, g_pids)


def _contiguous(block, tile: int = 256):
    """A row-major copy of a block: sorting the rows of a transposed (strided) view ran 2.5x slower, and numpy's
    own copy of one is cache-bound (8x slower on a busy 2-core host), so it is copied in column tiles."""
    if not isinstance(block, np.ndarray) or block.flags.c_contiguous:
        return np.asarray(block)
    out = np.empty(block.shape, block.dtype)
    for c in range(0, block.shape[1], tile):
        out[:, c : c + tile] = block[:, c : c + tile]
    return out


def _metrics_over_blocks(blocks, q_pids: np.ndarray, g_pids: np.ndarray) -> dict[str, float]:
    """Accumulates R@k, AP and INP over (start row, similarity block) pairs that cover every query once."""
    num_q = q_pids.size
    hits = {k: 0 for k in RANKS}
    ap_sum = 0.0
    inp_sum = 0.0
    for start, block in blocks:
        stop = start + block.shape[0]
        if block.dtype not in (np.float32, np.float64):  # bf16 / ints: sort in float32
            block = block.astype(np.float32)
        qb = q_pids[start:stop]
        rows, ranks, counts = _block_ranks(block, qb, g_pids, start)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # index of each row's first match in ``ranks``
        # k-th match of a row (1-based) sits at ranks[first + k - 1]; precision there is k / rank.
        k = np.arange(ranks.size) - first[rows] + 1
        ap_sum += float(np.sum(np.bincount(rows, weights=k / ranks, minlength=stop - start) / counts))
        last = ranks[first + counts - 1]
        inp_sum += float(np.sum(counts / last))
        best = ranks[first]
        for r in RANKS:
            hits[r] += int(np.sum(best <= r))

    out = {f"R{r}": 100.0 * hits[r] / num_q for r in RANKS}
    out["mAP"] = 100.0 * ap_sum / num_q
    out["mINP"] = 100.0 * inp_sum / num_q
    return out
