"""tf.data pipelines: building the tfds dataset, the training stream, and the eval gallery/query batches.

Training stream. Indices into the training pairs come from a sampler that is a pure function of
(seed, epoch) (`epoch_order`); epochs are concatenated into one stream, and global batch s is stream
positions [s * global_batch, (s + 1) * global_batch). Process p takes the p-th 1/process_count of every
global batch, so the processes' shares concatenated in process order are the single-process batch.
Every random augmentation of a row is seeded with (seed, stream position): a run resumed at step N, or
run with another number of processes, sees exactly the same rows, augmented the same way.

The training split is held in memory (encoded images, once per image, and token ids): CUHK-PEDES is about
0.3 GB. Captions are tokenized once, in full and key-word-filtered form (uit_jax/data/text.py); per step
only the choice between them and the MLM masking are drawn, in TensorFlow.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import logging
import os
import shutil
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from uit_jax.data import augment
from uit_jax.data import builders as builders_lib
from uit_jax.data import images as images_lib
from uit_jax.data import neighbours as neighbours_lib
from uit_jax.data import synthetic as synth_lib
from uit_jax.data import text as text_lib
from uit_jax.data import tokenizer as tok_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know before building the model."""

    num_train_ids: int  # classes of the ID head
    num_train_pairs: int  # (image, caption) pairs in train: one epoch
    splits: dict[str, int]  # (image, caption) pairs per split
    tokenizer_dir: str | None  # synthetic: its own small tokenizer; real sets: None (use the CLIP checkpoint's)
    num_images: dict[str, int] = dataclasses.field(default_factory=dict)  # images per split (gallery sizes)


# ---------------------------------------------------------------------------------------------------------
# Building and reading the tfds dataset.
# ---------------------------------------------------------------------------------------------------------
def _spec(cfg) -> synth_lib.Spec:
    s = cfg.synthetic
    return synth_lib.Spec(
        train_ids=s.train_ids,
        val_ids=s.val_ids,
        test_ids=s.test_ids,
        images_per_id=s.images_per_id,
        height=s.height,
        width=s.width,
        seed=s.seed,
        scene=s.scene,
    )


def get_builder(cfg, **kwargs) -> tfds.core.GeneratorBasedBuilder:
    """The tfds builder named by cfg.name, over cfg.data_dir (synthetic: configured by its spec)."""
    if cfg.name not in builders_lib.BUILDERS:
        raise ValueError(f"data.name is {cfg.name!r}; expected one of {sorted(builders_lib.BUILDERS)}")
    if cfg.name == "synthetic":
        kwargs["config"] = builders_lib.synthetic_config(_spec(cfg))
    data_dir = os.path.expanduser(cfg.data_dir) if cfg.data_dir else None
    return builders_lib.BUILDERS[cfg.name](data_dir=data_dir, **kwargs)


def synthetic_dir(cfg) -> str:
    """Where the synthetic set of this config lives: manual_dir/<sizes and seed>, so that sets of different
    sizes (the tiny test config, the default) sit side by side instead of overwriting each other."""
    return os.path.join(os.path.expanduser(cfg.manual_dir), builders_lib.synthetic_config(_spec(cfg)).name)


def _ensure_synthetic(cfg):
    """Generates the synthetic set (and its tokenizer) if absent; returns its tokenizer folder.

    Atomic: written to a temporary sibling folder, then renamed, so a run killed mid-way leaves no half-written
    set behind (the next run removes the leftover and starts again). Callers hold the prepare lock.
    """
    root = synthetic_dir(cfg)
    want = _spec(cfg)
    have = synth_lib.read_spec(root)
    if have is None:
        if os.path.exists(root):
            raise ValueError(
                f"{root} exists but holds no complete synthetic set written by uit_jax (no {synth_lib.SPEC_FILE}). "
                "Delete the folder; it is regenerated."
            )
        tmp = root + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed generation
        log.info("generating the synthetic set %s in %s", want, root)
        synth_lib.generate(tmp, want)
        tok_lib.write_bpe_tokenizer(synth_lib.VOCABULARY, os.path.join(tmp, "tokenizer"))
        os.rename(tmp, root)
    elif have != want:
        raise ValueError(
            f"{root} holds a synthetic set generated with {have}, but the config asks for {want}. "
            "Delete the folder (it is regenerated) or set data.manual_dir to another one."
        )
    tok_dir = os.path.join(root, "tokenizer")
    if not os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):  # a set generated before the tokenizer was
        tmp = tok_dir + ".partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tok_lib.write_bpe_tokenizer(synth_lib.VOCABULARY, tmp)
        shutil.rmtree(tok_dir, ignore_errors=True)
        os.rename(tmp, tok_dir)
    return tok_dir


def builder_kwargs(cfg) -> dict:
    """The builder's POS tagger from cfg.tagger ('' keeps the dataset's default: NLTK, or the synthetic lexicon)."""
    tagger = text_lib.make_tagger(cfg.tagger)
    return {} if tagger is None else {"tagger": tagger}


def check_ready(cfg) -> None:
    """Fails in seconds, before any dataset work, on what the build would need and lacks (the NLTK data)."""
    if cfg.name == "synthetic" or get_builder(cfg).is_prepared():
        return
    builder_kwargs(cfg) or text_lib.nltk_tagger()  # a built set needs no tagger; an unbuilt one does


def prepare(cfg, **builder_kwargs_) -> DatasetInfo:
    """Makes sure the tfds dataset is built (first generating the synthetic set), and describes it.

    Safe to call from several processes on one machine at once (the multi-process CPU runs): a file lock
    next to the built dataset lets one process generate and build while the others wait, then reuse it.
    The POS tagger is cfg.tagger's unless `builder_kwargs_` gives one (tests).
    """
    builder_kwargs_ = {**builder_kwargs(cfg), **builder_kwargs_}
    builder = get_builder(cfg, **builder_kwargs_)
    lock_dir = os.path.dirname(os.fspath(builder.data_dir))  # <data_dir>/<name>[/<config>]
    os.makedirs(lock_dir, exist_ok=True)
    with open(os.path.join(lock_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            tok_dir = _ensure_synthetic(cfg) if cfg.name == "synthetic" else None
            manual_dir = synthetic_dir(cfg) if cfg.name == "synthetic" else os.path.expanduser(cfg.manual_dir)
            if not builder.is_prepared():
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    builder = get_builder(cfg, **builder_kwargs_)  # re-read: another process may have built it
    train = load_split(cfg, "train", builder=builder, with_images=False)
    splits = {name: int(s.num_examples) for name, s in builder.info.splits.items()}
    num_images = {}
    for name in splits:
        data = train if name == "train" else load_split(cfg, name, builder=builder, with_images=False)
        num_images[name] = int(len(np.unique(data["image_id"])))
    return DatasetInfo(
        num_train_ids=int(train["pid"].max()) + 1 if len(train["pid"]) else 0,
        num_train_pairs=splits["train"],
        splits=splits,
        tokenizer_dir=tok_dir,
        num_images=num_images,
    )


_SPLIT_CACHE: dict[tuple, dict[str, np.ndarray]] = {}
_SPLIT_CACHE_SIZE = 4  # train, val, test and one more: the trainer evaluates the same splits again and again


def load_split(cfg, split: str, *, builder=None, with_images: bool = True) -> dict[str, np.ndarray]:
    """A built split in memory, ordered by (image_id, caption_index). Treat the arrays as read-only.

    Returns arrays over pairs: caption (str), words / pos (object arrays of str lists), pid, orig_id,
    image_id; and if with_images, images: object array of encoded bytes indexed by image_id.
    Recently read splits are kept (keyed by the built dataset's folder), so periodic evaluation does not
    read the files again.
    """
    builder = builder or get_builder(cfg)
    key = (os.fspath(builder.data_dir), split, with_images)
    if key not in _SPLIT_CACHE:
        if len(_SPLIT_CACHE) >= _SPLIT_CACHE_SIZE:
            _SPLIT_CACHE.pop(next(iter(_SPLIT_CACHE)))  # oldest first
        _SPLIT_CACHE[key] = _read_split(builder, split, with_images)
    return _SPLIT_CACHE[key]


def _read_split(builder, split: str, with_images: bool) -> dict[str, np.ndarray]:
    if split not in builder.info.splits:
        raise ValueError(f"split {split!r} not in dataset {builder.name}; it has {sorted(builder.info.splits)}")
    ds = builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})
    if not with_images:
        ds = ds.map(lambda e: {k: v for k, v in e.items() if k != "image"})
    cols = {k: [] for k in ("caption", "words", "pos", "pid", "orig_id", "image_id", "caption_index", "file_path")}
    images = {}
    for e in ds.as_numpy_iterator():
        for k in cols:
            cols[k].append(e[k])
        if with_images:
            images[int(e["image_id"])] = e["image"]
    order = np.lexsort((np.asarray(cols["caption_index"]), np.asarray(cols["image_id"])))
    out = {
        "caption": np.asarray([cols["caption"][i].decode() for i in order], dtype=object),
        "file_path": np.asarray([cols["file_path"][i].decode() for i in order], dtype=object),
        "words": _object_array([[w.decode() for w in cols["words"][i]] for i in order]),
        "pos": _object_array([[t.decode() for t in cols["pos"][i]] for i in order]),
    }
    for k in ("pid", "orig_id", "image_id"):
        out[k] = np.asarray(cols[k])[order].astype(np.int32 if k != "orig_id" else np.int64)
    if with_images:
        out["images"] = _object_array([images[i] for i in range(len(images))])
    return out


def _object_array(items) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


# ---------------------------------------------------------------------------------------------------------
# Samplers: whole epochs of pair indices, from (seed, epoch) alone.
# ---------------------------------------------------------------------------------------------------------
def _draw_groups(
    neighbours: dict[int, np.ndarray], avail: list[int], rng: np.random.Generator, size: int, group: int
) -> list[int]:
    """`size` distinct identities of `avail`, drawn as groups: a random seed identity, then up to group - 1 of its
    caption neighbours (nearest first) that are in `avail` and not drawn yet."""
    pool, taken, picked = set(avail), set(), []
    for i in rng.permutation(len(avail)):
        if avail[i] in taken:
            continue
        free = [int(nb) for nb in neighbours.get(avail[i], ()) if int(nb) in pool and int(nb) not in taken]
        members = ([avail[i]] + free[: group - 1])[: size - len(picked)]
        taken.update(members)
        picked.extend(members)
        if len(picked) == size:
            break
    return picked


def identity_rounds(
    pids: np.ndarray,
    rng: np.random.Generator,
    ids_per_round: int,
    pairs_per_id: int,
    neighbours: dict[int, np.ndarray] | None = None,
    group: int = 1,
) -> list[list[np.ndarray]]:
    """One epoch of the reference's RandomIdnumSampler, as rounds of chunks (each chunk: pairs of one id).

    Each identity's pairs are shuffled and cut into chunks of k pairs, k drawn from 1..pairs_per_id per
    identity and epoch (an identity with fewer than k pairs is topped up by drawing with replacement; a
    remainder shorter than k is left out this epoch). While at least ids_per_round identities have chunks
    left, a round draws that many distinct identities and takes the next chunk of each. With `neighbours`
    (pid -> caption-neighbour pids, nearest first) and group > 1, a round draws groups of up to `group`
    neighbouring identities instead of independent ones (the `neighbours` sampler).
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
        if neighbours is not None and group > 1:
            picked = _draw_groups(neighbours, avail, rng, ids_per_round, group)
        else:
            chosen = rng.choice(len(avail), size=ids_per_round, replace=False)
            picked = [avail[i] for i in chosen]
        rounds.append([by_id[p].pop(0) for p in picked])
        avail = [p for p in avail if by_id[p]]
    return rounds


SAMPLERS = ("identity", "neighbours", "random")


def epoch_order(
    pids: np.ndarray,
    *,
    sampler: str,
    global_batch: int,
    pairs_per_id: int,
    seed: int,
    epoch: int,
    neighbours: dict[int, np.ndarray] | None = None,
    group: int = 1,
) -> np.ndarray:
    """Pair indices of one epoch of the training stream ('neighbours' needs the caption neighbours)."""
    rng = np.random.default_rng([seed, epoch])
    if sampler == "random":
        return rng.permutation(len(pids))
    if sampler in ("identity", "neighbours"):
        ids_per_round = max(1, global_batch // pairs_per_id)
        if len(np.unique(pids)) < ids_per_round:
            raise ValueError(
                f"{sampler} sampler: a round needs {ids_per_round} identities (global_batch "
                f"{global_batch} // pairs_per_id {pairs_per_id}), the split has {len(np.unique(pids))}"
            )
        if sampler == "neighbours" and neighbours is None:
            raise ValueError("neighbours sampler: no caption neighbours given (data.neighbour_group needs them)")
        if sampler == "identity":
            neighbours = None
        rounds = identity_rounds(pids, rng, ids_per_round, pairs_per_id, neighbours, group)
        return np.concatenate([c for r in rounds for c in r]).astype(np.int64)
    raise ValueError(f"data.sampler is {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def sampler_neighbours(cfg, data) -> dict[int, np.ndarray] | None:
    """pid -> caption-neighbour pids (nearest first) when the 'neighbours' sampler is on, else None."""
    if cfg.sampler != "neighbours":
        return None
    group = int(cfg.neighbour_group)
    if group < 2:
        raise ValueError(f"data.neighbour_group is {group}; the neighbours sampler needs groups of at least 2")
    ids, nb = neighbours_lib.caption_neighbours(data["caption"], data["pid"], k=4 * group)
    return {int(i): row for i, row in zip(ids, nb)}


def stream_rows(
    pids: np.ndarray,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    **sampler_kw,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """This process's rows of the stream from global batch `start_step` on, as (positions, indices) chunks.
    `sampler_kw`: epoch_order's sampler settings (sampler, pairs_per_id, and neighbours, group if any)."""
    local = global_batch // process_count
    skip = start_step * global_batch
    begin, epoch = 0, 0
    while True:
        order = epoch_order(pids, global_batch=global_batch, seed=seed, epoch=epoch, **sampler_kw)
        if not len(order):
            raise ValueError("the sampler produced an empty epoch; the training split is too small")
        pos = begin + np.arange(len(order), dtype=np.int64)
        keep = (pos >= skip) & ((pos % global_batch) // local == process_index)
        if keep.any():
            yield pos[keep], order[keep]
        begin += len(order)
        epoch += 1


# ---------------------------------------------------------------------------------------------------------
# Training iterator.
# ---------------------------------------------------------------------------------------------------------
def _encode_train_text(cfg, tokenizer, data):
    L = cfg.text_len
    ids, content = text_lib.encode_captions(tokenizer, data["caption"], data["words"], data["pos"], L)
    fw, ft = [], []
    for ws, ts in zip(data["words"], data["pos"]):
        kept = [(w, t) for w, t in zip(ws, ts) if t.startswith(text_lib.KEYWORD_PREFIXES)]
        fw.append([w for w, _ in kept])
        ft.append([t for _, t in kept])
    # The filtered caption is its kept words joined by spaces, as SEN's filter_sentence writes it.
    fids, fcontent = text_lib.encode_captions(tokenizer, [" ".join(w) for w in fw], fw, ft, L)
    return ids, content, fids, fcontent


def make_train_iterator(
    cfg,
    tokenizer,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data: dict | None = None,
) -> TrainIterator:
    """This process's share of each global training batch, from step `start_step` on (endless).

    Yields images float32 (b, H, W, 3) normalised; text int32 (b, L); pid int32 (b,) in 0..N-1;
    image_id int32 (b,); with cfg.mlm_outputs also mlm_text, mlm_labels int32 (b, L). b = global_batch //
    process_count. `data` (a load_split result) skips reading the split again.
    """
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    data = data if data is not None else load_split(cfg, "train")
    # Sampler errors surface here rather than inside tf.data's generator thread.
    sampler_kw = dict(sampler=cfg.sampler, pairs_per_id=cfg.pairs_per_id)
    neighbours = sampler_neighbours(cfg, data)
    if neighbours is not None:
        sampler_kw.update(neighbours=neighbours, group=int(cfg.neighbour_group))
    epoch_order(data["pid"], global_batch=global_batch, seed=seed, epoch=0, **sampler_kw)
    stop = threading.Event()
    rows, signature = _row_source(
        cfg, tokenizer, data, stop, global_batch=global_batch, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count, sampler_kw=sampler_kw,
    )  # fmt: skip
    ds = tf.data.Dataset.from_generator(rows, output_signature=signature)
    ds = ds.map(_augment_row(cfg, seed, text_lib.mask_token_id(tokenizer)), tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    ds = ds.map(_batch_pixels(cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return TrainIterator(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), stop)


def _row_source(
    cfg, tokenizer, data, stop, *, global_batch, seed, start_step, process_index, process_count, sampler_kw
):
    """The sampler's rows for this process as a generator of (position, encoded image, captions, pid, image id),
    and its tf.data signature. Captions are tokenised once here (full and key-word versions)."""
    ids, content, fids, fcontent = _encode_train_text(cfg, tokenizer, data)
    images, pids, image_ids = data["images"], data["pid"], data["image_id"]

    def rows():
        for pos, idx in stream_rows(
            pids,
            global_batch=global_batch,
            seed=seed,
            start_step=start_step,
            process_index=process_index,
            process_count=process_count,
            **sampler_kw,
        ):
            if stop.is_set():
                return
            for p, i in zip(pos.tolist(), idx.tolist()):
                yield p, images[image_ids[i]], ids[i], content[i], fids[i], fcontent[i], pids[i], image_ids[i]

    L = cfg.text_len
    signature = (
        tf.TensorSpec((), tf.int64),
        tf.TensorSpec((), tf.string),
        tf.TensorSpec((L,), tf.int32),
        tf.TensorSpec((L,), tf.bool),
        tf.TensorSpec((L,), tf.int32),
        tf.TensorSpec((L,), tf.bool),
        tf.TensorSpec((), tf.int32),
        tf.TensorSpec((), tf.int32),
    )
    return rows, signature


def _augment_row(cfg, seed: int, mask_id: int):
    """Per row, from (run seed, stream position) only: decode + resize, the augmentation parameters, the key-word
    caption (p cfg.keyword_prob) and SEN's caption masking."""
    size = tuple(cfg.image_size)
    seed_t = tf.constant(seed, tf.int64)

    def one(pos, image, text, cont, ftext, fcont, pid, image_id):
        s = tf.random.experimental.stateless_split(tf.stack([seed_t, pos]), 3)
        out = {"images": augment.decode_resize(image, size), "text": text, "pid": pid, "image_id": image_id}
        out.update(augment.draw_params(s[0], size, flip=cfg.flip, pad=cfg.crop_pad, erasing_prob=cfg.erasing_prob))
        use_f = tf.random.stateless_uniform([], s[1]) < cfg.keyword_prob
        text = tf.where(use_f, ftext, text)
        cont = tf.where(use_f, fcont, cont)
        out["text"] = text
        if cfg.mlm_masking or cfg.mlm_outputs:
            masked, labels = text_lib.mask_tokens(text, cont, s[2], mask_id=mask_id)
            if cfg.mlm_masking:
                out["text"] = masked
            if cfg.mlm_outputs:
                out["mlm_text"], out["mlm_labels"] = masked, labels
        return out

    return one


def _batch_pixels(cfg):
    """The pixel work, batched (flip, pad-crop, normalise, erase): XLA fuses it into one pass, ~3x less CPU than
    per row."""

    @tf.function(jit_compile=True)
    def pixels(b):
        b = dict(b)
        imgs = augment.flip_pad_crop(b.pop("images"), b.pop("flip"), b.pop("offset"), cfg.crop_pad)
        b["images"] = augment.normalize_erase(imgs, b.pop("erase"), cfg.erasing_fill)
        return b

    return pixels


class TrainIterator:
    """The endless training stream; `close()` (or leaving a `with` block) stops it promptly.

    Dropping a running tf.data iterator that reads a Python generator blocks for up to a minute in TensorFlow's
    destructor (it waits on the generator's thread). `close()` ends the generator at its next round, drains what
    is already in flight, and only then releases the iterator.
    """

    def __init__(self, it, stop: threading.Event):
        self._it, self._stop = it, stop

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        return next(self._it)

    def close(self) -> None:
        if self._it is None:
            return
        self._stop.set()
        for _ in self._it:  # the in-flight rounds; then the generator's end reaches us
            pass
        self._it = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------------
# Eval iterators.
# ---------------------------------------------------------------------------------------------------------
def _shard_rows(n: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Row indices (steps, batch_size) of this process, -1 for padding; global step s covers rows
    [s * B * P, (s + 1) * B * P) split by process, so P processes read what one process with B * P would."""
    per_step = batch_size * process_count
    steps = max(1, -(-n // per_step))
    rows = np.arange(steps * per_step).reshape(steps, process_count, batch_size)[:, process_index]
    return np.where(rows < n, rows, -1)


class _EvalBatches:
    """A re-iterable sequence of eval batches (each pass builds a fresh tf.data pipeline)."""

    def __init__(self, make, steps: int):
        self._make, self._steps = make, steps

    def __len__(self):
        return self._steps

    def __iter__(self):
        return iter(self._make())


def make_eval_iterators(
    cfg,
    tokenizer,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    data: dict | None = None,
) -> tuple[Iterable[dict], Iterable[dict]]:
    """(gallery, queries) of a split, unshuffled and padded to whole batches.

    gallery: every image once, in image_id order: images (B, H, W, 3), pid, image_id, mask (B,) bool.
    queries: every caption, in (image_id, caption) order: text (B, L), pid, image_id, mask.
    Padding rows have mask False and pid -1. Every process runs the same number of steps.
    """
    data = data if data is not None else load_split(cfg, split)
    first = np.unique(data["image_id"], return_index=True)[1]  # a pair of each image, in image_id order
    g_pid, g_iid = data["pid"][first], data["image_id"][first]
    g_rows = _shard_rows(len(first), batch_size, process_index, process_count)
    size = tuple(cfg.image_size)
    images = data["images"]

    def gallery():
        # Decoded and resized by uit_jax.data.images (PIL), exactly as uit_jax.retrieval does for search.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for r in g_rows:
                safe = np.maximum(r, 0)
                pixels, _ = images_lib.load_batch([images[i] for i in g_iid[safe]], size, pool=pool)
                yield {
                    "images": images_lib.normalize(pixels),
                    "pid": np.where(r >= 0, g_pid[safe], -1).astype(np.int32),
                    "image_id": np.where(r >= 0, g_iid[safe], -1).astype(np.int32),
                    "mask": r >= 0,
                }

    text = tok_lib.tokenize(tokenizer, list(data["caption"]), max_len=cfg.text_len)
    q_rows = _shard_rows(len(text), batch_size, process_index, process_count)

    def queries():
        for r in q_rows:
            safe = np.maximum(r, 0)
            yield {
                "text": text[safe],
                "pid": np.where(r >= 0, data["pid"][safe], -1).astype(np.int32),
                "image_id": np.where(r >= 0, data["image_id"][safe], -1).astype(np.int32),
                "mask": r >= 0,
            }

    return _EvalBatches(gallery, len(g_rows)), _EvalBatches(queries, len(q_rows))
