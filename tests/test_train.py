"""End to end: a tiny config trains, evaluates, checkpoints, resumes (also after SIGTERM), and fails clearly."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import synthetic as synthetic_config
from uit_jax import build as build_lib
from uit_jax import checkpoint as ckpt_lib
from uit_jax import config as config_lib
from uit_jax import evaluate, rundir, train
from uit_jax import state as state_lib
from uit_jax.data import prepare, train_input


def tiny_config(root, **overrides):
    c = synthetic_config.get_config("tiny")
    c.data.manual_dir = str(root / "raw")
    c.data.data_dir = str(root / "tfds")
    c.data.image_size = (32, 16)
    s = c.data.synthetic
    s.train_ids, s.val_ids, s.test_ids, s.images_per_id, s.height, s.width = 16, 6, 6, 2, 32, 16
    c.batch_size = 16
    c.eval.batch_size = 32
    c.total_steps = 4
    c.eval.every_epochs = 1.0  # 64 pairs / 16 = 4 steps per epoch: one validation, at the end
    c.checkpoint.async_save = False
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    prepare.prepare(tiny_config(root).data)  # generate + build once for every test here
    return root


def _params(workdir, config, step=None):
    setup = build_lib.build(config)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    abstract, *_ = state_lib.train_state_spec(
        config, setup.model, mesh, jax.random.key(config.seed), setup.info.num_train_pairs
    )
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    step = ckpt.latest_step() if step is None else step
    state = ckpt.restore(step, abstract).state
    ckpt.close()
    return jax.device_get(state["params"]), step


def test_end_to_end_writes_results(data_root, tmp_path):
    wd = tmp_path / "run"
    config = tiny_config(data_root)
    res = train.train_and_evaluate(config, str(wd))
    saved = json.loads((wd / "results.json").read_text())
    assert saved["steps"] == 4 and saved["best_step"] == 4
    for key in ("test_at_last", "test_at_best"):
        m = saved[key]
        assert set(m) >= {"R1", "R5", "R10", "mAP", "mINP", "num_queries", "num_gallery"}
        assert 0.0 <= m["mINP"] <= 100.0 and 0.0 <= m["mAP"] <= 100.0 and 0.0 <= m["R1"] <= m["R5"] <= m["R10"] <= 100.0
        assert m["num_gallery"] == 6 * 2 and m["num_queries"] == 6 * 2 * 2  # every test image / caption once
    assert res["test_at_best"] == saved["test_at_best"]
    assert saved["test_at_last"] == saved["test_at_best"]  # best is the last step: evaluated once, reported twice
    assert "R1" in saved["table"] and len(saved["report"]) == 2
    assert saved["nonfinite_steps"] == 0
    assert saved["selection"] == {"rule": "best_val", "split": "val", "label": "best val"}
    assert "i2t_R1" in saved["table"] and 0 <= saved["test_at_best"]["i2t_mAP"] <= 100
    curve = [json.loads(line) for line in (wd / "val_curve.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in curve] == [(4, 1.0)] and 0.0 <= curve[0]["R1"] <= 100.0
    events = [f for f in os.listdir(wd) if f.startswith("events.out.tfevents")]
    assert events, "no TensorBoard summaries written"
    # --mode=eval restores the best checkpoint and reproduces the test figures
    ev = evaluate.evaluate_run(config, str(wd))
    names = ("R1", "R5", "R10", "mAP", "mINP")
    assert ev["step"] == 4 and {k: ev["results"]["test @ step 4"][k] for k in names} == {
        k: saved["test_at_best"][k] for k in names
    }


def test_eval_without_a_checkpoint_is_one_clear_error_and_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint under .*; train first"):
        evaluate.evaluate_run(tiny_config(tmp_path), str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists() and not (tmp_path / "raw").exists()


def test_one_run_per_workdir(tmp_path, caplog):
    import fcntl

    wd = tmp_path / "wd"
    wd.mkdir()
    with open(wd / ".lock", "w") as holder:  # a live run holds the lock
        holder.write("host h1, pid 123, since 2026-11-27 10:00:00\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(rundir.WorkdirInUseError, match=r"in use by another run \(host h1, pid 123, since 2026"):
            train.train_and_evaluate(tiny_config(tmp_path), str(wd))
    assert not (tmp_path / "raw").exists(), "the refused run did dataset work"
    # The holder died (the kernel dropped its lock) and left its file: taken over, with a warning.
    with rundir.WorkdirLock(str(wd)):
        assert f"pid {os.getpid()}," in (wd / ".lock").read_text()
        assert "stale workdir lock (host h1, pid 123" in caplog.text
    assert (wd / ".lock").read_text() == ""  # a clean exit leaves no holder


def test_epochs_to_steps_one_rule():
    assert config_lib.epochs_to_steps(1.5, 62) == 93 and config_lib.epochs_to_steps(0.0, 62) == 0
    assert config_lib.epochs_to_steps(0.01, 62) == 1 and config_lib.epochs_to_steps(0.5 / 62, 62) == 0  # nearest
    # The run's length follows the same rule: 2.51 epochs of 62 steps is 156 steps, not int(155.62) = 155.
    from types import SimpleNamespace

    c = SimpleNamespace(batch_size=128, total_steps=0, schedule=SimpleNamespace(epochs=2.51))
    assert config_lib.steps_per_epoch(c, 8000) == 62 and config_lib.total_steps(c, 8000) == 156
    c.total_steps = 7
    assert config_lib.total_steps(c, 8000) == 7


def test_sigterm_then_resume_equals_uninterrupted(data_root, tmp_path, monkeypatch):
    config = tiny_config(data_root, **{"eval.every_epochs": 0.0})
    straight = tmp_path / "straight"
    train.train_and_evaluate(config, str(straight))

    # Interrupted: SIGTERM arrives while step 2's batch is being read; the run saves step 2 and returns.
    real = train_input.make_train_iterator

    def iterator_that_gets_killed(*args, **kwargs):
        for i, batch in enumerate(real(*args, **kwargs)):
            if i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(train_input, "make_train_iterator", iterator_that_gets_killed)
    out = train.train_and_evaluate(config, str(interrupted))
    assert out == {"stopped_at_step": 2}
    monkeypatch.setattr(train_input, "make_train_iterator", real)
    assert not (interrupted / "results.json").exists()

    # Resumed: same command, continues from step 2 to the end.
    train.train_and_evaluate(config, str(interrupted))
    p_straight, s1 = _params(str(straight), config)
    p_resumed, s2 = _params(str(interrupted), config)
    assert s1 == s2 == 4
    # Same machine, same mesh, same compiled step replayed from the restored state: no reduction order differs,
    # so the only slack is for a recompiled program fusing differently (~1 ulp of parameters of size ~1).
    for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    r1 = json.loads((straight / "results.json").read_text())["test_at_last"]
    r2 = json.loads((interrupted / "results.json").read_text())["test_at_last"]
    assert r1["R1"] == r2["R1"] and abs(r1["mAP"] - r2["mAP"]) < 1e-4


def test_nonfinite_losses_stop_the_run_with_last_good_checkpoint(data_root, tmp_path):
    # An absurd learning rate makes the parameters blow up after the first update; every later step is
    # non-finite and skipped; after 2 in a row the run stops, keeping the last checkpoint (step 1).
    config = tiny_config(
        data_root,
        **{
            "optim.lr": 1e30,
            "checkpoint.max_nonfinite_in_row": 2,
            "checkpoint.every_steps": 1,
            "eval.every_epochs": 0.0,
            "total_steps": 8,
            "schedule.warmup_epochs": 0,
        },
    )
    with pytest.raises(train.NonFiniteLossError, match="non-finite"):
        train.train_and_evaluate(config, str(tmp_path / "nan"))
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "nan" / "checkpoints"), async_save=False)
    latest = ckpt.latest_step()
    ckpt.close()
    params, _ = _params(str(tmp_path / "nan"), config, latest)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)), "a non-finite state was checkpointed"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 12}, "multiple of the 8 devices"),
        ({"data.image_size": (36, 16)}, "not a multiple of the patch stride"),
        ({"data.name": "market1501"}, "not a known dataset"),
        ({"loss.sdm": -1.0}, "must be >= 0"),
        ({"loss.triplet_start_epochs": -1.0}, "triplet_start_epochs=-1.0 must be >= 0"),
        ({"model.remat": "some"}, "config.model.remat='some' is not a remat policy: use one of none, full, dots"),
        (
            {"model.attention": "flash"},
            "config.model.attention='flash' is not an attention kernel: use one of auto, xla, einsum, cudnn",
        ),
        ({"model.attention": "cudnn"}, "attention='cudnn' needs a CUDA GPU, but JAX's backend is 'cpu'"),
        ({"data.image_size": (128,)}, r"image_size=\(128,\) must be \(height, width\)"),
        ({"loss.mlm": 1.0}, "set --config.data.mlm_outputs=True"),
        ({"data.tagger": "/nonexistent/tags.tsv"}, "cannot read the word->tag file"),
    ],
)
def test_config_errors_fail_before_building(tmp_path, overrides, message):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "raw").exists(), "the dataset was generated before the config was checked"


def test_wrong_weights_fail_before_any_dataset_work(tmp_path):
    """A model_init folder without weights is reported in seconds, before the synthetic set is generated."""
    (tmp_path / "clip").mkdir()
    config = tiny_config(tmp_path, model_init=str(tmp_path / "clip"))
    with pytest.raises(Exception, match="clip"):
        train.train_and_evaluate(config, str(tmp_path / "wd"))
    assert not (tmp_path / "raw").exists(), "the dataset was generated before the weights were loaded"


def test_cli_fatal_error_is_one_message_and_a_prompt_exit(tmp_path):
    """`--mode=eval` with no checkpoint: rc 1, the message first, no second traceback, nothing created."""
    import subprocess
    import sys
    import time

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "uit_jax.main", "--config=configs/synthetic.py:tiny", f"--workdir={tmp_path / 'wd'}",
         "--mode=eval"],
        cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "UIT_DATA_ROOT": str(tmp_path / "data"), "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert p.returncode == 1, p.stderr[-2000:]
    assert "Fatal: FileNotFoundError: No checkpoint under" in p.stderr
    assert "cannot schedule new futures" not in p.stderr and p.stderr.count("Traceback") <= 1
    assert not (tmp_path / "wd").exists() and not (tmp_path / "data").exists()
    assert time.time() - t0 < 60


def test_persistent_compilation_cache(tmp_path):
    """uit_jax.compile_cache.enable() points JAX's persistent cache at a folder that compiled programs land in;
    UIT_JAX_CACHE='' turns it off."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp\n"
        "from uit_jax import compile_cache\n"
        "print(compile_cache.enable())\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).block_until_ready()\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for value in (str(tmp_path / "cache"), ""):
        env = {**os.environ, "UIT_JAX_CACHE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == (value or "None")
    assert any((tmp_path / "cache").iterdir()), "no compiled program was written to the cache"


def test_unwritable_checkpoint_folder_stops_before_any_work(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "checkpoints").write_text("a file where the checkpoint folder should be")  # root ignores chmod; this not
    with pytest.raises(ckpt_lib.CheckpointError, match=r"Cannot write checkpoints to .*wd.checkpoints: File exists"):
        train.train_and_evaluate(tiny_config(tmp_path), str(wd))
    assert not (tmp_path / "raw").exists(), "the refused run did dataset work"


@pytest.mark.slow
def test_a_full_disk_is_one_sentence_on_a_real_small_disk(data_root, tmp_path):
    """A 1 MiB tmpfs as the workdir (a checkpoint of the tiny model is ~2.5 MiB): the run ends with the one-sentence
    disk error naming the step, the folder and the last good checkpoint. Needs permission to mount; where there is
    none, test_disk_errors_are_one_sentence_naming_step_folder_and_last_good injects the same OSError instead."""
    import subprocess

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()[:120]}); the injected test covers it")
    try:
        want = r"No space left on device while saving checkpoint step \d+ to .*small.run.checkpoints; the last good"
        with pytest.raises(ckpt_lib.CheckpointError, match=want):
            train.train_and_evaluate(tiny_config(data_root, **{"checkpoint.every_steps": 2}), str(small / "run"))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("name", ["cuhk", "icfg", "rstp"])
def test_vit_l14_variant_is_valid_and_builds_its_grid(name):
    """The large variant's image size tiles its 14-pixel patches (IRRA's 27 x 9 grid at 384x128); checked on an
    abstract model (no weights)."""
    import importlib

    from uit_jax.models import clip as clip_lib

    config = importlib.import_module(f"configs.{name}").get_config("vit-l14")
    config_lib.validate(config, 1)
    assert tuple(config.data.image_size) == (378, 126) and config.model.stride == 14
    assert config.model.scan_layers and config.model.remat == "full"  # fits one 80 GB GPU at batch 128
    base = importlib.import_module(f"configs.{name}").get_config()
    assert not base.model.scan_layers and base.model.remat == "none"
    c = clip_lib.config_from_preset("vit-l14", image_size=config.data.image_size, stride=config.model.stride)
    model = clip_lib.CLIP(c)
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 378, 126, 3), np.float32),
        jax.ShapeDtypeStruct((1, 77), np.int32),
    )  # fmt: skip
    assert c.grid == (27, 9)
    assert shapes["params"]["vision_model"]["embeddings"]["position_embedding"]["embedding"].shape == (1 + 243, 1024)


def test_the_papers_protocol_is_labelled_in_every_output(data_root, tmp_path):
    """eval.select_on='test' picks the checkpoint by test R1 (the papers' protocol): results.json, the printed
    table, TensorBoard and val_curve.jsonl say so; the default selects on validation and says that."""
    wd = tmp_path / "papers"
    res = train.train_and_evaluate(tiny_config(data_root, **{"eval.select_on": "test"}), str(wd))
    assert res["selection"]["rule"] == "best_test_epoch" and "papers' protocol" in res["selection"]["label"]
    assert "selected_on_test" in res and "val_at_best" not in res
    assert "best TEST epoch (the papers' protocol" in res["table"]
    curve = [json.loads(line) for line in (wd / "val_curve.jsonl").read_text().splitlines()]
    assert [r["split"] for r in curve] == ["test"]
    assert set(res["test_at_best"]) >= {"i2t_R1", "i2t_R5", "i2t_R10", "i2t_mAP", "i2t_mINP"}
    assert sum(res["test_rank_buckets"].values()) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="config.eval.select_on='best'"):
        train.train_and_evaluate(tiny_config(data_root, **{"eval.select_on": "best"}), str(tmp_path / "bad"))


def test_a_resume_may_not_switch_the_selection_rule(tmp_path):
    from uit_jax import rundir

    wd = tmp_path / "wd"
    wd.mkdir()
    old = rundir.config_to_dict(tiny_config(tmp_path))
    del old["eval"]["select_on"]  # a run from before the field: it selected on validation
    (wd / rundir.CONFIG_FILE).write_text(json.dumps(old))
    rundir.check_resume(str(wd), tiny_config(tmp_path))  # the same rule
    with pytest.raises(rundir.ConfigChangedError, match=r"eval.select_on: '<absent>' -> 'test'"):
        rundir.check_resume(str(wd), tiny_config(tmp_path, **{"eval.select_on": "test"}))
