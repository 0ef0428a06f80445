"""tools/benchmark.py runs (tiny preset) and reports its figures."""

import pytest

from tools import benchmark


def test_benchmark_reports_step_time_and_flops(tmp_path):
    out = benchmark.main(
        ["--preset=tiny", "--image_size=32,16", "--text_len=12", "--batch=8", "--num_classes=5", "--steps=2",
         "--dtype=float32", f"--out={tmp_path / 'b.json'}"]
    )  # fmt: skip
    assert out["pairs_per_s"] > 0 and out["step_s_min"] <= out["step_s_median"] <= out["step_s_max"]
    assert out["gflops_per_pair"] > 0 and out["params_millions"] > 0 and out["num_devices"] == 8
    assert (tmp_path / "b.json").read_text().startswith("{")
    # Analytic count per component (3 x forward), next to XLA's CPU count of every op (matmuls and the rest).
    parts = out["gflops_per_pair_by_component"]
    assert abs(sum(parts.values()) - out["gflops_per_pair"]) < 1e-3 and "restoration_decoder" in parts
    assert out["xla_over_analytic"] >= 1.0 and out["total_mib"] >= out["temp_mib"] > 0  # XLA counts every op


def test_benchmark_table_and_aot(capsys):
    common = ["--preset=tiny", "--image_size=32,16", "--text_len=12", "--batch=8", "--num_classes=5", "--steps=1",
              "--dtype=float32"]  # fmt: skip
    out = benchmark.main([*common, "--table=align,remat=full,scan=1;batch=16,scan=0"])
    rows = {r["variant"]: r for r in out["rows"]}
    scanned = rows["align,remat=full,scan=1"]
    assert scanned["objectives"] == "align" and scanned["remat"] == "full" and scanned["scan"] is True
    assert "restoration_decoder" not in scanned["gflops_per_pair_by_component"]
    assert rows["batch=16,scan=0"]["batch"] == 16 and rows["batch=16,scan=0"]["scan"] is False
    assert "xla_over_analytic" not in scanned  # under scan XLA counts the loop body once
    assert rows["batch=16,scan=0"]["gflops_per_pair"] > scanned["gflops_per_pair"]  # + the restoration pass
    assert "| align,remat=full,scan=1 |" in out["table"] and "| 1.00 |" in out["table"]
    # --aot compiles from abstract shapes: memory figures, no step run. At 8 pairs per device the activations
    # outweigh the tiny weights, so recomputing them (full remat, under scan: XLA:CPU's scheduler keeps the
    # recomputed activations of an unrolled program alive, README "Benchmarks") must need less temporary memory.
    aot = benchmark.main([*common[:3], "--batch=64", *common[4:], "--aot", "--table=scan=1;scan=1,remat=full"])
    full, remat = (r for r in aot["rows"])
    assert "step_s_median" not in full and full["total_mib"] > 0
    assert remat["temp_mib"] < full["temp_mib"]
    with pytest.raises(SystemExit, match="cannot read 'batch'"):
        benchmark.main([*common, "--table=batch"])
    capsys.readouterr()


def test_search_benchmark_runs_on_small_sizes(capsys):
    from tools import bench_search

    out = bench_search.main(["--images=6", "--batch=4", "--sizes=50,300", "--dim=8", "--queries=1,3", "--repeats=1"])
    assert out["index"]["images"] == 6 and out["index"]["images_per_s"] > 0
    assert [(r["gallery"], r["queries"]) for r in out["query"]] == [(50, 1), (50, 3), (300, 1), (300, 3)]
    assert "| 300 x 8 | 3 |" in capsys.readouterr().out
