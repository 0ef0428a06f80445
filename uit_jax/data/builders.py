"""TFDS builders for CUHK-PEDES, ICFG-PEDES, RSTPReid and the synthetic set, reading the official folders.

One example per (image, caption) pair. Features:
    image          the encoded file, untouched (decoded by the pipeline)
    caption        the caption text as written
    words, pos     the caption split Treebank-style and its Penn Treebank tags (for the key-word filter;
                   computed here, once: NLTK's averaged perceptron tagger, or the synthetic set's lexicon)
    pid            person id for training and evaluation: the split's ids remapped to 0..N-1 in id order
                   (for train, the ID head's class)
    orig_id        the id in the annotation file
    image_id       0..M-1, the image's index within its split (all captions of an image share it)
    caption_index  which caption of the image
    file_path      the image path relative to imgs/

Split rules (as IRRA's datasets/*.py, plus validation where the reference has none):
    CUHK-PEDES  reid_raw.json, key file_path, splits train / val / test.
    RSTPReid    data_captions.json, key img_path, splits train / val / test.
    ICFG-PEDES  ICFG-PEDES.json, key file_path, splits train / test only. Our val split holds out every
                20th training identity (sorted by id: 0th, 20th, ...), about 5% of them (156 of 3102),
                so model selection never looks at test; train keeps the other identities.
                (IRRA/SEN have no ICFG validation set and select on test.)
Bad input is reported all at once: missing folders or files, malformed JSON entries, unknown splits,
unreadable images raise one error listing every offender (entry index, field, path); empty captions are
dropped with a warning that gives their count and where they are.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from uit_jax.data import defaults
from uit_jax.data import synthetic as synth_lib
from uit_jax.data import text as text_lib

log = logging.getLogger(__name__)

ICFG_VAL_EVERY = 20  # every 20th ICFG training identity (by sorted id) forms our validation split


class DataError(ValueError):
    """The dataset folder does not match the official layout; the message lists every offender."""


def _raise_all(title: str, problems: list[str]):
    if problems:
        raise DataError(f"{title}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


MAX_CAPTION_CHARS = 10_000  # the longest real captions are a few hundred characters


def _as_id(x) -> int | None:
    """An identity: an int (or an integral float / numeric string) that fits int64; None otherwise."""
    if isinstance(x, bool):
        return None
    if isinstance(x, float):
        return int(x) if x.is_integer() and abs(x) < 2**63 else None
    if isinstance(x, str) and re.fullmatch(r"[+-]?[0-9]+", x):  # ASCII digits only ('1_000', '٣' are not ids)
        x = int(x)
    if not isinstance(x, int):
        return None
    return x if -(2**63) <= x < 2**63 else None


def _caption_problem(text: str) -> str:
    """Why a caption (or path) cannot be used, or '' when it can."""
    if len(text) > MAX_CAPTION_CHARS:
        return f"{len(text)} characters (at most {MAX_CAPTION_CHARS}; is it a caption?)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text ({e.reason} at position {e.start})"
    return ""


# Each official layout's annotation file(s), to name the layout a folder is in when it is not the one asked for.
_LAYOUT_FILES = {
    "cuhk (CUHK-PEDES)": ("reid_raw.json",),
    "icfg (ICFG-PEDES)": ("ICFG-PEDES.json", "ICFG_PEDES.json"),
    "rstp (RSTPReid)": ("data_captions.json",),
}


def _layout_hint(root: str, wanted: tuple[str, ...]) -> list[str]:
    """A line naming the layout `root` is in when its annotation file is another dataset's, and what to change."""
    for layout, files in _LAYOUT_FILES.items():
        found = [f for f in files if f not in wanted and os.path.isfile(os.path.join(root, f))]
        if found:
            return [
                f"the folder holds {found[0]}: it is in the {layout} layout, not this dataset's ({wanted[0]}); "
                f"name that dataset instead (data.name / eval.dataset {layout.split()[0]!r}) or point manual_dir at "
                "this dataset's own folder"
            ]
    return ["point manual_dir at the dataset's official folder (imgs/ and the annotation file; docs/data.md)"]


def read_annotations(
    root: str, ann_file: str | tuple[str, ...], path_key: str, splits: tuple[str, ...], check_images: bool = True
) -> dict[str, list[dict]]:
    """Validated annotation entries by split: {split: [{'path', 'file_path', 'orig_id', 'captions'}]}.

    `ann_file` may list the names the file goes by (the first that exists is read). Every problem in the folder
    is collected before raising, so one run shows all of them.
    """
    img_dir = os.path.join(root, "imgs")
    names = (ann_file,) if isinstance(ann_file, str) else tuple(ann_file)
    ann_file = next((n for n in names if os.path.exists(os.path.join(root, n))), names[0])
    ann_path = os.path.join(root, ann_file)
    if len(names) > 1 and not os.path.exists(ann_path):
        ann_path = f"{ann_path} (or {' / '.join(names[1:])})"
    missing = [f"missing {p}" for p in (root, img_dir, ann_path) if not os.path.exists(p)]
    if missing and os.path.isdir(root):
        missing += _layout_hint(root, names)
    elif missing:
        missing.append(
            "pass the dataset's folder: --config.data.manual_dir=DIR (training) or --eval_manual_dir=DIR "
            "(cross-domain --mode=eval)"
        )
    _raise_all(f"dataset folder {root!r}", missing)
    try:
        with open(ann_path) as f:
            annos = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{ann_path}: not valid JSON ({e})") from None
    if not isinstance(annos, list):
        raise DataError(f"{ann_path}: expected a JSON list of entries, got {type(annos).__name__}")
    problems, empty = [], []
    out = {s: [] for s in splits}
    for i, a in enumerate(annos):
        where = f"{ann_file} entry {i}"
        if not isinstance(a, dict):
            problems.append(f"{where}: not an object")
            continue
        bad = [k for k in ("split", "captions", path_key, "id") if k not in a]
        if bad:
            problems.append(f"{where}: missing field(s) {bad}")
            continue
        split = a["split"]
        if not isinstance(split, str) or split not in splits:
            problems.append(f"{where}: field 'split' is {split!r:.80}, expected one of {list(splits)}")
            split = None
        orig_id = _as_id(a["id"])
        if orig_id is None:
            problems.append(f"{where}: field 'id' is {a['id']!r:.80}, not an integer identity")
        caps = a["captions"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            problems.append(f"{where}: field 'captions' must be a list of strings, got {caps!r:.80}")
            continue
        bad_caps = [f"caption {j}: {why}" for j, c in enumerate(caps) if (why := _caption_problem(c))]
        if bad_caps:
            problems.append(f"{where}: field 'captions': " + "; ".join(bad_caps))
            continue
        kept = [c for c in caps if c.strip()]
        empty += [f"{where} caption {j}" for j, c in enumerate(caps) if not c.strip()]
        if not kept:
            problems.append(f"{where}: field 'captions' has no non-empty caption")
        rel = a[path_key]
        if not isinstance(rel, str) or not rel or "\x00" in rel or _caption_problem(rel):
            problems.append(f"{where}: field {path_key!r} is {rel!r:.80}, not a path")
            continue
        path = os.path.join(img_dir, rel)
        if not os.path.isfile(path):
            problems.append(f"{where}: field {path_key!r}: image {path} does not exist")
        elif check_images:
            try:  # decode fully: Image.verify() does not read JPEG data, so a truncated file would pass it
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt files
                problems.append(f"{where}: field {path_key!r}: image {path} is unreadable ({e})")
        if split is not None and orig_id is not None and kept:
            out[split].append({"path": path, "file_path": rel, "orig_id": orig_id, "captions": kept})
    _raise_all(f"annotations {ann_path}", problems)
    if empty:
        log.warning("%s: dropped %d empty caption(s): %s", ann_path, len(empty), ", ".join(empty))
    return out


class _PedesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Common reader: subclasses set the annotation file, the path key and the split rule."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}
    ANN_FILE = ""
    PATH_KEY = "file_path"
    FILE_SPLITS: tuple[str, ...] = ("train", "val", "test")
    # Nothing is downloaded, so there are no checksum files to look up. tfds' default lookup goes through
    # `code_path`, which imports the `importlib_resources` backport (not in our pinned environment).
    url_infos = None

    def __init__(self, *, tagger: Callable[[list[str]], list[str]] | None = None, **kwargs):
        """tagger: words -> Penn Treebank tags; default NLTK's perceptron tagger (tests inject one)."""
        self._tagger = tagger
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "caption": tfds.features.Text(),
                    "words": tfds.features.Sequence(tfds.features.Text()),
                    "pos": tfds.features.Sequence(tfds.features.Text()),
                    "pid": np.int32,
                    "orig_id": np.int64,
                    "image_id": np.int32,
                    "caption_index": np.int32,
                    "file_path": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            homepage="https://github.com/anosorae/IRRA",
        )

    def _make_splits(self, by_split: dict[str, list[dict]]) -> dict[str, list[dict]]:
        return by_split

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        by_split = self._make_splits(read_annotations(root, self.ANN_FILE, self.PATH_KEY, self.FILE_SPLITS))
        tagger = self._tagger or text_lib.nltk_tagger()
        return {s: self._generate_examples(entries, tagger) for s, entries in by_split.items()}

    def _generate_examples(self, entries: list[dict], tagger):
        remap = {o: i for i, o in enumerate(sorted({e["orig_id"] for e in entries}))}
        for image_id, e in enumerate(entries):
            for k, cap in enumerate(e["captions"]):
                words = text_lib.split_words(cap)
                yield (
                    f"{image_id:07d}_{k}",
                    {
                        "image": e["path"],
                        "caption": cap,
                        "words": words,
                        "pos": tagger(words),
                        "pid": remap[e["orig_id"]],
                        "orig_id": e["orig_id"],
                        "image_id": image_id,
                        "caption_index": k,
                        "file_path": e["file_path"],
                    },
                )


class CuhkPedes(_PedesBuilder):
    """CUHK-PEDES (Li et al., CVPR 2017): 40,206 images of 13,003 people, two captions each."""

    ANN_FILE = "reid_raw.json"
    PATH_KEY = "file_path"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request CUHK-PEDES from its authors (see "Dataset" in
    https://github.com/ShuangLI59/Person-Search-with-Natural-Language-Description). Put it in manual_dir as
        manual_dir/imgs/{CUHK01,CUHK03,Market,test_query,train_query}/...
        manual_dir/reid_raw.json
            [{"split": "train|val|test", "captions": [...], "file_path": "...", "id": int}, ...]
    """


class IcfgPedes(_PedesBuilder):
    """ICFG-PEDES (Ding et al., 2021): 54,522 images of 4,102 people, one caption each."""

    ANN_FILE = ("ICFG-PEDES.json", "ICFG_PEDES.json")  # IRRA's name, SEN's name
    PATH_KEY = "file_path"
    FILE_SPLITS = ("train", "test")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request ICFG-PEDES from its authors (https://github.com/zifyloo/SSAN, "Dataset"). Put it in manual_dir as
        manual_dir/imgs/{train,test}/...
        manual_dir/ICFG-PEDES.json   (SEN's name, ICFG_PEDES.json, is read too)
            [{"split": "train|test", "captions": [...], "file_path": "...", "id": int}, ...]
    """

    def _make_splits(self, by_split):
        ids = sorted({e["orig_id"] for e in by_split["train"]})
        held = set(ids[::ICFG_VAL_EVERY])
        return {
            "train": [e for e in by_split["train"] if e["orig_id"] not in held],
            "val": [e for e in by_split["train"] if e["orig_id"] in held],
            "test": by_split["test"],
        }


class RstpReid(_PedesBuilder):
    """RSTPReid (Zhu et al., 2021): 20,505 images of 4,101 people, two captions each."""

    ANN_FILE = "data_captions.json"
    PATH_KEY = "img_path"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Request RSTPReid from its authors (https://github.com/NjtechCVLab/RSTPReid-Dataset).
    Put it in manual_dir as
        manual_dir/imgs/*.jpg
        manual_dir/data_captions.json
            [{"split": "train|val|test", "captions": [...], "img_path": "...", "id": int}, ...]
    """


class SyntheticPedes(CuhkPedes):
    """The synthetic set (synthetic.py): CUHK-PEDES layout and reader, tags from the generator's lexicon.

    Pass `config=synthetic_config(spec)` so that sets generated with different parameters do not share a
    cache folder.
    """

    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Generate it: python -m uit_jax.data.synthetic --out MANUAL_DIR (uit_jax.data.prepare.prepare does this).
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("tagger", text_lib.lexicon_tagger(synth_lib.POS_TAGS))
        super().__init__(**kwargs)


def synthetic_config(spec: synth_lib.Spec) -> tfds.core.BuilderConfig:
    """A builder config named after the generation parameters."""
    name = (
        f"t{spec.train_ids}_v{spec.val_ids}_e{spec.test_ids}_i{spec.images_per_id}"
        f"_{spec.height}x{spec.width}_s{spec.seed}_{spec.scene}"
    )
    return tfds.core.BuilderConfig(name=name, description=f"synthetic set {spec}")


# Registered against the one list of datasets (defaults.DATASETS): a name there without a builder fails here.
BUILDERS = {"synthetic": SyntheticPedes, "cuhk": CuhkPedes, "icfg": IcfgPedes, "rstp": RstpReid}
if set(BUILDERS) != set(defaults.DATASETS):
    raise ImportError(f"builders.BUILDERS {sorted(BUILDERS)} != data.defaults.DATASETS {sorted(defaults.DATASETS)}")
