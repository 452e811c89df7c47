"""One process of tests/test_multiprocess.py: joins a 2-process job, sums a global batch."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from t5x_like import partitioning as part  # noqa: E402


def main(port: str, process_id: int) -> None:
    joined = part.initialize_distributed(
        {"coordinator_address": f"127.0.0.1:{port}", "num_processes": 2, "process_id": process_id}
    )
    assert joined and jax.process_count() == 2 and jax.device_count() == 8
    mesh = part.make_mesh({"data": -1, "tensor": 2})
    sharding = part.batch_sharding(mesh, 2)
    # Each process holds its half of the global batch rows.
    local = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) + 100 * process_id
    global_batch = jax.make_array_from_process_local_data(sharding, local, (8, 3))
    total = jax.jit(jnp.sum, out_shardings=part.logical_sharding(mesh, ()))(global_batch)
    print(f"RESULT {process_id} {dict(mesh.shape)} {float(total)}", flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
