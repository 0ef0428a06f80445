"""The evaluation input: a split's gallery (every image once) and queries (every caption), unshuffled, padded to whole
batches with a mask of real rows, so that every process runs the same number of steps.

Images are decoded and resized by `data/images.py` (PIL, in a thread pool), the code search uses too, so an image's
embedding here equals the one `retrieval.Retriever` computes. No tf.data.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from uit_jax.data import images as images_lib
from uit_jax.data import tokenizer as tok_lib

if TYPE_CHECKING:  # prepare.py imports TensorFlow; this module must not (the accelerator image has none)
    from uit_jax.data import prepare as prepare_lib


def shard_rows(n: int, batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    """Row indices (steps, batch_size) of this process, -1 for padding; global step s covers rows
    [s * B * P, (s + 1) * B * P) split by process, so P processes read what one process with B * P would."""
    per_step = batch_size * process_count
    steps = max(1, -(-n // per_step))
    rows = np.arange(steps * per_step).reshape(steps, process_count, batch_size)[:, process_index]
    return np.where(rows < n, rows, -1)


class Batches:
    """A re-iterable sequence of padded batches (each pass reads them afresh)."""

    def __init__(self, make: Callable[[], Iterator[dict]], steps: int):
        self._make, self._steps = make, steps

    def __len__(self):
        return self._steps

    def __iter__(self):
        return iter(self._make())


def make_batches(
    cfg,
    tokenizer,
    data: prepare_lib.Split,
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> tuple[Batches, Batches]:
    """(gallery, queries) of a split, this process's share of each global batch.

    gallery: every image once, in image_id order (`Split.gallery_rows`): images (B, H, W, 3), pid, image_id,
    mask (B,) bool. queries: every caption, in the split's (image_id, caption) order: text (B, L), pid, image_id,
    mask. Padding rows have mask False and pid -1.
    """
    first = data.gallery_rows
    g_pid, g_iid = data.pid[first], data.image_id[first]
    g_rows = shard_rows(len(first), batch_size, process_index, process_count)
    size = tuple(cfg.image_size)

    def gallery():
        with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
            for r in g_rows:
                safe = np.maximum(r, 0)
                pixels, _ = images_lib.load_batch([data.images[i] for i in g_iid[safe]], size, pool=pool)
                yield {
                    "images": images_lib.normalize(pixels),
                    "pid": np.where(r >= 0, g_pid[safe], -1).astype(np.int32),
                    "image_id": np.where(r >= 0, g_iid[safe], -1).astype(np.int32),
                    "mask": r >= 0,
                }

    text = tok_lib.tokenize(tokenizer, list(data.caption), max_len=cfg.text_len)
    q_rows = shard_rows(len(text), batch_size, process_index, process_count)

    def queries():
        for r in q_rows:
            safe = np.maximum(r, 0)
            yield {
                "text": text[safe],
                "pid": np.where(r >= 0, data.pid[safe], -1).astype(np.int32),
                "image_id": np.where(r >= 0, data.image_id[safe], -1).astype(np.int32),
                "mask": r >= 0,
            }

    return Batches(gallery, len(g_rows)), Batches(queries, len(q_rows))
