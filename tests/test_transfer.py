"""Cross-domain evaluation (evaluate.evaluate_transfer, --eval_dataset, tools/cross_domain.py) on synthetic sets
written in the three official layouts, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from uit_jax import evaluate, export
from uit_jax.data import builders, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = synthetic.Spec(train_ids=6, val_ids=3, test_ids=4, images_per_id=2, height=32, width=16, seed=5)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Small synthetic sets in the ICFG-PEDES and RSTPReid layouts (other identities than the trained run's)."""
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for layout in ("icfg", "rstp"):
        synthetic.generate(str(root / layout), SPEC, layout=layout)
        out[layout] = root / layout
    return out


def _kw(sets, name, tmp_path):
    folder = sets[name]
    return dict(manual_dir=str(folder), data_dir=str(tmp_path / "tfds"), tagger=str(folder / synthetic.TAGS_FILE))


def test_the_run_on_other_layouts_and_in_domain(trained_run, sets, tmp_path):
    config, wd, root = trained_run
    # In-domain through the same path: the run's own test set, read by the CUHK-PEDES reader, gives its figures.
    own = next((root / "raw").glob("t*"))
    tags = tmp_path / "tags.tsv"
    tags.write_text("".join(f"{w}\t{t}\n" for w, t in synthetic.POS_TAGS.items()))
    same = evaluate.evaluate_transfer(
        str(wd), "cuhk", manual_dir=str(own), data_dir=str(tmp_path / "own"), tagger=str(tags), out_dir=str(tmp_path)
    )
    saved = json.loads((wd / "results.json").read_text())["test_at_best"]
    got = next(iter(same["results"].values()))
    for k in (*evaluate.METRICS, *evaluate.I2T_METRICS):
        assert got[k] == pytest.approx(saved[k], abs=1e-6), k  # the same embeddings, the same ranking
    for name in ("icfg", "rstp"):
        out = evaluate.evaluate_transfer(str(wd), name, **_kw(sets, name, tmp_path))
        m = next(iter(out["results"].values()))
        assert (m["num_gallery"], m["num_queries"]) == (4 * 2, 4 * 2 * 2)  # the target's test split
        assert all(0 <= m[k] <= 100 for k in (*evaluate.METRICS, *evaluate.I2T_METRICS))
        assert out["checkpoint"] == f"step {saved.get('steps', 4)}" or out["checkpoint"].startswith("step ")
        written = json.loads((wd / "eval" / f"transfer_{name}_test.json").read_text())
        assert written["results"] == out["results"] and sum(written["rank_buckets"].values()) == pytest.approx(100)
        assert (wd / "eval" / f"{name}_test_report.html").exists()
    # An exported model folder is a source too, with the same figures.
    export.export_workdir(str(wd), str(tmp_path / "model"))
    again = evaluate.evaluate_transfer(str(tmp_path / "model"), "rstp", **_kw(sets, "rstp", tmp_path))
    assert next(iter(again["results"].values()))["R1"] == m["R1"]


def test_bad_input_is_one_message_and_nothing_is_written(trained_run, sets, tmp_path):
    _, wd, _ = trained_run
    before = set(os.listdir(wd / "eval"))
    with pytest.raises(ValueError, match=r"'market1501' is not a known dataset; use one of \['cuhk', 'icfg'"):
        evaluate.evaluate_transfer(str(wd), "market1501")
    with pytest.raises(builders.DataError, match=r"nowhere' for 'icfg' does not exist: pass the dataset's folder"):
        evaluate.evaluate_transfer(
            str(wd), "icfg", **dict(_kw(sets, "icfg", tmp_path), manual_dir=str(tmp_path / "nowhere"))
        )
    # An RSTPReid folder given for ICFG-PEDES: the message names the layout it is in.
    with pytest.raises(builders.DataError, match=r"data_captions.json: it is in the rstp \(RSTPReid\) layout"):
        evaluate.evaluate_transfer(str(wd), "icfg", **dict(_kw(sets, "icfg", tmp_path), manual_dir=str(sets["rstp"])))
    broken = tmp_path / "broken"
    shutil.copytree(sets["icfg"], broken)
    os.remove(next((broken / "imgs" / "synth").glob("*.png")))
    with pytest.raises(builders.DataError, match=r"image .*\.png does not exist"):
        evaluate.evaluate_transfer(str(wd), "icfg", **dict(_kw(sets, "icfg", tmp_path), manual_dir=str(broken)))
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    shutil.copy(wd / "model.json", no_ckpt / "model.json")
    with pytest.raises(FileNotFoundError, match="No checkpoint folder .*train first"):
        evaluate.evaluate_transfer(str(no_ckpt), "icfg", **_kw(sets, "icfg", tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a training workdir .* nor an exported model folder"):
        evaluate.evaluate_transfer(str(tmp_path), "icfg", **_kw(sets, "icfg", tmp_path))
    assert set(os.listdir(wd / "eval")) == before


def test_the_domain_generalisation_table(trained_run, sets, tmp_path, capsys):
    from tools import cross_domain

    _, wd, _ = trained_run
    export.export_workdir(str(wd), str(tmp_path / "model"))
    tags = str(sets["icfg"] / synthetic.TAGS_FILE)
    out = cross_domain.main(
        ["--run", f"icfg={wd}", "--run", f"exported={tmp_path / 'model'}", "--data", f"icfg={sets['icfg']}",
         "--data", f"rstp={sets['rstp']}", "--tagger", tags, "--data_dir", str(tmp_path / "tfds"),
         "--out", str(tmp_path / "table")]
    )  # fmt: skip
    lines = out["table"].splitlines()
    assert lines[0] == "| trained on \\ tested on | icfg | rstp |"
    icfg_row, exported_row = lines[2], lines[3]
    assert icfg_row.startswith("| icfg |") and icfg_row.split("|")[2].strip().endswith("*")  # in-domain marked
    assert "*" not in exported_row and exported_row.split("|")[2:4] == icfg_row.replace(" *", "").split("|")[2:4]
    cell = out["cells"]["icfg -> rstp"]
    assert icfg_row.split("|")[3].strip() == f"{cell['R1']:.2f} / {cell['mAP']:.2f} / {cell['mINP']:.2f}"
    assert (tmp_path / "table" / "cross_domain.md").read_text().strip() == out["table"]
    with pytest.raises(SystemExit, match="write NAME=PATH"):
        cross_domain.main(["--run", str(wd), "--data", f"icfg={sets['icfg']}"])
    with pytest.raises(SystemExit, match=r"--data \['market'\]: not a known dataset"):
        cross_domain.main(["--run", f"a={wd}", "--data", f"market={sets['icfg']}"])


def test_the_command_line(trained_run, sets, tmp_path):
    """`--mode=eval --eval_dataset` on a workdir with no --config: rc 0 and the table; an unknown name: rc 1 and
    one message, before anything is read."""
    _, wd, _ = trained_run
    kw = _kw(sets, "rstp", tmp_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "uit_jax.main", "--mode=eval", f"--workdir={wd}", "--eval_dataset=rstp",
           f"--eval_manual_dir={kw['manual_dir']}", f"--eval_data_dir={kw['data_dir']}",
           f"--eval_tagger={kw['tagger']}"]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rstp test @ step" in p.stdout and "i2t_R1" in p.stdout
    bad = subprocess.run([*cmd[:5], "--eval_dataset=market"], cwd=REPO, capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert bad.returncode == 1 and "Fatal: ValueError: --eval_dataset / config.eval.dataset 'market'" in bad.stderr
