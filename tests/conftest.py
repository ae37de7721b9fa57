"""Test setup: 8 fake CPU devices so sharding tests run anywhere; float32 matmuls exact."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def fast_compile():
    """XLA's optimisations off for one test module (`pytestmark =
    pytest.mark.usefixtures("fast_compile")`), where compile time dominates tiny models; the
    setting is restored for the other modules."""
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)
