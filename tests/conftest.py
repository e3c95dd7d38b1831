"""Tests run on CPU with 8 emulated devices; the flag must be set before jax is imported."""

import os
import sys

# LLVM at -O0 for XLA:CPU: the tests' tiny steps spend far longer compiling than running. Measured on the
# 2-core VM, the whole suite: 1829-1884 s -> 1039-1391 s (README, "Tests"). The subprocesses the tests start
# inherit these flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Identical computations compiled by different tests (init, steps) are compiled once per session."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield


@pytest.fixture
def tiny_config():
    from tiny import tiny_config as make
    return make()
