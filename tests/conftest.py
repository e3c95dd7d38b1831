"""Tests run on CPU with 8 emulated devices; the flag must be set before jax is imported."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from tiny import FAST_COMPILE_FLAGS  # noqa: E402  (tiny imports nothing that imports jax)

# The subprocesses the tests start inherit these flags.
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), FAST_COMPILE_FLAGS,
                                    "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


# The slowest test files first, so that pytest-xdist's two workers, which take whole files (`--dist loadfile`)
# in collection order, do not end with one of them running a long file alone (longest first: the classic
# bound for such a schedule). Measured one file after another (2026-12-04, the 2-core VM, beside a TPU
# compile): 266 s, 201, 153, 147, 144, 138, 130, 120, 118, 113, 110, 110, 102, 101, 92, 87, 74, 60; every
# other file under 40 s, in its usual order after these.
SLOWEST_FILES = ("test_gcs_checkpoints.py", "test_pod_runs.py", "test_multiprocess.py", "test_plan.py",
                 "test_step.py", "test_vae_losses.py", "test_sdxl.py", "test_data_train.py", "test_optimizers.py",
                 "test_vae.py", "test_launch_scripts.py", "test_tpu_attention.py", "test_imports.py",
                 "test_checkpoint.py", "test_remat_accum.py", "test_scan_layers.py", "test_metrics.py",
                 "test_fsdp.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests keep their order


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
