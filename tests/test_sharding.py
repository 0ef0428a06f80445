"""Tests for uit_jax/sharding.py on 8 fake CPU devices, plus a 2-process x 2-device loopback run."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from tests import numerics
from uit_jax import sharding

REPO = Path(__file__).resolve().parents[1]


def test_default_mesh_is_data_over_all_devices_with_auto_axes():
    mesh = sharding.make_mesh()
    assert dict(mesh.shape) == {"data": 8}
    assert mesh.axis_types == (AxisType.Auto,)
    assert list(mesh.devices.flat) == jax.devices()


@pytest.mark.parametrize(
    "shape,expected",
    [
        ({"data": 2, "fsdp": -1}, {"data": 2, "fsdp": 4}),
        ([("data", -1), ("fsdp", 2)], {"data": 4, "fsdp": 2}),
        ({"data": 8, "fsdp": 1}, {"data": 8, "fsdp": 1}),
        ([("data", 4), ("fsdp", 2)], {"data": 4, "fsdp": 2}),
    ],
)
def test_mesh_shapes(shape, expected):
    mesh = sharding.make_mesh(shape)
    assert dict(mesh.shape) == expected
    assert tuple(mesh.axis_names) == tuple(expected)
    assert mesh.axis_types == (AxisType.Auto,) * len(expected)


def test_mesh_over_given_devices():
    mesh = sharding.make_mesh({"data": -1}, devices=jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 4}


@pytest.mark.parametrize(
    "shape,match",
    [
        ({"data": 3}, "multiplies to 3 devices but 8"),
        ({"data": 3, "fsdp": -1}, "does not divide 8"),
        ({"data": -1, "fsdp": -1}, "at most one -1"),
        ({"data": 0}, "positive"),
        ([("data", 2), ("data", 4)], "repeat"),
    ],
)
def test_mesh_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


def _params():
    return {
        "enc": {"kernel": np.zeros((16, 24)), "bias": np.zeros(24)},
        "head": {"kernel": np.zeros((6, 10)), "tall": np.zeros((12, 10))},
        "square": np.zeros((8, 8)),
        "layers": [np.zeros((4, 3)), np.zeros((8,))],
    }


def test_rules_to_specs():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rules = [
        ("enc/bias", "replicate"),
        ("enc/.*", "fsdp"),  # kernel (16, 24): both divisible by 4 -> the larger, dim 1
        ("head/.*", "fsdp"),  # (6, 10): nothing divisible -> replicated; (12, 10) -> dim 0
        ("square", "fsdp"),  # tie -> the first dim
        ("layers/0", P("data", None)),
        ("layers/.*", P("fsdp")),  # never reached for layers/0: the first match wins
    ]
    specs = sharding.param_partition_specs(_params(), rules, mesh)
    assert specs["enc"]["kernel"] == P(None, "fsdp")
    assert specs["enc"]["bias"] == P()
    assert specs["head"]["kernel"] == P()
    assert specs["head"]["tall"] == P("fsdp")
    assert specs["square"] == P("fsdp")
    assert specs["layers"][0] == P("data", None)
    assert specs["layers"][1] == P("fsdp")


def test_rules_default_replicated_and_abstract_leaves():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    abstract = jax.eval_shape(lambda: jax.tree.map(jnp.asarray, _params()))
    specs = sharding.param_partition_specs(abstract, [("enc/kernel", "fsdp")], mesh)
    assert specs["enc"]["kernel"] == P(None, "fsdp")
    assert all(s == P() for s in [specs["enc"]["bias"], specs["head"]["kernel"], specs["square"]])


def test_fsdp_rule_on_data_only_mesh_replicates():
    specs = sharding.param_partition_specs(_params(), [(".*", "fsdp")], sharding.make_mesh())
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))


@pytest.mark.parametrize(
    "rule,match",
    [
        (("enc/kernel", P("model")), "mesh axis 'model'"),
        (("enc/bias", P(None, "fsdp")), "more entries"),
        (("enc/bias", "shard"), "must be a PartitionSpec"),
        (("head/kernel", P(None, "fsdp")), "head/kernel dim 1 of size 10 is not divisible by 4"),
    ],
)
def test_rule_errors(rule, match):
    with pytest.raises(ValueError, match=match):
        sharding.param_partition_specs(_params(), [rule], sharding.make_mesh({"data": 2, "fsdp": 4}))


def test_shardings_for():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    specs = sharding.param_partition_specs(_params(), [("enc/kernel", "fsdp")], mesh)
    shardings = sharding.shardings_for(specs, mesh)
    assert jax.tree.structure(shardings) == jax.tree.structure(_params())
    assert shardings["enc"]["kernel"] == NamedSharding(mesh, P(None, "fsdp"))
    assert shardings["square"] == NamedSharding(mesh, P())


def test_batch_sharding():
    assert sharding.batch_sharding(sharding.make_mesh()).spec == P("data")
    assert sharding.batch_sharding(sharding.make_mesh({"data": 2, "fsdp": 4})).spec == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="none of"):
        sharding.batch_sharding(sharding.make_mesh({"model": 8}))


def test_check_batch_divisible():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    sharding.check_batch_divisible(16, mesh)
    with pytest.raises(ValueError, match=r"batch size 12 .* 8 data shards .*multiple of 8"):
        sharding.check_batch_divisible(12, mesh)


def test_host_batch_to_global_single_process():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2})
    rng = np.random.default_rng(0)
    batch = {"images": rng.random((16, 4, 4, 3), dtype=np.float32), "pid": np.arange(16, dtype=np.int32)}
    out = sharding.host_batch_to_global(batch, mesh)
    for key, x in batch.items():
        assert out[key].shape == x.shape and out[key].dtype == x.dtype
        assert out[key].sharding == sharding.batch_sharding(mesh)
        for shard in out[key].addressable_shards:  # each device holds its 2 rows
            assert shard.data.shape[0] == 2
            np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    with pytest.raises(ValueError, match="'pid'.*multiple of this process's 8 data shards"):
        sharding.host_batch_to_global({"pid": np.arange(12)}, mesh)


def test_sharded_matmul_equals_unsharded():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 24)).astype(np.float32)
    params = {"w": rng.standard_normal((24, 32)).astype(np.float32)}
    p_shardings = sharding.shardings_for(sharding.param_partition_specs(params, [("w", "fsdp")], mesh), mesh)
    assert p_shardings["w"].spec == P(None, "fsdp")
    params = jax.device_put(params, p_shardings)
    xb = sharding.host_batch_to_global({"x": x}, mesh)["x"]
    fn = jax.jit(
        lambda p, x: jnp.tanh(x @ p["w"]),
        in_shardings=(p_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.batch_sharding(mesh),
    )
    out = fn(params, xb)
    assert out.sharding == sharding.batch_sharding(mesh)
    # tanh is 1-Lipschitz, so the 24-term dot product's Higham bound carries over: 2 * gamma_24 * (|x| @ |w|), plus
    # the error of the two tanh implementations (XLA's is a rational approximation, a few ulp; measured 2 ulp).
    w = np.asarray(params["w"])
    bound = numerics.reduction_rtol(24) * (np.abs(x) @ np.abs(w)) + 8 * numerics.F32_EPS
    err = np.abs(sharding.gather_to_host(out) - np.tanh(x @ w))
    assert np.all(err <= bound), float(err.max())


def test_gather_to_host_single_process():
    mesh = sharding.make_mesh()
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    arr = jax.device_put(x, sharding.batch_sharding(mesh))
    got = sharding.gather_to_host(arr)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, x)
    tree = sharding.gather_to_host({"a": arr, "b": jnp.float32(2.0)})
    np.testing.assert_array_equal(tree["a"], x)
    assert tree["b"] == 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_loopback():
    """2 processes x 2 CPU devices: per-process halves -> global batch, jitted sum, gather_to_host."""
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
    )
    port = _free_port()
    worker = str(REPO / "tests" / "multiprocess_worker_sharding.py")
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(port), str(i)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 90
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
        assert f"OK {i}" in out
