"""Multi-seed report: N seeds of one config, and the mean, sample std, min and max of every test metric.

    python tools/seeds.py --config=configs/synthetic.py --seeds=0,1,2 --root=runs/seeds [--extra --config.x=y ...]

Each seed is the README's training command, `python -m uit_jax.main --config=CONFIG --workdir=ROOT/s<SEED>
--config.seed=SEED [EXTRA]` (the seed sets the initialisation, data order and augmentations); a seed whose
results.json exists is read, not run again, so an interrupted report resumes. The report has one block per
selection rule, each stated: the checkpoint chosen on the validation split (our default), the last step, and, for
runs made with `--config.eval.select_on=test`, the papers' protocol (the best epoch on the test split), labelled as
such and never mixed with the others. Every metric is reported: text-to-image R1, R5, R10, mAP, mINP and
image-to-text i2t_R1 ... i2t_mINP. Printed, and written to ROOT/seeds.md and ROOT/seeds.json (each seed's figures
and workdir too).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T2I = ("R1", "R5", "R10", "mAP", "mINP")
I2T = tuple(f"i2t_{k}" for k in T2I)
BEST_TEST_LABEL = "best TEST epoch (the papers' protocol: selected on the test split, optimistic)"


def run_seed(root: str, config: str, seed: int, extra: list[str], name: str | None = None) -> dict:
    """The results.json of one seed, training it first when it has none; its workdir and wall time added."""
    workdir = os.path.join(root, name or f"s{seed}")
    results_path = os.path.join(workdir, "results.json")
    if not os.path.exists(results_path):
        cmd = [
            sys.executable,
            "-m",
            "uit_jax.main",
            f"--config={config}",
            f"--workdir={workdir}",
            f"--config.seed={seed}",
            *extra,
        ]
        print("$", " ".join(cmd), flush=True)
        os.makedirs(workdir, exist_ok=True)
        t0 = time.time()
        with open(os.path.join(workdir, "log.txt"), "w") as log:
            rc = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if rc:
            raise SystemExit(f"{config} seed {seed} failed (exit {rc}); see {workdir}/log.txt")
        with open(os.path.join(workdir, "wall_seconds.txt"), "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    with open(results_path) as f:
        res = json.load(f)
    res["workdir"], res["seed"], res["wall_seconds"] = workdir, seed, None
    wall = os.path.join(workdir, "wall_seconds.txt")
    if os.path.exists(wall):
        with open(wall) as f:
            res["wall_seconds"] = float(f.read())
    return res


def selection_label(res: dict) -> str:
    """How a run chose its reported checkpoint ('best val' for runs that predate the field)."""
    return (res.get("selection") or {}).get("label", "best val")


def spread(values: list[float]) -> dict:
    """n, mean, sample std (0 for one value), min and max."""
    return dict(
        n=len(values),
        mean=statistics.mean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        min=min(values),
        max=max(values),
    )


def summarize(runs: list[dict]) -> dict:
    """{selection label: {metric: spread}} over the runs: the reported checkpoint (under its own rule) and the
    last step. Runs that chose their checkpoint by different rules are never pooled."""
    labels = sorted({selection_label(r) for r in runs})
    out = {}
    for label in labels:
        mine = [r for r in runs if selection_label(r) == label]
        metrics = [k for k in (*T2I, *I2T) if all(k in r["test_at_best"] for r in mine)]
        out[f"test @ {label}"] = {k: spread([r["test_at_best"][k] for r in mine]) for k in metrics}
    last = [k for k in (*T2I, *I2T) if all(k in r["test_at_last"] for r in runs)]
    out["test @ last step"] = {k: spread([r["test_at_last"][k] for r in runs]) for k in last}
    return out


def markdown(summary: dict, seeds: list[int], title: str) -> str:
    lines = [f"{title}: seeds {', '.join(map(str, seeds))}; mean ± sample std (min-max) of the test split.", ""]
    for rule, metrics in summary.items():
        lines.append(f"**{rule}**" + (" — not comparable with model selection on validation" if "TEST" in rule else ""))
        lines.append("")
        lines.append("| metric | n | mean ± std | min-max |")
        lines.append("| --- | --- | --- | --- |")
        for k, s in metrics.items():
            lines.append(f"| {k} | {s['n']} | {s['mean']:.2f} ± {s['std']:.2f} | {s['min']:.2f}-{s['max']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config file[:variant], e.g. configs/synthetic.py")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--root", required=True, help="folder for the seeds' workdirs and the report")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for every run (last)")
    a = p.parse_args(argv)
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds {a.seeds!r}: write comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {a.seeds!r}: give distinct seeds, e.g. 0,1,2")
    root = os.path.abspath(a.root)
    runs = [run_seed(root, a.config, s, a.extra) for s in seeds]
    summary = summarize(runs)
    text = markdown(summary, seeds, a.config + (" " + " ".join(a.extra) if a.extra else ""))
    record = dict(
        config=a.config,
        extra=a.extra,
        seeds=seeds,
        summary=summary,
        runs=[
            {k: r.get(k) for k in ("seed", "workdir", "selection", "best_step", "test_at_best", "test_at_last")}
            | {"wall_seconds": r["wall_seconds"]}
            for r in runs
        ],
    )
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "seeds.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(root, "seeds.json"), "w") as f:
        json.dump(record, f, indent=1)
    print("\n" + text)
    return record


if __name__ == "__main__":
    main()
