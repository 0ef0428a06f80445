"""Retrieval metrics at evaluation scale: text-to-image and image-to-text on the same similarity, timed.

    python tools/bench_metrics.py [--queries 19848 --gallery 19848 --ids 1000 --dim 512 --repeats 3]

Defaults are ICFG-PEDES's test split (19,848 captions; the same number of images). Random unit embeddings with an
identity signal; the Evaluator's two calls, `retrieval_metrics(sim, q_pid, g_pid)` (each caption ranks the images)
and `retrieval_metrics(sim.T, g_pid, q_pid)` (each image ranks the captions), alternated `--repeats` times; prints
their medians, the ratio i2t / t2i and the peak resident memory as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

from uit_jax import metrics  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=19848)
    p.add_argument("--gallery", type=int, default=19848)
    p.add_argument("--ids", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.gallery < a.ids:
        raise SystemExit(f"--gallery {a.gallery} must hold every one of the --ids {a.ids} identities")
    rng = np.random.default_rng(0)
    q_pid = rng.integers(0, a.ids, a.queries)
    g_pid = np.concatenate([np.arange(a.ids), rng.integers(0, a.ids, a.gallery - a.ids)])
    signal = 0.6 * rng.standard_normal((a.ids, a.dim), dtype=np.float32)  # each identity a random direction

    def unit(pids):
        z = rng.standard_normal((len(pids), a.dim), dtype=np.float32) + signal[pids]
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    sim = unit(q_pid) @ unit(g_pid).T  # (Q, G)
    times = {"t2i": [], "i2t": []}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        t2i = metrics.retrieval_metrics(sim, q_pid, g_pid)
        times["t2i"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        i2t = metrics.retrieval_metrics(sim.T, g_pid, q_pid)
        times["i2t"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = dict(
        queries=a.queries,
        gallery=a.gallery,
        ids=a.ids,
        t2i_s_median=round(med["t2i"], 3),
        i2t_s_median=round(med["i2t"], 3),
        i2t_over_t2i=round(med["i2t"] / med["t2i"], 3),
        t2i_s=[round(t, 3) for t in times["t2i"]],
        i2t_s=[round(t, 3) for t in times["i2t"]],
        t2i_R1=round(t2i["R1"], 2),
        i2t_R1=round(i2t["R1"], 2),
        peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    )
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
