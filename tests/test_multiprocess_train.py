"""Two processes on loopback (jax.distributed, 2 CPU devices each) train like one process with 4 devices."""

import json
import os
import socket
import subprocess
import sys

import jax

from tests import numerics
from tests.test_train import _params, data_root, tiny_config  # noqa: F401  (data_root is a fixture)
from uit_jax import build as build_lib
from uit_jax import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(root, workdir, extra=()):
    c = tiny_config(root)
    return [
        sys.executable, "-m", "uit_jax.main", "--config=configs/synthetic.py:tiny", f"--workdir={workdir}",
        f"--config.data.manual_dir={c.data.manual_dir}", f"--config.data.data_dir={c.data.data_dir}",
        "--config.data.image_size=(32, 16)", "--config.data.synthetic.train_ids=16",
        "--config.data.synthetic.val_ids=6", "--config.data.synthetic.test_ids=6",
        "--config.data.synthetic.images_per_id=2", "--config.data.synthetic.height=32",
        "--config.data.synthetic.width=16", "--config.batch_size=16", "--config.eval.batch_size=32",
        "--config.total_steps=2", "--config.eval.every_epochs=0",
        # Adam with a tiny eps turns float rounding in near-zero gradients (reduction order differs across
        # processes) into lr-sized steps; the paper's eps (1e-3) keeps the comparison meaningful.
        "--config.optim.eps=1e-3", *extra,
    ]  # fmt: skip


def _env(n_devices):
    # UIT_JAX_CACHE is the session's fresh compilation cache (tests/conftest.py): the crash tests restart the same
    # tiny run again and again, and each restart would otherwise compile it anew.
    env = dict(os.environ)
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}", JAX_PLATFORMS="cpu")
    return env


def test_two_processes_match_one(data_root, tmp_path):  # noqa: F811
    single = tmp_path / "single"
    multi = tmp_path / "multi"
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(data_root, single), cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    ]
    for pid in range(2):
        extra = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}")
        procs.append(
            subprocess.Popen(
                _cmd(data_root, multi, extra), cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=600)
        outs.append(out.decode(errors="replace"))
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "process 1 of 2" in outs[2] and "4 global cpu devices" in outs[2]
    # Only process 0 prints the results table and writes results.json.
    assert "Retrieval on synthetic" in outs[1] and "Retrieval on synthetic" not in outs[2]

    config = tiny_config(data_root)
    p_single, s1 = _params(str(single), config)
    p_multi, s2 = _params(str(multi), config)
    assert s1 == s2 == 2
    # Scale: the largest parameter move of the run. Was an absolute 1e-5; the gradients are summed in another
    # order (2 x 2 devices, gloo all-reduce), and Adam (eps 1e-3) turns a gradient error dg into at most
    # lr * dg / eps of update; the sums are those of the train step (tests/test_steps.py), so the same 2 * gamma_256
    # of the move bounds the difference.
    setup = build_lib.build(config)
    p_start = state_lib.init_params(setup.model, jax.random.split(jax.random.key(config.seed))[0])
    # Two Adam steps of ~1e-3 on parameters of ~1: measured 1.2e-7 absolute (one ulp of the parameter, 1e-4 of
    # the move), which the bound's per-step ulp term covers.
    rel, moved = numerics.assert_updates_close(p_single, p_multi, p_start, numerics.reduction_rtol(256), steps=2)
    print(f"two processes vs one: {rel:.3g} of the move {moved:.3g}")
    r_single = json.loads((single / "results.json").read_text())["test_at_last"]
    r_multi = json.loads((multi / "results.json").read_text())["test_at_last"]
    for k in ("num_queries", "num_gallery"):  # every query and gallery image gathered from both processes
        assert r_single[k] == r_multi[k], (k, r_single[k], r_multi[k])
    # Rankings from parameters equal to rounding: identical unless two similarities tie to within rounding, when
    # one query's rank may flip; each metric is a mean over queries, so one flip moves it by at most 100 / queries.
    one_query = 100.0 / r_single["num_queries"]
    for k in ("R1", "R5", "R10", "mAP", "mINP"):
        assert abs(r_single[k] - r_multi[k]) <= one_query + 1e-9, (k, r_single[k], r_multi[k])


def test_a_dead_process_stops_the_others_promptly(data_root, tmp_path):  # noqa: F811
    """kill -9 of one process mid-training: the survivor exits with an error within a bounded time, not a hang.

    Process 1 also reaches its first step 40 s after process 0 (a slow host): gloo gives CPU processes a fixed 30 s
    to meet at a collective's first run, so training starts only because they meet at the coordination-service
    barrier after compiling (sharding.compile_then_meet)."""
    import signal
    import time

    port = _free_port()
    extra = ["--config.total_steps=100000", "--config.checkpoint.every_steps=100000", "--heartbeat_timeout=10"]
    procs = []
    for pid in range(2):
        args = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}", *extra)
        log = open(tmp_path / f"p{pid}.log", "wb")  # noqa: SIM115 - closed below
        env = dict(_env(2), **({"UIT_JAX_DELAY_AT": "compile:40"} if pid == 1 else {}))
        procs.append((subprocess.Popen(_cmd(data_root, tmp_path / "wd", args), cwd=ROOT, env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))  # fmt: skip
    try:
        deadline = time.time() + 300
        while "train/loss" not in (tmp_path / "p0.log").read_text(errors="replace"):  # training has started
            assert time.time() < deadline and procs[0][0].poll() is None, (tmp_path / "p0.log").read_text()[-3000:]
            time.sleep(0.5)
        procs[1][0].send_signal(signal.SIGKILL)
        t0 = time.time()
        rc = procs[0][0].wait(timeout=120)
        waited = time.time() - t0
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    print(f"survivor: rc {rc} after {waited:.1f}s")
    assert rc != 0, (tmp_path / "p0.log").read_text()[-3000:]
    assert waited < 60, f"the survivor took {waited:.0f}s to stop"
