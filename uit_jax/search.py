"""Search your own photos with a trained model, from the command line.

    python -m uit_jax.search index --model=MODEL --images=FOLDER --out=INDEX [--batch_size=256] [--skip_bad]
                                   [--ann=auto|none|hnsw|ivf|ivfpq] [--ann_options=m=32,ef_search=128]
    python -m uit_jax.search query --index=INDEX --model=MODEL [--k=10] [--html=report.html] "text" ["text" ...]

MODEL is an exported folder (`python -m uit_jax.export`), a training workdir, an IRRA/SEN `best.pth` or a Hugging
Face CLIP id/folder (then --image_size, default 384,128). `index` embeds every jpg/png/webp/bmp under FOLDER
(recursive) with a progress bar, and is resumable: rerunning it adds only the files not yet in INDEX (saved as
INDEX.npz + INDEX.json every few batches). `--ann` adds an approximate FAISS index (INDEX.faiss, `uit_jax.ann`)
that `query` and the server then use; the default, auto, keeps exact search below a million images (and keeps the
kind an index already has). `query` prints the ranked paths and scores per sentence and, with --html, writes a
self-contained report (thumbnails embedded) that any browser opens.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from uit_jax import checkpoint as ckpt_lib
from uit_jax import report, retrieval
from uit_jax.data import images as images_lib


def _size(s: str):
    try:
        h, w = (int(x) for x in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--image_size must be H,W (e.g. 384,128), got {s!r}") from e
    return h, w


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m uit_jax.search", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, help="exported folder, workdir, best.pth or HF CLIP id/folder")
    common.add_argument("--image_size", type=_size, default=None, help="H,W for CLIP weights (default 384,128)")
    common.add_argument("--step", default="best", help="for a workdir: best, latest or a step number")
    common.add_argument("--tokenizer", default="", help="tokenizer id/folder when the model has none (.pth files)")
    ix = sub.add_parser("index", parents=[common], help="embed a folder of images (resumable)")
    ix.add_argument("--images", required=True, help="folder of images (searched recursively)")
    ix.add_argument("--out", required=True, help="index path (writes OUT.npz and OUT.json)")
    ix.add_argument("--batch_size", type=int, default=256)
    ix.add_argument("--skip_bad", action="store_true", help="leave unreadable files out (default: stop, list them)")
    ix.add_argument(
        "--ann",
        default="auto",
        help="approximate index: auto (exact below 1M images; default), none, hnsw, ivf or ivfpq (uit_jax/ann.py)",
    )
    ix.add_argument("--ann_options", default="", help="e.g. m=32,ef_search=128 (hnsw) or nlist=4096,nprobe=256")
    q = sub.add_parser("query", parents=[common], help="rank the indexed images for sentences")
    q.add_argument("--index", required=True, help="index path written by `index`")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--html", default="", help="write a self-contained HTML report here")
    q.add_argument("texts", nargs="+", help="one or more sentences")
    return p.parse_args(argv)


def _load_retriever(a) -> retrieval.Retriever:
    step = ckpt_lib.parse_step(a.step)
    return retrieval.Retriever.load(a.model, image_size=a.image_size, step=step, tokenizer=a.tokenizer)


def cmd_index(a) -> retrieval.Index:
    from uit_jax import ann as ann_lib  # noqa: PLC0415

    options = _options(a.ann_options)  # bad flags fail before anything is embedded
    explicit = ann_lib.resolve_kind(a.ann, 0) if a.ann != "auto" else None
    if options and explicit is None:
        raise ValueError(f"--ann_options={a.ann_options} needs an approximate index: pass --ann=hnsw, ivf or ivfpq.")
    if explicit is not None and set(options) - set(ann_lib.DEFAULTS[explicit]):
        raise ValueError(
            f"--ann_options for {explicit} takes {sorted(ann_lib.DEFAULTS[explicit])}, got {sorted(options)}."
        )
    r = _load_retriever(a)
    base = retrieval._index_base(a.out)
    index = retrieval.Index.load(a.out) if os.path.exists(base + ".json") else None
    if index is not None:
        print(f"resuming {base}: {len(index)} images already indexed", file=sys.stderr)
    had = index.ann.kind if index is not None and index.ann is not None else None
    index = r.index_folder(
        a.images,
        batch_size=a.batch_size,
        index=index,
        skip_bad=a.skip_bad,
        progress=retrieval.progress_bar,
        save_to=a.out,
    )
    if index.skipped:
        print(f"skipped {len(index.skipped)} unreadable file(s): {index.skipped[:5]}", file=sys.stderr)
    # auto keeps the kind an index already has (rebuilt if images were added), else exact below AUTO_MIN images.
    kind = (had or ann_lib.resolve_kind("auto", len(index))) if a.ann == "auto" else explicit
    if kind is not None and (index.ann is None or index.ann.kind != kind or options):
        t0 = time.time()
        index.build_ann(kind, **options)
        print(f"approximate index {index.ann.describe()} built in {time.time() - t0:.1f} s", file=sys.stderr)
        index.save(a.out)
    elif kind is None and had is not None:
        index.ann = None
        index.save(a.out)
    extra = f" / {base}.faiss ({index.ann.describe()})" if index.ann is not None else ""
    print(f"{len(index)} images in {base}.npz / {base}.json{extra}")
    return index


def _options(text: str) -> dict:
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not value.strip().isdigit():
            raise ValueError(f"--ann_options takes key=integer pairs separated by commas, got {item!r}.")
        out[key.strip()] = int(value)
    return out


def cmd_query(a) -> list:
    r = _load_retriever(a)
    index = retrieval.Index.load(a.index)
    if index.model != r.fingerprint:
        raise ValueError(
            f"{a.index} was built with another model ({index.model}; --model gives {r.fingerprint}): query it with "
            "the model that built it, or rebuild the index."
        )
    hits = index.search(r.encode_text(a.texts), k=a.k)
    for text, row in zip(a.texts, hits, strict=True):
        print(f"\n{text}")
        for rank, (path, score) in enumerate(row, 1):
            print(f"  {rank:3d}  {score:.4f}  {path}")
    if a.html:
        rows = [(t, [dict(src=p, name=p, score=s) for p, s in row]) for t, row in zip(a.texts, hits, strict=True)]
        how = "exact" if index.ann is None else f"approximate: {index.ann.describe()}"
        notes = [f"model {a.model}; index {a.index} ({len(index)} images, {how}); top {a.k} per query by cosine score."]
        report.write_html(a.html, rows, title="uit_jax search", notes=notes)
        print(f"\nreport: {os.path.abspath(a.html)}")
    return hits


def main(argv=None):
    a = parse(argv)
    try:
        return cmd_index(a) if a.cmd == "index" else cmd_query(a)
    except (FileNotFoundError, ValueError, images_lib.UnreadableImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
