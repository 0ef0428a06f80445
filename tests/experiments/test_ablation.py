"""experiments/ablation.py: resumes finished runs, summarises mean and spread right, reports a failed run clearly."""

import json
import statistics

import numpy as np
import pytest

from experiments import ablation


def _write_results(root, variant, seed, r1):
    d = root / f"{variant}_s{seed}"
    d.mkdir(parents=True)
    metrics = {"R1": r1, "R5": r1 + 10, "R10": r1 + 20, "mAP": r1 / 2, "mINP": r1 / 4}
    (d / "results.json").write_text(json.dumps({"test_at_best": metrics, "best_step": 100 * (seed + 1)}))
    (d / "wall_seconds.txt").write_text(f"{60.0 * (seed + 1)}\n")


def test_finished_runs_are_read_not_rerun_and_summarised(tmp_path, capsys):
    r1 = {"full": [50.0, 54.0, 58.0], "no_triplet": [40.0, 41.0, 45.0]}
    for v, vals in r1.items():
        for seed, x in enumerate(vals):
            _write_results(tmp_path, v, seed, x)
    ablation.main(["--root", str(tmp_path), "--variants", "full,no_triplet", "--seeds", "0,1,2"])
    assert "$" not in capsys.readouterr().out  # nothing was launched
    table = (tmp_path / "ablation.md").read_text().splitlines()
    full = next(line for line in table if line.startswith("| full |"))
    cells = [c.strip() for c in full.strip("|").split("|")]
    assert cells[1] == "3"
    assert cells[2] == f"{np.mean(r1['full']):.2f} ± {np.std(r1['full'], ddof=1):.2f}"  # sample std, as numpy's
    assert cells[5] == f"{np.mean(r1['full']) / 2:.2f} ± {statistics.stdev(r1['full']) / 2:.2f}"
    assert cells[7] == "50.00-58.00" and cells[8] == "2.0"  # R1 range; median minutes per run
    raw = json.loads((tmp_path / "ablation.json").read_text())
    assert [r["test_at_best"]["R1"] for r in raw["no_triplet"]] == r1["no_triplet"]


def test_a_failed_run_names_its_log(tmp_path):
    with pytest.raises(SystemExit, match=r"bogus seed 0 failed .*bogus_s0/log.txt"):
        ablation.main(["--root", str(tmp_path), "--variants", "bogus", "--seeds", "0"])
    assert "Unknown synthetic variant 'bogus'" in (tmp_path / "bogus_s0" / "log.txt").read_text()
