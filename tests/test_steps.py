"""Train step: same loss and update on 1 device and on 8 simulated devices; non-finite steps are skipped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import numerics
from uit_jax import sharding, steps
from uit_jax.models import clip as clip_lib
from uit_jax.models import uit as uit_lib

WEIGHTS = dict(sdm=1.0, id=1.0, triplet=10.0, restoration=10.0, itc=0.5, mlm=0.0)
# The longest sums in this step are the weight gradients over B x L = 8 x 12 token rows, taken through two-layer
# towers (a chain of ~2 such sums): n = 256 bounds the terms any one result accumulates. 2 * gamma_256 = 6.1e-5 of
# the quantity compared; measured 1.7e-6 of the update (Intel, AVX-512 and --xla_cpu_max_isa=AVX2 alike) and
# 3.6e-6 on an AMD EPYC, so the bound has >15x headroom while a sharding bug (errors >= 1e-1 of the update) fails.
RTOL = numerics.reduction_rtol(256)


def _setup(batch=8, **model_kw):
    cfg = clip_lib.config_from_preset("tiny", image_size=(32, 16), vocab_size=64, text_len=12, eot_token_id=63)
    model = uit_lib.UIT(clip_config=cfg, num_classes=5, drop_ratio=0.5, decoder_layers=1, **model_kw)
    rng = np.random.default_rng(0)
    text = rng.integers(1, 60, (batch, cfg.text_len)).astype(np.int32)
    text[:, 7] = 63  # end-of-text, then padding
    text[:, 8:] = 0
    batch_np = dict(
        images=rng.standard_normal((batch, 32, 16, 3)).astype(np.float32),
        text=text,
        pid=np.array([0, 0, 1, 1, 2, 3, 4, 4], np.int32)[:batch],
    )
    params = model.init(
        {"params": jax.random.key(0)}, batch_np["images"][:1], batch_np["text"][:1], rng=jax.random.key(1)
    )["params"]
    return cfg, model, params, batch_np


def _run(mesh, n_steps=2, split=False, **model_kw):
    cfg, model, params, batch_np = _setup(**model_kw)
    # Plain SGD: Adam would turn float rounding in near-zero gradients into lr-sized differences.
    tx = optax.sgd(0.5)
    loss_fn = steps.make_loss_fn(model, WEIGHTS, logit_scale=50.0, patch_size=cfg.patch_size)
    state = steps.init_state(params, tx)
    specs = sharding.param_partition_specs(state, ((".*", "fsdp"),), mesh)
    state_sh = sharding.shardings_for(specs, mesh)
    # The trainer's jit: shardings, donation.
    step = steps.jit_train_step(loss_fn, tx, None, state_sh, mesh, split=split)
    state = jax.device_put(state, state_sh)
    batch = sharding.host_batch_to_global(batch_np, mesh)
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(n_steps):
            before = state
            state, m = step(state, batch, jax.random.key(7))
            losses.append(float(m["loss"]))
            assert all(x.is_deleted() for x in jax.tree.leaves(before["params"]))  # donated
    return losses, jax.device_get(state["params"]), m


_DATA_MESH_ONE_STEP = {}


def _one_step_on_data_mesh():
    """One step of the plain model on the 8-device data mesh, the reference of two tests (computed once)."""
    if not _DATA_MESH_ONE_STEP:
        _DATA_MESH_ONE_STEP["run"] = _run(sharding.make_mesh({"data": -1}), n_steps=1)
    return _DATA_MESH_ONE_STEP["run"]


def test_one_device_equals_eight_devices():
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": -1})
    assert eight.size == 8
    l1, p1, m1 = _run(one)
    l8, p8, m8 = _run(eight)
    np.testing.assert_allclose(l1, l8, rtol=RTOL)  # measured 1.6e-7 (2.5e-7 with AVX2)
    for k in ("loss_sdm", "loss_id", "loss_triplet", "loss_restoration", "loss_itc"):
        assert k in m1 and np.isfinite(float(m1[k]))
    _, _, params0, _ = _setup()
    # Different reduction orders across devices; two SGD steps (the second from parameters that already differ by
    # rounding) measured 1.7e-6 of the largest move (~32), the same as one step.
    rel, moved = numerics.assert_updates_close(p1, p8, params0, RTOL, steps=2)
    assert moved > 0.1, moved  # the update really moved the parameters
    print(f"one vs eight devices: {rel:.3g} of the move {moved:.3g}")


def test_fsdp_mesh_matches_data_mesh():
    fsdp = sharding.make_mesh({"data": 2, "fsdp": 4})
    l_d, p_d, _ = _one_step_on_data_mesh()
    l_f, p_f, _ = _run(fsdp, n_steps=1)
    np.testing.assert_allclose(l_d, l_f, rtol=RTOL)  # forward only: measured 6.6e-8
    # Was an absolute 1e-4 on a move of ~32 (3e-6 relative): 1.16e-4 on an AMD EPYC failed it. Measured here
    # 1.7e-6 of the move (1.8e-6 with --xla_cpu_max_isa=AVX2).
    _, _, params0, _ = _setup()
    rel, moved = numerics.assert_updates_close(p_d, p_f, params0, RTOL)
    print(f"data vs data x fsdp mesh: {rel:.3g} of the move {moved:.3g}")


def test_split_step_matches_one_program():
    """The trainer's default, gradient and update as two programs (`SplitTrainStep`), on the FSDP mesh: the same
    loss, update and metrics as the single program."""
    fsdp = sharding.make_mesh({"data": 2, "fsdp": 4})
    l_d, p_d, m_d = _one_step_on_data_mesh()
    l_s, p_s, m_s = _run(fsdp, n_steps=1, split=True)
    np.testing.assert_allclose(l_d, l_s, rtol=RTOL)
    _, _, params0, _ = _setup()
    rel, moved = numerics.assert_updates_close(p_d, p_s, params0, RTOL)
    assert moved > 0.1, moved
    assert set(m_s) == set(m_d)
    for k in m_d:  # losses, gradient and parameter norms (sums of squares over every parameter), counters
        np.testing.assert_allclose(float(m_s[k]), float(m_d[k]), rtol=RTOL, err_msg=k)
    print(f"one program on data vs split on data x fsdp: {rel:.3g} of the move {moved:.3g}")


def test_split_step_compiles_each_program_once():
    """The first call compiles the gradient and the update, once each; no later step compiles anything."""
    cfg, model, params, batch_np = _setup()
    tx = optax.sgd(0.1)
    model = model.clone(use_restoration=False)
    loss_fn = steps.make_loss_fn(model, dict(sdm=1.0), logit_scale=50.0, patch_size=cfg.patch_size)
    mesh = sharding.make_mesh({"data": 2}, devices=jax.devices()[:2])
    state = steps.init_state({k: v for k, v in params.items() if k != "decoder"}, tx)
    state_sh = sharding.shardings_for(sharding.param_partition_specs(state, ((".*", "fsdp"),), mesh), mesh)
    step = steps.jit_train_step(loss_fn, tx, None, state_sh, mesh, split=True)
    state = jax.device_put(state, state_sh)
    batch = sharding.host_batch_to_global(batch_np, mesh)
    compiled = []  # the function name of every XLA compile (a persistent-cache hit counts too)
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, fun_name=None, **kw: (
            compiled.append(fun_name) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    with jax.set_mesh(mesh):
        state, m = step(state, batch, jax.random.key(0))
        first = list(compiled)
        for _ in range(2):
            state, m = step(state, batch, jax.random.key(0))
        jax.block_until_ready(m)
    # Once each: the update's arguments (the gradient's outputs) keep their shapes and shardings from step to step.
    assert first.count("jit(grad_step)") == 1 and first.count("jit(update_step)") == 1, first
    assert compiled == first, f"compiled after the first step: {compiled[len(first) :]}"
    assert int(state["step"]) == 3


def test_scan_and_remat_under_fsdp_match_the_loop():
    """The ViT-L/14 setting (layers under scan, full remat) on a sharded mesh: the same step as the plain loop."""
    fsdp = sharding.make_mesh({"data": 2, "fsdp": 4})
    l_d, p_d, _ = _one_step_on_data_mesh()
    l_s, p_s, _ = _run(fsdp, n_steps=1, scan=True, remat="full")
    np.testing.assert_allclose(l_d, l_s, rtol=RTOL)
    _, _, params0, _ = _setup()
    rel, moved = numerics.assert_updates_close(p_d, p_s, params0, RTOL)
    print(f"loop on data vs scan + remat on data x fsdp: {rel:.3g} of the move {moved:.3g}")


def test_weight_zero_skips_objective():
    cfg, model, params, batch_np = _setup()
    fn = steps.make_loss_fn(
        model.clone(use_restoration=False),
        dict(sdm=1.0, restoration=0.0),
        logit_scale=50.0,
        patch_size=cfg.patch_size,
    )
    params = {k: v for k, v in params.items() if k != "decoder"}
    total, parts = fn(params, batch_np, jax.random.key(0))
    assert set(parts) == {"sdm"}
    np.testing.assert_allclose(float(total), float(parts["sdm"]))
    with pytest.raises(ValueError, match="Unknown loss weights"):
        steps.make_loss_fn(model, dict(sdmm=1.0), logit_scale=50.0, patch_size=cfg.patch_size)


@pytest.mark.parametrize("split", [False, True])
def test_nonfinite_update_is_skipped_and_counted(split):
    cfg, model, params, batch_np = _setup()
    tx = optax.sgd(0.1)
    loss_fn = steps.make_loss_fn(model, dict(sdm=1.0, restoration=1.0), logit_scale=50.0, patch_size=cfg.patch_size)
    state = steps.init_state(params, tx)
    mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state_sh = sharding.shardings_for(sharding.param_partition_specs(state, ((".*", "fsdp"),), mesh), mesh)
    jitted = steps.jit_train_step(loss_fn, tx, None, state_sh, mesh, split=split)
    step = lambda st, b, r: jitted(jax.tree.map(jnp.copy, st), b, r)  # the tests keep the states it donates
    bad = dict(batch_np, images=np.full_like(batch_np["images"], np.nan))
    s1, m1 = step(state, bad, jax.random.key(0))
    assert int(m1["skipped"]) == 1 and int(s1["nonfinite_run"]) == 1 and int(s1["step"]) == 1
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(s1["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s2, m2 = step(s1, bad, jax.random.key(0))
    assert int(s2["nonfinite_run"]) == 2 and int(s2["nonfinite_total"]) == 2
    s3, m3 = step(s2, batch_np, jax.random.key(0))
    assert int(m3["skipped"]) == 0 and int(s3["nonfinite_run"]) == 0 and int(s3["nonfinite_total"]) == 2
    assert any(
        float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(s3["params"]))
    )


def test_delayed_objective_joins_the_total_at_its_start_step():
    cfg, model, params, batch_np = _setup()
    weights = dict(sdm=1.0, triplet=10.0)
    kw = dict(logit_scale=50.0, patch_size=cfg.patch_size)
    model = model.clone(use_restoration=False)
    params = {k: v for k, v in params.items() if k != "decoder"}
    fn = steps.make_loss_fn(model, weights, start_steps={"triplet": 3}, **kw)
    rng = jax.random.key(0)
    before, parts = fn(params, batch_np, rng, jnp.int32(2))
    after, parts_after = fn(params, batch_np, rng, jnp.int32(3))
    assert set(parts) == {"sdm", "triplet"}  # still computed (and logged) before its start
    np.testing.assert_allclose(float(before), float(parts["sdm"]), rtol=1e-6)
    np.testing.assert_allclose(float(after), float(parts["sdm"] + 10.0 * parts["triplet"]), rtol=1e-6)
    assert float(parts["triplet"]) > 0
    # Without a start step the weight is constant, and the step argument is optional.
    plain = steps.make_loss_fn(model, weights, **kw)
    np.testing.assert_allclose(float(plain(params, batch_np, rng)[0]), float(after), rtol=1e-6)
    with pytest.raises(ValueError, match="starts at step 3"):
        fn(params, batch_np, rng)
    with pytest.raises(ValueError, match="Unknown loss weights"):
        steps.make_loss_fn(model, weights, start_steps={"tripplet": 3}, **kw)
    # In the train step, the gradient before the start is the SDM gradient alone.
    tx = optax.sgd(1.0)
    step = jax.jit(steps.make_train_step(fn, tx))
    sdm_only = jax.jit(steps.make_train_step(steps.make_loss_fn(model, dict(sdm=1.0), **kw), tx))
    s_fn, _ = step(steps.init_state(params, tx), batch_np, rng)
    s_ref, _ = sdm_only(steps.init_state(params, tx), batch_np, rng)
    # The updates agree to rounding (two programs, fused differently); a triplet gradient would be of the order
    # of the SDM one, i.e. an error of O(1) of the update.
    numerics.assert_updates_close(s_ref["params"], s_fn["params"], params, RTOL)
