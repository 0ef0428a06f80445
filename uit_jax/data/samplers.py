"""Samplers of the training stream: whole epochs of pair indices, each a pure function of (seed, epoch).

Epochs are concatenated into one stream, and global batch s is stream positions [s * global_batch,
(s + 1) * global_batch). Process p takes the p-th 1/process_count of every global batch, so the processes' shares
concatenated in process order are the single-process batch, and a run resumed at step N reads exactly the rows it
would have read.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

SAMPLERS = ("identity", "random")


def identity_rounds(
    pids: np.ndarray, rng: np.random.Generator, ids_per_round: int, pairs_per_id: int
) -> list[list[np.ndarray]]:
    """One epoch of the reference's RandomIdnumSampler, as rounds of chunks (each chunk: pairs of one id).

    Each identity's pairs are shuffled and cut into chunks of k pairs, k drawn from 1..pairs_per_id per
    identity and epoch (an identity with fewer than k pairs is topped up by drawing with replacement; a
    remainder shorter than k is left out this epoch). While at least ids_per_round identities have chunks
    left, a round draws that many distinct identities and takes the next chunk of each.
    """
    by_id: dict[int, list[np.ndarray]] = {}
    for pid in np.unique(pids):
        idxs = np.flatnonzero(pids == pid)
        k = int(rng.integers(1, pairs_per_id + 1))
        if len(idxs) < k:
            idxs = rng.choice(idxs, size=k, replace=True)
        idxs = rng.permutation(idxs)
        by_id[int(pid)] = [idxs[i : i + k] for i in range(0, len(idxs) - k + 1, k)]
    avail = sorted(by_id)
    rounds = []
    while len(avail) >= ids_per_round:
        chosen = rng.choice(len(avail), size=ids_per_round, replace=False)
        rounds.append([by_id[avail[i]].pop(0) for i in chosen])
        avail = [p for p in avail if by_id[p]]
    return rounds


def epoch_order(
    pids: np.ndarray, *, sampler: str, global_batch: int, pairs_per_id: int, seed: int, epoch: int
) -> np.ndarray:
    """Pair indices of one epoch of the training stream: 'identity' (the reference's sampler, `identity_rounds`)
    or 'random' (a permutation of all pairs)."""
    rng = np.random.default_rng([seed, epoch])
    if sampler == "random":
        return rng.permutation(len(pids))
    if sampler == "identity":
        ids_per_round = max(1, global_batch // pairs_per_id)
        if len(np.unique(pids)) < ids_per_round:
            raise ValueError(
                f"identity sampler: a round needs {ids_per_round} identities (global_batch "
                f"{global_batch} // pairs_per_id {pairs_per_id}), the split has {len(np.unique(pids))}"
            )
        rounds = identity_rounds(pids, rng, ids_per_round, pairs_per_id)
        return np.concatenate([c for r in rounds for c in r]).astype(np.int64)
    raise ValueError(f"data.sampler is {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def stream_rows(
    pids: np.ndarray,
    *,
    sampler: str,
    global_batch: int,
    pairs_per_id: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's rows of the stream from global batch `start_step` on, one chunk per epoch:
    (stream positions, pair indices)."""
    local = global_batch // process_count
    skip = start_step * global_batch
    begin, epoch = 0, 0
    while True:
        order = epoch_order(
            pids, sampler=sampler, global_batch=global_batch, pairs_per_id=pairs_per_id, seed=seed, epoch=epoch
        )
        if not len(order):
            raise ValueError("the sampler produced an empty epoch; the training split is too small")
        pos = begin + np.arange(len(order), dtype=np.int64)
        keep = (pos >= skip) & ((pos % global_batch) // local == process_index)
        if keep.any():
            yield pos[keep], order[keep]
        begin += len(order)
        epoch += 1
