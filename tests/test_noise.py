"""The noise schedule and the forward process of training (sdjax/models/noise.py) against diffusers' PyTorch
DDPMScheduler. (Against the diffusers-Flax-based module it replaced, when both existed: alphas_cumprod within
1.4e-6, add_noise and velocity within 1.3e-6.)"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.config import BETA_SCHEDULES, base_config
from sdjax.models import noise as noise_lib

TIMESTEPS = np.array([0, 1, 10, 250, 500, 998, 999], np.int32)
# (beta_start, beta_end) of Stable Diffusion and of DDPM's paper (diffusers' defaults); cosine ignores them.
BETA_RANGES = [(0.00085, 0.012), (0.0001, 0.02)]


def make_config(beta_schedule: str = "scaled_linear", beta_range: tuple[float, float] = BETA_RANGES[0]):
    config = base_config()
    config.diffusion.beta_schedule = beta_schedule
    config.diffusion.beta_start, config.diffusion.beta_end = beta_range
    return config


def torch_scheduler(config) -> diffusers.DDPMScheduler:
    d = config.diffusion
    return diffusers.DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                                   beta_start=d.beta_start, beta_end=d.beta_end)


def latents_and_noise() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (len(TIMESTEPS), 4, 8, 8)
    return rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("beta_range", BETA_RANGES)
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_betas_and_alphas_cumprod_are_pytorchs(beta_schedule, beta_range):
    """Bit for bit on this x86 host; 1e-6 leaves room for how torch.linspace rounds elsewhere (diffusers' Flax
    schedule is up to 1.4e-6 off)."""
    config = make_config(beta_schedule, beta_range)
    reference = torch_scheduler(config)
    np.testing.assert_allclose(noise_lib.betas(config.diffusion), reference.betas.numpy(), rtol=1e-6)
    alphas_cumprod = noise_lib.alphas_cumprod(config.diffusion)
    assert alphas_cumprod.dtype == np.float32 and alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(alphas_cumprod, reference.alphas_cumprod.numpy(), rtol=1e-6)


def test_add_noise_and_velocity_are_pytorchs():
    config = make_config()
    schedule, reference = noise_lib.make_noise_schedule(config), torch_scheduler(config)
    latents, noise = latents_and_noise()
    as_torch = (torch.from_numpy(latents), torch.from_numpy(noise), torch.from_numpy(TIMESTEPS).long())
    np.testing.assert_allclose(noise_lib.add_noise(schedule, latents, noise, TIMESTEPS),
                               reference.add_noise(*as_torch).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(noise_lib.velocity(schedule, latents, noise, TIMESTEPS),
                               reference.get_velocity(*as_torch).numpy(), rtol=1e-6, atol=1e-6)


def test_the_noised_latents_are_signal_and_noise_in_the_scheduled_proportions():
    """x_t = sqrt(a) x_0 + sqrt(1 - a) noise and v = sqrt(a) noise - sqrt(1 - a) x_0 with a = alpha_bar_t, by hand."""
    config = make_config()
    schedule = noise_lib.make_noise_schedule(config)
    latents, noise = latents_and_noise()
    alpha_bar = noise_lib.alphas_cumprod(config.diffusion).astype(np.float64)[TIMESTEPS][:, None, None, None]
    np.testing.assert_allclose(noise_lib.add_noise(schedule, latents, noise, TIMESTEPS),
                               alpha_bar**0.5 * latents + (1 - alpha_bar) ** 0.5 * noise, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(noise_lib.velocity(schedule, latents, noise, TIMESTEPS),
                               alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * latents, rtol=1e-5, atol=1e-6)


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    config = make_config()
    schedule = noise_lib.make_noise_schedule(config)
    d = config.diffusion  # SD's scaled-linear schedule in float64, independently of both
    betas = np.linspace(d.beta_start**0.5, d.beta_end**0.5, d.num_train_timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)[TIMESTEPS]
    snr = noise_lib.snr(schedule, TIMESTEPS)
    np.testing.assert_allclose(snr, alphas_cumprod / (1 - alphas_cumprod), rtol=1e-4)


def test_the_schedule_is_a_pytree_a_compiled_step_takes_or_closes_over():
    config = make_config()
    schedule = noise_lib.make_noise_schedule(config)
    latents, noise = latents_and_noise()
    eager = noise_lib.add_noise(schedule, latents, noise, TIMESTEPS)
    assert len(jax.tree.leaves(schedule)) == 1
    np.testing.assert_allclose(jax.jit(noise_lib.add_noise)(schedule, latents, noise, TIMESTEPS), eager,
                               rtol=1e-6, atol=1e-7)
    closed_over = jax.jit(lambda x, n, t: noise_lib.add_noise(schedule, x, n, t))
    np.testing.assert_allclose(closed_over(latents, noise, jnp.asarray(TIMESTEPS)), eager, rtol=1e-6, atol=1e-7)


def test_an_unknown_beta_schedule_is_refused_by_name():
    with pytest.raises(ValueError, match="beta_schedule='sigmoid': expected one of"):
        noise_lib.betas(make_config("sigmoid").diffusion)
