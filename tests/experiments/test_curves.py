"""tools/curves.py: reads each run's val_curve.jsonl (a repeat after a resume keeps its last value), one column per
variant, and names its run folders after the variant and its overrides."""

import json

from experiments import curves


def test_curve_table_side_by_side(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    rows = [dict(step=10, epoch=1.0, R1=5.0), dict(step=20, epoch=2.0, R1=9.0), dict(step=20, epoch=2.0, R1=9.5)]
    (a / "val_curve.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert curves.read_curve(str(a)) == {1.0: 5.0, 2.0: 9.5}
    assert curves.read_curve(str(tmp_path / "missing")) == {}
    out = curves.table(
        {"full": {1.0: 5.0, 2.0: 9.5}, "no_triplet": {1.0: 4.0}},
        {"full": {"test_at_best": {"R1": 10.25}}, "no_triplet": None},
    )
    lines = out.splitlines()
    assert lines[0] == "| epoch | full | no_triplet |"
    assert lines[2] == "| 1 | 5.0 | 4.0 |" and lines[3] == "| 2 | 9.5 |  |"
    assert lines[-1] == "| test R1 at best val | 10.2 |  |"
    assert curves._folder("full:--config.optim.lr=3e-4+--config.schedule.epochs=2") == (
        "full_--config.optim.lr=3e-4_--config.schedule.epochs=2"
    )
