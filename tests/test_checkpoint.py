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


def test_one_best_rule_earliest_on_ties(tmp_path):
    class Manager:  # the two calls best_step makes of an Orbax manager
        def __init__(self, metrics):
            self._m = metrics

        def all_steps(self):
            return list(reversed(self._m))  # any order

        def metrics(self, step):
            if self._m[step] == "damaged":
                raise ValueError("unreadable metrics")
            return self._m[step]

    m = {1: {"val_r1": 40.0}, 3: {"val_r1": 55.0}, 5: {}, 7: {"val_r1": 55.0}, 9: "damaged"}
    assert ckpt_lib.best_step(Manager(m)) == (3, 55.0)
    assert ckpt_lib.best_step(Manager({2: {}})) is None
    # Training (Checkpointer.best) and export/search (read_state) use that one rule.
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(2, _state(2), {}, val_r1=50.0)
    ckpt.save(4, _state(4), {}, val_r1=50.0)  # a tie with step 2; also the latest
    ckpt.wait()
    kept = sorted(ckpt.manager.all_steps())
    best = ckpt.best()
    ckpt.close()
    assert best == (kept[0], 50.0)
    assert ckpt_lib.read_state(str(tmp_path / "ck"), "best").step == best[0]


def test_sigterm_is_a_preemption_inside_the_block(tmp_path):
    import os
    import signal

    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    with ckpt_lib.Preemption():
        assert not ckpt.reached_preemption(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert ckpt.reached_preemption(2)
    assert not ckpt.reached_preemption(3)  # the flag lives for the block only
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


def test_checkpoints_keep_the_unrolled_layout_and_restore_into_either(tmp_path):
    """A run with its layers stacked (scan) saves one subtree per layer, like every other run, so a checkpoint
    written either way resumes either way, sharded: switching `scan_layers` keeps a workdir's checkpoints."""
    from uit_jax import optim, sharding

    rng = np.random.default_rng(0)
    layer = lambda: {"kernel": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "bias": jnp.zeros(4)}  # noqa: E731
    flat = {"encoder": {f"layers_{i}": layer() for i in range(3)}, "head": {"w": jnp.ones(5)}}
    layers = [flat["encoder"][f"layers_{i}"] for i in range(3)]
    stacked_params = {"encoder": {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}, "head": flat["head"]}
    tx = optim.make_optimizer(flat, schedule=1e-3)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})

    def on_mesh(params):
        state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(7)}
        state = jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state)  # non-zero moments
        sh = sharding.shardings_for(sharding.param_partition_specs(state, ((".*", "fsdp"),), mesh), mesh)
        state = jax.device_put(state, sh)
        return state, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)

    flat_state, flat_abstract = on_mesh(flat)
    stacked_state, stacked_abstract = on_mesh(stacked_params)
    assert stacked_abstract["params"]["encoder"]["layers"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(
        None, "fsdp"
    )
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
    ckpt.save(1, stacked_state, {})
    ckpt.wait()
    on_disk = ckpt.manager.item_metadata(1)["state"]["params"]["encoder"]
    assert sorted(on_disk) == ["layers_0", "layers_1", "layers_2"] and on_disk["layers_2"]["kernel"].shape == (8, 4)
    read = ckpt_lib.read_state(str(tmp_path / "ck"), "latest").state  # what export and search read: stacked
    for x, y in zip(jax.tree.leaves(read), jax.tree.leaves(stacked_state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def check(step, abstract, want):
        got = ckpt.restore(step, abstract).state
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert x.sharding == y.sharding
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    check(1, stacked_abstract, stacked_state)
    check(1, flat_abstract, flat_state)
    ckpt.save(2, flat_state, {})  # an unrolled run's checkpoint resumes a stacked one
    ckpt.wait()
    check(2, stacked_abstract, stacked_state)
    ckpt.close()
