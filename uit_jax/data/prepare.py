"""Preparing a dataset: the tfds builder of a config, generating the synthetic set, building under a lock, and
reading a built split into memory as a `Split`.

Building is safe from several processes on one machine at once (the multi-process CPU runs): a file lock next to
the built dataset lets one process generate and build while the others wait, then reuse it. Generation is atomic
(a temporary sibling folder renamed into place), so a run killed mid-way leaves no half-written set behind.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from uit_jax.data import builders as builders_lib
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


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """A built split in memory, one row per (image, caption) pair, ordered by (image_id, caption index).

    The arrays are read-only by convention. `images` (encoded bytes, indexed by image_id) is None when the split
    was read without them.
    """

    caption: np.ndarray  # (P,) str
    words: np.ndarray  # (P,) lists of str: the caption's words, as tagged at build time
    pos: np.ndarray  # (P,) lists of str: their Penn Treebank tags
    pid: np.ndarray  # (P,) int32, 0..N-1 within the split
    orig_id: np.ndarray  # (P,) int64, the id in the annotation file
    image_id: np.ndarray  # (P,) int32, 0..M-1 within the split
    file_path: np.ndarray  # (P,) str, relative to imgs/
    images: np.ndarray | None  # (M,) encoded image bytes

    def __len__(self) -> int:
        return len(self.caption)

    @functools.cached_property
    def gallery_rows(self) -> np.ndarray:
        """The row of each image's first caption, in image_id order: the evaluation gallery's order."""
        return np.unique(self.image_id, return_index=True)[1]

    @property
    def gallery_paths(self) -> list[str]:
        return [str(p) for p in self.file_path[self.gallery_rows]]

    @property
    def num_images(self) -> int:
        return len(self.gallery_rows)


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


def _ensure_synthetic(cfg) -> str:
    """Generates the synthetic set (and its tokenizer) if absent; returns its tokenizer folder. Callers hold the
    prepare lock."""
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
                _check_manual_dir(cfg.name, manual_dir, builder)
                builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    builder = get_builder(cfg, **builder_kwargs_)  # re-read: another process may have built it
    splits = {name: int(s.num_examples) for name, s in builder.info.splits.items()}
    read = {name: load_split(cfg, name, builder=builder, with_images=False) for name in splits}
    train = read["train"]
    return DatasetInfo(
        num_train_ids=int(train.pid.max()) + 1 if len(train) else 0,
        num_train_pairs=splits["train"],
        splits=splits,
        tokenizer_dir=tok_dir,
        num_images={name: s.num_images for name, s in read.items()},
    )


def _check_manual_dir(name: str, manual_dir: str, builder) -> None:
    """A missing or empty dataset folder, said with where to get the dataset and how to pass its folder (tfds
    would only assert)."""
    if os.path.isdir(manual_dir) and os.listdir(manual_dir):
        return
    what = "does not exist" if not os.path.exists(manual_dir) else "is empty"
    raise builders_lib.DataError(
        f"dataset folder {manual_dir!r} for {name!r} {what}: pass the dataset's folder with "
        "--config.data.manual_dir=DIR (training) or --eval_manual_dir=DIR (cross-domain --mode=eval), or put it "
        f"under $UIT_DATA_ROOT.{builder.MANUAL_DOWNLOAD_INSTRUCTIONS.rstrip()}"
    )


def load_split(cfg, split: str, *, builder=None, with_images: bool = True) -> Split:
    """A built split in memory (see `Split`); `with_images=False` leaves the encoded images out."""
    builder = builder or get_builder(cfg)
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
    ints = {k: np.asarray(cols[k], np.int64)[order] for k in ("pid", "orig_id", "image_id")}
    return Split(
        caption=np.asarray([cols["caption"][i].decode() for i in order], dtype=object),
        words=_object_array([[w.decode() for w in cols["words"][i]] for i in order]),
        pos=_object_array([[t.decode() for t in cols["pos"][i]] for i in order]),
        pid=ints["pid"].astype(np.int32),
        orig_id=ints["orig_id"],
        image_id=ints["image_id"].astype(np.int32),
        file_path=np.asarray([cols["file_path"][i].decode() for i in order], dtype=object),
        images=_object_array([images[i] for i in range(len(images))]) if with_images else None,
    )


def _object_array(items) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr
