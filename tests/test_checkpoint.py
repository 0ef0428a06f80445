"""checkpoint.py: retention keeps the latest and the best, best() names the best step, restore round-trips."""

import jax
import jax.numpy as jnp
import numpy as np

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
