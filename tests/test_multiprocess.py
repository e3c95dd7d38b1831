"""Two processes x 4 emulated CPU devices (launch/local.py, jax.distributed over gloo) train exactly like one
process x 8 devices on the same global batches, and write one shared checkpoint that one process restores.

The mesh is fsdp=8, so every large array is split over the devices of both processes: each process writes
its own shards of the checkpoint, and restoring gathers them onto this single process's 8 devices. The
checkpoint is in a gs:// bucket, as on a pod (hosts share no disk): a GCS API server on 127.0.0.1
(tests/gcs_server.py) that both processes reach.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sdjax import checkpoint as checkpoint_lib
from sdjax import distributed
from sdjax import train as train_lib
from sdjax import training_setup
from gcs_server import GcsServer
from sdjax.metrics import read_metrics
from tiny import PARAMS_ATOL, comparable_config, load_config_file, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 5
TIMEOUT_S = 900


def _test_config():
    config = comparable_config(tiny_config())
    config.train.steps = NUM_STEPS
    config.train.checkpoint_every = NUM_STEPS
    config.train.sample_every = config.train.eval_every = 0  # not what this test is about; each costs a compile
    config.mesh.data, config.mesh.fsdp = 1, 8
    return config, load_config_file("demo")


def _flat(config, prefix=""):
    flat = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_overrides(config, base) -> list[str]:
    """--config.KEY=VALUE for every value where `config` differs from the config file `base`."""
    ours, theirs = _flat(config), _flat(base)
    return [f"--config.{key}={value}" for key, value in sorted(ours.items()) if theirs.get(key) != value]


@pytest.mark.slow  # about 3 minutes on 2 CPU cores: three JAX processes start and compile
def test_two_processes_train_like_one_and_share_a_checkpoint(tmp_path):
    server = GcsServer()
    try:
        _two_processes_train_like_one(tmp_path, server.make_bucket("sdjax-pod"))
    finally:
        server.stop()


def _two_processes_train_like_one(tmp_path, bucket):
    config, demo = _test_config()
    config.train.checkpoint_dir = f"{bucket}/run"
    multi_dir, single_dir = tmp_path / "two_processes", tmp_path / "one_process"
    command = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--devices_per_process", "4",
               "--", sys.executable, "-m", "sdjax.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
               # Each process its own workdir, as each host of a pod has its own disk: only the bucket is shared.
               "--workdir", str(multi_dir / "host{process_id}"), *config_overrides(config, demo)]
    log_path = tmp_path / "two_processes.log"
    with open(log_path, "w") as log:
        # Started first, so that its start-up and compilation overlap the one-process run below.
        launcher = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            reference_config = config.copy_and_resolve_references()
            reference_config.train.checkpoint_dir = ""  # its own, in single_dir
            reference = train_lib.train(reference_config, str(single_dir))  # this process: 8 devices
            launcher.wait(timeout=TIMEOUT_S)
        finally:
            if launcher.poll() is None:
                launcher.kill()
    output = log_path.read_text()
    assert launcher.returncode == 0, f"the two-process run failed:\n{output[-5000:]}"

    # Process 0 alone logs: one metrics line per step, one summary line. Every process keeps its config.json.
    multi_metrics = read_metrics(str(multi_dir / "host0"))
    assert not os.path.exists(multi_dir / "host1" / "metrics.jsonl")
    for host in ("host0", "host1"):
        saved = json.loads((multi_dir / host / "config.json").read_text())
        assert saved["train"]["checkpoint_dir"] == config.train.checkpoint_dir
    assert [m["step"] for m in multi_metrics] == list(range(1, NUM_STEPS + 1)), multi_metrics
    summaries = [line for line in output.splitlines() if line.startswith('{"step"')]
    assert len(summaries) == 1 and json.loads(summaries[0])["step"] == NUM_STEPS

    # Same losses: the same float32 sums, over devices of two processes instead of one (1e-5 relative).
    single_metrics = read_metrics(str(single_dir))
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in multi_metrics], [m[key] for m in single_metrics],
                                   rtol=1e-5, err_msg=key)

    # One shared checkpoint, restored by this one process onto its 8 devices. Params: tiny.PARAMS_ATOL (the
    # same float32 sums in another order, through 5 updates).
    abstract_state = training_setup.build(config).abstract_state
    restored = checkpoint_lib.Checkpoints(config.train.checkpoint_dir, config).restore_latest(lambda: abstract_state)
    assert restored is not None and restored.step == NUM_STEPS
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=PARAMS_ATOL),
                 restored.state.params, reference.state.params)
    sharded = [leaf for leaf in jax.tree.leaves(restored.state.params) if "fsdp" in leaf.sharding.spec]
    assert sharded, "the restored params should be split over this process's devices again"


def test_a_checkpoint_dir_the_processes_do_not_share_is_refused_before_anything_compiles(tmp_path):
    """The default checkpoint_dir (WORKDIR/checkpoints) with a workdir per host: the hosts would never commit
    a checkpoint together; the run stops at start and says why."""
    config, demo = _test_config()
    command = [sys.executable, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--devices_per_process", "4",
               "--", sys.executable, "-m", "sdjax.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
               "--workdir", str(tmp_path / "host{process_id}"), *config_overrides(config, demo)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "is not shared by the processes of this run: process 0 does not see the file process 1 wrote" in \
        result.stderr, result.stderr[-3000:]
    assert "on a pod, a gs:// bucket" in result.stderr
    assert not os.path.exists(tmp_path / "host0" / "metrics.jsonl")


# --- the launcher and the flags, without JAX ---------------------------------------------------------------

LAUNCHER = [sys.executable, os.path.join(ROOT, "launch", "local.py")]
# Reports its flags and the XLA_FLAGS it got; process 1 fails with exit code 3, process 0 waits to be stopped.
CHILD = """
import os, sys, time
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
with open(os.path.join({out!r}, flags["process_id"]), "w") as f:
    f.write(flags["coordinator_address"] + " " + flags["num_processes"] + " " + os.environ["XLA_FLAGS"])
if flags["process_id"] == "1" and {fail}:
    sys.exit(3)
time.sleep(60)
"""


def _child(tmp_path, fail: bool) -> list[str]:
    return [sys.executable, "-c", CHILD.format(out=str(tmp_path), fail=fail)]


def test_launcher_passes_flags_and_stops_all_when_one_fails(tmp_path):
    start = time.monotonic()
    result = subprocess.run([*LAUNCHER, "-n", "2", "--devices_per_process", "3", "--", *_child(tmp_path, True)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for (it sleeps 60 s)
    reports = [(tmp_path / str(i)).read_text().split(" ", 2) for i in range(2)]
    assert reports[0][0] == reports[1][0] and reports[0][0].startswith("127.0.0.1:")
    assert all(num == "2" and "--xla_force_host_platform_device_count=3" in xla for _, num, xla in reports)


def test_launcher_forwards_sigterm(tmp_path):
    launcher = subprocess.Popen([*LAUNCHER, "-n", "2", "--", *_child(tmp_path, False)])
    deadline = time.monotonic() + 30
    while not all((tmp_path / str(i)).exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=30) == 128 + signal.SIGTERM  # the children died of the forwarded signal


@pytest.mark.parametrize("flags,missing", [
    ({"coordinator_address": "10.0.0.1:1234"}, "--num_processes, --process_id missing"),
    ({"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 2}, "--process_id=2"),
])
def test_incomplete_distributed_flags_are_named(flags, missing):
    with pytest.raises(distributed.DistributedFlagsError, match=missing):
        distributed.initialize(**flags)


def test_a_tpu_host_where_jax_already_runs_is_an_error_not_a_single_process_run(monkeypatch):
    jax.devices()  # JAX runs: jax.distributed.initialize() can no longer join anything
    assert distributed.initialize() is False  # CPU: one process, nothing to join
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # the same call on a TPU host
    with pytest.raises(RuntimeError, match="JAX started on this TPU host before sdjax could join the other hosts"):
        distributed.initialize()
