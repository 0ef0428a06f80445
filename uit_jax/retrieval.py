"""Search with a trained model: encode images and sentences, index a folder of photos, rank it for free text.

    from uit_jax import retrieval
    r = retrieval.Retriever.load("models/synthetic")           # exported folder, workdir, HF CLIP id/folder, .pth
    z_img = r.encode_images(["a.jpg", pil_image, uint8_array])  # unit-norm (N, D) float32
    z_txt = r.encode_text(["a man in a blue jacket"])           # unit-norm (M, D) float32
    index = r.index_folder("photos/", batch_size=256)           # embeddings + paths; index.save(p) / Index.load(p)
    hits = index.search(r.encode_text(["..."]), k=10)           # [[(path, score), ...] per query]

Images are preprocessed by `uit_jax.data.images` (PIL/numpy), the same code the evaluation uses, so an image's
embedding here equals the one `--mode=eval` computes. Search is exact: cosine similarity against every gallery
embedding, blockwise on the accelerator, with the gallery sharded across the local devices when there are several;
an index may also hold an approximate FAISS index (`index.build_ann("hnsw")`, `uit_jax.ann`) for galleries past a
million images, which `search` then uses. No TensorFlow, tfds, CLU or ml_collections is imported.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uit_jax.data import images as images_lib
from uit_jax.data import tokenizer as tok_lib
from uit_jax.models import stacking

DEFAULT_IMAGE_SIZE = (384, 128)


def _unit(z):
    return z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-12)


class Retriever:
    """A CLIP image tower and text tower with their preprocessing; see the module docstring."""

    def __init__(self, model, params, tokenizer, *, image_size, mean, std, name: str = ""):
        self.model = model
        self.params = jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params))
        self.tokenizer = tokenizer
        self.image_size = tuple(int(s) for s in image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = name
        self.text_len = model.config.text_len
        self._enc_img = jax.jit(lambda p, x: _unit(model.apply({"params": p}, x, method=model.encode_image)["embed"]))
        self._enc_txt = jax.jit(lambda p, t: _unit(model.apply({"params": p}, t, method=model.encode_text)["embed"]))

    # ------------------------------------------------------------------------------------------- loading
    @classmethod
    def load(
        cls, source: str, *, image_size: Sequence[int] | None = None, step: str | int = "best", tokenizer: str = ""
    ) -> Retriever:
        """From an exported model folder, a training workdir (checkpoint `step`: best, latest or N), an IRRA/SEN
        `best.pth` (or any CLIP `.pt` / `.pth` state dict), or a Hugging Face CLIP id or folder (zero-shot).

        `image_size` (H, W) is needed only where the source does not record it (CLIP weights: default 384x128).
        `tokenizer` (an id or folder) only where the source has none (IRRA/SEN files: default OpenAI's CLIP BPE).
        """
        from uit_jax import export, rundir  # noqa: PLC0415
        from uit_jax.models import convert, layers  # noqa: PLC0415

        source = os.fspath(source)
        if os.path.isdir(source) and export.is_model_folder(source):
            e = export.load_model(source)
            return cls(e.model, e.params, e.tokenizer, image_size=e.image_size, mean=e.mean, std=e.std, name=source)
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, rundir.MODEL_FILE)):
            return cls._from_workdir(source, step)
        size = tuple(image_size or DEFAULT_IMAGE_SIZE)
        model, params = convert.load(source, image_size=size)
        tok_src = tokenizer or (source if os.path.isdir(source) or not os.path.exists(source) else "")
        tok_src = tok_src or "openai/clip-vit-base-patch16"
        tok = tok_lib.load_tokenizer(tok_src)
        return cls(model, params, tok, image_size=size, mean=layers.CLIP_MEAN, std=layers.CLIP_STD, name=source)

    @classmethod
    def _from_workdir(cls, workdir: str, step) -> Retriever:
        from uit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
        from uit_jax import rundir  # noqa: PLC0415
        from uit_jax.models import clip as clip_lib  # noqa: PLC0415

        desc = rundir.read_model(workdir)
        state = ckpt_lib.read_state(os.path.join(workdir, "checkpoints"), step).state
        config = clip_lib.CLIPConfig(**desc["clip"])
        tok = tok_lib.load_tokenizer(os.path.join(workdir, rundir.TOKENIZER_DIR))
        return cls(
            clip_lib.CLIP(config),
            state["params"]["clip"],
            tok,
            image_size=desc["image_size"],
            mean=desc["mean"],
            std=desc["std"],
            name=workdir,
        )

    # ------------------------------------------------------------------------------------------- encoding
    @property
    def fingerprint(self) -> str:
        """Identifies the weights and preprocessing (an index remembers it, so it is never mixed with another)."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha256()
            # Layer by layer (the layout of checkpoints), so indexes built before the stacked layout still match.
            for x in jax.tree.leaves(stacking.unstack(self.params)):
                h.update(np.asarray(x).tobytes())
            h.update(json.dumps([self.image_size, self.mean, self.std]).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def preprocess(self, pixels_uint8: np.ndarray) -> np.ndarray:
        return images_lib.normalize(pixels_uint8, self.mean, self.std)

    def encode_pixels(self, pixels: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
        """Unit-norm (N, D) float32 embeddings of uint8 RGB pixels (N, H, W, 3) already at the model's image size
        (`image_size`; `encode_images` reads and resizes any source). Normalised here with the model's mean/std."""
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or pixels.shape[1:] != (*self.image_size, 3) or pixels.dtype != np.uint8:
            raise ValueError(
                f"encode_pixels takes uint8 pixels of shape (N, {self.image_size[0]}, {self.image_size[1]}, 3), the "
                f"model's image size; got {pixels.dtype} {pixels.shape}. Resize first, or use encode_images."
            )
        out = []
        for i in range(0, len(pixels), batch_size):
            chunk = pixels[i : i + batch_size]
            n = len(chunk)
            if n < batch_size and i > 0:  # pad the last batch to the compiled shape
                chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._enc_img(self.params, self.preprocess(chunk)))[:n])
        return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)

    def encode_images(self, sources: Sequence, *, batch_size: int = 64, skip_bad: bool = False) -> np.ndarray:
        """Unit-norm (N, D) float32 embeddings of paths, encoded bytes, PIL images or uint8 arrays (any size and
        mode). An unreadable source raises UnreadableImageError listing every bad one (nothing is returned), unless
        skip_bad, which leaves them out (then use `encode_images_kept` to know which)."""
        return self.encode_images_kept(sources, batch_size=batch_size, skip_bad=skip_bad)[0]

    def encode_images_kept(self, sources: Sequence, *, batch_size: int = 64, skip_bad: bool = False):
        """(embeddings, indices of the sources that were read)."""
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            pixels, kept = images_lib.load_batch(list(sources), self.image_size, pool=pool, skip_bad=skip_bad)
        return self.encode_pixels(pixels, batch_size=batch_size), kept

    def encode_text(self, texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
        """Unit-norm (M, D) float32 embeddings of sentences (CLIP BPE, truncated to the model's text length)."""
        if isinstance(texts, str):
            raise TypeError("encode_text takes a list of sentences; wrap a single one in a list.")
        ids = tok_lib.tokenize(self.tokenizer, list(texts), self.text_len)
        return self.encode_token_ids(ids, batch_size=batch_size)

    def encode_token_ids(self, ids: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
        """Unit-norm (M, D) float32 embeddings of token ids (M, text_len), as `tokenizer.tokenize` makes them (the
        end-of-text token, the largest id, is where the text tower pools)."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] != self.text_len or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                f"encode_token_ids takes integer token ids of shape (M, {self.text_len}), the model's text length; "
                f"got {ids.dtype} {ids.shape}. Tokenize with uit_jax.data.tokenizer.tokenize, or use encode_text."
            )
        out = []
        for i in range(0, len(ids), batch_size):
            out.append(np.asarray(self._enc_txt(self.params, ids[i : i + batch_size])))
        return np.concatenate(out) if out else np.zeros((0, self.model.config.embed_dim), np.float32)

    # ------------------------------------------------------------------------------------------- indexing
    def index_folder(
        self,
        folder: str,
        *,
        batch_size: int = 256,
        index: Index | None = None,
        skip_bad: bool = False,
        progress: Callable[[int, int, float], None] | None = None,
        save_to: str | None = None,
        save_every: int = 20,
    ) -> Index:
        """Embeds every image under `folder` (recursive). With `index`, only files not in it are added (resume).

        Unreadable files: UnreadableImageError listing all of them, before anything is embedded, unless skip_bad
        (then they are left out and listed in `index.skipped`). `progress(done, total, images_per_s)` is called
        after each batch; `save_to` saves the index every `save_every` batches (an interrupted run resumes).
        """
        folder = os.path.abspath(folder)
        paths = images_lib.list_images(folder)
        index = index if index is not None else Index.empty(self.model.config.embed_dim, self.fingerprint)
        if index.model != self.fingerprint:
            raise ValueError(
                f"The index was built with another model or preprocessing ({index.model}; this one is "
                f"{self.fingerprint}): build a new index for this model."
            )
        have = set(index.paths)
        todo = [p for p in paths if p not in have]
        if not skip_bad:
            self._check_readable(todo)
        t0, done = time.time(), 0
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for b, i in enumerate(range(0, len(todo), batch_size)):
                chunk = todo[i : i + batch_size]
                pixels, kept = images_lib.load_batch(chunk, self.image_size, pool=pool, skip_bad=True)
                index.add([chunk[k] for k in kept], self.encode_pixels(pixels, batch_size=batch_size))
                index.skipped.extend(p for k, p in enumerate(chunk) if k not in set(kept))
                done += len(chunk)
                if progress is not None:
                    progress(done, len(todo), done / max(time.time() - t0, 1e-9))
                if save_to and (b + 1) % save_every == 0:
                    index.save(save_to)
        if save_to:
            index.save(save_to)
        return index

    @staticmethod
    def _check_readable(paths: Sequence[str]) -> None:
        """Decodes every file once (threads) and raises UnreadableImageError listing all that fail, so that a
        bad file stops the indexing before anything is embedded (PIL's verify() does not read JPEG data)."""

        def bad(p):
            try:
                images_lib.to_rgb(p)
                return None
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt or odd files
                return (p, f"{type(e).__name__}: {e}")

        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            found = [x for x in pool.map(bad, paths) if x is not None]
        if found:
            raise images_lib.UnreadableImageError(found)


@dataclasses.dataclass
class Index:
    """Gallery embeddings (N, D) float32, unit-norm, with their paths; `model` is the Retriever's fingerprint.

    `ann`: an optional approximate index over the same rows (`uit_jax.ann.AnnIndex`), used by `search` and `top_k`
    unless they are asked for exact results; saved beside the exact index (PATH.faiss) and loaded with it."""

    paths: list[str]
    embeddings: np.ndarray
    model: str
    skipped: list[str] = dataclasses.field(default_factory=list)
    ann: object = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, dim: int, model: str) -> Index:
        return cls([], np.zeros((0, dim), np.float32), model)

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, paths: Sequence[str], embeddings: np.ndarray) -> None:
        if len(paths) != len(embeddings):
            raise ValueError(f"{len(paths)} paths but {len(embeddings)} embeddings")
        self.paths.extend(paths)
        self.embeddings = np.concatenate([self.embeddings, np.asarray(embeddings, np.float32)])
        if len(paths):
            self.ann = None  # it no longer covers the gallery: build it again (`search index` does, at the end)

    def build_ann(self, kind: str, **options):
        """Builds the approximate index `kind` ('hnsw', 'ivf', 'ivfpq'; see uit_jax.ann) over the embeddings."""
        from uit_jax import ann as ann_lib  # noqa: PLC0415

        self.ann = ann_lib.AnnIndex.build(self.embeddings, kind, **options)
        return self.ann

    def save(self, path: str) -> None:
        """Writes PATH.npz (embeddings) and PATH.json (paths, model), each atomically, and PATH.faiss when the
        index holds an approximate one (a stale PATH.faiss is removed)."""
        base = _index_base(path)
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        with open(base + ".npz.partial", "wb") as f:
            np.savez(f, embeddings=self.embeddings)
        meta = {"model": self.model, "paths": self.paths, "skipped": self.skipped, "dim": int(self.embeddings.shape[1])}
        if self.ann is not None:
            self.ann.save(base + ".faiss")
            meta["ann"] = self.ann.meta()
        elif os.path.exists(base + ".faiss"):
            os.remove(base + ".faiss")
        with open(base + ".json.partial", "w") as f:
            json.dump(meta, f)
        os.replace(base + ".npz.partial", base + ".npz")
        os.replace(base + ".json.partial", base + ".json")

    @classmethod
    def load(cls, path: str) -> Index:
        base = _index_base(path)
        try:
            with open(base + ".json") as f:
                meta = json.load(f)
            emb = np.load(base + ".npz")["embeddings"]
        except FileNotFoundError as e:
            raise FileNotFoundError(f"No index at {base}.json / {base}.npz ({e.filename} is missing).") from e
        if emb.shape[0] != len(meta["paths"]):
            raise ValueError(
                f"Index {base} is inconsistent: {emb.shape[0]} embeddings for {len(meta['paths'])} paths "
                "(an interrupted write?); rebuild it with `search index`."
            )
        ann = None
        if meta.get("ann"):
            from uit_jax import ann as ann_lib  # noqa: PLC0415

            ann = ann_lib.AnnIndex.load(base + ".faiss", meta["ann"])
            if len(ann) != emb.shape[0]:
                raise ValueError(
                    f"Index {base}: the approximate index holds {len(ann)} rows for {emb.shape[0]} embeddings (an "
                    "interrupted write?); rebuild it with `search index --ann=...`."
                )
        index = cls(list(meta["paths"]), emb.astype(np.float32), meta["model"], list(meta.get("skipped", [])))
        index.ann = ann
        return index

    def top_k(self, queries: np.ndarray, k: int = 10, *, exact: bool = False, block: int = 65536):
        """(scores (Q, k) float32, gallery rows (Q, k) int64), best first: by the approximate index if there is one
        (rows of -1 where it found fewer than k) unless `exact`, else exact blockwise search on the device."""
        queries = np.asarray(queries, np.float32)
        if self.ann is not None and not exact:
            return self.ann.search(queries, min(k, len(self.paths)))
        cached = getattr(self, "_device", None)
        if cached is None or cached[0] != (len(self.paths), block):  # placed once; re-placed after add()
            self._device = cached = ((len(self.paths), block), DeviceGallery(self.embeddings, block))
        return top_k(queries, cached[1], k)

    def search(
        self, queries: np.ndarray, k: int = 10, *, exact: bool = False, block: int = 65536
    ) -> list[list[tuple[str, float]]]:
        """The k best gallery images per query: [[(path, cosine score), ...], ...], best first (exact, or by the
        approximate index when the index has one and not `exact`)."""
        scores, idx = self.top_k(queries, k, exact=exact, block=block)
        return [
            [(self.paths[j], float(s)) for s, j in zip(srow, irow, strict=True) if j >= 0]
            for srow, irow in zip(scores, idx, strict=True)
        ]


def _index_base(path: str) -> str:
    path = os.fspath(path)
    for ext in (".npz", ".json"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


class DeviceGallery:
    """Gallery embeddings placed on the local devices once, in blocks of `block` rows, each block sharded across
    the devices (padded rows are masked out). Queries against it copy nothing but the queries."""

    def __init__(self, gallery: np.ndarray, block: int = 65536):
        n = len(gallery)
        devices = jax.local_devices()
        nd = len(devices)
        self.block = max(nd, (min(block, max(n, 1)) + nd - 1) // nd * nd)
        mesh = jax.sharding.Mesh(np.array(devices), ("g",))
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("g", None))
        self.n, self.blocks = n, []
        for start in range(0, n, self.block):
            chunk = np.asarray(gallery[start : start + self.block], np.float32)
            valid = len(chunk)
            if valid < self.block:
                chunk = np.concatenate([chunk, np.zeros((self.block - valid, chunk.shape[1]), np.float32)])
            self.blocks.append((jax.device_put(chunk, sh), start, valid))

    def __len__(self) -> int:
        return self.n


def top_k(queries: np.ndarray, gallery, k: int, *, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product: (scores (Q, k), gallery indices (Q, k)), best first.

    `gallery` is a (G, D) array or a DeviceGallery (placed once; pass one to query many times). The gallery is
    processed in blocks of `block` rows, each sharded across the local devices, keeping a running top-k: memory is
    O(Q * (block + k)) beyond the gallery itself, whatever its size.
    """
    if not isinstance(gallery, DeviceGallery):
        gallery = DeviceGallery(np.asarray(gallery, np.float32), block)
    k = min(k, len(gallery))
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    q = jnp.asarray(queries, jnp.float32)
    best_s = jnp.full((len(queries), k), -jnp.inf, jnp.float32)
    best_i = jnp.zeros((len(queries), k), jnp.int32)
    for g, start, valid in gallery.blocks:
        best_s, best_i = _merge_block(q, g, best_s, best_i, jnp.int32(start), jnp.int32(valid))
    return np.asarray(best_s), np.asarray(best_i).astype(np.int64)


@jax.jit
def _merge_block(q, g, best_s, best_i, start, valid):
    # (Q, block); full float32 products, not the TF32 / bfloat16 passes GPUs and TPUs use by default, so the scores
    # and the order of near-ties are the CPU's.
    s = jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST)
    col = jnp.arange(g.shape[0], dtype=jnp.int32)
    s = jnp.where(col[None, :] < valid, s, -jnp.inf)
    k = best_s.shape[1]
    bs, bi = jax.lax.top_k(s, min(k, g.shape[0]))
    cat_s = jnp.concatenate([best_s, bs], axis=1)
    cat_i = jnp.concatenate([best_i, bi + start], axis=1)
    top_s, pos = jax.lax.top_k(cat_s, k)
    return top_s, jnp.take_along_axis(cat_i, pos, axis=1)


def progress_bar(done: int, total: int, rate: float) -> None:
    """A one-line progress bar on stderr: done/total, images/s, time left."""
    width = 30
    filled = int(width * done / max(total, 1))
    left = (total - done) / rate if rate > 0 else float("inf")
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images, {rate:.1f} images/s, {left:.0f}s left "
    )
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
