"""Sampling: classifier-free guidance, the schedulers against PyTorch diffusers, determinism, sharding, CLI."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sdjax import cli
from sdjax import images as images_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import sample as sample_lib
from sdjax.config import SCHEDULERS
from sdjax.models import schedulers as schedulers_lib

# The tiny model's grid (16 px): 4 images on 8 devices are padded to 8, so every call below shares one compile.
NUM_STEPS = 3
PROMPTS = sample_lib.repeat_prompts(["a red circle on a blue background", "a green square on a white background"], 2)


def micro_config():
    """Smaller than tiny_config (one UNet and VAE level, 8 px): the scheduler sweep compiles 6 samplers."""
    from tiny import tiny_config
    c = tiny_config()
    c.model.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",))
    c.model.vae.update(block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                       up_block_types=("UpDecoderBlock2D",))
    c.model.text_encoder.update(num_hidden_layers=1)
    c.data.resolution = 8
    c.mesh.data = 1
    return c


# --- classifier-free guidance -----------------------------------------------------------------------


def _predictions():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32),
            jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32))


def test_guidance_one_is_the_conditional_prediction_alone():
    uncond, cond = _predictions()
    np.testing.assert_array_equal(sample_lib.classifier_free_guidance(uncond, cond, 1.0), cond)


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_is_uncond_plus_scale_times_difference(scale):
    uncond, cond = _predictions()
    expected = np.asarray(uncond) + scale * (np.asarray(cond) - np.asarray(uncond))
    np.testing.assert_allclose(sample_lib.classifier_free_guidance(uncond, cond, scale), expected, rtol=1e-5,
                               atol=1e-5)


def test_pairs_interleave_and_split_back():
    uncond, cond = _predictions()
    paired = sample_lib.interleave_pairs(uncond, cond)
    np.testing.assert_array_equal(paired[1], cond[0])  # u0, c0, u1, c1: a device's shard holds whole pairs
    back_uncond, back_cond = sample_lib.split_pairs(paired)
    np.testing.assert_array_equal(back_uncond, uncond)
    np.testing.assert_array_equal(back_cond, cond)


def test_one_guided_ddim_step_follows_the_formulas(tiny_config):
    """DDIM (eta 0) from t to the previous timestep, with eps = uncond + s (cond - uncond), by hand."""
    uncond, cond = _predictions()
    sample = jnp.asarray(np.random.default_rng(1).standard_normal(uncond.shape), jnp.float32)
    scale, num_steps = 7.5, 10
    schedule = schedulers_lib.make_sampling_scheduler("ddim", tiny_config, num_steps, sample.shape)
    state = schedule.init_state()
    prev, _ = schedule.step(state, sample_lib.classifier_free_guidance(uncond, cond, scale), 0, sample, None)

    d = tiny_config.diffusion  # scaled_linear betas, as diffusers defines them
    betas = np.linspace(d.beta_start**0.5, d.beta_end**0.5, d.num_train_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1 - betas)
    t = int(schedule.timestep(state, 0))
    t_prev = t - d.num_train_timesteps // num_steps
    assert (t, t_prev) == (901, 801)  # "leading" spacing with steps_offset=1, as Stable Diffusion's DDIM
    eps = np.asarray(uncond) + scale * (np.asarray(cond) - np.asarray(uncond))
    x0 = (np.asarray(sample) - np.sqrt(1 - alphas_cumprod[t]) * eps) / np.sqrt(alphas_cumprod[t])
    expected = np.sqrt(alphas_cumprod[t_prev]) * x0 + np.sqrt(1 - alphas_cumprod[t_prev]) * eps
    np.testing.assert_allclose(prev, expected, rtol=1e-4, atol=1e-4)


# (Each scheduler's whole loop against PyTorch diffusers': tests/test_sampling_schedulers.py.)


# --- sampling the tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models_and_params():
    """Params replicated over the 8 devices, created as create_train_state creates them (a shared compile)."""
    from tiny import tiny_config
    config = tiny_config()
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config)
    assert mesh.shape["data"] == 8
    shardings = mesh_lib.tree_shardings(models_lib.param_shapes(models, config), mesh, config.mesh.fsdp_min_size)
    return config, models, mesh, models_lib.init_params(models, config, jax.random.key(0), out_shardings=shardings)


@pytest.fixture(scope="module")
def sharded_sampler(tiny_models_and_params):
    config, models, mesh, params = tiny_models_and_params
    return sample_lib.Sampler(models, config, mesh, "ddim", NUM_STEPS), params


def test_same_seed_gives_the_same_images_of_the_configured_size(sharded_sampler):
    sampler, params = sharded_sampler
    first = sampler(params, PROMPTS, seed=3, guidance=5.0)
    assert first.shape == (len(PROMPTS), 16, 16, 3) and first.dtype == np.uint8
    assert first.min() >= 0 and first.max() <= 255 and first.std() > 0
    np.testing.assert_array_equal(sampler(params, PROMPTS, seed=3, guidance=5.0), first)
    assert np.abs(sampler(params, PROMPTS, seed=4, guidance=5.0).astype(int) - first).max() > 0


def test_an_image_does_not_depend_on_the_others_in_the_batch(sharded_sampler):
    sampler, params = sharded_sampler
    together = sampler(params, PROMPTS, seed=3, guidance=5.0)
    alone = sampler(params, PROMPTS[:1], seed=3, guidance=5.0)
    np.testing.assert_array_equal(alone[0], together[0])


def test_sharded_over_8_devices_matches_1_device(sharded_sampler, tiny_models_and_params):
    sampler, params = sharded_sampler
    config, models, _, _ = tiny_models_and_params
    config = config.copy_and_resolve_references()
    config.mesh.data = 1
    one_device = mesh_lib.make_mesh(config, jax.devices()[:1])
    single = sample_lib.Sampler(models, config, one_device, "ddim", NUM_STEPS)
    expected = single(jax.device_put(jax.device_get(params), mesh_lib.replicated(one_device)), PROMPTS, seed=3,
                      guidance=5.0)
    # Tolerance: one uint8 level. Every image is computed whole on one device (no cross-device reduction),
    # so only a batch-size-dependent choice of CPU kernels could round differently; measured: identical.
    sharded = sampler(params, PROMPTS, seed=3, guidance=5.0)
    assert np.abs(sharded.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.slow  # six samplers compiled (one UNet + VAE each)
def test_every_scheduler_samples_end_to_end():
    config = micro_config()
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config, jax.devices()[:1])
    params = jax.device_put(models_lib.init_params(models, config, jax.random.key(0)), mesh_lib.replicated(mesh))
    for name in SCHEDULERS:
        sampler = sample_lib.Sampler(models, config, mesh, name, NUM_STEPS)
        images = sampler(params, ["a red circle", "a red circle"], seed=0, guidance=3.0)
        assert images.shape == (2, 8, 8, 3) and images.dtype == np.uint8, name
        assert np.abs(images[0].astype(int) - images[1]).max() > 0, f"{name}: two seeds gave the same image"


# --- grids and the command line ---------------------------------------------------------------------


def test_grid_puts_prompts_in_rows_and_seeds_in_columns():
    images = np.stack([np.full((2, 3, 3), i, np.uint8) for i in range(5)])
    grid = images_lib.image_grid(images, columns=2)
    assert grid.shape == (3 * 2, 2 * 3, 3)
    assert grid[0, 3, 0] == 1 and grid[2, 0, 0] == 2 and grid[4, 3, 0] == 0  # row 1 col 0 = image 2; pad black


def test_sample_command_from_a_pretrained_folder(tmp_path, tiny_config):
    from pytorch_folder import write_pytorch_folder
    tiny_config.model.unet.sample_size = 4  # x the VAE's 4 = 16 px: the shapes of `sharded_sampler`, compiled once
    folder = tmp_path / "pretrained"
    write_pytorch_folder(tiny_config, str(folder))
    out, out_dir = tmp_path / "grid.png", tmp_path / "images"
    code = cli.main(["sdjax", "sample", f"--pretrained={folder}", "--prompt", "a red circle", "--prompt",
                     "a blue square", "--num-images=2", "--scheduler=ddim", f"--steps={NUM_STEPS}", "--seed=1",
                     "--precision=fp32", f"--out={out}", f"--out-dir={out_dir}"])
    assert code == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 16, 2 * 16, 3) and grid.std() > 0  # rows: prompts, columns: images
    assert sorted(os.listdir(out_dir)) == [f"image_{j:04d}.png" for j in range(4)]
    np.testing.assert_array_equal(np.asarray(Image.open(out_dir / "image_0002.png")), grid[16:, :16])


def test_sample_command_needs_exactly_one_source(capsys):
    with pytest.raises(SystemExit, match="exactly one of --workdir"):
        cli.main(["sdjax", "sample", "--prompt", "a red circle"])


@pytest.mark.parametrize("key,value,message", [
    ("sample.scheduler", "heun", "expected one of"),
    ("sample.steps", 0, "expected between 1"),
    ("sample.guidance", -1.0, "guidance scale >= 0"),
])
def test_config_names_a_bad_sample_value(tiny_config, key, value, message):
    from sdjax.config import ConfigError
    from sdjax.validation import validate
    group, name = key.split(".")
    tiny_config[group][name] = value
    with pytest.raises(ConfigError, match=message) as error:
        validate(tiny_config, 8)
    assert error.value.key == key
