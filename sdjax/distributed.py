"""Joining the processes of a multi-host run (one process per host) before JAX touches a device.

- Cloud TPU VMs and pod slices, GKE TPU node pools (and SLURM / Open MPI jobs): JAX finds the coordinator,
  the process count and this process's index itself, so `jax.distributed.initialize()` gets no arguments.
- Other clusters, and `launch/local.py`: the three values come from `--coordinator_address`,
  `--num_processes` and `--process_id`, the same on every process except the id.
- Anywhere else: a single process; there is nothing to join. Except on a TPU host where JAX already runs
  (a device was touched first): there it is an error, since on a pod each host would train alone.

After this, `jax.devices()` lists every device of every process and one `Mesh` spans them all.
"""

from __future__ import annotations

import jax

# What jax.distributed.initialize() (jax 0.10) raises when no cluster environment is detected, and when JAX
# already runs on this process's devices (a notebook, a test calling the CLI): both mean one process.
_NO_CLUSTER_MESSAGE = "coordinator_address should be defined"
_BACKEND_STARTED_MESSAGE = "must be called before any JAX calls"


class DistributedFlagsError(ValueError):
    """The multi-process flags are incomplete or inconsistent; the message names the flag."""


def _use_cpu_collectives() -> None:
    # CPU devices of different processes talk over gloo (the CPU client is created later, at first use, and
    # reads this then); without it a cross-process CPU collective fails. TPU/GPU collectives do not use it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the other processes of this run; returns False for a single-process run (nothing to join).

    Must run before anything creates a JAX array or lists devices.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(value is not None for value in given.values()):
        missing = [f"--{name}" for name, value in given.items() if value is None]
        if missing:
            raise DistributedFlagsError(
                f"{', '.join(missing)} missing: a multi-process run needs all of --coordinator_address "
                "(host:port of process 0), --num_processes and --process_id on every process, or none of them "
                "on Cloud TPU / GKE, where they are detected.")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise DistributedFlagsError(
                f"--process_id={process_id} with --num_processes={num_processes}: expected "
                f"0 <= process_id < num_processes.")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
        _use_cpu_collectives()
        return True
    try:
        jax.distributed.initialize()  # detects Cloud TPU (GCE metadata), GKE, SLURM, Open MPI
    except (ValueError, RuntimeError) as e:
        if _BACKEND_STARTED_MESSAGE in str(e) and jax.process_count() == 1 and jax.default_backend() == "tpu":
            # On a TPU host this hides an ordering bug: each host of a pod would train alone, and without
            # jax.distributed there is no preemption sync point either.
            raise RuntimeError(
                "JAX started on this TPU host before sdjax could join the other hosts (jax.distributed."
                "initialize() must run before anything touches a device): run sdjax in a fresh process, or call "
                "sdjax.distributed.initialize() first.") from e
        if _NO_CLUSTER_MESSAGE not in str(e) and _BACKEND_STARTED_MESSAGE not in str(e):
            raise
        return False
    _use_cpu_collectives()
    return True
