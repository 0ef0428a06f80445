"""Gradient caching (`config.micro_batch`): the chunked step is the one-shot step, to float32 rounding.

Every comparison is against the one-shot step (`steps.make_grad_step`) on the same inputs. The bound is the one of
tests/test_steps.py, for the same reason: the two steps compute the same sums (a weight gradient over the batch's
B x L token rows, the embedding gradients over B columns) in another order, chunk by chunk instead of at once, so
they differ by at most 2 * gamma_256 of the quantity compared (tests/numerics.py); a chunking bug (a chunk's rows
given another row's noise or cotangent, a chunk left out or counted twice, a loss averaged over a chunk instead of
the batch) moves a gradient by a fraction of its own size.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import numerics
from tests import test_steps as ts
from tests.test_train import _params, data_root, tiny_config  # noqa: F401  (data_root is a fixture)
from uit_jax import build as build_lib
from uit_jax import config as config_lib
from uit_jax import sharding, steps, train
from uit_jax import state as state_lib

RTOL = ts.RTOL
# Adam's step lr * g / (|g| + eps) has slope lr / eps at g = 0, so with the usual eps a rounding-sized gradient
# difference in a near-zero entry becomes an update difference far above rounding of the largest move (seen: 1.3x
# the bound with eps 1e-3, in a token embedding). With eps 1e3, far above any gradient here, the step is linear in
# the gradient (SGD at lr 1e-3), so an update compares as the gradient does.
LINEAR_ADAM = {"optim.eps": 1e3, "optim.lr": 1.0}
WEIGHTS = dict(ts.WEIGHTS, mlm=1.0)  # every objective: SDM, ID, triplet, restoration, ITC, MLM
MASK_ID = 62


def _setup(rows=16, objectives=WEIGHTS, **model_kw):
    """The tiny model of tests/test_steps.py (with the MLM head when `objectives` has it) and `rows` distinct pairs:
    repeated identities (SDM's several positives), captions of different lengths, a few masked words each."""
    cfg, model, _, _ = ts._setup()
    model = model.clone(use_mlm=bool(objectives.get("mlm")), **model_kw)
    rng = np.random.default_rng(1)
    text = rng.integers(1, 60, (rows, cfg.text_len)).astype(np.int32)
    for i, end in enumerate(rng.integers(4, cfg.text_len, rows)):
        text[i, end] = 63  # end-of-text, then padding
        text[i, end + 1 :] = 0
    masked = (rng.random(text.shape) < 0.3) & (text > 0) & (text < 63)
    batch = dict(
        images=rng.standard_normal((rows, 32, 16, 3)).astype(np.float32),
        text=text,
        pid=rng.permutation(np.arange(rows) // 2 % 5).astype(np.int32),
        mlm_text=np.where(masked, MASK_ID, text).astype(np.int32),
        mlm_labels=np.where(masked, text, 0).astype(np.int32),
    )
    if not model.use_mlm:
        batch = {k: v for k, v in batch.items() if not k.startswith("mlm")}
    params = model.init(
        {"params": jax.random.key(0)},
        batch["images"][:1],
        batch["text"][:1],
        rng=jax.random.key(1),
        mlm_text=batch.get("mlm_text", batch["text"])[:1] if model.use_mlm else None,
    )["params"]
    loss_fn = steps.make_loss_fn(model, objectives, logit_scale=50.0, patch_size=cfg.patch_size)
    return cfg, model, jax.tree.map(np.asarray, params), batch, loss_fn


def _steps(mesh, micro_batch, rows=16, objectives=WEIGHTS, one_shot=True, **model_kw):
    """The one-shot step's (loss, parts, grads) (None unless `one_shot`), the chunked step's (loss, parts, grads,
    aux), and the one-shot forward pass's outputs (what it draws and embeds), on `mesh`."""
    cfg, model, params, batch_np, loss_fn = _setup(rows, objectives, **model_kw)
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    batch = sharding.host_batch_to_global(batch_np, mesh)
    rng, step = jax.random.key(7), jnp.int32(3)
    chunked = steps.make_gradcache_grad_step(loss_fn, micro_batch, mesh, with_aux=True)
    forward = lambda p, b: model.apply(  # the one-shot step's forward pass (grad_step folds the step into the rng)
        {"params": p}, b["images"], b["text"], rng=jax.random.fold_in(rng, step), mlm_text=b.get("mlm_text")
    )
    with jax.set_mesh(mesh):
        ref = jax.device_get(jax.jit(steps.make_grad_step(loss_fn))(params, batch, rng, step)) if one_shot else None
        got = jax.device_get(jax.jit(chunked)(params, batch, rng, step))
        out = jax.device_get(jax.jit(forward)(params, batch)) if one_shot else None
    return ref, got, out


_ONE_DEVICE = {}


def _one_device(objectives, **model_kw):
    """The one-device comparison (4 chunks of 4), computed once per setting for the tests that share it."""
    key = (tuple(sorted(objectives.items())), tuple(sorted(model_kw.items(), key=str)))
    if key not in _ONE_DEVICE:
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
        _ONE_DEVICE[key] = _steps(mesh, 4, objectives=objectives, **model_kw)
    return _ONE_DEVICE[key]


def _assert_same_step(ref, got, rtol=RTOL):
    """Same loss and parts (relative) and the same gradient, element by element, to `rtol` of its largest entry
    (leaves whose gradient is ~0 carry pure rounding noise, so a per-leaf ratio would prove nothing)."""
    (l_ref, p_ref, g_ref), (l_got, p_got, g_got) = ref[:3], got[:3]
    np.testing.assert_allclose(float(l_got), float(l_ref), rtol=rtol)
    assert set(p_got) == set(p_ref)
    for k in p_ref:
        np.testing.assert_allclose(float(p_got[k]), float(p_ref[k]), rtol=rtol, err_msg=k)
    scale = numerics.max_abs(g_ref)
    assert scale > 0
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(g_ref), jax.tree.leaves(g_ref), jax.tree.leaves(g_got)):
        err = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: |diff| {err:.3g} > {rtol:.3g} x {scale:.3g}"
    return numerics.max_abs_diff(g_ref, g_got) / scale


@pytest.mark.parametrize("devices", [1, 8])
def test_chunked_step_equals_one_shot_step(devices):
    """The full objective (SDM + ID + triplet + restoration + ITC + MLM), 16 pairs: on one device in 4 chunks of 4
    rows, on 8 devices in 2 chunks of 1 row per device (8 rows a chunk). Each chunk is given the one-shot step's
    random draws for its rows: its patch masks are the one-shot step's, bit for bit."""
    if devices == 1:
        ref, got, out = _one_device(WEIGHTS)
    else:
        ref, got, out = _steps(sharding.make_mesh({"data": 8}), 1)
    rel = _assert_same_step(ref, got)
    aux = got[3]
    # The re-run's patch-drop noise: every row's mask is the one the one-shot step drew for that row (in the batch's
    # order; a shifted or reused slice of the noise would move whole rows).
    np.testing.assert_array_equal(aux["patch_mask"], out["patch_mask"])
    # The first pass draws nothing (the towers have no random layer): its embeddings are the re-run's and the
    # one-shot step's, to rounding.
    for name, i in (("z_img", 0), ("z_txt", 1)):
        z = out[name]
        for z_pass in (aux["z_pass1"][i], aux["z_pass2"][i]):
            assert numerics.max_abs_diff(z_pass, z) <= RTOL * numerics.max_abs(z), name
    print(f"{devices} device(s): gradient {rel:.3g} of its largest entry")


def test_chunked_train_step_on_fsdp_with_split_scan_and_remat():
    """The trainer's step (`jit_train_step`: shardings, donation, the split programs) with micro_batch on the
    data x fsdp mesh, layers rolled and rematerialised: the same update and metrics as the one-shot step on the
    data mesh."""

    def run(mesh, micro_batch, **model_kw):
        cfg, model, params, batch_np, loss_fn = _setup(objectives=ts.WEIGHTS, **model_kw)
        tx = optax.sgd(0.5)
        state = steps.init_state(params, tx)
        state_sh = sharding.shardings_for(sharding.param_partition_specs(state, ((".*", "fsdp"),), mesh), mesh)
        step = steps.jit_train_step(loss_fn, tx, None, state_sh, mesh, split=True, micro_batch=micro_batch)
        state = jax.device_put(state, state_sh)
        with jax.set_mesh(mesh):
            before = state
            state, metrics = step(state, sharding.host_batch_to_global(batch_np, mesh), jax.random.key(7))
            assert all(x.is_deleted() for x in jax.tree.leaves(before["params"]))  # donated
        return params, jax.device_get(state["params"]), jax.device_get(metrics)

    p0, p_ref, m_ref = run(sharding.make_mesh({"data": -1}), 0)
    _, p_got, m_got = run(sharding.make_mesh({"data": 2, "fsdp": 4}), 1, scan=True, remat="full")
    rel, moved = numerics.assert_updates_close(p_ref, p_got, p0, RTOL)
    assert moved > 0.1, moved
    assert set(m_got) == set(m_ref)
    for k in m_ref:  # losses, gradient and parameter norms, counters
        np.testing.assert_allclose(float(m_got[k]), float(m_ref[k]), rtol=RTOL, err_msg=k)
    print(f"one-shot on data vs chunked on data x fsdp, scan + remat: {rel:.3g} of the move {moved:.3g}")


def test_bfloat16_chunked_step_is_as_close_to_float32_as_the_one_shot_step():
    """bf16 compute: chunking adds no error beyond bf16's own. Both bf16 steps approximate the float32 gradient
    (each rounding 2^-8 relative); if the chunked one is as accurate as the one-shot one, the two differ by at most
    twice the one-shot step's distance from float32 (triangle inequality), which must itself stay well below a
    bug's O(1) of the gradient for the test to mean anything."""
    f32, _, _ = _one_device(WEIGHTS)
    bf16, got, _ = _one_device(WEIGHTS, dtype=jnp.bfloat16)
    scale = numerics.max_abs(f32[2])
    bf16_err = numerics.max_abs_diff(bf16[2], f32[2])
    chunk_err = numerics.max_abs_diff(got[2], bf16[2])
    assert 0 < bf16_err < 0.1 * scale, (bf16_err, scale)
    assert chunk_err <= 2 * bf16_err, (chunk_err, bf16_err)
    loss_err = abs(float(bf16[0]) - float(f32[0]))
    assert abs(float(got[0]) - float(bf16[0])) <= max(2 * loss_err, RTOL * float(f32[0]))
    print(f"bf16: one-shot vs float32 {bf16_err / scale:.3g}, chunked vs one-shot {chunk_err / scale:.3g} of the max")


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sdm", "id", "triplet", "restoration", "itc", "mlm"])
def test_each_objective_alone(objective):
    """Each objective's gradient on its own, 8 devices in 2 chunks: the exactness figures of docs/gradcache.md."""
    mesh = sharding.make_mesh({"data": -1})
    weights = {objective: 1.0}
    model_kw = {} if objective == "restoration" else dict(use_restoration=False)
    ref, got, _ = _steps(mesh, 1, objectives=weights, **model_kw)
    rel = _assert_same_step(ref, got)
    print(f"{objective}: gradient {rel:.3g} of its largest entry")


def test_micro_batch_must_divide_the_per_device_batch(tmp_path):
    with pytest.raises(ValueError, match=r"config.micro_batch=3 must divide the per-device batch 4 \(config.batch"):
        steps.check_micro_batch(3, 32, 8)
    assert steps.check_micro_batch(2, 32, 8) == 2 and steps.check_micro_batch(0, 32, 8) == 1
    config = tiny_config(tmp_path, micro_batch=4)  # batch 16 over 8 devices
    with pytest.raises(ValueError, match=r"config.micro_batch=4 must divide the per-device batch 2 .* one of \[1, 2\]"):
        config_lib.validate(config, 8)
    config_lib.validate(tiny_config(tmp_path, micro_batch=2), 8)
    # The step itself refuses too (the benchmark and tests build it without a config).
    _, _, params, batch, loss_fn = _setup(rows=8, objectives=dict(sdm=1.0), use_restoration=False)
    with pytest.raises(ValueError, match="config.micro_batch=3 must divide the per-device batch 8"):
        jax.eval_shape(steps.make_gradcache_grad_step(loss_fn, 3), params, batch, jax.random.key(0), 0)
    with pytest.raises(TypeError, match="needs the objective from steps.make_loss_fn"):
        steps.make_gradcache_grad_step(lambda *a: 0.0, 2)


def test_resume_with_another_micro_batch_equals_an_uninterrupted_run(data_root, tmp_path):  # noqa: F811
    """The state does not depend on micro_batch: 2 steps in one go, then resumed in chunks (2 of 1 row per device
    on 8 devices) to step 4, ends where 4 one-shot steps end."""
    config = tiny_config(data_root, **{"eval.every_epochs": 0.0, **LINEAR_ADAM})
    straight, switched = tmp_path / "straight", tmp_path / "switched"
    train.train_and_evaluate(config, str(straight))
    assert train.train_and_evaluate(config, str(switched), stop_after=2) == {"stopped_at_step": 2}
    config.micro_batch = 1
    train.train_and_evaluate(config, str(switched))
    p_straight, s1 = _params(str(straight), config)
    p_switched, s2 = _params(str(switched), config)
    assert s1 == s2 == 4
    # With LINEAR_ADAM the update is the gradient times lr / eps, and the chunked gradient differs from the one-shot
    # one by the reduction order only (2 * gamma_256 of the largest, as above): the same bound of the run's largest
    # move holds, plus one ulp per step.
    setup = build_lib.build(config)
    p_start = state_lib.init_params(setup.model, jax.random.split(jax.random.key(config.seed))[0])
    rel, moved = numerics.assert_updates_close(p_straight, p_switched, p_start, RTOL, steps=4)
    print(f"resumed with micro_batch 1 vs uninterrupted one-shot: {rel:.3g} of the move {moved:.3g}")


@pytest.mark.slow
def test_two_processes_in_chunks_match_one_process_at_once(data_root, tmp_path):  # noqa: F811
    """Two processes on loopback (2 CPU devices each), micro_batch 2 (2 chunks of the 4 rows each device holds),
    against one process with 4 devices and the whole batch at once."""
    import subprocess

    from tests import test_multiprocess_train as mp

    single, multi = tmp_path / "single", tmp_path / "multi"
    port = mp._free_port()
    linear = tuple(f"--config.{k}={v}" for k, v in LINEAR_ADAM.items())  # after _cmd's eps: the last one counts
    runs = [(mp._cmd(data_root, single, linear), 4)]
    for pid in range(2):
        extra = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={pid}")
        runs.append((mp._cmd(data_root, multi, (*extra, *linear, "--config.micro_batch=2")), 2))
    procs = [
        subprocess.Popen(cmd, cwd=mp.ROOT, env=mp._env(n), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for cmd, n in runs
    ]
    outs = [p.communicate(timeout=600)[0].decode(errors="replace") for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "process 1 of 2" in outs[2] and "4 global cpu devices" in outs[2]
    config = tiny_config(data_root, **LINEAR_ADAM)
    p_single, s1 = _params(str(single), config)
    p_multi, s2 = _params(str(multi), config)
    assert s1 == s2 == 2
    setup = build_lib.build(config)
    p_start = state_lib.init_params(setup.model, jax.random.split(jax.random.key(config.seed))[0])
    # The chunks only reorder the gradient's sums, and the update is linear in it (LINEAR_ADAM).
    rel, moved = numerics.assert_updates_close(p_single, p_multi, p_start, RTOL, steps=2)
    print(f"two processes in chunks vs one process at once: {rel:.3g} of the move {moved:.3g}")


def test_benchmark_micro_batch(capsys):
    """tools/benchmark.py --micro_batch and the `micro_batch` table key: a timed chunked step, and an AOT compile
    whose temporaries shrink with the chunk (the activations of one chunk are held, not the batch's)."""
    from tools import benchmark

    common = ["--preset=tiny", "--image_size=32,16", "--text_len=12", "--num_classes=5", "--dtype=float32"]
    run = benchmark.main([*common, "--batch=16", "--steps=1", "--micro_batch=1"])
    assert run["micro_batch"] == 1 and run["pairs_per_s"] > 0 and np.isfinite(run["loss"])
    assert "xla_gflops_per_pair" not in run  # XLA counts the chunk loop's body once
    # 64 rows per device against chunks of 4: the one-shot temporaries are megabytes, far above the 0.1 MiB the
    # report rounds to (at 8 rows per device both read 1-2 MiB and the rounding decided the comparison).
    aot = benchmark.main([*common, "--batch=512", "--aot", "--table=micro_batch=0;micro_batch=4"])
    whole, chunked = aot["rows"]
    assert chunked["micro_batch"] == 4 and whole["micro_batch"] == 0
    assert chunked["temp_mib"] < whole["temp_mib"] / 2, (chunked["temp_mib"], whole["temp_mib"])
    capsys.readouterr()
