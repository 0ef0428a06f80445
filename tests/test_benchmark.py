"""tools/benchmark.py runs (tiny preset) and reports its figures."""

from tools import benchmark


def test_benchmark_reports_step_time_and_flops(tmp_path):
    out = benchmark.main(
        ["--preset=tiny", "--image_size=32,16", "--text_len=12", "--batch=8", "--num_classes=5", "--steps=2",
         "--dtype=float32", f"--out={tmp_path / 'b.json'}"]
    )  # fmt: skip
    assert out["pairs_per_s"] > 0 and out["step_s_min"] <= out["step_s_median"] <= out["step_s_max"]
    assert out["gflops_per_pair"] > 0 and out["params_millions"] > 0 and out["num_devices"] == 8
    assert (tmp_path / "b.json").read_text().startswith("{")
    align = benchmark.main(["--preset=tiny", "--image_size=32,16", "--text_len=12", "--batch=8", "--num_classes=5",
                            "--steps=1", "--dtype=float32", "--objectives=align"])  # fmt: skip
    assert align["gflops_per_pair"] < out["gflops_per_pair"]  # no restoration pass


def test_search_benchmark_runs_on_small_sizes(capsys):
    from tools import bench_search

    out = bench_search.main(["--images=6", "--batch=4", "--sizes=50,300", "--dim=8", "--queries=1,3", "--repeats=1"])
    assert out["index"]["images"] == 6 and out["index"]["images_per_s"] > 0
    assert [(r["gallery"], r["queries"]) for r in out["query"]] == [(50, 1), (50, 3), (300, 1), (300, 3)]
    assert "| 300 x 8 | 3 |" in capsys.readouterr().out
