"""Test set-up: 8 simulated CPU devices, configured before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Our package first: it configures the platform and malloc before jax.
# isort: off
import t5x_like  # noqa: E402,F401  (T5X_LIKE_MALLOC=on must act before the XLA CPU client)
import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402
# isort: on

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated CPU devices, got {len(devs)}"
    return devs
