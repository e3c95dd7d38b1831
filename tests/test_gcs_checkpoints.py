"""Checkpoints on gs:// (`train.checkpoint_dir`, what a pod shares), against a real GCS API server on this
machine (tests/gcs_server.py): asynchronous saves, keep-N deletion, exact resume, a cut-off step skipped, a
run read back for inference (`sdjax sample` / `export` / `eval-demo` read it this way), and storage that
fails (a missing bucket, no permission, at the start or in the middle of a save)."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from etils import epath
from tiny import FAST_COMPILE_FLAGS, small_state

from gcs_server import GcsServer, StorageOutage
from sdjax import checkpoint as checkpoint_lib
from sdjax import train as train_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def server():
    server = GcsServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def bucket(server):
    return server.make_bucket("sdjax-test")


@pytest.fixture
def outage(server):
    """The clients talk to the server through a proxy that fails on cue."""
    proxy = StorageOutage(server)
    yield proxy
    proxy.close()


def _config(steps, checkpoint_dir=""):
    from tiny import tiny_config
    config = tiny_config()
    config.mesh.data, config.mesh.fsdp = 4, 2  # a sharded state: every device's shard is written
    config.train.update(steps=steps, checkpoint_every=2, keep_checkpoints=1, checkpoint_dir=checkpoint_dir,
                        sample_every=0, eval_every=0)
    config.optimizer.decay = "constant"  # the schedule of steps 1-4 does not depend on train.steps
    return config


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """6 steps straight on local disk; 4 steps into the bucket, then the same run resumed there to 6."""
    local = train_lib.train(_config(6), str(tmp_path_factory.mktemp("local")))
    checkpoint_dir = f"{bucket}/run"
    workdir = tmp_path_factory.mktemp("gcs")
    first = train_lib.train(_config(4, checkpoint_dir), str(workdir))
    kept_after_first = sorted(p.name for p in epath.Path(checkpoint_dir).iterdir())
    resumed = train_lib.train(_config(6, checkpoint_dir), str(workdir))
    return local, first, kept_after_first, resumed, checkpoint_dir, workdir


def test_saves_in_the_bucket_keeping_the_newest(runs):
    _, first, kept_after_first, resumed, checkpoint_dir, _ = runs
    assert int(first.state.step) == 4 and kept_after_first == ["4"]  # step 2 deleted: keep_checkpoints=1
    assert sorted(p.name for p in epath.Path(checkpoint_dir).iterdir()) == ["6"]
    assert (epath.Path(checkpoint_dir) / "6" / checkpoint_lib.COMMIT_MARKER).exists()


def test_resumed_from_the_bucket_equals_the_uninterrupted_local_run(runs):
    local, _, _, resumed, _, _ = runs
    assert int(resumed.state.step) == 6
    assert resumed.last_metrics["loss"] == local.last_metrics["loss"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 resumed.state.params, local.state.params)


def test_a_run_with_gcs_checkpoints_is_read_back_for_inference(runs):
    _, _, _, resumed, checkpoint_dir, workdir = runs
    loaded = checkpoint_lib.load_inference_checkpoint(str(workdir))  # config.json names the bucket
    assert loaded.step == 6 and loaded.config.train.checkpoint_dir == checkpoint_dir
    np.testing.assert_array_equal(loaded.params["unet"]["conv_in"]["kernel"],
                                  np.asarray(resumed.state.ema_params["unet"]["conv_in"]["kernel"]))


def test_a_cut_off_step_in_the_bucket_is_skipped_and_deleted(bucket, tiny_config, caplog):
    directory = f"{bucket}/cut-off"
    checkpoints = checkpoint_lib.Checkpoints(directory, tiny_config)
    for step in (1, 2):
        checkpoints.save(step, small_state(step), jax.random.key(0))
    checkpoints.close()
    (epath.Path(directory) / "2" / checkpoint_lib.COMMIT_MARKER).unlink()  # what a save cut off on GCS leaves
    reopened = checkpoint_lib.Checkpoints(directory, tiny_config)
    restored = reopened.restore_latest(lambda: small_state(0))
    reopened.close()
    assert restored.step == 1 and int(restored.state.step) == 1
    assert any("['2'] in " + directory + " were cut off mid-write" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in epath.Path(directory).iterdir()) == ["1"]  # step 2 is written again


def test_a_bucket_that_does_not_exist_is_named_before_anything_runs(server, tiny_config):
    with pytest.raises(checkpoint_lib.CheckpointSaveError,
                       match=r"cannot be written to gs://no-such-bucket-x/run: .*gs://no-such-bucket-x does not exist"):
        checkpoint_lib.Checkpoints("gs://no-such-bucket-x/run", tiny_config)
    assert not epath.Path("gs://no-such-bucket-x").exists()  # not created by the attempt


def test_storage_without_permission_is_named_before_anything_runs(bucket, outage, tiny_config):
    outage.fail(lambda method, url: method in ("POST", "PUT"), how="forbidden")
    with pytest.raises(checkpoint_lib.CheckpointSaveError,
                       match=f"cannot be written to {bucket}/no-permission: .*(403|Forbidden)"):
        checkpoint_lib.Checkpoints(f"{bucket}/no-permission", tiny_config)


# The server goes away in the middle of a save. Run in a process of its own: orbax leaves threads of the failed
# save waiting 5 minutes for signals that never come (`sdjax train` exits at once; a test process would wait).
SAVE_DURING_OUTAGE = """
import os, sys, time
import jax
sys.path.insert(0, {tests!r})
from tiny import small_state, tiny_config
from sdjax import checkpoint as checkpoint_lib
checkpoints = checkpoint_lib.Checkpoints({directory!r}, tiny_config())
for step in (1, 2, 3):  # orbax starts a save once the one before it is committed: 1 and 2 are complete
    checkpoints.save(step, small_state(step), jax.random.key(0))
started = time.time()
while time.time() - started < 300:
    try:
        checkpoints.check_saves()
    except checkpoint_lib.CheckpointSaveError as e:
        print(f"after {{time.time() - started:.0f}} s: {{e}}", flush=True)
        break
    time.sleep(0.2)
os._exit(0)  # as `sdjax train` does after a failed save
"""


@pytest.mark.slow
def test_a_save_cut_off_by_the_server_going_away_is_reported_and_the_one_before_is_restored(bucket, outage,
                                                                                            tiny_config):
    directory = f"{bucket}/outage"
    outage.fail(lambda method, url: method in ("POST", "PUT") and "outage/3/" in url, how="down")
    script = SAVE_DURING_OUTAGE.format(tests=os.path.join(ROOT, "tests"), directory=directory)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    # gcsfs retries a dropped connection 6 times (about 30 s) before it gives up: then it is reported.
    assert f"Saving the checkpoint of step 3 to {directory}/3 failed: " in done.stdout, done.stdout + done.stderr[-3000:]
    assert f"The newest complete checkpoint, {directory}/2, is kept" in done.stdout
    assert outage.failed_requests

    outage.restore()
    checkpoints = checkpoint_lib.Checkpoints(directory, tiny_config)
    restored = checkpoints.restore_latest(lambda: small_state(0))
    checkpoints.close()
    assert restored.step == 2 and _steps_in(directory) == [1, 2]  # what step 3 left is deleted on reopening


# --- `sdjax train` processes: a save that fails, and the resume after it ---------------------------


def _sdjax_train(workdir, checkpoint_dir, cache, steps, checkpoint_every=100_000):
    overrides = dict(steps=steps, batch_size=8, log_every=1, precision="fp32", checkpoint_every=checkpoint_every,
                     checkpoint_dir=checkpoint_dir, sample_every=0, eval_every=0, compilation_cache_dir=cache)
    argv = [sys.executable, "-m", "sdjax.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
            "--workdir", str(workdir), "--config.data.resolution=16", "--config.data.demo_num_examples=64",
            "--config.data.num_threads=1", "--config.optimizer.warmup_steps=2",
            "--config.model.vae_config=",  # no VAE stage
            # a smaller step to compile (the startup benchmark's): the saves are what is tested
            "--config.model.unet.block_out_channels=(32,32)", "--config.train.train_text_encoder=False",
            "--config.train.ema_decay=0"]
    argv += [f"--config.train.{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": FAST_COMPILE_FLAGS}  # one CPU device: quicker
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _steps_in(directory):
    return sorted(int(p.name) for p in epath.Path(directory).iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_a_failed_save_keeps_the_last_checkpoint_and_the_same_command_resumes(bucket, outage, tmp_path):
    """(SIGTERM's save and resume on a bucket: tests/test_pod_runs.py.)"""
    workdir, cache, checkpoint_dir = tmp_path / "run", str(tmp_path / "xla"), f"{bucket}/failing"
    every, steps = 10, 25
    kept, failing = every, 2 * every

    # The second save is refused (the service account lost its permission mid-run): the run stops at once
    # (orbax alone would report it at the next save, `every` steps later), naming the step, path and cause.
    outage.fail(lambda method, url: method in ("POST", "PUT") and f"failing/{failing}/" in url)
    process = _sdjax_train(workdir, checkpoint_dir, cache, steps=steps, checkpoint_every=every)
    started = time.time()
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 1, stderr[-3000:]
    assert f"Saving the checkpoint of step {failing} to {checkpoint_dir}/{failing} failed" in stderr
    assert f"The newest complete checkpoint, {checkpoint_dir}/{kept}, is kept" in stderr
    assert failing <= _logged_steps(workdir)[-1] < failing + every
    assert time.time() - started < 200  # not held up by orbax's threads of the failed save (5 minutes)

    # Storage is back: the same command resumes from the kept checkpoint and finishes.
    outage.restore()
    config, _, step = checkpoint_lib.load_params_for_inference(str(workdir))  # config.json names the bucket
    assert step == kept and config.train.checkpoint_dir == checkpoint_dir and _steps_in(checkpoint_dir)[0] == kept
    process = _sdjax_train(workdir, checkpoint_dir, cache, steps=steps, checkpoint_every=every)
    stdout, stderr = process.communicate(timeout=400)
    assert process.returncode == 0, stderr[-3000:]
    assert f"Resuming from the checkpoint at step {kept}" in stdout + stderr
    assert json.loads(stdout.strip().splitlines()[-1])["step"] == steps
    assert _logged_steps(workdir)[-2:] == [steps - 1, steps]
    assert _steps_in(checkpoint_dir)[-1] == steps
