"""Test-suite set-up: 8 fake CPU devices before JAX starts, so sharded code runs on a real mesh."""

import os

# Must happen before any backend is initialised; the env var covers subprocesses too.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
# Tests compare against float64 NumPy only where they say so; default stays float32.

import contextlib  # noqa: E402

import pytest  # noqa: E402

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _on_duration_event(name, *args, **kwargs):
    if name == _BACKEND_COMPILE:
        _compiles[0] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration_event)


class _Counter:
    n = 0


@contextlib.contextmanager
def _count_compiles():
    counter, start = _Counter(), _compiles[0]
    try:
        yield counter
    finally:
        counter.n = _compiles[0] - start


@pytest.fixture
def count_compiles():
    """``with count_compiles() as c: ...; assert c.n == 0``: XLA compilations inside the block.

    Counts real backend compilations (jax.monitoring), which is what "compiles nothing" means;
    a jitted function's ``_cache_size()`` is not reliable across a long pytest process.
    """
    return _count_compiles
