"""The VAE stage (`sdjax train-vae`, `train.stage="vae"`) and the trained VAE the UNet stage runs on.

The VAE stage trains the AutoencoderKL (sdjax/models/autoencoder_kl.py) with `sdjax train`'s loop, mesh, optimizer, checkpoints and metrics
(sdjax/train.py); what differs is here. A batch {pixel_values [B,H,W,3] in [-1,1]} becomes a loss:
  encode -> posterior N(mean, std^2) -> one latent sample -> decode -> reconstruction x'
  loss = l1_weight * mean|x - x'| + l2_weight * mean (x - x')^2 + kl_weight * mean KL(posterior || N(0, 1))
         + perceptual_weight * mean LPIPS(x, x')                                   (if perceptual_weight > 0)
         + gan_weight * -mean D(x') + hinge loss of D on (x, x')     (if gan_weight > 0, from gan_start_step)
(means over pixels, over latent elements, over D's patches): the LDM/SD autoencoder objective. The LPIPS
network (sdjax/models/lpips.py) is frozen, read from `vae_train.perceptual_weights`. The patch-GAN
discriminator D (sdjax/models/discriminator.py) is trained in the same step, with its own optimizer state
(sdjax/optim.py): two stop-gradients split the one loss into the decoder's term (D's params stopped) and D's
hinge loss (the reconstruction stopped), so each network gets the gradient of its own objective only. As in
LDM, with `gan_adaptive_weight` the generator term's weight is gan_weight x |grad of the reconstruction
terms| / |grad of the generator term|, both taken at the decoder's last conv kernel (one vjp through that
conv alone); with gradient accumulation, per micro-batch.

Every train.sample_every steps a grid of held-out images (top) and their reconstructions (bottom, from the
posterior mean) goes to WORKDIR/samples and TensorBoard ("reconstructions"); train.eval_every gives eval_l1 /
eval_mse on the eval split.

At the end, the latent scaling factor: 1 / std of sampled latents of `vae_train.scaling_examples` training
images (SD's 0.18215 was found this way), so that the UNet stage's latents have unit variance. It is written
to WORKDIR/vae_scaling_factor.json, whose presence marks a finished VAE run.

The UNet stage takes the trained VAE with `model.vae_from` (such a workdir, or a diffusers folder):
`use_trained_vae` copies its architecture and scaling factor into `model.vae` (so the UNet run's config and
checkpoints are complete without it), `with_trained_vae` puts its weights into a fresh train state.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import checkpoint as checkpoint_lib
from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax.config import ConfigError
from sdjax.data import files
from sdjax.images import image_grid, to_uint8
from sdjax.models import discriminator as discriminator_lib

SCALING_FILE = "vae_scaling_factor.json"
# Fixed keys of the scaling factor's latent samples and of the grids: the same params give the same numbers.
SCALING_SEED = 0


# --- the loss -----------------------------------------------------------------------------------------


def kl_to_standard_normal(mean: jax.Array, std: jax.Array) -> jax.Array:
    """KL(N(mean, std^2) || N(0, 1)) per latent element."""
    return 0.5 * (jnp.square(mean) + jnp.square(std) - 1.0 - 2.0 * jnp.log(std))


def make_train_step(models: models_lib.Models, config: ml_collections.ConfigDict, tx, lr_schedule):
    """(state, batch, rng) -> (state, metrics {loss, l1, mse, kl, [perceptual], [generator_loss,
    discriminator_loss, logits_real, logits_fake, gan_weight], grad_norm, lr}): the shared update step
    (sdjax/step.py) around the autoencoder loss."""
    weights = config.vae_train
    adaptive = models.discriminator is not None and weights.gan_adaptive_weight

    def reconstruction_loss(reconstruction, pixels, frozen):
        error = reconstruction - pixels
        metrics = {"l1": jnp.mean(jnp.abs(error)), "mse": jnp.mean(jnp.square(error))}
        loss = weights.l1_weight * metrics["l1"] + weights.l2_weight * metrics["mse"]
        if models.perceptual is not None:
            metrics["perceptual"] = jnp.mean(models.perceptual.apply(
                {"params": frozen[models_lib.PERCEPTUAL]}, pixels, reconstruction))
            loss = loss + weights.perceptual_weight * metrics["perceptual"]
        return loss, metrics

    def loss_fn(trainable, frozen, batch, example_rngs, step):
        params = trainable["vae"]
        pixels = batch["pixel_values"]
        mean, std = models_lib.image_latent_moments(models, params, pixels)
        mean, std = mean.astype(jnp.float32), std.astype(jnp.float32)
        noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(example_rngs)
        latents = mean + std * noise
        if adaptive:
            reconstruction, last_layer_grad = models_lib.decode_with_last_layer_vjp(models, params, latents)
        else:
            reconstruction = models_lib.decode_unscaled_latents(models, params, latents)
        reconstruction = reconstruction.astype(jnp.float32)
        (loss, metrics), loss_grad = jax.value_and_grad(reconstruction_loss, has_aux=True)(
            reconstruction, pixels, frozen)
        metrics["kl"] = jnp.mean(kl_to_standard_normal(mean, std))
        loss = loss + weights.kl_weight * metrics["kl"]
        if models.discriminator is None:
            return loss, metrics
        adversarial, generator_grad = adversarial_losses(
            models.discriminator, trainable[models_lib.DISCRIMINATOR], pixels, reconstruction)
        gan_weight = jnp.float32(weights.gan_weight)
        if adaptive:  # LDM's: balance the two terms' gradients at the decoder's last layer
            norm = lambda g: jnp.sqrt(jnp.sum(jnp.square(last_layer_grad(g))))  # noqa: E731
            ratio = norm(loss_grad) / (norm(generator_grad) + 1e-4)
            gan_weight = gan_weight * jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4))
        on = (step >= weights.gan_start_step).astype(jnp.float32)
        loss = loss + on * (gan_weight * adversarial["generator_loss"] + adversarial["discriminator_loss"])
        return loss, {**metrics, **adversarial, "gan_weight": gan_weight}

    return step_lib.make_update_step(loss_fn, config, tx, lr_schedule)


def adversarial_losses(discriminator, discriminator_params, pixels: jax.Array,
                       reconstruction: jax.Array) -> tuple[dict[str, jax.Array], jax.Array]:
    """The patch-GAN terms, each differentiable only in its own network: `generator_loss` (-mean D(x')) in
    the VAE (D's params stopped), `discriminator_loss` (hinge on D(x), D(x')) in D (x' stopped); and the
    gradient of generator_loss with respect to x' (for the adaptive weight)."""
    judge = lambda params, images: discriminator.apply({"params": params}, images)  # noqa: E731
    stopped_params = jax.lax.stop_gradient(discriminator_params)
    generator, generator_grad = jax.value_and_grad(
        lambda x: discriminator_lib.generator_loss(judge(stopped_params, x)))(reconstruction)
    # Real and fake in one pass (the discriminator normalises per example, so this is exact).
    logits_real, logits_fake = jnp.split(
        judge(discriminator_params, jnp.concatenate([pixels, jax.lax.stop_gradient(reconstruction)])), 2)
    return ({"generator_loss": generator,
             "discriminator_loss": discriminator_lib.hinge_discriminator_loss(logits_real, logits_fake),
             "logits_real": jnp.mean(logits_real), "logits_fake": jnp.mean(logits_fake)}, generator_grad)


def reconstruct(models: models_lib.Models, params: dict, pixels: jax.Array) -> jax.Array:
    """Images NHWC in [-1, 1] decoded from the posterior mean (no sampling): what the VAE preserves."""
    mean, _ = models_lib.image_latent_moments(models, params["vae"], pixels)
    return models_lib.decode_unscaled_latents(models, params["vae"], mean).astype(jnp.float32)


# --- held-out images: grids and eval ----------------------------------------------------------------


def held_out_split(config: ml_collections.ConfigDict) -> str:
    return "eval" if data_lib.has_eval_split(config) else "train"


class ReconstructionSamples:
    """The grid of `vae_train.grid_images` held-out images (top row) and their reconstructions (bottom row),
    into WORKDIR/samples/step_XXXXXX.png; the same images every time."""

    tag = "reconstructions"

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, mesh, workdir: str):
        count = config.vae_train.grid_images
        batches = data_lib.unaugmented_batches(config, models.tokenizer, held_out_split(config), count)
        if len(batches) == 0:
            raise data_lib.DataError(f"{data_lib.source_name(config)} has fewer than vae_train.grid_images={count} "
                                     "examples for the reconstruction grid")
        self.pixels = batches[0]["pixel_values"]
        self.folder = os.path.join(workdir, "samples")
        self._reconstruct = jax.jit(functools.partial(reconstruct, models), out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, params: dict) -> np.ndarray:
        reconstructions = self._reconstruct(params, self.pixels)
        images = np.concatenate([np.asarray(to_uint8(jnp.asarray(self.pixels))),
                                 np.asarray(to_uint8(reconstructions))])
        return image_grid(images, len(self.pixels))

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:06d}.png")


def reconstruction_errors(models: models_lib.Models, params: dict, pixels: jax.Array) -> dict[str, jax.Array]:
    error = reconstruct(models, params, pixels) - pixels
    return {"l1": jnp.mean(jnp.abs(error)), "mse": jnp.mean(jnp.square(error))}


class ReconstructionEvaluator:
    """{eval_l1, eval_mse}: the posterior-mean reconstruction error over the whole global batches of the eval
    split (deterministic, so comparable across steps)."""

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, mesh):
        global_batch = config.train.batch_size
        self.host_batches = data_lib.unaugmented_batches(config, models.tokenizer, "eval",
                                                         global_batch // jax.process_count())
        if len(self.host_batches) < jax.process_count():
            raise data_lib.DataError(f"the eval split of {data_lib.source_name(config)} has fewer examples than "
                                     f"one global batch (train.batch_size={global_batch})")
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self._errors = jax.jit(functools.partial(reconstruction_errors, models),
                               out_shardings=mesh_lib.replicated(mesh))

    def __call__(self, params: dict) -> dict[str, float]:
        errors = [self._errors(params, batch["pixel_values"])
                  for batch in mesh_lib.global_batches(self.host_batches, self.batch_sharding)]
        errors = jax.device_get(errors)
        return {k: float(np.mean([e[k] for e in errors])) for k in errors[0]}  # equal batch sizes

    def evaluate_state(self, state: step_lib.TrainState) -> dict[str, float]:
        metrics = {f"eval_{k}": v for k, v in self(step_lib.inference_params(state, use_ema=False)).items()}
        if state.ema_params is not None:
            metrics.update({f"eval_{k}_ema": v for k, v in self(step_lib.inference_params(state)).items()})
        return metrics


# --- the scaling factor -----------------------------------------------------------------------------


def latent_moments_sums(models: models_lib.Models, params: dict, pixels: jax.Array, rng: jax.Array) -> jax.Array:
    """[sum, sum of squares, count] of the elements of latents sampled from the posteriors of `pixels`."""
    mean, std = models_lib.image_latent_moments(models, params["vae"], pixels)
    mean, std = mean.astype(jnp.float32), std.astype(jnp.float32)
    latents = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
    return jnp.stack([jnp.sum(latents), jnp.sum(jnp.square(latents)), jnp.float32(latents.size)])


def compute_scaling_factor(models: models_lib.Models, config: ml_collections.ConfigDict, mesh,
                           params: dict) -> dict[str, float]:
    """{scaling_factor: 1 / std, latent_mean, latent_std, examples} of sampled latents (unscaled) of the first
    `vae_train.scaling_examples` training images (rounded up to whole global batches), without augmentation."""
    global_batch = config.train.batch_size
    host_batches = data_lib.unaugmented_batches(config, models.tokenizer, "train", global_batch // jax.process_count())
    num_batches = min(-(-config.vae_train.scaling_examples // global_batch), len(host_batches) // jax.process_count())
    if num_batches == 0:
        raise data_lib.DataError(f"{data_lib.source_name(config)} has fewer examples than one global batch "
                                 f"(train.batch_size={global_batch}) for the scaling factor")
    sums_fn = jax.jit(functools.partial(latent_moments_sums, models), out_shardings=mesh_lib.replicated(mesh))
    base = jax.random.key(SCALING_SEED)
    batches = mesh_lib.global_batches(host_batches[:num_batches * jax.process_count()], mesh_lib.batch_sharding(mesh))
    sums = [sums_fn(params, batch["pixel_values"], jax.random.fold_in(base, index))
            for index, batch in enumerate(batches)]
    total, total_sq, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return {"scaling_factor": 1.0 / std, "latent_mean": float(mean), "latent_std": std,
            "examples": num_batches * global_batch}


def save_scaling_factor(workdir: str, stats: dict, step: int) -> str:
    """WORKDIR/scaling_factor.json, the VAE run's last file, written by every process (the stats are the same
    on all): on a pod each host reads its own copy back (`is_finished`, `use_trained_vae`)."""
    path = os.path.join(workdir, SCALING_FILE)
    files.write_bytes(path, (json.dumps({**stats, "step": step}, indent=2) + "\n").encode())
    return path


def is_finished(workdir: str) -> bool:
    """Whether `workdir` holds a finished VAE run (its scaling factor is written last)."""
    return os.path.isfile(os.path.join(workdir, SCALING_FILE))


# --- the UNet stage's VAE ---------------------------------------------------------------------------


def vae_stage_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The VAE stage's config for a UNet run with `model.vae_config`: that file's, on the UNet run's data
    (`config.data`, so `--config.data.path=DIR` points both stages at DIR), its checkpoints in
    `train.checkpoint_dir`-vae when the run names one."""
    vae_config = config_lib.load_config_file(config_lib.find_config_file(config.model.vae_config))
    vae_config.train.stage = "vae"
    vae_config.data = ml_collections.ConfigDict(config.data.to_dict())
    if config.train.checkpoint_dir:  # shared storage (a pod's bucket) for this run: the VAE stage's too
        # Beside it, not in it: orbax deletes what it takes for unfinished saves in its directory (on GCS, a
        # folder without a commit marker).
        vae_config.train.checkpoint_dir = config.train.checkpoint_dir.rstrip("/") + "-vae"
    return vae_config


def _vae_folder(path: str) -> str | None:
    """The diffusers VAE folder at `path` (a VAE folder itself, or a pipeline folder's vae/), else None."""
    for folder in (os.path.join(path, "vae"), path):
        config_file = os.path.join(folder, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                if "AutoencoderKL" in json.load(f).get("_class_name", ""):
                    return folder
    return None


def _trained_vae_config(path: str) -> dict:
    """AutoencoderKL fields of the VAE at `model.vae_from`, its scaling factor included."""
    if not os.path.isdir(path):
        raise ConfigError("model.vae_from", path, "expected a folder: a `sdjax train-vae` workdir or a diffusers "
                                                  "(VAE or pipeline) folder")
    if is_finished(path):
        with open(os.path.join(path, SCALING_FILE)) as f:
            scaling_factor = json.load(f)["scaling_factor"]
        with open(os.path.join(path, "config.json")) as f:
            run_vae = json.load(f)["model"]["vae"]  # JSON lists: the config's tuples
        return {**{k: tuple(v) if isinstance(v, list) else v for k, v in run_vae.items()},
                "scaling_factor": scaling_factor}
    folder = _vae_folder(path)
    if folder:
        return models_lib.vae_config_from_folder(folder)
    if os.path.isfile(os.path.join(path, "config.json")):  # a sdjax workdir without the scaling factor
        raise ConfigError("model.vae_from", path, f"this VAE run has not finished (no {SCALING_FILE}): run its "
                                                  "`sdjax train-vae` command again to finish it")
    raise ConfigError("model.vae_from", path, "expected a `sdjax train-vae` workdir or a diffusers folder with an "
                                              "AutoencoderKL config.json (itself or in vae/)")


def use_trained_vae(config: ml_collections.ConfigDict) -> None:
    """model.vae <- the architecture and scaling factor of the VAE at `model.vae_from`, in place."""
    trained = _trained_vae_config(config.model.vae_from)
    with config.unlocked():
        config.model.vae = ml_collections.ConfigDict({**config.model.vae.to_dict(), **trained})


def load_trained_vae_params(models: models_lib.Models, config: ml_collections.ConfigDict) -> dict:
    """float32 host params of the VAE at `model.vae_from` (the EMA weights of a run that kept them)."""
    path = config.model.vae_from
    if is_finished(path):
        return checkpoint_lib.load_inference_checkpoint(path).params["vae"]
    return models_lib.load_vae_params_from_folder(models, config, _vae_folder(path))


def with_trained_vae(state: step_lib.TrainState, models: models_lib.Models,
                     config: ml_collections.ConfigDict) -> step_lib.TrainState:
    """`state` with its frozen VAE replaced by the one at `model.vae_from`, placed as the old one was."""
    old = state.frozen["vae"]
    params = load_trained_vae_params(models, config)
    shapes = jax.tree.map(lambda x: tuple(np.shape(x)), params)
    expected = jax.tree.map(lambda x: tuple(x.shape), old)
    if shapes != expected:
        raise ConfigError("model.vae_from", config.model.vae_from, "its weights do not have the shapes of its "
                                                                   "config.json")
    new = jax.tree.map(lambda host, placed: jax.device_put(np.asarray(host, np.float32), placed.sharding),
                       params, old)
    return state.replace(frozen={**state.frozen, "vae": new})
