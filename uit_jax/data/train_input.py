"""The training input: this process's share of every global batch, as a tf.data stream.

Rows come from the sampler (`samplers.stream_rows`); every random augmentation of a row is seeded with (run seed,
stream position), so a run resumed at step N, or run with another number of processes, sees exactly the same rows
augmented the same way. The training split is held in memory (encoded images, once per image, and token ids:
CUHK-PEDES is about 0.3 GB). Captions are tokenised once, in full and key-word-filtered form; per step only the
choice between the two and the caption masking are drawn, in TensorFlow.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import tensorflow as tf

from uit_jax.data import augment, samplers
from uit_jax.data import prepare as prepare_lib
from uit_jax.data import text as text_lib


@dataclasses.dataclass(frozen=True)
class Captions:
    """Every training caption tokenised once, in full and cut to its key words (SEN's filter); `content` marks the
    tokens of nouns and adjectives (masked at the higher rate)."""

    ids: np.ndarray  # (P, L) int32
    content: np.ndarray  # (P, L) bool
    keyword_ids: np.ndarray  # (P, L) int32
    keyword_content: np.ndarray  # (P, L) bool


def encode_captions(cfg, tokenizer, data: prepare_lib.Split) -> Captions:
    L = cfg.text_len
    ids, content = text_lib.encode_captions(tokenizer, data.caption, data.words, data.pos, L)
    kept_words, kept_tags = [], []
    for ws, ts in zip(data.words, data.pos):
        kept = [(w, t) for w, t in zip(ws, ts) if t.startswith(text_lib.KEYWORD_PREFIXES)]
        kept_words.append([w for w, _ in kept])
        kept_tags.append([t for _, t in kept])
    # The filtered caption is its kept words joined by spaces, as SEN's filter_sentence writes it.
    k_ids, k_content = text_lib.encode_captions(tokenizer, [" ".join(w) for w in kept_words], kept_words, kept_tags, L)
    return Captions(ids=ids, content=content, keyword_ids=k_ids, keyword_content=k_content)


def make_train_iterator(
    cfg,
    tokenizer,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    data: prepare_lib.Split | None = None,
) -> TrainIterator:
    """This process's share of each global training batch, from step `start_step` on (endless).

    Yields images float32 (b, H, W, 3) normalised; text int32 (b, L); pid int32 (b,) in 0..N-1;
    image_id int32 (b,); with cfg.mlm_outputs also mlm_text, mlm_labels int32 (b, L). b = global_batch //
    process_count. `data` (a `prepare.load_split` result) skips reading the split again.
    """
    if global_batch % process_count:
        raise ValueError(f"global_batch {global_batch} is not divisible by process_count {process_count}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    data = data if data is not None else prepare_lib.load_split(cfg, "train")
    sampler = dict(sampler=cfg.sampler, pairs_per_id=cfg.pairs_per_id, global_batch=global_batch, seed=seed)
    samplers.epoch_order(data.pid, epoch=0, **sampler)  # sampler errors here, not in tf.data's generator thread
    captions = encode_captions(cfg, tokenizer, data)
    stop = threading.Event()

    def rows():
        stream = samplers.stream_rows(
            data.pid, start_step=start_step, process_index=process_index, process_count=process_count, **sampler
        )
        for positions, indices in stream:
            if stop.is_set():
                return
            for pos, i in zip(positions.tolist(), indices.tolist()):
                yield {
                    "pos": pos,
                    "image": data.images[data.image_id[i]],
                    "text": captions.ids[i],
                    "content": captions.content[i],
                    "keyword_text": captions.keyword_ids[i],
                    "keyword_content": captions.keyword_content[i],
                    "pid": data.pid[i],
                    "image_id": data.image_id[i],
                }

    L = cfg.text_len
    signature = {
        "pos": tf.TensorSpec((), tf.int64),
        "image": tf.TensorSpec((), tf.string),
        "text": tf.TensorSpec((L,), tf.int32),
        "content": tf.TensorSpec((L,), tf.bool),
        "keyword_text": tf.TensorSpec((L,), tf.int32),
        "keyword_content": tf.TensorSpec((L,), tf.bool),
        "pid": tf.TensorSpec((), tf.int32),
        "image_id": tf.TensorSpec((), tf.int32),
    }
    ds = tf.data.Dataset.from_generator(rows, output_signature=signature)
    ds = ds.map(_augment_row(cfg, seed, text_lib.mask_token_id(tokenizer)), tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(global_batch // process_count, drop_remainder=True)
    ds = ds.map(_batch_pixels(cfg), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return TrainIterator(ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator(), stop)


def _augment_row(cfg, seed: int, mask_id: int):
    """Per row, from (run seed, stream position) only: decode + resize, the augmentation parameters, the key-word
    caption (p cfg.keyword_prob) and SEN's caption masking."""
    size = tuple(cfg.image_size)
    seed_t = tf.constant(seed, tf.int64)

    def augment_row(row):
        s = tf.random.experimental.stateless_split(tf.stack([seed_t, row["pos"]]), 3)
        out = {"images": augment.decode_resize(row["image"], size), "pid": row["pid"], "image_id": row["image_id"]}
        out.update(augment.draw_params(s[0], size, flip=cfg.flip, pad=cfg.crop_pad, erasing_prob=cfg.erasing_prob))
        use_keywords = tf.random.stateless_uniform([], s[1]) < cfg.keyword_prob
        text = tf.where(use_keywords, row["keyword_text"], row["text"])
        content = tf.where(use_keywords, row["keyword_content"], row["content"])
        out["text"] = text
        if cfg.mlm_masking or cfg.mlm_outputs:
            masked, labels = text_lib.mask_tokens(text, content, s[2], mask_id=mask_id)
            if cfg.mlm_masking:
                out["text"] = masked
            if cfg.mlm_outputs:
                out["mlm_text"], out["mlm_labels"] = masked, labels
        return out

    return augment_row


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
