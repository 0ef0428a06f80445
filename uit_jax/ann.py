"""Approximate nearest-neighbour search for galleries past exact search: FAISS indexes (HNSW, IVF, IVF-PQ) by
inner product over an Index's unit-norm embeddings, built, searched, saved and loaded beside the exact index.

    ann = AnnIndex.build(embeddings, "hnsw")        # or "ivf", "ivfpq"; options: m, ef_search, nlist, nprobe, pq
    scores, idx = ann.search(queries, k=10)         # (Q, k) float32 cosine scores, int64 rows (-1: none found)
    ann.save("INDEX.faiss"); AnnIndex.load("INDEX.faiss", meta)

`retrieval.Index` holds one (`Index.build_ann`, `index.ann`), and then `Index.search` / `Index.top_k` use it;
`python -m uit_jax.search index --ann=...` builds it. Exact search stays the default below `AUTO_MIN` images
(`--ann=auto`); above it, `AUTO_KIND`. The choice and its settings come from tools/bench_ann.py (docs/serving.md).
"""

from __future__ import annotations

import math
import os

import numpy as np

KINDS = ("hnsw", "ivf", "ivfpq")
AUTO_MIN = 1_000_000  # exact search up to about a million images (docs/serving.md: ~0.1 s per query at 1M x 512)
# IVF past a million: at 1M real embeddings its defaults find 0.994 of the exact top-10 (HNSW's 0.981), built in
# half HNSW's time, in two thirds of its memory (docs/serving.md).
AUTO_KIND = "ivf"
# Build and search settings; tools/bench_ann.py measured the recall/latency trade-off that picked them.
DEFAULTS = {
    "hnsw": {"m": 32, "ef_construction": 64, "ef_search": 256},  # ef_search 128: recall 0.944 at 1M
    "ivf": {"nlist": 0, "nprobe": 0},  # 0: nlist ~ 4 sqrt(N) (a power of two), nprobe = nlist / 16
    "ivfpq": {"nlist": 0, "nprobe": 0, "pq": 64},  # pq: bytes per vector (PQ{pq}x8)
}


def _faiss():
    try:
        import faiss  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - faiss-cpu is in requirements.txt
        raise ImportError("Approximate search needs FAISS: pip install faiss-cpu (see requirements.txt).") from e
    return faiss


def no_polysemous(index) -> None:
    """The factory's IVF-PQ trains polysemous codes (for Hamming pre-filtering, which we never use): 17x the
    training time of the codebooks themselves (85 s against 5 s for 6,000 x 32 here)."""
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False


def default_nlist(n: int) -> int:
    """~4 sqrt(N) inverted lists, a power of two, at most N / 39 (FAISS' minimum points per centroid)."""
    want = 1 << max(4, round(math.log2(max(4 * math.sqrt(max(n, 1)), 1))))
    return int(max(1, min(want, n // 39)))


class AnnIndex:
    """A FAISS index over unit-norm embeddings (inner product = cosine), with its kind and settings."""

    def __init__(self, index, kind: str, options: dict):
        self.index, self.kind, self.options = index, kind, dict(options)
        self._apply_search_options()

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, embeddings: np.ndarray, kind: str, *, seed: int = 0, train_size: int = 0, **options) -> AnnIndex:
        """Builds a `kind` index (see KINDS) on (N, D) float32 embeddings. Unknown options are refused.

        IVF kinds train their coarse quantiser (and PQ codebooks) on `train_size` rows drawn at random
        (default: 64 per list, at least 10,000), then add every row."""
        faiss = _faiss()
        if kind not in KINDS:
            raise ValueError(f"Unknown approximate index kind {kind!r}: choose one of {', '.join(KINDS)}.")
        unknown = set(options) - set(DEFAULTS[kind])
        if unknown:
            raise ValueError(
                f"Unknown option(s) {sorted(unknown)} for a {kind} index; it takes {sorted(DEFAULTS[kind])}."
            )
        x = np.ascontiguousarray(embeddings, np.float32)
        n, d = x.shape
        if n == 0:
            raise ValueError("Cannot build an approximate index of an empty gallery.")
        opts = {**DEFAULTS[kind], **options}
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(opts["m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(opts["ef_construction"])
        else:
            opts["nlist"] = int(opts["nlist"]) or default_nlist(n)
            opts["nprobe"] = int(opts["nprobe"]) or max(1, opts["nlist"] // 16)
            if kind == "ivfpq" and d % int(opts["pq"]):
                raise ValueError(f"pq={opts['pq']} must divide the embedding width {d}.")
            spec = f"IVF{opts['nlist']},Flat" if kind == "ivf" else f"IVF{opts['nlist']},PQ{int(opts['pq'])}x8"
            index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
            no_polysemous(index)
            if opts["nlist"] > n:
                raise ValueError(
                    f"nlist={opts['nlist']} inverted lists need at least as many images; the gallery has {n} (use "
                    f"nlist <= {max(1, n // 39)}, or leave it 0 for the default)."
                )
            m = min(n, train_size or max(10_000, 64 * opts["nlist"]))
            rows = np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) if m < n else slice(None)
            index.train(x[rows])
        cls._add(index, x)
        return cls(index, kind, opts)

    @staticmethod
    def _add(index, x: np.ndarray, chunk: int = 1 << 18) -> None:
        for i in range(0, len(x), chunk):  # bounded temporary memory for the assignment of each chunk
            index.add(x[i : i + chunk])

    def add(self, embeddings: np.ndarray) -> None:
        """Adds rows (after the existing ones) without retraining."""
        self._add(self.index, np.ascontiguousarray(embeddings, np.float32))

    # ------------------------------------------------------------------ searching
    def set_search(self, **options) -> None:
        """Changes the search-time settings: ef_search (hnsw) or nprobe (ivf, ivfpq)."""
        allowed = {"hnsw": {"ef_search"}, "ivf": {"nprobe"}, "ivfpq": {"nprobe"}}[self.kind]
        if set(options) - allowed:
            raise ValueError(f"A {self.kind} index takes search options {sorted(allowed)}, got {sorted(options)}.")
        self.options.update({k: int(v) for k, v in options.items()})
        self._apply_search_options()

    def _apply_search_options(self) -> None:
        faiss = _faiss()
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(self.options["ef_search"])
        else:
            faiss.extract_index_ivf(self.index).nprobe = int(self.options["nprobe"])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32, rows (Q, k) int64), best first; rows of -1 where fewer than k were found."""
        q = np.ascontiguousarray(queries, np.float32)
        if self.kind == "hnsw" and k > self.options["ef_search"]:
            self.index.hnsw.efSearch = int(k)  # HNSW returns at most efSearch results
        scores, idx = self.index.search(q, int(k))
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = int(self.options["ef_search"])
        return scores.astype(np.float32), idx.astype(np.int64)

    # ------------------------------------------------------------------ describing, saving
    def __len__(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> str:
        """e.g. 'hnsw (ef_construction=64, ef_search=256, m=32)'."""
        return f"{self.kind} ({', '.join(f'{k}={v}' for k, v in sorted(self.options.items()))})"

    def meta(self) -> dict:
        return {"kind": self.kind, "options": self.options, "size": len(self)}

    def save(self, path: str) -> None:
        """Writes the FAISS index to `path` atomically."""
        _faiss().write_index(self.index, path + ".partial")
        os.replace(path + ".partial", path)

    @classmethod
    def load(cls, path: str, meta: dict) -> AnnIndex:
        """Reads `path` as written by `save`; `meta` is what `meta()` gave (kept in the index's JSON)."""
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"The index's JSON names a {meta.get('kind')} approximate index but {path} is missing: rebuild it "
                "with `python -m uit_jax.search index --ann=...`."
            )
        index = _faiss().read_index(path)
        return cls(index, meta["kind"], meta["options"])


def resolve_kind(kind: str, n: int) -> str | None:
    """--ann's value -> a kind, or None for exact search ('auto': exact below AUTO_MIN images, else AUTO_KIND)."""
    if kind in ("", "none", "exact"):
        return None
    if kind == "auto":
        return AUTO_KIND if n >= AUTO_MIN else None
    if kind not in KINDS:
        raise ValueError(f"--ann must be auto, none, or one of {', '.join(KINDS)}; got {kind!r}.")
    return kind
