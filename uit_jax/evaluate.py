"""Text-to-image retrieval evaluation: embed the gallery and the queries on the mesh, then score on the host.

Batches come padded to whole batches with a `mask` of real rows (every process runs the same number of steps);
embeddings are gathered to every host, padding rows are dropped, and `metrics.retrieval_metrics` ranks the gallery
for each caption in blocks of queries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import jax
import numpy as np
from absl import logging

from uit_jax import metrics as metrics_lib
from uit_jax import sharding


def embed(fn: Callable, params, batches: Iterable[dict], key: str, mesh) -> tuple[np.ndarray, np.ndarray]:
    """Runs `fn(params, batch[key])` over padded batches; returns (embeddings, pids) of the real rows, in order."""
    zs, pids = [], []
    for batch in batches:
        local = {key: batch[key], "pid": batch["pid"], "mask": batch["mask"]}
        g = sharding.host_batch_to_global(local, mesh)
        z = fn(params, g[key])
        z, pid, mask = (sharding.gather_to_host(x) for x in (z, g["pid"], g["mask"]))
        mask = mask.astype(bool)
        zs.append(np.asarray(z, np.float32)[mask])
        pids.append(np.asarray(pid)[mask])
    if not zs:
        raise ValueError(f"The evaluation split produced no {key} batches: is it empty?")
    return np.concatenate(zs), np.concatenate(pids)


def evaluate(
    encode_images, encode_texts, params, gallery: Iterable[dict], queries: Iterable[dict], mesh, *, keep=None
) -> dict:
    """Returns {'R1','R5','R10','mAP','mINP','num_queries','num_gallery','seconds'} for text-to-image retrieval.

    With `keep` (a dict), also stores there the similarity (Q, G) and the query and gallery pids, for reports."""
    t0 = time.time()
    z_img, g_pid = embed(encode_images, params, gallery, "images", mesh)
    z_txt, q_pid = embed(encode_texts, params, queries, "text", mesh)
    sim = z_txt @ z_img.T  # (Q, G) cosine similarity: both sides are unit-norm.
    out = metrics_lib.retrieval_metrics(sim, q_pid, g_pid)
    if keep is not None:
        keep.update(similarity=sim, query_pids=q_pid, gallery_pids=g_pid)
    out = {k: float(v) for k, v in out.items()}
    out.update(num_queries=int(len(q_pid)), num_gallery=int(len(g_pid)), seconds=time.time() - t0)
    logging.info("Evaluated %d queries against %d images in %.1fs", len(q_pid), len(g_pid), out["seconds"])
    return out


def format_table(rows: dict[str, dict]) -> str:
    """A plain-text results table: one row per (split, checkpoint) name."""
    cols = ("R1", "R5", "R10", "mAP", "mINP")
    name_w = max([len("split")] + [len(n) for n in rows])
    lines = [f"{'split':<{name_w}}  " + "  ".join(f"{c:>6}" for c in cols)]
    for name, m in rows.items():
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{m[c]:6.2f}" for c in cols))
    return "\n".join(lines)


def jit_encoders(encode_images, encode_texts, mesh):
    """Jits both encoders with a batch-sharded input and a replicated-params convention left to the caller."""
    bs = sharding.batch_sharding(mesh)
    return (
        jax.jit(encode_images, in_shardings=(None, bs), out_shardings=bs),
        jax.jit(encode_texts, in_shardings=(None, bs), out_shardings=bs),
    )
