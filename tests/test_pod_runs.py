"""Runs as a pod runs them: two processes (4 emulated CPU devices each, launch/local.py) joined by
jax.distributed, each with its own workdir, model and data folders (a host's own disk), sharing nothing but a
gs:// bucket for the checkpoints (a GCS API server on 127.0.0.1, tests/gcs_server.py).

- The demo config with its VAE stage trains both stages; SIGTERM to both processes (what Cloud TPU and GKE
  send before a preemption, and `launch/tpu_vm.sh stop`) saves a checkpoint at the same step on both and exits
  0; the same command resumes, here on a host whose disk was replaced (a recreated VM keeps nothing local).
- A DreamBooth fine-tune of a `model.pretrained` folder staged on every host, with prior preservation:
  every host samples the same class images into its own class folder, then the run trains.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from gcs_server import GcsServer
from pytorch_folder import write_pytorch_folder
from sdjax import vae as vae_lib
from sdjax.metrics import read_metrics
from test_multiprocess import config_overrides
from tiny import load_config_file, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
HOSTS = ("host0", "host1")


def _launch(workdir_pattern: str, overrides: list[str]) -> list[str]:
    """`sdjax train` of configs/demo.py as two processes, each with the workdir `workdir_pattern` names."""
    return [sys.executable, os.path.join(ROOT, "launch", "local.py"), "-n", "2", "--devices_per_process", "4", "--",
            sys.executable, "-m", "sdjax.cli", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
            "--workdir", workdir_pattern, *overrides]


def _run(command: list[str], log_path, stop_when=None) -> tuple[int, str]:
    """Runs `command` to its end, or sends it SIGTERM (which launch/local.py forwards to every process) once
    `stop_when()` is true; returns its exit code and output."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while stop_when and process.poll() is None and time.monotonic() < deadline:
                if stop_when():
                    process.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.2)
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            if process.poll() is None:
                process.kill()
    return process.returncode, log_path.read_text()


def _steps_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    return len(read_metrics(str(workdir))) if os.path.exists(path) else 0


# A short VAE stage (model.vae_config names a config file): configs/demo_vae.py, 4 steps.
SHORT_VAE_STAGE = """
from sdjax.config import load_config_file


def get_config():
    c = load_config_file({demo_vae!r})
    c.train.steps = 4
    c.train.batch_size = 8
    c.train.log_every = 1
    c.train.checkpoint_every = 2
    c.train.sample_every = c.train.eval_every = 0
    c.vae_train.scaling_examples = 16
    return c
"""
UNET_STEPS = 10


@pytest.mark.slow  # about 3 minutes on 2 CPU cores: four 2-process runs of the demo's two stages
def test_the_demo_trains_both_stages_stops_on_sigterm_and_resumes_on_a_replaced_host(tmp_path):
    server = GcsServer()
    try:
        _demo_on_two_hosts(tmp_path, server.make_bucket("sdjax-pod"))
    finally:
        server.stop()


def _demo_on_two_hosts(tmp_path, bucket):
    vae_stage = tmp_path / "vae_stage.py"
    vae_stage.write_text(SHORT_VAE_STAGE.format(demo_vae=os.path.join(ROOT, "configs", "demo_vae.py")))
    checkpoint_dir = f"{bucket}/demo"
    overrides = [f"--config.model.vae_config={vae_stage}", f"--config.train.checkpoint_dir={checkpoint_dir}",
                 f"--config.train.steps={UNET_STEPS}", "--config.train.batch_size=8", "--config.train.log_every=1",
                 "--config.train.checkpoint_every=1000",  # the UNet stage saves on SIGTERM and at the end only
                 "--config.train.sample_every=0", "--config.train.eval_every=0",
                 "--config.train.compilation_cache_dir=", "--config.data.demo_num_examples=64"]
    command = _launch(str(tmp_path / "host{process_id}"), overrides)
    host0, host1 = (tmp_path / host for host in HOSTS)

    # 1. Both stages; SIGTERM once the UNet stage has logged a step.
    code, output = _run(command, tmp_path / "first.log", stop_when=lambda: _steps_logged(host0) >= 1)
    assert code == 0, f"the run stopped by SIGTERM should exit 0:\n{output[-5000:]}"
    saved = re.search(r"Preemption notice: saved a checkpoint at step (\d+)", output)
    assert saved, output[-5000:]
    stopped_at = int(saved.group(1))
    assert 1 <= stopped_at < UNET_STEPS
    # Each host read its own copy of what the VAE stage leaves for the UNet stage.
    for host in (host0, host1):
        assert (host / "vae" / vae_lib.SCALING_FILE).exists() and (host / "vae" / "config.json").exists()
        assert json.loads((host / "config.json").read_text())["train"]["checkpoint_dir"] == checkpoint_dir
    scaling_factor = json.loads((host0 / "vae" / vae_lib.SCALING_FILE).read_text())["scaling_factor"]
    assert [m["step"] for m in read_metrics(str(host0))] == list(range(1, stopped_at + 1))

    # 2. Host 1 is replaced (a recreated VM: its disk is empty); the same command resumes from the bucket.
    shutil.rmtree(host1)
    code, output = _run(command, tmp_path / "second.log")
    assert code == 0, f"the resumed run failed:\n{output[-5000:]}"
    assert f"Resuming from the checkpoint at step {stopped_at} in {checkpoint_dir}" in output, output[-5000:]
    assert "Resuming from the checkpoint at step 4" in output  # the VAE stage's last, in {checkpoint_dir}-vae
    summaries = [json.loads(line) for line in output.splitlines() if line.startswith('{"step"')]
    assert [s["step"] for s in summaries] == [UNET_STEPS]
    assert [m["step"] for m in read_metrics(str(host0))] == list(range(1, UNET_STEPS + 1))
    # The replaced host derived the same VAE files from the stage's checkpoint in the bucket.
    rebuilt = json.loads((host1 / "vae" / vae_lib.SCALING_FILE).read_text())["scaling_factor"]
    np.testing.assert_allclose(rebuilt, scaling_factor, rtol=1e-6)


# --- DreamBooth on two hosts ---------------------------------------------------------------------------

NUM_CLASS_IMAGES = 4


def _dreambooth_config(tmp_path):
    config = tiny_config()
    config.train.steps = 3
    config.train.checkpoint_every = 1000
    config.train.sample_every = config.train.eval_every = 0
    config.data.caption_dropout = 0.0
    # Every host its own copy of the model and the images (staged on each host's disk, as launch/README.md says).
    host_folder = str(tmp_path / "host{process_id}")
    config.model.pretrained = f"{host_folder}/model"
    config.dreambooth.update(
        instance_data_dir=f"{host_folder}/instance", instance_prompt="a photo of sks dog",
        with_prior_preservation=True, class_data_dir=f"{host_folder}/class", class_prompt="a photo of dog",
        num_class_images=NUM_CLASS_IMAGES, prior_loss_weight=1.0)
    config.sample.steps = 2  # the class images' sampler: what matters here is that every host gets them
    return config


@pytest.mark.slow  # about 2 minutes on 2 CPU cores
def test_a_dreambooth_fine_tune_samples_its_class_images_on_every_host_and_trains(tmp_path):
    config = _dreambooth_config(tmp_path)
    write_pytorch_folder(config, str(tmp_path / "model"))
    for host in HOSTS:
        shutil.copytree(tmp_path / "model", tmp_path / host / "model")
        os.makedirs(tmp_path / host / "instance")
        for i in range(3):
            Image.new("RGB", (24, 20), (200, 30, 30)).save(tmp_path / host / "instance" / f"{i}.png")
    server = GcsServer()
    try:
        config.train.checkpoint_dir = f"{server.make_bucket('sdjax-pod')}/dreambooth"
        command = _launch(str(tmp_path / "host{process_id}"), config_overrides(config, load_config_file("demo")))
        code, output = _run(command, tmp_path / "dreambooth.log")
    finally:
        server.stop()
    assert code == 0, f"the DreamBooth run failed:\n{output[-5000:]}"
    assert f"Sampling {NUM_CLASS_IMAGES} class images of 'a photo of dog'" in output
    # The same images on both hosts: one sampling program over the devices of both.
    images = {host: sorted(os.listdir(tmp_path / host / "class")) for host in HOSTS}
    assert images["host0"] == images["host1"] == [f"class_{i:05d}.png" for i in range(NUM_CLASS_IMAGES)]
    for name in images["host0"]:
        assert (tmp_path / "host0" / "class" / name).read_bytes() == (tmp_path / "host1" / "class" / name).read_bytes()
    assert [m["step"] for m in read_metrics(str(tmp_path / "host0"))] == [1, 2, 3]
