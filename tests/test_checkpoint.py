"""checkpoint.py: retention keeps the latest and the best, best() names the best step, restore round-trips."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uit_jax import checkpoint as ckpt_lib


def _state(x):
    return {"params": {"w": jnp.full((3, 2), x, jnp.float32)}, "step": jnp.int32(x)}


def test_keeps_latest_and_best_and_restores(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    assert ckpt.latest_step() is None and ckpt.best() is None
    ckpt.save(1, _state(1), {"epoch": 1.0}, val_r1=30.0)
    ckpt.save(2, _state(2), {"epoch": 2.0}, val_r1=55.0)  # the best
    ckpt.save(3, _state(3), {"epoch": 3.0}, val_r1=40.0)
    ckpt.save(4, _state(4), {"epoch": 4.0})  # latest, not evaluated
    ckpt.wait()
    # The best (2) is older than the latest (4): Orbax's max_to_keep + best_fn would delete the latest.
    assert sorted(ckpt.manager.all_steps()) == [2, 4]
    assert ckpt.best() == (2, 55.0) and ckpt.latest_step() == 4
    abstract = jax.eval_shape(lambda: _state(0))
    r = ckpt.restore(2, abstract)
    np.testing.assert_array_equal(np.asarray(r.state["params"]["w"]), np.full((3, 2), 2.0))
    assert r.step == 2 and r.meta["epoch"] == 2.0 and r.meta["val_r1"] == 55.0
    assert not ckpt.reached_preemption(4)
    ckpt.close()
    # A new Checkpointer on the same folder (a resumed run) sees the same latest and best.
    again = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    assert again.latest_step() == 4 and again.best() == (2, 55.0)
    again.close()


def test_a_better_validation_replaces_the_best(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, _state(1), {}, val_r1=10.0)
    ckpt.save(2, _state(2), {}, val_r1=20.0)
    ckpt.wait()
    assert ckpt.best() == (2, 20.0) and sorted(ckpt.manager.all_steps()) == [2]
    ckpt.close()


def _random_state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {"w": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32), "b": jnp.zeros(48)},
        "step": jnp.int32(seed),
    }


def _largest_data_file(step_dir):
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_data_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_64_bytes(step_dir):  # same size, different contents: only the checksum sees it
    f = _largest_data_file(step_dir)
    data = bytearray(f.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    f.write_bytes(bytes(data))


def _delete(rel):
    return lambda step_dir: [p.unlink() if p.is_file() else shutil.rmtree(p) for p in [step_dir / rel]]


def _empty_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("")


FAULTS = {
    "truncated data file": _truncate,
    "64 bytes flipped": _flip_64_bytes,
    "state _METADATA deleted": _delete("state/_METADATA"),
    "empty meta": _empty_meta,
    "state item deleted": _delete("state"),
    "a data file deleted": lambda d: _largest_data_file(d).unlink(),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(tmp_path, fault, caplog):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, _random_state(1), {}, val_r1=10.0)  # kept as the best
    ckpt.save(2, _random_state(2), {})  # the latest
    ckpt.close()
    FAULTS[fault](tmp_path / "ck" / "2")
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    got = ckpt.restore_latest_intact(jax.eval_shape(lambda: _random_state(0)))
    assert got.step == 1
    np.testing.assert_array_equal(np.asarray(got.state["params"]["w"]), np.asarray(_random_state(1)["params"]["w"]))
    assert "Checkpoint step 2" in caplog.text and "damaged" in caplog.text
    assert (tmp_path / "ck" / "2.damaged").exists() and ckpt.latest_step() == 1
    # the run goes on: new checkpoints are written after the set-aside step
    ckpt.save(3, _random_state(3), {})
    ckpt.wait()
    assert ckpt.latest_step() == 3
    ckpt.close()


def test_no_intact_checkpoint_is_an_error_listing_each(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, _random_state(1), {})
    ckpt.close()
    _flip_64_bytes(tmp_path / "ck" / "1")
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    with pytest.raises(
        ckpt_lib.CheckpointError, match=r"No intact checkpoint.*\n  step 1: CheckpointError: .*checksum"
    ):
        ckpt.restore_latest_intact(jax.eval_shape(lambda: _random_state(0)))
    ckpt.close()
    empty = ckpt_lib.Checkpointer(str(tmp_path / "none"), async_save=False)
    assert empty.restore_latest_intact(jax.eval_shape(lambda: _random_state(0))) is None
    empty.close()


def test_nonfinite_parameters_are_never_saved(tmp_path, caplog):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    assert ckpt.save(1, _random_state(1), {})
    bad = _random_state(2)
    bad["params"]["w"] = bad["params"]["w"].at[3, 4].set(jnp.nan)
    assert not ckpt.save(2, bad, {})
    ckpt.wait()
    assert ckpt.latest_step() == 1 and "not all finite" in caplog.text
    ckpt.close()


def test_fingerprint_sees_any_single_change():
    x = {"a": jnp.ones((64, 32)), "n": jnp.arange(10, dtype=jnp.int32), "h": jnp.ones(7, jnp.bfloat16)}
    base = ckpt_lib.fingerprint(x)
    assert base[0] != 0  # equal values do not cancel out
    for key, idx in (("a", (5, 7)), ("n", 3), ("h", 6)):
        y = dict(x)
        bits = np.asarray(y[key]).copy()
        bits.view(np.uint8 if bits.dtype.itemsize == 1 else f"u{bits.dtype.itemsize}")[idx] ^= 1  # one bit
        y[key] = jnp.asarray(bits)
        assert ckpt_lib.fingerprint(y) != base, key


TENSORSTORE_ENOSPC = (
    'RESOURCE_EXHAUSTED: Error writing "x" in OCDBT database at local file "/ck/2/state/": Failed to write 36190 '
    "bytes to file 24: No space left on device [os_error_code='28']"
)  # how tensorstore reported a full 1 MiB tmpfs (tests/test_train.py, --slow)


@pytest.mark.parametrize("form", ["oserror", "tensorstore"])
def test_disk_errors_are_one_sentence_naming_step_folder_and_last_good(tmp_path, monkeypatch, form):
    import errno

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, _random_state(1), {})

    def no_space(*a, **k):
        if form == "tensorstore":
            raise ValueError(TENSORSTORE_ENOSPC)
        raise RuntimeError("async save failed") from OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.manager, "save", no_space)
    with pytest.raises(ckpt_lib.CheckpointError) as e:
        ckpt.save(2, _random_state(2), {})
    msg = str(e.value)
    assert msg.startswith("No space left on device while saving checkpoint step 2 to ")
    assert "the last good checkpoint is step 1" in msg and str(tmp_path / "ck") in msg
    monkeypatch.undo()
    ckpt.close()


def test_step_flag_of_export_and_search():
    assert [ckpt_lib.parse_step(s) for s in ("best", "latest", "120")] == ["best", "latest", 120]
    with pytest.raises(ValueError, match="--step must be best, latest or a step number, got 'last'"):
        ckpt_lib.parse_step("last")
    from uit_jax import export

    with pytest.raises(SystemExit) as e:  # a usage error (argparse, exit code 2), before any file is touched
        export.main(["--workdir=/nonexistent", "--out=/nonexistent/out", "--step=-3"])
    assert e.value.code == 2
