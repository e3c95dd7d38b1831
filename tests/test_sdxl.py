"""SDXL (configs/sdxl.py): two text encoders, pooled text and micro-conditioning, as diffusers' PyTorch SDXL
pipeline conditions its UNet; a PyTorch SDXL folder loads, trains and exports back to one (and to the Flax
SDXL pipeline)."""

import os

import jax
import numpy as np
import pytest
import torch

from sdjax import checkpoint as checkpoint_lib
from sdjax import cli
from sdjax import config as config_lib
from sdjax import models as models_lib
from sdjax import optim
from sdjax import plan as plan_lib
from sdjax import step as step_lib
from sdjax import validation

ATOL = 1e-3  # fp32 on CPU, outputs of order 1 (as tests/test_export.py)
PROMPTS = ["a red circle on a blue background", ""]


@pytest.fixture(scope="module")
def pytorch_sdxl(tmp_path_factory):
    """A tiny SDXL diffusers folder with PyTorch weights, the PyTorch pipeline over it, and sdjax's models and
    params loaded from it."""
    from diffusers import PNDMScheduler, StableDiffusionXLPipeline
    from pytorch_folder import write_pytorch_folder
    from tiny import tiny_sdxl_config
    from transformers import CLIPTokenizer
    config = tiny_sdxl_config()
    folder = str(tmp_path_factory.mktemp("sdxl"))
    torch_models = write_pytorch_folder(config, folder)
    tokenizers = {name: CLIPTokenizer.from_pretrained(os.path.join(folder, name)) for name in ("tokenizer", "tokenizer_2")}
    pipe = StableDiffusionXLPipeline(**torch_models, **tokenizers, scheduler=PNDMScheduler(),
                                     force_zeros_for_empty_prompt=False)
    config.model.pretrained = folder
    models = models_lib.build_models(config)
    params = models_lib.load_pretrained_params(models, config)
    return config, models, params, pipe


def _pytorch_conditioning(pipe):
    with torch.no_grad():
        context, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    return context.numpy(), pooled.numpy()


def _pytorch_prediction(pipe, latents, timesteps, context, pooled, image_size):
    time_ids = pipe._get_add_time_ids((image_size, image_size), (0, 0), (image_size, image_size), torch.float32,
                                      text_encoder_projection_dim=pooled.shape[-1])
    with torch.no_grad():
        return pipe.unet(torch.from_numpy(latents), torch.from_numpy(timesteps), torch.from_numpy(context),
                         added_cond_kwargs={"text_embeds": torch.from_numpy(pooled),
                                            "time_ids": time_ids.repeat(len(latents), 1)}).sample.numpy()


def test_conditioning_and_prediction_match_the_pytorch_sdxl_pipeline(pytorch_sdxl):
    config, models, params, pipe = pytorch_sdxl
    assert models.sdxl and models.components[-1] == models_lib.TEXT_ENCODER_2
    ids = models.tokenizer(PROMPTS, padding="max_length", max_length=config.data.max_length, truncation=True).input_ids
    assert ids.shape == (2, 2, config.data.max_length)  # a row of each tokenizer per caption
    ours = models_lib.text_conditioning(models, params, ids)
    context, pooled = _pytorch_conditioning(pipe)
    assert ours["context"].shape == (2, config.data.max_length, 64 + 32) and ours["text_embeds"].shape == (2, 24)
    np.testing.assert_allclose(ours["context"], context, atol=ATOL)
    np.testing.assert_allclose(ours["text_embeds"], pooled, atol=ATOL)

    latents = np.random.default_rng(0).standard_normal((2, 4, 4, 4), dtype=np.float32)
    timesteps = np.array([10, 700], np.int32)
    ours = np.asarray(models_lib.predict_noise(models, params["unet"], latents, timesteps, **ours))
    theirs = _pytorch_prediction(pipe, latents, timesteps, context, pooled, config.data.resolution)
    assert np.abs(theirs).mean() > 0.1
    np.testing.assert_allclose(ours, theirs, atol=ATOL)
    # The pooled text and the micro-conditioning reach the UNet: other values give another prediction.
    other_size = _pytorch_prediction(pipe, latents, timesteps, context, pooled, 2 * config.data.resolution)
    other_pooled = _pytorch_prediction(pipe, latents, timesteps, context, pooled[::-1].copy(), config.data.resolution)
    assert np.abs(other_size - theirs).max() > 10 * ATOL and np.abs(other_pooled - theirs).max() > 10 * ATOL


def test_sdxl_loss_is_conditioned_on_each_images_size_and_crop_from_the_batch(pytorch_sdxl):
    from sdjax import data as data_lib
    config, models, params, _ = pytorch_sdxl
    batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    size = config.data.resolution  # the demo's images are drawn at it: uncropped, at their own size
    np.testing.assert_array_equal(batch["time_ids"], np.tile([size, size, 0, 0, size, size], (len(batch["time_ids"]), 1)))
    example_losses = jax.jit(step_lib.make_example_losses(models, config))
    rngs = jax.random.split(jax.random.key(0), config.train.batch_size)
    losses = example_losses(params, batch, rngs)
    other_crops = example_losses(params, {**batch, "time_ids": batch["time_ids"] * 3}, rngs)
    assert np.abs(np.asarray(other_crops - losses)).min() > 0
    # Batches without them (a latent cache's) take the image as it is: the same here.
    no_time_ids = {k: v for k, v in batch.items() if k != "time_ids"}
    np.testing.assert_allclose(example_losses(params, no_time_ids, rngs), losses, rtol=1e-6)


def test_sdxl_trains_both_text_encoders_over_fsdp_and_exports_to_the_pytorch_sdxl_pipeline(pytorch_sdxl, tmp_path):
    """With model.scan_layers (the UNet's stack of 2 and both text encoders' layers scanned, their params
    stacked and sharded): the export unrolls them for the PyTorch pipeline; a resume without it is refused
    by name. (tests/test_scan_layers.py: scanned and unrolled compute the same.)"""
    from diffusers import StableDiffusionXLPipeline
    from tiny import run_train_steps

    from sdjax import training_setup
    from sdjax.models import layer_stacks
    config, _, _, _ = pytorch_sdxl
    config = config.copy_and_resolve_references()
    config.train.train_text_encoder = True
    config.mesh.fsdp = 2
    config.optimizer.warmup_steps = 0
    config.model.scan_layers = True
    assert step_lib.trainable_components(config) == ("unet", "text_encoder", models_lib.TEXT_ENCODER_2)
    state, losses = run_train_steps(config, num_steps=3)
    assert all(np.isfinite(loss) and grad_norm > 0 for loss, grad_norm in losses)
    stack = state.params["unet"]["mid_block"]["attentions_0"]["transformer_blocks"]
    assert stack["attn1"]["to_q"]["kernel"].shape == (2, 64, 64)  # two blocks: one scan
    assert state.params["text_encoder"]["text_model"]["encoder"]["layers"]["mlp"]["fc1"]["kernel"].ndim == 3
    trained = layer_stacks.unstack_params(jax.device_get(state.params))
    moved = {name: max(float(np.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(trained[name]), jax.tree.leaves(pytorch_sdxl[2][name])))
        for name in ("unet", "text_encoder", models_lib.TEXT_ENCODER_2)}
    assert all(change > 0 for change in moved.values()), moved

    workdir, out = str(tmp_path / "run"), str(tmp_path / "export")
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    checkpoints.save(3, state, jax.random.key(0))
    checkpoints.close()
    assert cli.main(["sdjax", "export", "--workdir", workdir, "--out", out]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert not pipe.config.force_zeros_for_empty_prompt

    _, params, _ = checkpoint_lib.load_params_for_inference(workdir)
    models = models_lib.build_models(config)
    ids = models.tokenizer(PROMPTS, padding="max_length", max_length=config.data.max_length, truncation=True).input_ids
    ours = models_lib.text_conditioning(models, params, ids)
    context, pooled = _pytorch_conditioning(pipe)
    np.testing.assert_allclose(ours["context"], context, atol=ATOL)
    np.testing.assert_allclose(ours["text_embeds"], pooled, atol=ATOL)
    latents = np.random.default_rng(1).standard_normal((2, 4, 4, 4), dtype=np.float32)
    timesteps = np.array([3, 500], np.int32)
    np.testing.assert_allclose(
        np.asarray(models_lib.predict_noise(models, params["unet"], latents, timesteps, **ours)),
        _pytorch_prediction(pipe, latents, timesteps, context, pooled, config.data.resolution), atol=ATOL)
    size = config.data.resolution
    images = pipe(PROMPTS[0], height=size, width=size, num_inference_steps=2, guidance_scale=3.0, output_type="np").images
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all()

    unrolled = config.copy_and_resolve_references()
    unrolled.model.scan_layers = False
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), unrolled)
    with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                       match="saved with model.scan_layers=True.*--config.model.scan_layers=True"):
        checkpoints.check_newest(training_setup.build(unrolled).abstract_state)
    checkpoints.close()


def test_sdxl_samples_and_plans(pytorch_sdxl):
    from sdjax import mesh as mesh_lib
    from sdjax.sample import Sampler
    config, models, params, _ = pytorch_sdxl
    sampler = Sampler(models, config, mesh_lib.make_mesh(config), "ddim", num_steps=3)
    images = sampler(params, ["a red circle on a blue background", "a green square on a white background"], seed=1)
    assert images.shape == (2, config.data.resolution, config.data.resolution, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, sampler(params, ["a red circle on a blue background",
                                                           "a green square on a white background"], seed=1))
    plan = plan_lib.plan_step(config, "cpu:8", cache_dir="")
    assert plan.fits and plan.flops_per_device > 0


def test_sdxl_config_mismatches_name_the_field(tmp_path):
    from tiny import tiny_config, tiny_sdxl_config
    config = tiny_sdxl_config()
    config.model.unet.cross_attention_dim = 64
    with pytest.raises(config_lib.ConfigError, match=r"cross_attention_dim.*\(96: 64 \+ 32\)"):
        validation.validate_against_models(config, models_lib.build_models(config))
    config = tiny_sdxl_config()
    config.model.unet.projection_class_embeddings_input_dim = 24
    with pytest.raises(config_lib.ConfigError, match=r"projection_class_embeddings_input_dim.*\(72\)"):
        validation.validate_against_models(config, models_lib.build_models(config))
    config = tiny_config()  # an SDXL UNet without the second text encoder
    config.model.unet.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=72)
    with pytest.raises(config_lib.ConfigError, match="model.unet.addition_embed_type.*second text encoder"):
        validation.validate_against_models(config, models_lib.build_models(config))


def test_flax_export_of_sdxl_loads_back_and_conditions_the_same(tmp_path):
    """`--format flax` (the folder layout of diffusers <= 0.39's Flax pipelines, msgpack weights) read back as
    `model.pretrained`: the same params, so the same text conditioning."""
    from tiny import tiny_sdxl_config
    config = tiny_sdxl_config()
    models = models_lib.build_models(config)
    params = jax.device_get(models_lib.init_params(models, config, jax.random.key(0)))
    workdir, out = str(tmp_path / "run"), str(tmp_path / "flax")
    checkpoints = checkpoint_lib.Checkpoints(checkpoint_lib.checkpoint_dir(config, workdir), config)
    checkpoints.save(1, step_lib.state_from_params(params, optim.make_optimizer(config)), jax.random.key(0))
    checkpoints.close()
    assert cli.main(["sdjax", "export", "--workdir", workdir, "--out", out, "--format", "flax"]) == 0
    assert os.path.isfile(os.path.join(out, "text_encoder_2", "flax_model.msgpack"))
    loaded_config = tiny_sdxl_config()
    loaded_config.model.pretrained = out
    loaded_models = models_lib.build_models(loaded_config)
    assert loaded_models.sdxl
    loaded = models_lib.load_pretrained_params(loaded_models, loaded_config)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)
    ids = models.tokenizer(PROMPTS, padding="max_length", max_length=config.data.max_length, truncation=True).input_ids
    theirs = models_lib.text_conditioning(loaded_models, loaded, ids)
    ours = models_lib.text_conditioning(models, params, ids)
    np.testing.assert_array_equal(theirs["context"], ours["context"])
    np.testing.assert_array_equal(theirs["text_embeds"], ours["text_embeds"])
