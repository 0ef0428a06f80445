"""tools/seeds.py: resumes finished seeds, reports mean, sample std, min and max of every metric under each
selection rule, never pools runs selected by different rules, and names a failed run's log."""

import json
import statistics

import pytest

from tools import seeds


def _write(root, seed, r1, rule="best_val"):
    d = root / f"s{seed}"
    d.mkdir(parents=True)
    m = lambda x: {"R1": x, "R5": x + 10, "R10": x + 20, "mAP": x / 2, "mINP": x / 4, "i2t_R1": x + 1,
                   "i2t_R5": x + 2, "i2t_R10": x + 3, "i2t_mAP": x / 3, "i2t_mINP": x / 5}  # fmt: skip
    label = "best val" if rule == "best_val" else seeds.BEST_TEST_LABEL
    res = {
        "test_at_best": m(r1),
        "test_at_last": m(r1 - 1),
        "best_step": 10,
        "selection": {"rule": rule, "label": label},
    }
    (d / "results.json").write_text(json.dumps(res))


def test_finished_seeds_are_read_and_summarised(tmp_path, capsys):
    r1 = [50.0, 54.0, 61.0]
    for s, x in enumerate(r1):
        _write(tmp_path, s, x)
    out = seeds.main(["--config=configs/synthetic.py", "--seeds=0,1,2", f"--root={tmp_path}"])
    assert "$" not in capsys.readouterr().out  # nothing was launched
    best = out["summary"]["test @ best val"]
    assert best["R1"] == dict(n=3, mean=statistics.mean(r1), std=statistics.stdev(r1), min=50.0, max=61.0)
    assert best["i2t_mAP"]["mean"] == pytest.approx(statistics.mean(r1) / 3)
    assert out["summary"]["test @ last step"]["R1"]["max"] == 60.0
    assert [r["workdir"] for r in out["runs"]] == [str(tmp_path / f"s{s}") for s in range(3)]
    md = (tmp_path / "seeds.md").read_text()
    assert "**test @ best val**" in md and "**test @ last step**" in md
    assert f"| R1 | 3 | {statistics.mean(r1):.2f} ± {statistics.stdev(r1):.2f} | 50.00-61.00 |" in md
    assert json.loads((tmp_path / "seeds.json").read_text())["summary"] == out["summary"]


def test_the_papers_protocol_is_a_block_of_its_own(tmp_path):
    _write(tmp_path, 0, 50.0)
    _write(tmp_path, 1, 70.0, rule="best_test_epoch")
    out = seeds.main(["--config=c.py", "--seeds=0,1", f"--root={tmp_path}"])
    assert out["summary"]["test @ best val"]["R1"]["n"] == 1
    assert out["summary"][f"test @ {seeds.BEST_TEST_LABEL}"]["R1"] == dict(n=1, mean=70.0, std=0.0, min=70.0, max=70.0)
    assert "not comparable with model selection on validation" in (tmp_path / "seeds.md").read_text()


def test_bad_seeds_and_a_failed_run(tmp_path):
    with pytest.raises(SystemExit, match="give distinct seeds"):
        seeds.main(["--config=c.py", "--seeds=1,1", f"--root={tmp_path}"])
    with pytest.raises(SystemExit, match="comma-separated integers"):
        seeds.main(["--config=c.py", "--seeds=a", f"--root={tmp_path}"])
    with pytest.raises(SystemExit, match=r"configs/synthetic.py:bogus seed 0 failed .*s0/log.txt"):
        seeds.main(["--config=configs/synthetic.py:bogus", "--seeds=0", f"--root={tmp_path}"])
