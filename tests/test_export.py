"""`sdjax export`: the folder loads in PyTorch diffusers without missing/unexpected keys and computes what the
Flax models compute; a StableDiffusionPipeline runs from it; the Flax format round-trips exactly."""

import copy
import json
import logging
import os

import jax
import numpy as np
import pytest
import torch

from gcs_server import GcsServer
from sdjax import checkpoint as checkpoint_lib
from sdjax import cli
from sdjax import export as export_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import step as step_lib
from sdjax import train as train_lib

# Tolerance: fp32 on CPU, outputs of order 1. XLA and PyTorch convolutions/attention accumulate in other
# orders; the largest differences seen are ~1e-4 (UNet). The issue asks for <= 1e-3.
ATOL = 1e-3


@pytest.fixture(scope="module")
def run_workdir(tmp_path_factory):
    """A run's workdir holding one checkpoint of the tiny models, every weight perturbed from its init, so a
    weight that is dropped or transposed wrongly shows in the outputs (init has zero biases, unit norms).
    The checkpoint is in a gs:// bucket (a GCS API server on 127.0.0.1), named by the run's config.json."""
    from tiny import tiny_config
    server = GcsServer()
    config = tiny_config()
    config.train.checkpoint_dir = server.make_bucket("sdjax-export") + "/run"
    workdir = str(tmp_path_factory.mktemp("run"))
    train_lib.save_config(config, workdir)
    models = models_lib.build_models(config)
    params = jax.device_get(models_lib.init_params(models, config, jax.random.key(0)))
    noise = np.random.default_rng(0)
    params = jax.tree.map(lambda p: p + 0.02 * noise.standard_normal(p.shape).astype(np.float32), params)
    state = step_lib.state_from_params(params, optim.make_optimizer(config))
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    checkpoints.save(3, state, jax.random.key(0))
    checkpoints.close()
    yield workdir
    server.stop()


def _export(workdir, out, *flags):
    return cli.main(["sdjax", "export", "--workdir", workdir, "--out", out, *flags])


@pytest.fixture(scope="module")
def exported(run_workdir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "sd")
    assert _export(run_workdir, out) == 0
    config, params, _ = checkpoint_lib.load_params_for_inference(run_workdir)
    return out, config, models_lib.build_models(config), params


def test_folder_is_diffusers_layout_with_safetensors_and_no_safety_checker(exported):
    out = exported[0]
    for path in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(out, path)), path
    with open(os.path.join(out, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    assert not os.path.exists(out + ".partial")


def _load_pytorch(cls, folder):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def test_pytorch_unet_matches_flax(exported):
    from diffusers import UNet2DConditionModel
    out, _, models, params = exported
    unet = _load_pytorch(UNet2DConditionModel, os.path.join(out, "unet"))
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    timesteps = np.array([10, 700], np.int32)
    context = rng.standard_normal((2, 77, 64), dtype=np.float32)
    ours = np.asarray(models_lib.predict_noise(models, params["unet"], latents, timesteps, context))
    with torch.no_grad():
        theirs = unet(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context)).sample.numpy()
    assert np.abs(theirs).mean() > 0.1  # not a trivially small output
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


def test_pytorch_vae_decoder_and_text_encoder_match_flax(exported):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel
    out, _, models, params = exported
    vae = _load_pytorch(AutoencoderKL, os.path.join(out, "vae"))
    # 6x6, not 4x4: diffusers' Flax VAE takes latents whose last axis has latent_channels (4) for NHWC.
    latents = np.random.default_rng(1).standard_normal((2, 4, 6, 6), dtype=np.float32)
    ours = np.asarray(models_lib.decode_latents(models, params["vae"], latents))
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample.permute(0, 2, 3, 1).numpy()
    assert np.abs(theirs).mean() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=ATOL)

    text_encoder = _load_pytorch(CLIPTextModel, os.path.join(out, "text_encoder"))
    ids = np.asarray(models.tokenizer(["a red circle on a blue background", ""], padding="max_length",
                                      max_length=77).input_ids, np.int32)
    ours = np.asarray(models_lib.encode_text(models, params["text_encoder"], ids))
    with torch.no_grad():
        theirs = text_encoder(torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=ATOL)


def test_stable_diffusion_pipeline_loads_without_warnings_and_runs_two_steps(exported, caplog):
    import diffusers
    import transformers
    from diffusers import StableDiffusionPipeline
    diffusers.utils.logging.enable_propagation()
    transformers.utils.logging.enable_propagation()
    with caplog.at_level(logging.WARNING):
        pipe = StableDiffusionPipeline.from_pretrained(exported[0])
    key_warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and any(
        word in r.getMessage().lower() for word in ("missing", "unexpected", "not used", "initialized"))]
    assert not key_warnings, key_warnings
    assert type(pipe.scheduler).__name__ == "PNDMScheduler" and pipe.safety_checker is None
    image = pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()


def test_flax_format_round_trips_exactly(run_workdir, exported, tmp_path):
    out = str(tmp_path / "flax")
    assert _export(run_workdir, out, "--format=flax") == 0
    assert os.path.isfile(os.path.join(out, "unet", "diffusion_flax_model.msgpack"))
    config, params = copy.deepcopy(exported[1]), exported[3]
    config.model.pretrained = out
    loaded = models_lib.load_pretrained_params(models_lib.build_models(config), config)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


def test_export_refuses_to_overwrite(run_workdir, tmp_path):
    with pytest.raises(export_lib.ExportError, match="already exists"):
        export_lib.export(run_workdir, str(tmp_path))
