"""Search benchmark: index throughput (images/s) and query latency of exact search on large galleries.

    python tools/bench_search.py [--model DIR] [--sizes 10000,100000,1000000] [--dim 512] [--queries 1,16]

Index throughput: encodes `--images` synthetic JPEG files (random content, 256x128, so decoding and resizing are
timed too) with `--model` (default: the shipped mini CLIP at 128x64) through `Retriever.index_folder`; the first
batch (compilation) is not counted. Query latency: `retrieval.top_k` (k=10) over random unit-norm galleries of
each size, median of `--repeats` after one warm-up, for each query batch size. Peak resident memory of the process
is reported after each size (the gallery itself is N x dim x 4 bytes).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uit_jax import retrieval  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uit_jax", "assets")
SHIPPED = os.path.join(SHIPPED, "clip-mini-synthetic")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_index(model: str, image_size, n: int, batch: int) -> dict:
    r = retrieval.Retriever.load(model, image_size=image_size)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as warm, tempfile.TemporaryDirectory() as d:
        for folder, count in ((warm, batch), (d, n)):
            for i in range(count):
                img = Image.fromarray(rng.integers(0, 256, (256, 128, 3), dtype=np.uint8))
                img.save(os.path.join(folder, f"{i:06d}.jpg"))
        r.index_folder(warm, batch_size=batch)  # compiles the encoder for this batch shape
        t0 = time.perf_counter()
        index = r.index_folder(d, batch_size=batch)
        dt = time.perf_counter() - t0
    return {"images": len(index), "seconds": dt, "images_per_s": len(index) / dt, "image_size": r.image_size}


def bench_query(n: int, dim: int, q: int, repeats: int, block: int) -> dict:
    rng = np.random.default_rng(n)
    g = rng.standard_normal((n, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    qs = rng.standard_normal((q, dim), dtype=np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)
    t0 = time.perf_counter()
    placed = retrieval.DeviceGallery(g, block)  # what an Index does once
    place_s = time.perf_counter() - t0
    retrieval.top_k(qs, placed, 10)  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        retrieval.top_k(qs, placed, 10)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times))
    return {"gallery": n, "queries": q, "median_s": med, "place_s": place_s, "gallery_gib": g.nbytes / 2**30}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=SHIPPED)
    p.add_argument("--image_size", default="128,64", help="H,W for CLIP weights (an exported folder has its own)")
    p.add_argument("--images", type=int, default=512, help="images to index for the throughput figure (0: skip)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--dim", type=int, default=512, help="embedding width of the random galleries (ViT-B/16: 512)")
    p.add_argument("--queries", default="1,16", help="query batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--block", type=int, default=65536)
    a = p.parse_args(argv)
    import jax  # noqa: PLC0415

    print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    out = {"query": []}
    if a.images:
        size = tuple(int(x) for x in a.image_size.split(","))
        ix = bench_index(a.model, size, a.images, a.batch)
        out["index"] = ix
        print(
            f"index: {ix['images']} JPEG files 256x128 -> {ix['image_size']}, batch {a.batch}: "
            f"{ix['images_per_s']:.1f} images/s ({ix['seconds']:.1f} s)"
        )
    print("| gallery | queries | median latency | placing the gallery (once) | gallery size | peak RSS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in (int(s) for s in a.sizes.split(",")):
        for q in (int(s) for s in a.queries.split(",")):
            r = bench_query(n, a.dim, q, a.repeats, a.block)
            r["peak_rss_gib"] = peak_rss_gib()
            out["query"].append(r)
            print(
                f"| {n:,} x {a.dim} | {q} | {1000 * r['median_s']:.1f} ms | {r['place_s']:.2f} s | "
                f"{r['gallery_gib']:.2f} GiB | {r['peak_rss_gib']:.2f} GiB |"
            )
    return out


if __name__ == "__main__":
    main()
