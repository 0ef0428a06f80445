"""The domain-generalisation table: runs trained on some datasets, each tested on every dataset's test split.

    python tools/cross_domain.py --run cuhk=runs/cuhk --run icfg=runs/icfg --run rstp=runs/rstp \
        --data cuhk=/data/CUHK-PEDES --data icfg=/data/ICFG-PEDES --data rstp=/data/RSTPReid \
        [--step best] [--data_dir DIR] [--tagger FILE] [--out ROOT]

Rows: trained on (a --run NAME=WORKDIR_OR_EXPORTED_MODEL each); columns: tested on (a --data DATASET=FOLDER each,
DATASET one of cuhk, icfg, rstp); each cell R1 / mAP / mINP, text-to-image, at the run's best-validation
checkpoint, on that dataset's own test split and id rules with the run's own tokenizer and preprocessing
(`evaluate.evaluate_transfer`). A cell whose row name equals its column's dataset is in-domain (marked *). Prints
the markdown table and writes it to OUT/cross_domain.md, every cell's figures (i2t too) to OUT/cross_domain.json;
each evaluation's rankings and report go to the run's eval/ folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from anywhere

CELL = ("R1", "mAP", "mINP")


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{flag} {item!r}: write NAME=PATH, e.g. {flag} cuhk=/data/CUHK-PEDES")
        if name in out:
            raise SystemExit(f"{flag} {name!r} is given twice")
        out[name] = value
    return out


def table(cells: dict[tuple[str, str], dict], rows: list[str], cols: list[str]) -> str:
    """Markdown: one row per run, one column per target dataset, 'R1 / mAP / mINP' in each cell."""
    lines = [
        "| trained on \\ tested on | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for r in rows:
        row = []
        for c in cols:
            m = cells[(r, c)]
            row.append(" / ".join(f"{m[k]:.2f}" for k in CELL) + (" *" if r == c else ""))
        lines.append(f"| {r} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Each cell: text-to-image R1 / mAP / mINP on the column's test split; * in-domain.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], help="NAME=WORKDIR (or exported model folder); repeat")
    p.add_argument("--data", action="append", default=[], help="DATASET=FOLDER (official layout); repeat")
    p.add_argument("--step", default="best", help="checkpoint of each workdir: best, latest or a step number")
    p.add_argument("--data_dir", default="", help="where the datasets' tfds builds go (default: tfds' own)")
    p.add_argument("--tagger", default="", help="POS tagger for building the datasets (data.tagger; default NLTK)")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--out", default=".", help="folder for cross_domain.md and cross_domain.json")
    a = p.parse_args(argv)
    runs, data = _pairs(a.run, "--run"), _pairs(a.data, "--data")
    if not runs or not data:
        raise SystemExit("give at least one --run NAME=WORKDIR and one --data DATASET=FOLDER")

    from uit_jax import checkpoint as ckpt_lib  # noqa: PLC0415
    from uit_jax import compile_cache, evaluate  # noqa: PLC0415
    from uit_jax.data import defaults  # noqa: PLC0415

    unknown = sorted(set(data) - set(defaults.DATASETS))
    if unknown:
        raise SystemExit(f"--data {unknown}: not a known dataset; use one of {sorted(defaults.DATASETS)}")
    for path in runs.values():  # every source checked before any evaluation
        evaluate.load_towers(path, ckpt_lib.parse_step(a.step))
    compile_cache.enable()
    cells, raw = {}, {}
    for r, source in runs.items():
        for c, folder in data.items():
            res = evaluate.evaluate_transfer(
                source,
                c,
                manual_dir=folder,
                data_dir=os.path.join(a.data_dir, c) if a.data_dir else None,
                tagger=a.tagger,
                step=ckpt_lib.parse_step(a.step),
                batch_size=a.batch_size,
            )
            cells[(r, c)] = next(iter(res["results"].values()))
            raw[f"{r} -> {c}"] = dict(cells[(r, c)], checkpoint=res["checkpoint"], source=res["source"])
    text = table(cells, list(runs), list(data))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "cross_domain.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(a.out, "cross_domain.json"), "w") as f:
        json.dump(raw, f, indent=1)
    print("\n" + text)
    return {"table": text, "cells": raw}


if __name__ == "__main__":
    main()
