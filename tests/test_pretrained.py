"""Loading a local diffusers folder with PyTorch safetensors weights gives the PyTorch models' outputs."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax import models as models_lib
from sdjax.models import PretrainedFolderError

# Tolerance: fp32 on CPU, outputs of order 1. XLA and PyTorch convolutions/attention accumulate in other
# orders; typical differences are 1e-5, the largest seen 1.1e-4 (UNet). We allow 5e-4.
ATOL = 5e-4


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from pytorch_folder import write_pytorch_folder
    from tiny import tiny_config
    path = str(tmp_path_factory.mktemp("pretrained"))
    torch_models = write_pytorch_folder(tiny_config(), path)
    config = tiny_config()
    config.model.pretrained = path
    models = models_lib.build_models(config)
    params = models_lib.load_pretrained_params(models, config)
    return config, models, params, torch_models


def test_folder_has_safetensors_not_flax_weights(pretrained):
    config = pretrained[0]
    files = os.listdir(os.path.join(config.model.pretrained, "unet"))
    assert "diffusion_pytorch_model.safetensors" in files and "diffusion_flax_model.msgpack" not in files


def test_unet_matches_pytorch(pretrained):
    config, models, params, torch_models = pretrained
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 4, 4, 4), dtype=np.float32)
    timesteps = np.array([10, 700], np.int32)
    context = rng.standard_normal((2, 77, 64), dtype=np.float32)
    ours = models_lib.predict_noise(models, params["unet"], latents, timesteps, context)
    with torch.no_grad():
        theirs = torch_models["unet"](torch.from_numpy(latents), torch.from_numpy(timesteps),
                                      torch.from_numpy(context)).sample.numpy()
    assert np.abs(theirs).mean() > 0.1  # not a trivially small output
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL)


def test_vae_and_text_encoder_match_pytorch(pretrained):
    config, models, params, torch_models = pretrained
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    moments = models.vae.apply({"params": params["vae"]}, jnp.transpose(images, (0, 3, 1, 2)),
                               method=models.vae.encode).latent_dist.mean
    with torch.no_grad():
        theirs = torch_models["vae"].encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
    np.testing.assert_allclose(np.transpose(np.asarray(moments), (0, 3, 1, 2)), theirs.numpy(), atol=ATOL)

    ids = np.asarray(models.tokenizer(["a red circle on a blue background", ""], padding="max_length",
                                      max_length=77).input_ids, np.int32)
    ours = models_lib.encode_text(models, params["text_encoder"], ids)
    with torch.no_grad():
        theirs = torch_models["text_encoder"](torch.from_numpy(ids).long())[0].numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=ATOL)


def test_missing_folder_is_a_clear_error(tiny_config, tmp_path):
    tiny_config.model.pretrained = str(tmp_path / "nope")
    with pytest.raises(PretrainedFolderError, match="is not a folder"):
        models_lib.build_models(tiny_config)


def test_folder_without_unet_config_names_the_file(tiny_config, tmp_path):
    (tmp_path / "vae").mkdir()
    tiny_config.model.pretrained = str(tmp_path)
    with pytest.raises(PretrainedFolderError, match="unet/config.json is missing"):
        models_lib.build_models(tiny_config)
