"""The train state and the train step: one pure function, compiled once over the mesh.

A batch {pixel_values [B,H,W,3] in [-1,1], input_ids [B,77]} becomes a loss like this:
  frozen VAE encode -> latents x scaling factor (or, from a latent cache, {latent_mean, latent_std} sampled
  with the same rng); frozen CLIP text encoder -> text embeddings;
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

from sdjax import ema as ema_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax.models import noise as noise_lib
from sdjax.models import remat as remat_lib

TRAINABLE = ("unet",)


def stage_components(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trainable, all) components of the train state of `train.stage`: the UNet stage trains the UNet over a
    frozen VAE and text encoder; the VAE stage (sdjax/vae.py) trains the VAE alone."""
    if config.train.get("stage", "unet") == "vae":
        return ("vae",), ("vae",)
    return TRAINABLE, models_lib.COMPONENTS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]  # trainable components, float32: {"unet": ...}
    frozen: dict[str, Any]  # components that are only run forward: {"vae": ..., "text_encoder": ...}
    opt_state: optax.OptState
    ema_params: dict[str, Any] | None = None  # EMA of `params` (sdjax/ema.py); None when train.ema_decay is 0


def split_params(params: dict[str, Any], trainable_names: tuple[str, ...] = TRAINABLE) -> tuple[dict, dict]:
    trainable = {k: v for k, v in params.items() if k in trainable_names}
    frozen = {k: v for k, v in params.items() if k not in trainable_names}
    return trainable, frozen


def state_from_params(params: dict[str, Any], tx: optax.GradientTransformation, ema: bool = False,
                      trainable_names: tuple[str, ...] = TRAINABLE) -> TrainState:
    trainable, frozen = split_params(params, trainable_names)
    # A copy, not the same arrays: the step donates the state, and one buffer cannot be donated twice.
    ema_params = jax.tree.map(jnp.copy, trainable) if ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                      ema_params=ema_params)


def inference_params(state: TrainState, use_ema: bool = True) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"} for sampling: the EMA weights when kept (and `use_ema`)."""
    trainable = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return {**state.frozen, **trainable}


def state_shardings(state_shapes: TrainState, mesh, config: ml_collections.ConfigDict) -> TrainState:
    """Shardings for every leaf of the state: the fsdp rule for arrays, replicated for scalars."""
    return mesh_lib.tree_shardings(state_shapes, mesh, config.mesh.fsdp_min_size)


def create_train_state(models: models_lib.Models, config: ml_collections.ConfigDict, tx, mesh, rng):
    """A sharded TrainState of `train.stage`'s components; params are created already sharded (or loaded from
    `model.pretrained`)."""
    trainable, components = stage_components(config)
    param_shapes = models_lib.param_shapes(models, config, components)
    ema = config.train.ema_decay > 0
    state_shapes = jax.eval_shape(lambda p: state_from_params(p, tx, ema, trainable), param_shapes)
    shardings = state_shardings(state_shapes, mesh, config)
    params_shardings = {**shardings.params, **shardings.frozen}
    if config.model.pretrained:
        host_params = models_lib.load_pretrained_params(models, config, components)
        params = jax.device_put(host_params, params_shardings)
    else:
        params = models_lib.init_params(models, config, rng, out_shardings=params_shardings, components=components)
    state = jax.jit(lambda p: state_from_params(p, tx, ema, trainable), out_shardings=shardings,
                    donate_argnums=0)(params)
    return state, shardings


def make_train_step(models: models_lib.Models, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule) -> Callable:
    """(state, batch, rng) -> (state, metrics); `rng` is the run's base key, folded with the step inside."""
    scheduler, scheduler_state = noise_lib.make_noise_scheduler(config)
    prediction_type = config.diffusion.prediction_type
    num_timesteps = config.diffusion.num_train_timesteps

    def loss_fn(trainable, frozen, batch, example_rngs):
        """Mean loss over `batch`. Example i's VAE sample, noise and timestep are drawn from example_rngs[i]
        alone, so a micro-batch computes exactly its examples' part of the whole batch's loss."""
        params = {**frozen, **trainable}
        latent_rngs, noise_rngs, time_rngs = jax.vmap(lambda k: tuple(jax.random.split(k, 3)))(example_rngs)
        if "latent_mean" in batch:  # from the latent cache (sdjax/data/latent_cache.py): the VAE already ran
            latent_mean, latent_std = batch["latent_mean"], batch["latent_std"]
        else:
            latent_mean, latent_std = models_lib.image_latent_moments(models, params["vae"], batch["pixel_values"])
        latents = jax.vmap(lambda mean, std, k: models_lib.sample_latents(models, mean[None], std[None], k)[0])(
            latent_mean, latent_std, latent_rngs)
        text_embeddings = models_lib.encode_text(models, params["text_encoder"], batch["input_ids"])
        noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(noise_rngs)
        timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(time_rngs)
        latents = latents.astype(jnp.float32)
        noisy_latents = noise_lib.add_noise(scheduler, scheduler_state, latents, noise, timesteps)
        target = noise_lib.training_target(scheduler, scheduler_state, latents, noise, timesteps, prediction_type)
        with remat_lib.remat_unet_blocks(config.train.remat):
            prediction = models_lib.predict_noise(models, params["unet"], noisy_latents, timesteps, text_embeddings)
        return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target)), {}

    return make_update_step(loss_fn, config, tx, lr_schedule)


def make_update_step(loss_fn: Callable, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                     lr_schedule: optax.Schedule) -> Callable:
    """The train step of any stage around its `loss_fn(trainable, frozen, batch, example_rngs) -> (loss,
    metrics)`: gradient accumulation, optimizer update, EMA, and the metrics {loss, grad_norm, lr, **metrics}."""
    grad_accum = config.train.grad_accum

    def loss_and_grads(trainable, frozen, batch, example_rngs):
        """Over `grad_accum` equal micro-batches in sequence (lax.scan): their mean loss and gradient are the
        whole batch's, while only one micro-batch's activations are alive at a time. (XLA places the gradient
        all-reduce inside the loop, once per micro-batch: seen in the compiled step.)"""
        if grad_accum == 1:
            return jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, batch, example_rngs)

        def accumulate(totals, micro_batch):
            loss_and_aux, grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, *micro_batch)
            return jax.tree.map(jnp.add, totals, (loss_and_aux, grads)), None

        aux_shapes = jax.eval_shape(loss_fn, trainable, frozen, batch, example_rngs)[1]
        zeros = ((jnp.zeros((), jnp.float32), jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), aux_shapes)),
                 jax.tree.map(jnp.zeros_like, trainable))
        micro_batches = jax.tree.map(lambda x: split_micro_batches(x, grad_accum), (batch, example_rngs))
        totals, _ = jax.lax.scan(accumulate, zeros, micro_batches)
        return jax.tree.map(lambda total: total / grad_accum, totals)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        step_rng = jax.random.fold_in(rng, state.step)
        example_rngs = jax.random.split(step_rng, jax.tree.leaves(batch)[0].shape[0])
        (loss, loss_metrics), grads = loss_and_grads(state.params, state.frozen, batch, example_rngs)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(state.step),
                   **loss_metrics}
        ema_params = state.ema_params
        if ema_params is not None:
            ema_params = ema_lib.update(ema_params, params, ema_lib.decay_at(state.step, config.train.ema_decay))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params)
        return new_state, metrics

    return train_step


def split_micro_batches(x: jax.Array, grad_accum: int) -> jax.Array:
    """[B, ...] -> [grad_accum, B / grad_accum, ...], micro-batch j = examples j, j + grad_accum, ...

    Strided, not contiguous: each device holds a contiguous block of the batch, so every micro-batch takes
    B / grad_accum / devices examples from every device and the split moves no data between devices.
    """
    strided = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:])
    return jnp.swapaxes(strided, 0, 1)


def jit_train_step(train_step: Callable, shardings: TrainState, mesh) -> Callable:
    """The step compiled over the mesh: state sharded and donated, batch split over data-parallel devices."""
    return jax.jit(
        train_step,
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
    )
