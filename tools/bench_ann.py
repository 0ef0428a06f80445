"""ANN benchmark: recall@10 against exact search, latency per query, build time and memory of FAISS indexes.

    python tools/bench_ann.py embed --n 1000000 --out /tmp/uit_real_emb      # real embeddings (resumable, chunked)
    python tools/bench_ann.py bench --data random --n 1000000 --dim 512 --kinds exact,ivf,hnsw
    python tools/bench_ann.py bench --data real --emb /tmp/uit_real_emb --n 1000000 --kinds exact,ivf,hnsw
    python tools/bench_ann.py bench --data random --n 10000000 --dim 512 --kinds ivfpq --stream

`embed` renders synthetic people (`uit_jax.data.synthetic`, four views per identity, in memory: no files) and
embeds them with `--model` (default: the shipped mini CLIP at 128x64, 128-wide embeddings), in chunks of 10,000
saved as they are done, so an interrupted run resumes; the queries are captions of 1,000 gallery identities,
embedded by the text tower (text-to-image queries, as the service gets them).

`bench` builds each index kind on the gallery (random unit vectors, or the `embed` folder), then for each search
setting (IVF nprobe, HNSW efSearch) reports recall@10 against exact top-10 (the fraction of the exact ten found),
the median latency of one query at a time (`--repeats` passes over `--latency_queries` queries) and of a batch,
the build time and the index's own memory (faiss' serialised size) with the process' peak RSS. `--stream` (random
only) never holds the gallery: it is drawn chunk by chunk, added to the index and scored exactly on the fly, for
galleries that do not fit in memory (10M x 512 float32 is 20 GB).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uit_jax", "assets")
SHIPPED = os.path.join(SHIPPED, "clip-mini-synthetic")
CHUNK = 10_000


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# ----------------------------------------------------------------------------------------------- real embeddings
def cmd_embed(a) -> None:
    from uit_jax import retrieval  # noqa: PLC0415
    from uit_jax.data import synthetic as syn  # noqa: PLC0415

    os.makedirs(a.out, exist_ok=True)
    r = retrieval.Retriever.load(a.model, image_size=(128, 64))
    with open(os.path.join(a.out, "meta.json"), "w") as f:
        json.dump({"model": a.model, "fingerprint": r.fingerprint, "seed": a.seed, "views": 4, "chunk": CHUNK}, f)
    qfile = os.path.join(a.out, "queries.npz")
    if not os.path.exists(qfile):
        rng = np.random.default_rng([a.seed, 1])
        pids = np.sort(rng.choice(a.n // 4, 1000, replace=False)) + 1
        caps = [syn.make_caption(_identity(syn, a.seed, p), np.random.default_rng([a.seed, int(p), 8])) for p in pids]
        np.savez(qfile, z=r.encode_text(caps), pids=pids, captions=np.array(caps))
    for c in range(a.n // CHUNK):
        path = os.path.join(a.out, f"chunk_{c:04d}.npy")
        if os.path.exists(path):
            continue
        t0 = time.time()
        pixels = np.empty((CHUNK, 128, 64, 3), np.uint8)
        first = c * CHUNK // 4 + 1  # chunks hold whole identities (CHUNK is a multiple of 4)
        for i in range(CHUNK // 4):
            pid = first + i
            ident, rng = _identity(syn, a.seed, pid), np.random.default_rng([a.seed, pid, 7])
            for v in range(4):
                pixels[4 * i + v] = syn.render_image(ident, rng, 128, 64, "crop")
        z = r.encode_pixels(pixels, batch_size=250)
        np.save(path + ".partial.npy", z.astype(np.float32))
        os.replace(path + ".partial.npy", path)
        print(f"chunk {c}: {CHUNK} images in {time.time() - t0:.1f} s", flush=True)


def _identity(syn, seed: int, pid: int):
    return syn.sample_identity(np.random.default_rng([seed, int(pid)]))


def load_real(folder: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    chunks = sorted(glob.glob(os.path.join(folder, "chunk_*.npy")))[: -(-n // CHUNK)]
    g = np.concatenate([np.load(p) for p in chunks])[:n]
    if len(g) < n:
        raise SystemExit(f"{folder} holds {len(g)} embeddings, fewer than --n {n}: run `embed` further first.")
    q = np.load(os.path.join(folder, "queries.npz"))["z"].astype(np.float32)
    return np.ascontiguousarray(g), q


def random_unit(rng, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ----------------------------------------------------------------------------------------------- measuring
def exact_top10(g: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Ground truth: exact top-10 rows by inner product (numpy, blockwise)."""
    best_s = np.full((len(q), 10), -np.inf, np.float32)
    best_i = np.zeros((len(q), 10), np.int64)
    for start in range(0, len(g), 1 << 18):
        s = q @ g[start : start + (1 << 18)].T
        part = np.argpartition(-s, 10, axis=1)[:, :10]
        cat_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cat_i = np.concatenate([best_i, part + start], 1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
    return best_i


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def latency(fn, q: np.ndarray, n1: int, repeats: int) -> tuple[float, float]:
    """(median seconds of one query at a time, of one query in a batch of 16), after a warm-up."""
    fn(q[:16])
    one = []
    for _ in range(repeats):
        for i in range(min(n1, len(q))):
            t0 = time.perf_counter()
            fn(q[i : i + 1])
            one.append(time.perf_counter() - t0)
    batch = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(q[:16])
        batch.append((time.perf_counter() - t0) / 16)
    return float(np.median(one)), float(np.median(batch))


SWEEP = {
    "hnsw": ("ef_search", (16, 32, 64, 128, 256, 512)),
    "ivf": ("nprobe", (8, 16, 32, 64, 128, 256)),
    "ivfpq": ("nprobe", (8, 16, 32, 64, 128, 256)),
}


def bench_kind(kind, g, q, truth, a, rows, label) -> None:
    from uit_jax import ann as ann_lib  # noqa: PLC0415

    opts = {
        "hnsw": {"m": a.m, "ef_construction": a.ef_construction},
        "ivf": {"nlist": a.nlist},
        "ivfpq": {"nlist": a.nlist, "pq": a.pq},
    }[kind]
    t0 = time.perf_counter()
    index = ann_lib.AnnIndex.build(g, kind, **opts)
    build = time.perf_counter() - t0
    size = _saved_size(index)
    key, values = SWEEP[kind]
    for v in values:
        index.set_search(**{key: v})
        found = index.search(q, 10)[1]
        one, batch = latency(lambda x: index.search(x, 10), q, a.latency_queries, a.repeats)
        rows.append(_row(label, index.describe(), recall(found, truth), one, batch, build, size))


def _saved_size(index) -> int:
    import tempfile  # noqa: PLC0415

    with tempfile.TemporaryDirectory(dir=os.environ.get("UIT_BENCH_TMP", "/tmp")) as d:
        index.save(os.path.join(d, "x.faiss"))
        return os.path.getsize(os.path.join(d, "x.faiss"))


def bench_exact(g, q, truth, a, rows, label) -> None:
    from uit_jax import retrieval  # noqa: PLC0415

    t0 = time.perf_counter()
    placed = retrieval.DeviceGallery(g)
    build = time.perf_counter() - t0
    found = np.concatenate([retrieval.top_k(q[i : i + 64], placed, 10)[1] for i in range(0, len(q), 64)])
    one, batch = latency(lambda x: retrieval.top_k(x, placed, 10), q, a.latency_queries, a.repeats)
    rows.append(_row(label, "exact (uit_jax.retrieval.top_k)", recall(found, truth), one, batch, build, g.nbytes))


def _row(label, kind, rec, one, batch, build, size) -> dict:
    r = {
        "gallery": label,
        "index": kind,
        "recall@10": rec,
        "ms_1": 1000 * one,
        "ms_16": 1000 * batch,
        "build_s": build,
        "index_gib": size / 2**30,
        "peak_rss_gib": peak_rss_gib(),
        "load_1min": os.getloadavg()[0],  # the machine is shared: what else ran while this row was measured
    }
    print(
        f"| {label} | {kind} | {rec:.3f} | {r['ms_1']:.2f} ms | {r['ms_16']:.2f} ms | {build:.1f} s | "
        f"{r['index_gib']:.2f} GiB | {r['peak_rss_gib']:.1f} GiB | {r['load_1min']:.1f} |",
        flush=True,
    )
    return r


def bench_stream(a, rows) -> None:
    """IVF-PQ over a random gallery drawn chunk by chunk: never more than one chunk of vectors in memory."""
    from uit_jax import ann as ann_lib  # noqa: PLC0415

    faiss = ann_lib._faiss()
    rng = np.random.default_rng([a.seed, 2])
    q = random_unit(rng, a.queries, a.dim)
    nlist = a.nlist or ann_lib.default_nlist(a.n)
    t0 = time.perf_counter()
    index = faiss.index_factory(a.dim, f"IVF{nlist},PQ{a.pq}x8", faiss.METRIC_INNER_PRODUCT)
    ann_lib.no_polysemous(index)
    index.train(random_unit(np.random.default_rng([a.seed, 3]), max(10_000, 64 * nlist), a.dim))
    best_s = np.full((len(q), 10), -np.inf, np.float32)
    best_i = np.zeros((len(q), 10), np.int64)
    chunk = 500_000
    for start in range(0, a.n, chunk):
        x = random_unit(np.random.default_rng([a.seed, 4, start]), min(chunk, a.n - start), a.dim)
        index.add(x)
        s = q @ x.T
        part = np.argpartition(-s, 10, axis=1)[:, :10]
        cat_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], 1)
        cat_i = np.concatenate([best_i, part + start], 1)
        top = np.argsort(-cat_s, axis=1, kind="stable")[:, :10]
        best_s, best_i = np.take_along_axis(cat_s, top, 1), np.take_along_axis(cat_i, top, 1)
        del x, s
        print(f"  {start + chunk:,} added, {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    build = time.perf_counter() - t0
    ann = ann_lib.AnnIndex(index, "ivfpq", {"nlist": nlist, "nprobe": 8, "pq": a.pq})
    size = _saved_size(ann)
    for v in SWEEP["ivfpq"][1]:
        ann.set_search(nprobe=v)
        found = ann.search(q, 10)[1]
        one, batch = latency(lambda x: ann.search(x, 10), q, a.latency_queries, a.repeats)
        rows.append(_row(f"random {a.n:,} x {a.dim}", ann.describe(), recall(found, best_i), one, batch, build, size))


def cmd_bench(a) -> list:
    import faiss  # noqa: PLC0415
    import jax  # noqa: PLC0415

    print(
        f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), jax {jax.__version__}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        "| gallery | index | recall@10 | latency, 1 query | per query, batch of 16 | build | index size | peak RSS "
        "| load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    rows: list = []
    if a.stream:
        bench_stream(a, rows)
        return rows
    if a.data == "random":
        rng = np.random.default_rng([a.seed, 0])
        g = random_unit(rng, a.n, a.dim)
        q = random_unit(np.random.default_rng([a.seed, 1]), a.queries, a.dim)
        label = f"random {a.n:,} x {a.dim}"
    else:
        g, q = load_real(a.emb, a.n)
        q = q[: a.queries]
        label = f"real {a.n:,} x {g.shape[1]}"
    truth = exact_top10(g, q)
    for kind in a.kinds.split(","):
        if kind == "exact":
            bench_exact(g, q, truth, a, rows, label)
        else:
            bench_kind(kind, g, q, truth, a, rows, label)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="render and embed synthetic people (chunked, resumable)")
    e.add_argument("--n", type=int, default=1_000_000)
    e.add_argument("--out", required=True)
    e.add_argument("--model", default=SHIPPED)
    e.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="recall, latency, build time and memory of each index kind")
    b.add_argument("--data", choices=("random", "real"), default="random")
    b.add_argument("--emb", default="", help="the `embed` folder (--data real)")
    b.add_argument("--n", type=int, default=1_000_000)
    b.add_argument("--dim", type=int, default=512, help="random galleries only")
    b.add_argument("--queries", type=int, default=200, help="queries for recall (real: at most 1,000)")
    b.add_argument("--latency_queries", type=int, default=50, help="queries timed one at a time, per repeat")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--kinds", default="exact,hnsw,ivf")
    b.add_argument("--m", type=int, default=32, help="HNSW links per node")
    b.add_argument("--ef_construction", type=int, default=64)
    b.add_argument("--nlist", type=int, default=0, help="IVF lists (0: ~4 sqrt(N), a power of two)")
    b.add_argument("--pq", type=int, default=64, help="IVF-PQ bytes per vector")
    b.add_argument("--stream", action="store_true", help="random IVF-PQ without holding the gallery (10M)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", default="", help="also write the rows here")
    a = p.parse_args(argv)
    if a.cmd == "embed":
        return cmd_embed(a)
    rows = cmd_bench(a)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
