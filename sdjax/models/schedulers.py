"""The sampling schedulers of diffusers (Flax), driven by a step index inside one traced denoising loop.

`make_sampling_scheduler(name, config, num_inference_steps, latent_shape)` returns an object whose methods
take the loop index `i` (0 = noisiest) and are pure and traceable, so the whole loop is one `fori_loop`:

    state = s.init_state()                              # traceable: built inside the compiled sampler
    latents = noise * s.init_noise_sigma(state)
    for i in range(s.num_loop_steps(state)):
        t = s.timestep(state, i)                        # what the UNet is conditioned on
        eps = unet(s.scale_model_input(state, latents, i), t)
        latents, state = s.step(state, eps, i, latents, image_keys)

Most schedulers are diffusers' own, called as its Flax pipeline calls them. Three need an adapter, each
because diffusers' Flax code is wrong or untraceable there (the PyTorch schedulers are the reference):
- ddpm: FlaxDDPMScheduler.step assumes the previous timestep is t - 1 (with fewer inference steps than
  training steps it would leave most of the noise in), and its default variance calls `jnp.clip(a_min=)`,
  which jax 0.10 removed. `StridedDDPM.step` is PyTorch DDPMScheduler.step (strided posterior, "fixed_small"
  variance) over diffusers' Flax alphas, with its noise drawn per image.
- lms: FlaxLMSDiscreteScheduler.step integrates its coefficients with scipy on traced values and grows
  its history with a data-dependent length: it cannot be compiled. The coefficients depend only on the
  sigmas, so we compute them once on the host with diffusers' own `get_lms_coefficient`, and keep the
  derivative history in a fixed-size ring.
- euler and lms: their timesteps are floats found by equality; the Flax pipeline casts them to int first,
  which never matches. Indexing by step avoids that, and the UNet gets the float timesteps as in PyTorch.
- dpm: diffusers' Flax DPM-Solver++ ends at timestep 0 (PyTorch's `final_sigmas_type="sigma_min"`), not
  at sigma 0 as PyTorch's default does; the difference is the noise level of timestep 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from diffusers import (FlaxDDIMScheduler, FlaxDDPMScheduler, FlaxDPMSolverMultistepScheduler,
                       FlaxEulerDiscreteScheduler, FlaxLMSDiscreteScheduler, FlaxPNDMScheduler)

from sdjax.config import SCHEDULERS

LMS_ORDER = 4  # diffusers' default order for LMS


def _diffusers_scheduler(name: str, diffusion: ml_collections.ConfigDict):
    """The diffusers Flax scheduler, configured like Stable Diffusion's own scheduler configs."""
    common = dict(num_train_timesteps=diffusion.num_train_timesteps, beta_start=diffusion.beta_start,
                  beta_end=diffusion.beta_end, beta_schedule=diffusion.beta_schedule,
                  prediction_type=diffusion.prediction_type)
    if name == "ddim":
        return FlaxDDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if name == "pndm":
        return FlaxPNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    if name == "lms":
        return FlaxLMSDiscreteScheduler(**common)
    if name == "dpm":
        return FlaxDPMSolverMultistepScheduler(**common)
    if name == "euler":
        return FlaxEulerDiscreteScheduler(**common)
    if name == "ddpm":
        return FlaxDDPMScheduler(**common, clip_sample=False)
    raise ValueError(f"unknown scheduler {name!r}: expected one of {list(SCHEDULERS)}")


@dataclasses.dataclass(frozen=True)
class SamplingScheduler:
    """A diffusers Flax scheduler, called with the loop index; see the module docstring."""

    scheduler: Any
    num_inference_steps: int
    latent_shape: tuple[int, ...]

    def init_state(self):
        state = self.scheduler.create_state()
        return self.scheduler.set_timesteps(state, self.num_inference_steps, self.latent_shape)

    def num_loop_steps(self, state) -> int:
        """Static: PNDM (PLMS) takes one step more than asked for, its first timestep repeated."""
        return state.timesteps.shape[0]

    def init_noise_sigma(self, state) -> jax.Array:
        return state.init_noise_sigma

    def timestep(self, state, i) -> jax.Array:
        return state.timesteps[i]

    def scale_model_input(self, state, sample, i) -> jax.Array:
        return self.scheduler.scale_model_input(state, sample, self.timestep(state, i))

    def step(self, state, model_output, i, sample, image_keys):
        """(previous sample, new state); `image_keys` [B] are only drawn from by stochastic schedulers."""
        del image_keys
        return self.scheduler.step(state, model_output, self.timestep(state, i), sample, return_dict=False)


class StridedDDPM(SamplingScheduler):
    """Ancestral DDPM sampling over the inference timesteps (PyTorch DDPMScheduler.step, "fixed_small")."""

    def posterior(self, state, model_output, i, sample) -> tuple[jax.Array, jax.Array]:
        """Mean and standard deviation of x_prev given x_t = `sample` and the model's prediction."""
        alphas_cumprod, timesteps = state.common.alphas_cumprod, state.timesteps.astype(jnp.int32)
        last = self.num_loop_steps(state) - 1
        alpha_prod_t = alphas_cumprod[timesteps[i]]
        alpha_prod_prev = jnp.where(i == last, 1.0, alphas_cumprod[timesteps[jnp.minimum(i + 1, last)]])
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = 1 - current_alpha
        if self.scheduler.config.prediction_type == "epsilon":
            x0 = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
        else:  # v_prediction
            x0 = jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
        mean = (jnp.sqrt(alpha_prod_prev) * current_beta / beta_prod_t * x0
                + jnp.sqrt(current_alpha) * beta_prod_prev / beta_prod_t * sample)
        variance = jnp.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20)
        return mean, jnp.where(i == last, 0.0, jnp.sqrt(variance))

    def step(self, state, model_output, i, sample, image_keys):
        mean, std = self.posterior(state, model_output, i, sample)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(image_keys, i)
        # Per-image noise: an image does not depend on the others in the batch, nor on how it is sharded.
        noise = jax.vmap(lambda key: jax.random.normal(key, sample.shape[1:], sample.dtype))(step_keys)
        return mean + std * noise, state


@dataclasses.dataclass(frozen=True)
class CompiledLMS(SamplingScheduler):
    """FlaxLMSDiscreteScheduler's algorithm with host-computed coefficients and a fixed-size history."""

    coefficients: np.ndarray = None  # [num_inference_steps, LMS_ORDER]: weight of the derivative k steps back

    def init_state(self):
        state = self.scheduler.set_timesteps(self.scheduler.create_state(), self.num_inference_steps)
        return state.replace(timesteps=self.float_timesteps(),
                             derivatives=jnp.zeros((LMS_ORDER,) + tuple(self.latent_shape), jnp.float32))

    def float_timesteps(self) -> jax.Array:
        """diffusers' LMS timesteps before its cast to int (PyTorch conditions the UNet on these)."""
        last = self.scheduler.config.num_train_timesteps - 1
        return jnp.linspace(last, 0, self.num_inference_steps, dtype=jnp.float32)

    def scale_model_input(self, state, sample, i):
        return sample / jnp.sqrt(state.sigmas[i] ** 2 + 1)

    def step(self, state, model_output, i, sample, image_keys):
        del image_keys
        sigma = state.sigmas[i]
        if self.scheduler.config.prediction_type == "epsilon":
            derivative = model_output  # (sample - (sample - sigma * eps)) / sigma
        else:  # v_prediction, as diffusers converts it
            x0 = model_output * (-sigma / jnp.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
            derivative = (sample - x0) / sigma
        history = jnp.roll(state.derivatives, 1, axis=0).at[0].set(derivative)  # newest first
        weights = jnp.asarray(self.coefficients)[i]
        prev_sample = sample + jnp.tensordot(weights, history, axes=1)
        return prev_sample, state.replace(derivatives=history)


def _lms_coefficients(scheduler, num_inference_steps: int) -> np.ndarray:
    with jax.ensure_compile_time_eval():  # concrete sigmas, also when called while tracing the sampler
        state = scheduler.set_timesteps(scheduler.create_state(), num_inference_steps)
    state = state.replace(sigmas=np.asarray(state.sigmas, np.float64))  # scipy integrates numpy quickly
    table = np.zeros((num_inference_steps, LMS_ORDER), np.float32)
    for i in range(num_inference_steps):
        order = min(i + 1, LMS_ORDER)
        for k in range(order):
            table[i, k] = scheduler.get_lms_coefficient(state, order, i, k)
    return table


def make_sampling_scheduler(name: str, config: ml_collections.ConfigDict, num_inference_steps: int,
                            latent_shape: tuple[int, ...]) -> SamplingScheduler:
    """`name` in SCHEDULERS, for the noise schedule of `config.diffusion` and latents of `latent_shape`."""
    if num_inference_steps < 1 or (name == "pndm" and num_inference_steps < 2):
        raise ValueError(f"{name} needs at least {2 if name == 'pndm' else 1} inference steps, "
                         f"got {num_inference_steps}")
    if num_inference_steps > config.diffusion.num_train_timesteps:
        raise ValueError(f"{num_inference_steps} inference steps is more than the "
                         f"{config.diffusion.num_train_timesteps} training timesteps")
    scheduler = _diffusers_scheduler(name, config.diffusion)
    shape = tuple(latent_shape)
    if name == "ddpm":
        return StridedDDPM(scheduler, num_inference_steps, shape)
    if name == "lms":
        return CompiledLMS(scheduler, num_inference_steps, shape, _lms_coefficients(scheduler, num_inference_steps))
    return SamplingScheduler(scheduler, num_inference_steps, shape)


def diffusion_config_from_folder(pretrained_dir: str) -> dict:
    """The noise-schedule keys of `config.diffusion` found in a diffusers folder's scheduler config, if any."""
    path = os.path.join(pretrained_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    return {key: saved[key] for key in keys if key in saved}
