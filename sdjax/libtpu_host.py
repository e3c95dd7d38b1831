"""libtpu on a host without a TPU chip: a CPU host with `jax[tpu]` installed (the test extra, or a workstation
that plans TPU runs with `sdjax plan`).

There libtpu's start-up looks for a Cloud TPU VM's metadata and, not finding it, prints an "INVALID_ARGUMENT:
unexpected worker hostname" error and an accelerator-type warning on every command; JAX then carries on with
the CPU, so they are harmless, but they read like a failure. Naming both before JAX starts its backends keeps
it quiet. Only on a host without a chip: on a TPU VM the metadata server says what they are, and nothing here
is set.
"""

import os

# Any Cloud TPU slice name will do where libtpu finds no chip and nothing compiles for a TPU; `sdjax plan`
# names the slice it compiles for instead (plan._accelerator_type).
NO_TPU_ACCELERATOR_TYPE = "v5litepod-1"


def quiet_start_up(accelerator_type: str = NO_TPU_ACCELERATOR_TYPE) -> None:
    """Names the TPU worker (this host) and the accelerator type for libtpu, unless the user did, where this
    host has no TPU chip. Call before JAX initialises its backends (the first jax.devices())."""
    if _host_has_no_tpu():
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)


def _host_has_no_tpu() -> bool:
    """Whether this host has no TPU chip, as JAX's Cloud TPU start-up decides it (False when that private
    helper is gone: then libtpu's start-up messages stay, and nothing else changes)."""
    try:
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0
    except (ImportError, AttributeError):
        return False
