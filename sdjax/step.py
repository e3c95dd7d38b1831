"""The train state and the train step: one pure function, compiled once over the mesh.

A batch {pixel_values [B,H,W,3] in [-1,1], input_ids [B,77]} becomes a loss like this:
  frozen VAE encode -> latents x scaling factor; frozen CLIP text encoder -> text embeddings;
  noise + random timesteps -> noisy latents (DDPM forward process);
  UNet predicts epsilon (or v) -> MSE in float32 -> grads of the trainable params -> optax update.
Compute runs in the models' dtype (bf16 by default); params and optimizer state stay float32.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax.models import noise as noise_lib

TRAINABLE = ("unet",)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]  # trainable components, float32: {"unet": ...}
    frozen: dict[str, Any]  # components that are only run forward: {"vae": ..., "text_encoder": ...}
    opt_state: optax.OptState


def split_params(params: dict[str, Any]) -> tuple[dict, dict]:
    trainable = {k: v for k, v in params.items() if k in TRAINABLE}
    frozen = {k: v for k, v in params.items() if k not in TRAINABLE}
    return trainable, frozen


def state_from_params(params: dict[str, Any], tx: optax.GradientTransformation) -> TrainState:
    trainable, frozen = split_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=tx.init(trainable))


def state_shardings(state_shapes: TrainState, mesh, config: ml_collections.ConfigDict) -> TrainState:
    """Shardings for every leaf of the state: the fsdp rule for arrays, replicated for scalars."""
    return mesh_lib.tree_shardings(state_shapes, mesh, config.mesh.fsdp_min_size)


def create_train_state(models: models_lib.Models, config: ml_collections.ConfigDict, tx, mesh, rng):
    """A sharded TrainState; params are created already sharded (or loaded from `model.pretrained`)."""
    param_shapes = models_lib.param_shapes(models, config)
    state_shapes = jax.eval_shape(lambda p: state_from_params(p, tx), param_shapes)
    shardings = state_shardings(state_shapes, mesh, config)
    params_shardings = {**shardings.params, **shardings.frozen}
    if config.model.pretrained:
        host_params = models_lib.load_pretrained_params(models, config)
        params = jax.device_put(host_params, params_shardings)
    else:
        params = models_lib.init_params(models, config, rng, out_shardings=params_shardings)
    state = jax.jit(lambda p: state_from_params(p, tx), out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings


def make_train_step(models: models_lib.Models, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule) -> Callable:
    """(state, batch, rng) -> (state, metrics); `rng` is the run's base key, folded with the step inside."""
    scheduler, scheduler_state = noise_lib.make_noise_scheduler(config)
    prediction_type = config.diffusion.prediction_type
    num_timesteps = config.diffusion.num_train_timesteps

    def loss_fn(trainable, frozen, batch, rng):
        params = {**frozen, **trainable}
        latent_rng, noise_rng, time_rng = jax.random.split(rng, 3)
        latents = models_lib.encode_images(models, params["vae"], batch["pixel_values"], latent_rng)
        text_embeddings = models_lib.encode_text(models, params["text_encoder"], batch["input_ids"])
        noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
        timesteps = jax.random.randint(time_rng, (latents.shape[0],), 0, num_timesteps)
        latents = latents.astype(jnp.float32)
        noisy_latents = noise_lib.add_noise(scheduler, scheduler_state, latents, noise, timesteps)
        target = noise_lib.training_target(scheduler, scheduler_state, latents, noise, timesteps, prediction_type)
        prediction = models_lib.predict_noise(models, params["unet"], noisy_latents, timesteps, text_embeddings)
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.params, state.frozen, batch, step_rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step: Callable, shardings: TrainState, mesh) -> Callable:
    """The step compiled over the mesh: state sharded and donated, batch split over data-parallel devices."""
    return jax.jit(
        train_step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
