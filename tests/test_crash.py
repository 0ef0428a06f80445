"""kill -9 at the points where a run is most fragile: every restart resumes from the newest finished checkpoint and
the run ends where an uninterrupted one does (subprocesses, real SIGKILL via uit_jax.faults)."""

import json
import signal
import subprocess

import jax
import numpy as np
import pytest

from tests.test_multiprocess_train import ROOT, _cmd, _env
from tests.test_train import _params, data_root, tiny_config  # noqa: F401  (data_root is a fixture)
from uit_jax import faults

EXTRA = ("--config.total_steps=4", "--config.checkpoint.every_steps=1", "--config.checkpoint.async_save=True")


def _run(root, wd, kill_at=None):
    env = _env(1)
    env.pop(faults.ENV, None)
    if kill_at:
        env[faults.ENV] = kill_at
    p = subprocess.run(_cmd(root, wd, EXTRA), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):  # noqa: F811
    wd = tmp_path_factory.mktemp("crash") / "straight"
    rc, out = _run(data_root, wd)
    assert rc == 0, out[-3000:]
    return wd


def _check_same_end(data_root, reference, wd):  # noqa: F811
    config = tiny_config(data_root)
    (a, s1), (b, s2) = _params(str(reference), config), _params(str(wd), config)
    assert s1 == s2 == 4
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)  # the resumed replay: ~1 ulp of parameters of size ~1
    r1, r2 = (json.loads((w / "results.json").read_text())["test_at_last"] for w in (reference, wd))
    assert r1["R1"] == r2["R1"] and abs(r1["mAP"] - r2["mAP"]) < 1e-4


def _crash_then_finish(data_root, wd, kills):  # noqa: F811
    for kill_at in kills:
        rc, out = _run(data_root, wd, kill_at)
        assert rc == -signal.SIGKILL, f"{kill_at}: rc {rc}\n{out[-3000:]}"
        assert not (wd / "results.json").exists()
    rc, out = _run(data_root, wd)
    assert rc == 0, out[-3000:]
    return out


def test_kill_during_an_async_save_then_during_the_restore(data_root, reference, tmp_path):  # noqa: F811
    # The second save in flight (Orbax also removes step 1 then), then the restart dies while restoring.
    out = _crash_then_finish(data_root, tmp_path / "wd", ["saved:2", "restore"])
    assert "Restored checkpoint" in out
    _check_same_end(data_root, reference, tmp_path / "wd")


def test_kill_during_the_final_evaluation(data_root, reference, tmp_path):  # noqa: F811
    _crash_then_finish(data_root, tmp_path / "wd", ["final_eval"])
    _check_same_end(data_root, reference, tmp_path / "wd")


@pytest.mark.slow
@pytest.mark.parametrize(
    "kills", [["compile"], ["save:3"], ["saved:3", "saved:1"], ["finalize"], ["saved:1", "compile"]]
)
def test_kill_anywhere_else(data_root, reference, tmp_path, kills):  # noqa: F811
    _crash_then_finish(data_root, tmp_path / "wd", kills)
    _check_same_end(data_root, reference, tmp_path / "wd")


def test_delay_sleeps_once_at_its_point(monkeypatch):
    """UIT_JAX_DELAY_AT=POINT:SECONDS (the slow process of tests/test_multiprocess_train.py) sleeps at POINT the
    first time only, and nowhere else."""
    import time

    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(faults, "_seen", {})
    monkeypatch.setenv(faults.DELAY_ENV, "compile:40")
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.point("save")
    assert slept == []
    faults.point("compile")
    faults.point("compile")
    assert slept == [40.0]
