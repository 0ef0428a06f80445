"""Evaluation you can look at: per-query rankings (JSON lines), HTML reports with embedded thumbnails, and a
picture of a few ranked queries for TensorBoard. numpy/PIL only (no TensorFlow).

`WORKDIR/eval/<split>_rankings.jsonl` has one line per query: caption, true pid, the top-10 gallery paths, pids and
scores, the rank and path of the first correct image and the query's average precision (the same AP that `metrics`
averages into mAP). `WORKDIR/eval/<split>_report.html` starts with the error analysis (the share of queries whose
first correct image is at rank 1, 2-5, 6-10 and beyond 10, and the queries the model gets most wrong, each beside
the image it should have found), then shows a sample of queries (the best, the median and the worst by AP), each
with its top-10 in green (correct) or red (wrong) frames, in the style of IRRA's visualize.py.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from uit_jax import metrics as metrics_lib
from uit_jax.data import images as images_lib

GREEN, RED, GREY = (26, 156, 58), (221, 34, 34), (200, 200, 200)
# Where a query's first correct image lands: (label, first rank, last rank or None for no bound).
RANK_BUCKETS = (("1", 1, 1), ("2-5", 2, 5), ("6-10", 6, 10), (">10", 11, None))


def rankings(
    similarity: np.ndarray,
    query_pids: np.ndarray,
    gallery_pids: np.ndarray,
    captions: Sequence[str],
    gallery_paths: Sequence[str],
    *,
    k: int = 10,
    block: int = 1024,
) -> list[dict]:
    """One dict per query: caption, pid, top-k gallery paths / pids / scores, first_correct_rank (1-based), the path
    of that first correct image and its score (first_correct_path, first_correct_score) and ap."""
    q_pids, g_pids = np.asarray(query_pids), np.asarray(gallery_pids)
    k = min(k, len(g_pids))
    by_pid = {int(p): np.flatnonzero(g_pids == p) for p in np.unique(g_pids)}
    out = []
    for start in range(0, len(q_pids), block):
        sim = np.asarray(similarity[start : start + block], np.float32)
        # Ranks of the matches without an argsort of the gallery (metrics' sort + binary search).
        rows, ranks, counts = metrics_lib._block_ranks(sim, q_pids[start : start + block], g_pids, start)
        bounds = np.concatenate([[0], np.cumsum(counts)])
        # Top-k: every item scoring at least the k-th best (a partition finds that score; an argpartition alone
        # would pick among items tied at the boundary arbitrarily), sorted by descending score, ties by index.
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1]
        for r in range(len(sim)):
            mine = ranks[bounds[r] : bounds[r + 1]]
            # The first correct image: among the query's matches, the one at the best rank (ties: lowest index).
            matches = by_pid[int(q_pids[start + r])]
            first = matches[np.lexsort((matches, -sim[r, matches]))[0]]
            ap = float(np.mean(np.arange(1, len(mine) + 1) / mine))
            cand = np.flatnonzero(sim[r] >= kth[r])
            top = cand[np.lexsort((cand, -sim[r, cand]))[:k]]
            qi = start + r
            out.append(
                {
                    "query": qi,
                    "caption": str(captions[qi]),
                    "pid": int(q_pids[qi]),
                    "top_paths": [str(gallery_paths[j]) for j in top],
                    "top_pids": [int(g_pids[j]) for j in top],
                    "top_scores": [round(float(sim[r, j]), 6) for j in top],
                    "first_correct_rank": int(mine[0]),
                    "first_correct_path": str(gallery_paths[first]),
                    "first_correct_score": round(float(sim[r, first]), 6),
                    "ap": round(ap, 6),
                }
            )
    return out


def sample(ranked: list[dict], n: int = 4) -> list[tuple[str, dict]]:
    """n best, n around the median and n worst queries by AP (ties by query order), labelled."""
    order = sorted(range(len(ranked)), key=lambda i: (-ranked[i]["ap"], ranked[i]["query"]))
    mid = max(0, len(order) // 2 - n // 2)
    picks = [("best", order[:n]), ("median", order[mid : mid + n]), ("worst", order[-n:][::-1])]
    seen, out = set(), []
    for label, idx in picks:
        for i in idx:
            if i not in seen:
                seen.add(i)
                out.append((label, ranked[i]))
    return out


def rank_buckets(ranked: list[dict]) -> dict[str, float]:
    """Percent of queries whose first correct image is at rank 1, 2-5, 6-10 and beyond 10 (they sum to 100)."""
    first = np.asarray([q["first_correct_rank"] for q in ranked])
    out = {}
    for label, lo, hi in RANK_BUCKETS:
        inside = (first >= lo) & (first <= hi if hi is not None else True)
        out[label] = round(100.0 * float(np.mean(inside)), 4) if len(first) else 0.0
    return out


def most_wrong(ranked: list[dict], n: int = 10) -> list[dict]:
    """The n queries the model gets most wrong: the latest first correct image, then the lowest AP."""
    return sorted(ranked, key=lambda q: (-q["first_correct_rank"], q["ap"], q["query"]))[:n]


def thumbnail(src, height: int = 128, frame: tuple[int, int, int] | None = None) -> Image.Image:
    """A PIL thumbnail `height` high of any image source (path, bytes, PIL, uint8 array), optionally framed."""
    im = Image.fromarray(images_lib.to_rgb(src))
    w = max(1, round(im.width * height / im.height))
    im = im.resize((w, height), Image.BILINEAR)
    if frame is not None:
        d = ImageDraw.Draw(im)
        for t in range(3):
            d.rectangle([t, t, w - 1 - t, height - 1 - t], outline=frame)
    return im


def data_uri(src, height: int = 128) -> str:
    buf = io.BytesIO()
    thumbnail(src, height).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(path: str, rows, *, title: str, notes: Sequence[str] = (), tables: Sequence = ()) -> None:
    """rows: [(heading, [dict(src, name, score, correct: bool | None, note=''), ...]), ...]; every thumbnail is
    embedded (the file is self-contained). `tables`: [(caption, header cells, rows of cells)] shown first. Written
    atomically."""
    out = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em} .q{margin:1.2em 0} .hits{display:flex;flex-wrap:wrap;"
        "gap:6px} figure{margin:0;text-align:center;font-size:12px} img{display:block;border:4px solid #ddd}"
        " .ok img{border-color:#1a9c3a} .bad img{border-color:#d22} .meta{color:#555;font-size:13px}"
        " table.t{border-collapse:collapse;margin:.8em 0} .t td,.t th{border:1px solid #ccc;padding:2px 8px}"
        " .t caption{text-align:left;font-weight:bold}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    out += [f'<p class="meta">{html.escape(n)}</p>' for n in notes]
    for caption, head, body in tables:
        out.append(f'<table class="t"><caption>{html.escape(caption)}</caption><tr>')
        out.append("".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>")
        out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body]
        out.append("</table>")
    for heading, hits in rows:
        out.append(f'<div class="q"><h3>{html.escape(heading)}</h3><div class="hits">')
        for rank, h in enumerate(hits, 1):
            cls = "" if h.get("correct") is None else ("ok" if h["correct"] else "bad")
            name = html.escape(str(h["name"]))
            out.append(
                f'<figure class="{cls}"><img src="{data_uri(h["src"])}" alt="{name}" title="{name}">'
                f"<figcaption>{html.escape(h.get('label') or f'#{rank}')} {h['score']:.3f}"
                f"{html.escape(h.get('note', ''))}</figcaption></figure>"
            )
        out.append("</div></div>")
    out.append("</body></html>")
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    os.replace(tmp, path)


def write_split_report(
    out_dir: str,
    split: str,
    ranked: list[dict],
    image_source: Callable[[str], object],
    *,
    title: str,
    n: int = 4,
    n_wrong: int = 10,
) -> tuple[str, str]:
    """Writes OUT_DIR/<split>_rankings.jsonl and OUT_DIR/<split>_report.html; returns their paths.

    `image_source(path)` gives the image for a gallery path (bytes, array or a readable path)."""
    os.makedirs(out_dir, exist_ok=True)
    jsonl = os.path.join(out_dir, f"{split}_rankings.jsonl")
    with open(jsonl + ".partial", "w") as f:
        for row in ranked:
            f.write(json.dumps(row) + "\n")
    os.replace(jsonl + ".partial", jsonl)
    rows = []
    for q in most_wrong(ranked, n_wrong):
        heading = (
            f"[most wrong] {q['caption']}  (pid {q['pid']}; first correct at rank {q['first_correct_rank']}; "
            f"AP {q['ap']:.3f})"
        )
        hits = [
            dict(src=image_source(p), name=p, score=s, correct=pid == q["pid"], note=f" pid {pid}")
            for p, pid, s in list(zip(q["top_paths"], q["top_pids"], q["top_scores"], strict=True))[:5]
        ]
        hits.append(
            dict(
                src=image_source(q["first_correct_path"]),
                name=q["first_correct_path"],
                score=q["first_correct_score"],
                correct=True,
                label=f"#{q['first_correct_rank']}",
                note=" the right person",
            )
        )
        rows.append((heading, hits))
    for label, q in sample(ranked, n):
        heading = (
            f"[{label}] {q['caption']}  (pid {q['pid']}; first correct at rank {q['first_correct_rank']}; "
            f"AP {q['ap']:.3f})"
        )
        hits = [
            dict(src=image_source(p), name=p, score=s, correct=pid == q["pid"], note=f" pid {pid}")
            for p, pid, s in zip(q["top_paths"], q["top_pids"], q["top_scores"], strict=True)
        ]
        rows.append((heading, hits))
    page = os.path.join(out_dir, f"{split}_report.html")
    notes = [
        f"{len(ranked)} queries. Shown: the {n_wrong} queries the model gets most wrong (the latest first correct "
        "image, then the lowest AP), each with its top 5 and, last, the image it should have found; then the "
        f"{n} best, {n} median and {n} worst by average precision. Green: the image shows the query's person; red: "
        f"another person. Per-query rankings: {os.path.basename(jsonl)}."
    ]
    buckets = rank_buckets(ranked)
    counts = [round(buckets[k] * len(ranked) / 100) for k in buckets]
    table = (
        "Where the first correct image lands (text-to-image)",
        ["rank", *buckets],
        [["queries, %", *(f"{v:.2f}" for v in buckets.values())], ["queries", *counts]],
    )
    write_html(page, rows, title=title, notes=notes, tables=[table])
    return jsonl, page


def grid_image(ranked_sample: list[tuple[str, dict]], image_source, *, k: int = 5, height: int = 96) -> np.ndarray:
    """uint8 (H, W, 3): one row per query, its top-k thumbnails framed green/red (for TensorBoard)."""
    rows = []
    for _, q in ranked_sample:
        thumbs = [
            thumbnail(image_source(p), height, GREEN if pid == q["pid"] else RED)
            for p, pid in zip(q["top_paths"][:k], q["top_pids"][:k], strict=True)
        ]
        w = sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1)
        row = Image.new("RGB", (max(w, 1), height), (255, 255, 255))
        x = 0
        for t in thumbs:
            row.paste(t, (x, 0))
            x += t.width + 4
        rows.append(row)
    width = max((r.width for r in rows), default=1)
    canvas = Image.new("RGB", (width, max(1, len(rows) * (height + 4) - 4)), (255, 255, 255))
    for i, r in enumerate(rows):
        canvas.paste(r, (0, i * (height + 4)))
    return np.asarray(canvas)
