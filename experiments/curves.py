"""Learning-curve probe: short runs of several variants, validation R1 per epoch side by side.

Recipe choices (learning rate, epochs, which objective helps) are made from curves, not from one final number:

    python tools/curves.py --root runs/curves --variants full,no_restoration --seed 0 \
        [--extra --config.schedule.epochs=2 --config.optim.lr=3e-4]

Each variant is `python -m uit_jax.main --config=configs/synthetic.py:VARIANT` (through tools/ablation.py's runner,
so a finished run is not run again); a variant may carry its own overrides after a colon and '+'-separated,
e.g. `full:--config.optim.lr=3e-4+--config.schedule.epochs=2` (its run folder is named after the whole string).
Every run appends each validation to WORKDIR/val_curve.jsonl; the table has one row per validation epoch and one
column per variant, and is written to ROOT/curves.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import ablation  # noqa: E402


def read_curve(workdir: str, metric: str = "R1") -> dict[float, float]:
    """{epoch: metric} from a run's val_curve.jsonl; a validation repeated after a resume keeps its last value."""
    path = os.path.join(workdir, "val_curve.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out[row["epoch"]] = row[metric]
    return out


def table(curves: dict[str, dict[float, float]], finals: dict[str, dict]) -> str:
    names = list(curves)
    epochs = sorted({e for c in curves.values() for e in c})
    lines = ["| epoch | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for e in epochs:
        lines.append(f"| {e:g} | " + " | ".join(f"{curves[n][e]:.1f}" if e in curves[n] else "" for n in names) + " |")
    test = [f"{finals[n]['test_at_best']['R1']:.1f}" if finals.get(n) else "" for n in names]
    lines.append("| test R1 at best val | " + " | ".join(test) + " |")
    return "\n".join(lines)


def _folder(variant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", variant).strip("_")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True)
    p.add_argument("--variants", default="full", help="comma-separated; VARIANT[:flag+flag...]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metric", default="R1", choices=ablation.METRICS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for every run (last)")
    a = p.parse_args(argv)
    root = os.path.abspath(a.root)
    curves, finals = {}, {}
    for spec in [v for v in a.variants.split(",") if v]:
        variant, _, flags = spec.partition(":")
        run_root = os.path.join(root, _folder(spec))
        finals[spec] = ablation.run_one(run_root, variant, a.seed, [f for f in flags.split("+") if f] + a.extra)
        curves[spec] = read_curve(os.path.join(run_root, f"{variant}_s{a.seed}"), a.metric)
        print(table(curves, finals), flush=True)
    out = table(curves, finals)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "curves.md"), "w") as f:
        f.write(out + "\n")
    return out


if __name__ == "__main__":
    main()
