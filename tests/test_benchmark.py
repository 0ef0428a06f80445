"""tools/benchmark.py runs (tiny preset) and reports its figures."""

import pytest

from tools import benchmark


def test_benchmark_table_and_aot(tmp_path, capsys):
    common = ["--preset=tiny", "--image_size=32,16", "--text_len=12", "--num_classes=5", "--dtype=float32"]
    out = benchmark.main(
        [
            *common,
            "--batch=8",
            "--steps=2",
            "--table=full;attention=flash;align,remat=full,scan=1;split=0",
            f"--out={tmp_path / 'b.json'}",
        ]
    )
    assert (tmp_path / "b.json").read_text().startswith("{")
    full, failed, scanned, one = out["rows"]
    # A variant that fails gets its row and error; the others still run.
    assert failed["error"].startswith("ValueError: Unknown attention kernel 'flash'")
    assert "| attention=flash | failed: ValueError: Unknown attention kernel 'flash'" in out["table"]
    assert full["attention"] == "einsum"  # 'auto' on a CPU
    assert full["variant"] == "full" and scanned["variant"] == "align,remat=full,scan=1"
    assert full["pairs_per_s"] > 0 and full["step_s_min"] <= full["step_s_median"] <= full["step_s_max"]
    assert full["params_millions"] > 0 and full["num_devices"] == 8
    # Analytic count per component (3 x forward), next to XLA's CPU count of every op (matmuls and the rest).
    parts = full["gflops_per_pair_by_component"]
    assert abs(sum(parts.values()) - full["gflops_per_pair"]) < 1e-3 and "restoration_decoder" in parts
    assert full["xla_over_analytic"] >= 1.0 and full["total_mib"] >= full["temp_mib"] > 0
    assert scanned["objectives"] == "align" and scanned["remat"] == "full" and scanned["scan"] is True
    assert "restoration_decoder" not in scanned["gflops_per_pair_by_component"]
    assert scanned["gflops_per_pair"] < full["gflops_per_pair"]  # no restoration pass
    assert "xla_over_analytic" not in scanned  # under scan XLA counts the loop body once
    assert "| align,remat=full,scan=1 |" in out["table"] and "| 1.00 |" in out["table"]
    # The default step is two programs (gradient, update): memory is the larger of their peaks, the gradient's
    # counting the optimiser state it does not take; --split=0 is the single program, with no per-program split.
    assert full["split"] is True and one["split"] is False and "programs" not in one
    grad, update = full["programs"]
    assert full["total_mib"] >= max(grad["total_mib"], update["total_mib"]) and grad["temp_mib"] > 0
    assert one["pairs_per_s"] > 0 and one["gflops_per_pair"] == full["gflops_per_pair"]
    # --aot compiles from abstract shapes: memory figures, no step run. At 8 pairs per device the activations
    # outweigh the tiny weights, so recomputing them (full remat, under scan: XLA:CPU's scheduler keeps the
    # recomputed activations of an unrolled program alive, docs/benchmarks.md) must need less temporary memory.
    aot = benchmark.main([*common, "--batch=64", "--aot", "--objectives=align", "--table=scan=1;scan=1,remat=full"])
    plain, remat = aot["rows"]
    assert "step_s_median" not in plain and plain["total_mib"] > 0
    assert remat["temp_mib"] < plain["temp_mib"]
    with pytest.raises(SystemExit, match="cannot read 'batch'"):
        benchmark.main([*common, "--table=batch"])
    capsys.readouterr()


def test_search_benchmark_runs_on_small_sizes(capsys):
    from tools import bench_search

    out = bench_search.main(["--images=6", "--batch=4", "--sizes=50,300", "--dim=8", "--queries=1,3", "--repeats=1"])
    assert out["index"]["images"] == 6 and out["index"]["images_per_s"] > 0
    assert [(r["gallery"], r["queries"]) for r in out["query"]] == [(50, 1), (50, 3), (300, 1), (300, 3)]
    assert "| 300 x 8 | 3 |" in capsys.readouterr().out


def test_sen_benchmark_names_a_bad_checkout(tmp_path):
    """tools/bench_sen.py imports SEN from a checkout the user gives (none ships here): a wrong path is named, with
    what is missing, and a bare git directory gets the command that exports a work tree."""
    from tools import bench_sen

    with pytest.raises(SystemExit, match="no such directory"):
        bench_sen.check_sen_repo(str(tmp_path / "nowhere"))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "build.py").write_text("")
    with pytest.raises(SystemExit, match=r"not a SEN checkout.*missing model/clip_model.py"):
        bench_sen.check_sen_repo(str(tmp_path))
    bare = tmp_path / "bare"
    (bare / "objects").mkdir(parents=True)
    (bare / "HEAD").write_text("ref: refs/heads/main\n")
    with pytest.raises(SystemExit, match="bare git directory.*archive HEAD"):
        bench_sen.check_sen_repo(str(bare))
    with pytest.raises(SystemExit):  # argparse: --ours_flags needs --ours
        bench_sen.parse_args(["--sen_repo", str(tmp_path), "--ours_flags=--scan=1"])


def test_sen_benchmark_records_the_host_cpu(monkeypatch):
    """The SEN ratio differs from host to host, so the record names the CPU: model, vendor, cores, vector ISA."""
    import builtins
    import io

    from tools import bench_sen

    cpuinfo = (
        "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f\n"
    )
    real_open = builtins.open

    def fake_open(path, *a, **k):
        return io.StringIO(cpuinfo) if path == "/proc/cpuinfo" else real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(bench_sen.os, "cpu_count", lambda: 2)
    assert bench_sen.cpu_model() == "AMD EPYC 9B14 (AuthenticAMD), 2 cores, avx2 avx512f"


def test_input_benchmark_runs_on_a_small_set(tmp_path, capsys):
    from tools import bench_input

    out = bench_input.main(
        ["--batch=8", "--steps=2", "--warmup=1", "--height=64", "--width=32", "--train_ids=8",
         f"--manual_dir={tmp_path / 'raw'}", f"--data_dir={tmp_path / 'tfds'}"]
    )  # fmt: skip
    assert out["shape"] == [8, 64, 32, 3] and out["pairs_per_s"] > 0
    assert "pairs/s wall" in capsys.readouterr().out


def test_metrics_benchmark_times_both_directions():
    from tools import bench_metrics

    out = bench_metrics.main(["--queries=300", "--gallery=200", "--ids=50", "--dim=16", "--repeats=1"])
    assert out["t2i_s_median"] > 0 and out["i2t_s_median"] > 0 and 0 <= out["i2t_R1"] <= 100
