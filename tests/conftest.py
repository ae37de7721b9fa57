"""Test setup: 8 fake CPU devices so sharding tests run anywhere; float32 matmuls exact."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
