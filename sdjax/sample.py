"""Text -> images with classifier-free guidance: one compiled denoising loop, sharded over the mesh.

    prompts -> CLIP text encoder(s) (prompt and negative prompt) -> noise latents (one key per image)
      -> fori_loop over the scheduler's steps: one UNet call on [unconditional, conditional] pairs
         -> guidance -> scheduler step
      -> latents / VAE scaling factor -> VAE decode -> uint8 images

Images are split over every data-parallel device (mesh axes `data` x `fsdp`); each image's unconditional
and conditional inputs sit next to each other in the batch, so a device holds both halves of its pairs and
the guidance needs no communication. Image j of a call is drawn from `fold_in(key(seed), j)` alone, so the
same seed gives the same images, whatever the number of images or devices.
"""

from __future__ import annotations

import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdjax import checkpoint as checkpoint_lib
from sdjax import mesh as mesh_lib
from sdjax import models as models_lib
from sdjax.config import base_config
from sdjax.data import dreambooth
from sdjax.images import image_grid, save_images, save_png, to_uint8
from sdjax.models import noise as noise_lib
from sdjax.models import schedulers as schedulers_lib


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale) -> jax.Array:
    """uncond + scale * (cond - uncond), written as cond + (scale - 1) * (cond - uncond): the same formula,
    but scale 1 returns the conditional prediction bit for bit."""
    return cond + (scale - 1.0) * (cond - uncond)


def interleave_pairs(uncond: jax.Array, cond: jax.Array) -> jax.Array:
    """[B, ...] x 2 -> [2B, ...] as u0, c0, u1, c1, ...: a batch shard keeps each image's pair together."""
    return jnp.stack([uncond, cond], axis=1).reshape((-1,) + uncond.shape[1:])


def split_pairs(paired: jax.Array) -> tuple[jax.Array, jax.Array]:
    pairs = paired.reshape((-1, 2) + paired.shape[1:])
    return pairs[:, 0], pairs[:, 1]


def latent_shape(models: models_lib.Models, resolution: int) -> tuple[int, int, int]:
    size = resolution // models.vae_scale_factor
    return (models.unet.in_channels, size, size)


def generate(models: models_lib.Models, config: ml_collections.ConfigDict, scheduler: str, num_steps: int,
             resolution: int, batch_sharding, params: dict, prompt_ids: jax.Array, negative_ids: jax.Array,
             image_indices: jax.Array, seed: jax.Array, guidance: jax.Array) -> jax.Array:
    """The traced sampler: uint8 images [B, resolution, resolution, 3] for B prompts (see module doc)."""
    conditioning = jax.tree.map(interleave_pairs, models_lib.text_conditioning(models, params, negative_ids),
                                models_lib.text_conditioning(models, params, prompt_ids))
    image_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), image_indices)
    split_keys = jax.vmap(jax.random.split)(image_keys)
    noise_keys, step_keys = split_keys[:, 0], split_keys[:, 1]
    shape = latent_shape(models, resolution)
    noise = jax.vmap(lambda key: jax.random.normal(key, shape, jnp.float32))(noise_keys)
    noise = jax.lax.with_sharding_constraint(noise, batch_sharding)

    schedule = schedulers_lib.make_sampling_scheduler(scheduler, config, num_steps, noise.shape)
    state = schedule.init_state()

    def denoise(i, carry):
        latents, state = carry
        t = schedule.timestep(state, i)
        model_input = schedule.scale_model_input(state, latents, i)
        paired_input = interleave_pairs(model_input, model_input)
        prediction = models_lib.predict_noise(models, params["unet"], paired_input,
                                              jnp.full((paired_input.shape[0],), t), **conditioning)
        uncond, cond = split_pairs(prediction.astype(jnp.float32))  # the scheduler computes in float32
        guided = classifier_free_guidance(uncond, cond, guidance)
        latents, state = schedule.step(state, guided, i, latents, step_keys)
        return jax.lax.with_sharding_constraint(latents, batch_sharding), state

    latents = noise * schedule.init_noise_sigma(state)
    latents, _ = jax.lax.fori_loop(0, schedule.num_loop_steps(state), denoise, (latents, state))
    return to_uint8(models_lib.decode_latents(models, params["vae"], latents))  # divides by the scaling factor


class Sampler:
    """A compiled sampler for one (scheduler, steps) at `config.data.resolution` on a mesh. Keep it to sample
    again without recompiling; a new number of images compiles once more. Params may be sharded any way (e.g.
    the train state's); the images come back as numpy on every process."""

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, mesh, scheduler: str = "ddim",
                 num_steps: int = 50):
        if scheduler not in schedulers_lib.SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: expected one of {list(schedulers_lib.SCHEDULERS)}")
        self.models, self.config, self.mesh = models, config, mesh
        self.resolution = config.data.resolution  # the size the model was trained at
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self.data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        fn = functools.partial(generate, models, config, scheduler, num_steps, self.resolution, self.batch_sharding)
        self._generate = jax.jit(mesh_lib.traced_on_mesh(fn, mesh), out_shardings=mesh_lib.replicated(mesh))

    def _global(self, host_array: np.ndarray) -> jax.Array:
        """The same host array on every process -> one global array split over the data-parallel devices."""
        return jax.make_array_from_callback(host_array.shape, self.batch_sharding, lambda index: host_array[index])

    def _token_ids(self, texts: list[str]) -> np.ndarray:
        ids = self.models.tokenizer(texts, padding="max_length", max_length=self.config.data.max_length,
                                    truncation=True).input_ids
        return np.asarray(ids, np.int32)

    def __call__(self, params: dict, prompts: list[str], negative_prompt: str = "", seed: int = 0,
                 guidance: float = 7.5) -> np.ndarray:
        """One image per entry of `prompts`: uint8 [len(prompts), H, W, 3]."""
        count = len(prompts)
        padded = math.ceil(count / self.data_parallel) * self.data_parallel  # every device gets whole images
        prompt_list = list(prompts) + [""] * (padded - count)
        images = self._generate(
            params, self._global(self._token_ids(prompt_list)),
            self._global(self._token_ids([negative_prompt] * padded)),
            self._global(np.arange(padded, dtype=np.int32)), np.uint32(seed), np.float32(guidance))
        return np.asarray(images)[:count]


def repeat_prompts(prompts: list[str], images_per_prompt: int) -> list[str]:
    """Each prompt `images_per_prompt` times in a row: a grid row per prompt."""
    return [prompt for prompt in prompts for _ in range(images_per_prompt)]


class TrainingSamples:
    """The fixed grid of `config.sample` (rows: prompts, columns: seeds), sampled during training into
    WORKDIR/samples/step_XXXXXX.png; the same noise every time, so grids compare across steps."""

    tag = "samples"  # TensorBoard's image tag

    def __init__(self, models: models_lib.Models, config: ml_collections.ConfigDict, mesh, workdir: str):
        sample = config.sample
        self.sampler = Sampler(models, config, mesh, sample.scheduler, sample.steps)
        self.prompts = repeat_prompts(list(sample.prompts), sample.images_per_prompt)
        self.sample_config = sample
        self.folder = os.path.join(workdir, "samples")

    def __call__(self, params: dict) -> np.ndarray:
        s = self.sample_config
        images = self.sampler(params, self.prompts, s.negative_prompt, s.seed, s.guidance)
        return image_grid(images, s.images_per_prompt)

    def path(self, step: int) -> str:
        return os.path.join(self.folder, f"step_{step:06d}.png")


def sample_class_images(sampler: Sampler, params: dict, config: ml_collections.ConfigDict, batch_size: int,
                        write: bool = True, first: int | None = None) -> list[str]:
    """DreamBooth prior preservation: samples the missing class images with `sampler` from `params`, `batch_size`
    at a time, into the class folder as class_NNNNN.png (when `write`; a file already there is kept); returns
    their paths. The images are numbered on from `first` (default: those present) and seeded by that number,
    so an interrupted generation goes on with new images."""
    db, sample = config.dreambooth, config.sample
    if first is None:
        first = len(dreambooth.image_files(db.class_data_dir))
    paths = []
    for start in range(first, db.num_class_images, batch_size):
        count = min(batch_size, db.num_class_images - start)
        images = sampler(params, [db.class_prompt] * count, sample.negative_prompt, seed=sample.seed + start,
                         guidance=sample.guidance)
        for offset, image in enumerate(images):
            path = os.path.join(db.class_data_dir, f"class_{start + offset:05d}.png")
            if write and not os.path.exists(path):
                save_png(path, image)
            paths.append(path)
    return paths


# --- what `sdjax sample` samples from ---------------------------------------------------------------


class SampleSourceError(ValueError):
    """Neither or both of a run's workdir and a pretrained folder were given."""


def load_for_sampling(workdir: str | None = None, step: int | None = None, pretrained: str | None = None,
                      use_ema: bool = True) -> tuple[ml_collections.ConfigDict, dict, int | None]:
    """(config, host float32 params {"unet", "vae", "text_encoder"}, step or None) from a training run's
    checkpoint (EMA UNet when kept) or from a local diffusers-format folder."""
    if bool(workdir) == bool(pretrained):
        raise SampleSourceError("give exactly one of --workdir (a `sdjax train` run) and --pretrained (a local "
                                "diffusers-format folder)")
    if workdir:
        config, params, step = checkpoint_lib.load_params_for_inference(workdir, step, use_ema=use_ema)
        if config.train.get("stage", "unet") == "vae":
            raise SampleSourceError(f"{workdir} is a VAE run (`sdjax train-vae`): it has no UNet to sample; train "
                                    f"one on it with --config.model.vae_from={workdir}")
        return config, params, step
    config = base_config()
    config.model.pretrained = pretrained
    config.diffusion.update(noise_lib.diffusion_config_from_folder(pretrained))
    models = models_lib.build_models(config)
    config.data.resolution = models.unet.sample_size * models.vae_scale_factor  # the size it was trained at
    return config, models_lib.load_pretrained_params(models, config), None


def sample_to_files(config: ml_collections.ConfigDict, params: dict, prompts: list[str], num_images: int,
                    out: str | None, out_dir: str | None = None, negative_prompt: str = "", scheduler: str = "ddim",
                    num_steps: int = 50, guidance: float = 7.5, seed: int = 0) -> dict:
    """`sdjax sample`: `num_images` per prompt, over every device; a grid (rows: prompts) at `out` and one
    PNG per image in `out_dir`. Returns what it wrote and how long sampling took (compilation included)."""
    if num_images < 1:
        raise ValueError(f"--num-images={num_images}: expected at least 1")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked; sampling splits images over all devices
    config.mesh.data, config.mesh.fsdp = -1, 1
    models = models_lib.build_models(config)
    mesh = mesh_lib.make_mesh(config)
    params = jax.device_put(params, mesh_lib.replicated(mesh))
    start = time.perf_counter()
    sampler = Sampler(models, config, mesh, scheduler, num_steps)
    images = sampler(params, repeat_prompts(prompts, num_images), negative_prompt, seed, guidance)
    seconds = time.perf_counter() - start
    written = {}
    if jax.process_index() == 0:
        if out:
            save_png(out, image_grid(images, num_images))
            written["out"] = out
        if out_dir:
            written["out_dir"] = out_dir
            save_images(out_dir, images)
    return {**written, "images": len(images), "resolution": sampler.resolution, "scheduler": scheduler,
            "steps": num_steps, "guidance": guidance, "seed": seed, "seconds": round(seconds, 2)}
