"""One process of tests/test_sharding.py's two-process loopback run (not collected by pytest itself).

Usage: python tests/multiprocess_worker_sharding.py PORT PROCESS_ID, with XLA_FLAGS giving 2 CPU devices.
Each process holds half of an 8-row batch; checks run on the 4-device global mesh; then the coordination-service
barrier (`sharding.wait_for_all_processes`) waits for a late process, and names itself when one is too late.
Prints 'OK <id>'.
"""

import sys
import time

import jax
import numpy as np

from uit_jax import sharding


def main(port: int, process_id: int) -> None:
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())

    full_x = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    full_ids = np.arange(8, dtype=np.int32)
    rows = slice(4 * process_id, 4 * process_id + 4)  # this process's half of the global batch

    mesh = sharding.make_mesh()
    sharding.check_batch_divisible(8, mesh)
    batch = sharding.host_batch_to_global({"x": full_x[rows], "ids": full_ids[rows]}, mesh)
    assert batch["x"].shape == (8, 6) and batch["ids"].shape == (8,), batch["x"].shape
    assert batch["x"].sharding == sharding.batch_sharding(mesh)

    total = jax.jit(lambda b: b["x"].sum() + b["ids"].sum())(batch)
    np.testing.assert_allclose(sharding.gather_to_host(total), full_x.sum() + full_ids.sum())
    np.testing.assert_array_equal(sharding.gather_to_host(batch["x"]), full_x)

    # data x fsdp mesh spanning both processes: the weight is split by the 'fsdp' rule.
    mesh2 = sharding.make_mesh({"data": 2, "fsdp": -1})
    w = np.linspace(-1, 1, 6 * 4, dtype=np.float32).reshape(6, 4)
    w_sharding = sharding.shardings_for(sharding.param_partition_specs({"w": w}, [("w", "fsdp")], mesh2), mesh2)
    assert w_sharding["w"].spec == jax.sharding.PartitionSpec("fsdp"), w_sharding  # 6 > 4, both divisible by 2
    w_global = jax.make_array_from_callback(w.shape, w_sharding["w"], lambda idx: w[idx])
    xb = sharding.host_batch_to_global({"x": full_x[rows]}, mesh2)["x"]
    out = jax.jit(lambda x, w: x @ w, out_shardings=sharding.batch_sharding(mesh2))(xb, w_global)
    # Elementwise Higham bound for a 6-term dot product: |error| <= gamma_6 * (|x| @ |w|); a plain rtol would fail
    # wherever the terms cancel to near zero, depending on the CPU's summation order.
    err = np.abs(sharding.gather_to_host(out) - full_x @ w)
    assert np.all(err <= 2 * 6 * np.finfo(np.float32).eps * (np.abs(full_x) @ np.abs(w))), err.max()

    # The barrier waits for process 1, 3 s late (a collective's first run would give it 30 s on CPU; this, any).
    if process_id == 1:
        time.sleep(3.0)
    t0 = time.monotonic()
    sharding.wait_for_all_processes("test: meet", timeout_s=120)
    if process_id == 0:
        assert time.monotonic() - t0 > 2.0, time.monotonic() - t0  # it did wait
    # Too late: process 1 arrives after the 2 s timeout; process 0's error names the barrier and what to do.
    if process_id == 1:
        time.sleep(6.0)
    try:
        sharding.wait_for_all_processes("test: late", timeout_s=2)
    except RuntimeError as e:
        message = str(e)
    else:
        message = ""
    if process_id == 0:
        assert "Process 0 of 2 waited at barrier 'test: late' for up to 2 s" in message, message
        assert "other processes' logs" in message, message
    print(f"OK {process_id}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
