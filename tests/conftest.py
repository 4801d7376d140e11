"""Test-suite set-up: 8 fake CPU devices before JAX starts, so sharded code runs on a real mesh."""

import os

# Must happen before any backend is initialised; the env var covers subprocesses too.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests compare against float64 NumPy only where they say so; default stays float32.
