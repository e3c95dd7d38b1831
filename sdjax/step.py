"""The train state and the train step: one pure function, compiled once over the mesh.

A batch {pixel_values [B,H,W,3] in [-1,1], input_ids [B,77], time_ids [B,6]} becomes a loss like this:
  frozen VAE encode -> latents x scaling factor (or, from a latent cache, {latent_mean, latent_std} sampled
  with the same rng); frozen CLIP text encoder -> text embeddings (SDXL: two encoders, their pooled
  projection, and time_ids: each image's size and crop), or from a latent cache with text states, the
  cached {encoder_hidden_states (, text_embeds)}: the step then runs the UNet alone;
  noise + random timesteps -> noisy latents (DDPM forward process);
  UNet predicts epsilon (or v) -> MSE in float32 -> grads of the trainable params -> optax update.
Compute runs in the models' dtype (bf16 by default); params and optimizer state stay float32.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sdjax import ema as ema_lib
from sdjax import lora as lora_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax.models import noise as noise_lib

TRAINABLE = ("unet",)


def stage_components(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(trainable, all) components of the train state of `train.stage`: the UNet stage trains the UNet (or its
    LoRA adapters, and the text encoder if asked) over a frozen VAE and text encoder; the VAE stage
    (sdjax/vae.py) trains the VAE (and its patch-GAN discriminator), with LPIPS's VGG frozen when asked."""
    trainable = trainable_components(config)
    if config.train.get("stage", "unet") == "vae":
        perceptual = (models_lib.PERCEPTUAL,) if config.vae_train.get("perceptual_weight", 0) > 0 else ()
        return trainable, trainable + perceptual
    return trainable, models_lib.components(config)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict[str, Any]  # trainable components, float32: {"unet": ...} (LoRA: {"lora": adapters})
    frozen: dict[str, Any]  # components that are only run forward: {"vae": ..., "text_encoder": ...}
    opt_state: optax.OptState
    ema_params: dict[str, Any] | None = None  # EMA of `params` (sdjax/ema.py); None when train.ema_decay is 0
    # alpha / rank of the LoRA adapters in params["lora"] (sdjax/lora.py); static: not an array of the state.
    lora_scale: float = flax.struct.field(pytree_node=False, default=0.0)


def trainable_components(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """What the optimizer updates: the VAE stage's VAE (and discriminator); the LoRA adapters alone; or the
    UNet (and the text encoder, SDXL's both, if asked)."""
    if config.train.get("stage", "unet") == "vae":
        return ("vae",) + ((models_lib.DISCRIMINATOR,) if config.vae_train.get("gan_weight", 0) > 0 else ())
    if lora_lib.enabled(config):
        return (lora_lib.COMPONENT,)
    text_encoders = ("text_encoder", models_lib.TEXT_ENCODER_2)  # SDXL's both
    return TRAINABLE + tuple(c for c in models_lib.components(config)
                             if c in text_encoders and config.train.train_text_encoder)


def frozen_dtype(config: ml_collections.ConfigDict):
    """How the frozen params are stored: float32, or bfloat16 (half the memory; a bf16 run computes on
    bfloat16 copies of them anyway)."""
    return models_lib.compute_dtype(config.train.frozen_precision)


def split_params(params: dict[str, Any], trainable: tuple[str, ...] = TRAINABLE) -> tuple[dict, dict]:
    return ({k: v for k, v in params.items() if k in trainable},
            {k: v for k, v in params.items() if k not in trainable})


def state_from_params(params: dict[str, Any], tx: optax.GradientTransformation, ema: bool = False,
                      trainable: tuple[str, ...] = TRAINABLE, frozen_dtype=jnp.float32,
                      lora_scale: float = 0.0) -> TrainState:
    trainable, frozen = split_params(params, trainable)
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    # A copy, not the same arrays: the step donates the state, and one buffer cannot be donated twice.
    ema_params = jax.tree.map(jnp.copy, trainable) if ema else None
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, frozen=frozen, opt_state=tx.init(trainable),
                      ema_params=ema_params, lora_scale=lora_scale)


def initial_state(params: dict[str, Any], rng: jax.Array, config: ml_collections.ConfigDict,
                  tx: optax.GradientTransformation, ema: bool) -> TrainState:
    """The state a run starts from: the base params, plus fresh LoRA adapters (from `rng`) when configured."""
    params = lora_lib.add_adapters(params, config, rng)
    lora_scale = lora_lib.scale(config.lora) if lora_lib.enabled(config) else 0.0
    return state_from_params(params, tx, ema, trainable_components(config), frozen_dtype(config), lora_scale)


def inference_params(state: TrainState, use_ema: bool = True) -> dict[str, Any]:
    """{"unet", "vae", "text_encoder"} for sampling: the EMA weights when kept (and `use_ema`), LoRA adapters
    merged into their kernels."""
    trainable = state.ema_params if (use_ema and state.ema_params is not None) else state.params
    return lora_lib.merge({**state.frozen, **trainable}, state.lora_scale)


def state_shardings(state_shapes: TrainState, mesh, config: ml_collections.ConfigDict) -> TrainState:
    """Shardings for every leaf of the state: the fsdp rule for arrays, replicated for scalars."""
    return mesh_lib.tree_shardings(state_shapes, mesh, config.mesh.fsdp_min_size)


def create_train_state(models: models_lib.Models, config: ml_collections.ConfigDict, tx, mesh, rng):
    """A sharded TrainState of `train.stage`'s components; params are created already sharded (or loaded from
    `model.pretrained`)."""
    _, components = stage_components(config)
    param_shapes = models_lib.param_shapes(models, config, components)
    ema = config.train.ema_decay > 0
    lora_rng = jax.random.fold_in(rng, 1)  # the base params keep `rng` itself: the same init as without LoRA
    init_state = functools.partial(initial_state, config=config, tx=tx, ema=ema)
    state_shapes = jax.eval_shape(init_state, param_shapes, lora_rng)
    shardings = state_shardings(state_shapes, mesh, config)
    params_shardings = mesh_lib.tree_shardings(param_shapes, mesh, config.mesh.fsdp_min_size)  # the state's rule
    # LPIPS's VGG comes from its own file (sdjax/models/lpips.py); random only where abstract_train_state
    # traces this function without reading files.
    from_file = models_lib.PERCEPTUAL in components and config.vae_train.get("perceptual_weights")
    initialised = tuple(c for c in components if not (from_file and c == models_lib.PERCEPTUAL))
    if config.model.pretrained:
        host_params = models_lib.load_pretrained_params(models, config, initialised)
        params = jax.device_put(host_params, {c: params_shardings[c] for c in initialised})
    else:
        params = models_lib.init_params(models, config, rng, components=initialised,
                                        out_shardings={c: params_shardings[c] for c in initialised})
    if from_file:
        params[models_lib.PERCEPTUAL] = jax.device_put(models_lib.load_perceptual_params(config),
                                                       params_shardings[models_lib.PERCEPTUAL])
    state = jax.jit(init_state, out_shardings=shardings, donate_argnums=0)(params, lora_rng)
    return state, shardings


def abstract_train_state(models, config: ml_collections.ConfigDict, tx, mesh) -> TrainState:
    """ShapeDtypeStructs with the target shardings of the TrainState `create_train_state` would build.

    Traced, not run: nothing is allocated, and neither a `model.pretrained` folder's weights nor LPIPS's are
    read (the models, already built from their configs, give the same shapes)."""
    from_scratch = copy.deepcopy(config)
    from_scratch.model.pretrained = ""
    from_scratch.vae_train.perceptual_weights = ""
    shardings = {}

    def create(rng):
        state, shardings["state"] = create_train_state(models, from_scratch, tx, mesh, rng)
        return state

    shapes = jax.eval_shape(create, jax.random.key(0))
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes, shardings["state"])


def make_example_losses(models: models_lib.Models, config: ml_collections.ConfigDict) -> Callable:
    """(params, batch, example_rngs) -> the loss of each example [B]: the MSE of the UNet's prediction,
    weighted by Min-SNR-gamma when `loss.snr_gamma` > 0. Example i's VAE sample, noise and timestep are drawn
    from example_rngs[i] alone, so an example's loss does not depend on the batch it is in."""
    schedule = noise_lib.make_noise_schedule(config)
    prediction_type = config.diffusion.prediction_type
    num_timesteps = config.diffusion.num_train_timesteps
    loss = config.loss
    vae_encode_chunks = config.train.get("vae_encode_chunks", 1)

    def example_losses(params, batch, example_rngs):
        latent_rngs, noise_rngs, time_rngs = jax.vmap(lambda k: tuple(jax.random.split(k, 3)))(example_rngs)
        if "latent_mean" in batch:  # from the latent cache (sdjax/data/latent_cache.py): the VAE already ran
            latent_mean, latent_std = batch["latent_mean"], batch["latent_std"]
        else:
            latent_mean, latent_std = image_latent_moments_in_chunks(models, params["vae"], batch["pixel_values"],
                                                                     vae_encode_chunks)
        latents = jax.vmap(lambda mean, std, k: models_lib.sample_latents(models, mean[None], std[None], k)[0])(
            latent_mean, latent_std, latent_rngs)
        if "encoder_hidden_states" in batch:  # cached text states (data.cache_text_states): the encoders already ran
            conditioning = cached_conditioning(models, batch)
        else:
            conditioning = models_lib.batch_conditioning(models, params, batch)
        noise = jax.vmap(lambda k: noise_lib.training_noise(k, latents.shape[1:], loss.noise_offset))(noise_rngs)
        input_noise = jax.vmap(lambda k, n: noise_lib.perturbed_noise(k, n, loss.input_perturbation))(
            noise_rngs, noise)
        timesteps = jax.vmap(lambda k: jax.random.randint(k, (), 0, num_timesteps))(time_rngs)
        latents = latents.astype(jnp.float32)
        noisy_latents = noise_lib.add_noise(schedule, latents, input_noise, timesteps)
        target = noise_lib.training_target(schedule, latents, noise, timesteps, prediction_type)
        prediction = models_lib.predict_noise(models, params["unet"], noisy_latents, timesteps, **conditioning)
        losses = jnp.mean(jnp.square(prediction.astype(jnp.float32) - target), axis=tuple(range(1, target.ndim)))
        if loss.snr_gamma:
            losses = losses * noise_lib.min_snr_weights(schedule, timesteps, loss.snr_gamma, prediction_type)
        return losses

    return example_losses


def image_latent_moments_in_chunks(models: models_lib.Models, vae_params, pixel_values: jax.Array,
                                  chunks: int) -> tuple[jax.Array, jax.Array]:
    """The frozen VAE's posterior moments of a batch, encoded in `chunks` equal parts in sequence (`lax.map`;
    `train.vae_encode_chunks`). Each part takes the same share of every device's examples
    (`split_micro_batches`), so no data moves and every device encodes in every part; only one part's
    full-resolution activations are alive at a time. The moments are the same as encoding all at once."""
    if chunks == 1:
        return models_lib.image_latent_moments(models, vae_params, pixel_values)
    parts = split_micro_batches(pixel_values, chunks)
    moments = jax.lax.map(lambda part: models_lib.image_latent_moments(models, vae_params, part), parts)
    return jax.tree.map(lambda x: merge_micro_batches(x, chunks), moments)


def cached_conditioning(models: models_lib.Models, batch: dict) -> dict[str, jax.Array]:
    """`predict_noise`'s conditioning from a latent cache's text states (sdjax/data/latent_cache.py), what
    `models.batch_conditioning` computes from token ids: the states, and SDXL's pooled projection and
    size/crop time ids."""
    conditioning = {"context": batch["encoder_hidden_states"]}
    if models.sdxl:
        conditioning.update(text_embeds=batch["text_embeds"], time_ids=batch["time_ids"])
    return conditioning


def combine_example_losses(losses: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
    """The batch's loss from its examples' losses: their mean; with DreamBooth prior preservation, the batch
    is [instance examples; class examples] (sdjax/data/dreambooth.py) and the loss is
    mean(instance half) + dreambooth.prior_loss_weight * mean(class half), as in diffusers' train_dreambooth."""
    if not prior_preservation(config):
        return jnp.mean(losses)
    half = losses.shape[0] // 2
    return jnp.mean(losses[:half]) + config.dreambooth.prior_loss_weight * jnp.mean(losses[half:])


def prior_preservation(config: ml_collections.ConfigDict) -> bool:
    return "dreambooth" in config and bool(config.dreambooth.instance_data_dir) and \
        config.dreambooth.with_prior_preservation


def make_train_step(models: models_lib.Models, config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation, lr_schedule: optax.Schedule) -> Callable:
    """(state, batch, rng) -> (state, metrics) of the UNet stage; `rng` is the run's base key, folded with the
    step inside."""
    lora_scale = lora_lib.scale(config.lora) if lora_lib.enabled(config) else 0.0
    example_losses = make_example_losses(models, config)

    def loss_fn(trainable, frozen, batch, example_rngs, step):
        """The loss of `batch`. A micro-batch (strided, see split_micro_batches) computes exactly its examples'
        part of the whole batch's loss, also the two halves of a prior-preservation batch."""
        del step  # the same objective at every step
        params = lora_lib.merge({**frozen, **trainable}, lora_scale)  # LoRA: W + scale * A @ B, differentiable
        return combine_example_losses(example_losses(params, batch, example_rngs), config), {}

    return make_update_step(loss_fn, config, tx, lr_schedule)


def make_update_step(loss_fn: Callable, config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                     lr_schedule: optax.Schedule) -> Callable:
    """The train step of any stage around its `loss_fn(trainable, frozen, batch, example_rngs, step) -> (loss,
    metrics)`: gradient accumulation, optimizer update, EMA, and the metrics {loss, grad_norm, lr, **metrics}."""
    grad_accum = config.train.grad_accum

    def loss_and_grads(loss_fn, trainable, frozen, batch, example_rngs):
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
        step_loss_fn = functools.partial(loss_fn, step=state.step)
        (loss, loss_metrics), grads = loss_and_grads(step_loss_fn, state.params, state.frozen, batch, example_rngs)
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


def merge_micro_batches(x: jax.Array, parts: int) -> jax.Array:
    """The inverse of `split_micro_batches`: [parts, B / parts, ...] -> [B, ...] in the batch's order."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# XLA's ExecutionOptions effort levels (xla.proto's EffortLevel: EFFORT_O0 = 9 ... EFFORT_O3 = 39). Passed as
# these numbers: jax 0.10's compiler options take only the number, jax 0.12's take it or its own enum.
_XLA_EFFORT_LEVELS = {"O0": 9, "O1": 19, "O2": 29, "O3": 39}


def jit_train_step(train_step: Callable, shardings: TrainState, mesh, optimization_level: str = "") -> Callable:
    """The step compiled over the mesh: state sharded and donated, batch split over data-parallel devices.
    `optimization_level` (train.xla_optimization_level): XLA's effort at a fast step, "" for its default; set on
    this jit only, so every call of the step finds the executable compiled with it."""
    options = {"optimization_level": _XLA_EFFORT_LEVELS[optimization_level]} if optimization_level else None
    return jax.jit(
        mesh_lib.traced_on_mesh(train_step, mesh),
        in_shardings=(shardings, mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)),
        out_shardings=(shardings, mesh_lib.replicated(mesh)),
        donate_argnums=0,
        compiler_options=options,
    )
