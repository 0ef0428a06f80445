"""The synthetic ablation: each variant of configs/synthetic.py trained with several seeds; a table of mean and spread.

    python experiments/ablation.py --root runs/ablation [--variants full,no_restoration,no_triplet,no_text_aug]
        [--seeds 0,1,2] [--extra --config.data.data_dir=DIR ...]

Each run is the training command, `python -m uit_jax.main --config=configs/synthetic.py:VARIANT
--workdir=ROOT/VARIANT_sSEED --config.seed=SEED` (the seed sets the initialisation, data order and augmentations;
the synthetic set itself is the same). A finished run (results.json present) is not run again, so an interrupted
ablation resumes. The table (test split, at the best-validation checkpoint; mean +- sample standard deviation over
seeds, then min-max) is printed and written to ROOT/ablation.md, the raw figures to ROOT/ablation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from anywhere

from tools import seeds  # noqa: E402

METRICS = ("R1", "R5", "R10", "mAP", "mINP")


def run_one(root: str, variant: str, seed: int, extra: list[str]) -> dict:
    """One variant and seed (tools/seeds.py's runner: resumable, a failed run names its log)."""
    return seeds.run_seed(root, f"configs/synthetic.py:{variant}", seed, extra, name=f"{variant}_s{seed}")


def summarize(results: dict[str, list[dict]]) -> str:
    """Markdown: one row per variant, mean +- std (and min-max) of each test metric at the best-val checkpoint."""
    lines = [
        "| variant | seeds | " + " | ".join(METRICS) + " | R1 min-max | minutes/run |",
        "| --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- | --- |",
    ]
    for variant, runs in results.items():
        cells = []
        for m in METRICS:
            vals = [r["test_at_best"][m] for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f} ± {sd:.2f}")
        r1 = [r["test_at_best"]["R1"] for r in runs]
        walls = [r["wall_seconds"] for r in runs if r.get("wall_seconds")]
        minutes = f"{statistics.median(walls) / 60:.1f}" if walls else "-"
        lines.append(
            f"| {variant} | {len(runs)} | " + " | ".join(cells) + f" | {min(r1):.2f}-{max(r1):.2f} | {minutes} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="folder for the runs and the table")
    p.add_argument("--variants", default="full,no_restoration,no_triplet,no_text_aug")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run (last)")
    a = p.parse_args(argv)
    root = os.path.abspath(a.root)
    variants = [v for v in a.variants.split(",") if v]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in seeds:  # seed-major: a partial ablation already compares every variant
        for v in variants:
            results[v].append(run_one(root, v, seed, a.extra))
            print(summarize({k: r for k, r in results.items() if r}), flush=True)
    table = summarize(results)
    with open(os.path.join(root, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump(
            {
                v: [{k: r.get(k) for k in ("test_at_best", "best_step", "wall_seconds")} for r in runs]
                for v, runs in results.items()
            },
            f,
            indent=1,
        )
    print("\n" + table)


if __name__ == "__main__":
    main()
