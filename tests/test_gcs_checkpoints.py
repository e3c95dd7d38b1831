"""Checkpoints on gs:// (`train.checkpoint_dir`, what a pod shares), against a real GCS API server on this
machine (tests/gcs_server.py): asynchronous saves, keep-N deletion, exact resume, and a run read back for
inference (`sdjax sample` / `export` / `eval-demo` read it this way)."""

import jax
import numpy as np
import pytest
from etils import epath

from gcs_server import GcsServer
from sdjax import checkpoint as checkpoint_lib
from sdjax import train as train_lib


@pytest.fixture(scope="module")
def bucket():
    server = GcsServer()
    yield server.make_bucket("sdjax-test")
    server.stop()


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
