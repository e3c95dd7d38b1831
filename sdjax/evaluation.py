"""Validation loss on the held-out split, comparable from one evaluation to the next.

The training loss draws a new timestep, noise and VAE latent sample for every example at every step, so it
is noisy and says little about one step against another. Here all three are fixed: example j of the N
evaluated gets timestep floor((j + 0.5) * T / N) (the N examples cover the T training timesteps evenly), and
the noise and latent samples come from a fixed key (EVAL_SEED, not train.seed, so runs compare too). The
same params always give the same loss, so a change of the eval loss is a change of the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import data as data_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax.models import noise as noise_lib

EVAL_SEED = 0


def fixed_timesteps(first_example: jax.Array, batch_size: int, num_examples: int, num_timesteps: int) -> jax.Array:
    """Stratified timesteps of examples first_example .. first_example + batch_size - 1, of `num_examples`."""
    positions = first_example + jnp.arange(batch_size)
    return jnp.floor((positions + 0.5) * num_timesteps / num_examples).astype(jnp.int32)


def batch_loss(models: models_lib.Models, config: ml_collections.ConfigDict, num_examples: int, params: dict,
               batch: dict, batch_index: jax.Array) -> jax.Array:
    """Mean squared error of one eval batch, with the training loss's target, at fixed timesteps and noise."""
    schedule = noise_lib.make_noise_schedule(config)
    batch_size = batch["input_ids"].shape[0]
    latent_key, noise_key = jax.random.split(jax.random.fold_in(jax.random.key(EVAL_SEED), batch_index))
    latents = models_lib.encode_images(models, params["vae"], batch["pixel_values"], latent_key).astype(jnp.float32)
    conditioning = models_lib.batch_conditioning(models, params, batch)
    noise = jax.random.normal(noise_key, latents.shape, jnp.float32)
    timesteps = fixed_timesteps(batch_index * batch_size, batch_size, num_examples,
                                config.diffusion.num_train_timesteps)
    noisy_latents = noise_lib.add_noise(schedule, latents, noise, timesteps)
    target = noise_lib.training_target(schedule, latents, noise, timesteps, config.diffusion.prediction_type)
    prediction = models_lib.predict_noise(models, params["unet"], noisy_latents, timesteps, **conditioning)
    return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


class Evaluator:
    """`evaluator(params) -> eval loss` over the first whole global batches of the eval split."""

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, mesh):
        global_batch = config.train.batch_size
        self.host_batches = data_lib.unaugmented_batches(config, models.tokenizer, "eval",
                                                         global_batch // jax.process_count())
        self.num_batches = len(self.host_batches) // jax.process_count()
        if self.num_batches == 0:
            raise data_lib.DataError(f"the eval split of {data_lib.source_name(config)} has fewer examples than "
                                     f"one global batch (train.batch_size={global_batch})")
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        loss = functools.partial(batch_loss, models, config, self.num_batches * global_batch)
        self._batch_loss = jax.jit(mesh_lib.traced_on_mesh(loss, mesh), out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, params: dict) -> float:
        losses = [self._batch_loss(params, batch, np.int32(index))
                  for index, batch in enumerate(mesh_lib.global_batches(self.host_batches, self.batch_sharding))]
        return float(np.mean(jax.device_get(losses)))  # equal batch sizes: the mean over examples

    def evaluate_state(self, state: step_lib.TrainState) -> dict[str, float]:
        """{"eval_loss"} of the trained params, and {"eval_loss_ema"} of the EMA params when kept."""
        metrics = {"eval_loss": self(step_lib.inference_params(state, use_ema=False))}
        if state.ema_params is not None:
            metrics["eval_loss_ema"] = self(step_lib.inference_params(state))
        return metrics
