"""The three Stable Diffusion models, built from config or loaded from a local diffusers folder.

This package is the only place that touches the Flax classes of diffusers and transformers (both
deprecated upstream, see README): the rest of sdjax sees `Models` and plain parameter pytrees.

A `Models` holds the Flax *modules* (stateless, compute dtype baked in) and the tokenizer; parameters live
apart from them, in float32, so the train step can treat them as data (shard, donate, checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sdjax._deprecations import silence_flax_deprecation_notices

silence_flax_deprecation_notices()  # before the imports: diffusers logs the notice in class bodies

from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel  # noqa: E402

from sdjax.models import attention as attention_lib, noise, pytorch_weights  # noqa: E402
from sdjax.models import discriminator as discriminator_lib, lpips as lpips_lib  # noqa: E402
from sdjax.models.tokenizer import builtin_tokenizer  # noqa: E402

silence_flax_deprecation_notices()  # and after: now on the loggers those imports created

Params = Any
COMPONENTS = ("unet", "vae", "text_encoder")
# The VAE stage's loss networks (sdjax/vae.py), present only when its config asks for their loss terms: the
# patch-GAN discriminator is trained beside the VAE; LPIPS's VGG is frozen and read from a file.
DISCRIMINATOR, PERCEPTUAL = "discriminator", "perceptual"


class PretrainedFolderError(ValueError):
    """A `model.pretrained` folder is missing, incomplete or not in diffusers layout."""


@dataclasses.dataclass(frozen=True)
class Models:
    unet: FlaxUNet2DConditionModel
    vae: FlaxAutoencoderKL
    text_encoder: Any  # transformers' FlaxCLIPTextModule (a linen module)
    text_encoder_config: CLIPTextConfig
    tokenizer: CLIPTokenizer
    attention: str = "default"  # model.attention (sdjax/models/attention.py)
    discriminator: discriminator_lib.PatchDiscriminator | None = None  # vae_train.gan_weight > 0
    perceptual: lpips_lib.LPIPS | None = None  # vae_train.perceptual_weight > 0

    @property
    def vae_scale_factor(self) -> int:
        """How many image pixels one latent pixel covers (8 for SD)."""
        return 2 ** (len(self.vae.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.latent_channels

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.scaling_factor)


def compute_dtype(precision: str):
    return {"bf16": jnp.bfloat16, "fp32": jnp.float32}[precision]


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise PretrainedFolderError(
            f"{path} is missing: model.pretrained must be a local diffusers-format folder with "
            "unet/, vae/, text_encoder/ and tokenizer/ subfolders (as written by save_pretrained)."
        ) from None
    except json.JSONDecodeError as e:
        raise PretrainedFolderError(f"{path} is not valid JSON: {e}") from None


def _pretrained_dir(config: ml_collections.ConfigDict) -> str:
    path = config.model.pretrained
    if not os.path.isdir(path):
        raise PretrainedFolderError(f"model.pretrained={path!r} is not a folder on this machine.")
    return path


def build_models(config: ml_collections.ConfigDict) -> Models:
    """Builds the modules (no parameters) for `config.model`, from a pretrained folder when given."""
    dtype = compute_dtype(config.train.precision)
    efficient_attention = config.model.attention == "memory_efficient"
    if config.model.pretrained:
        root = _pretrained_dir(config)
        unet_cfg = _read_json(os.path.join(root, "unet", "config.json"))
        vae_cfg = _read_json(os.path.join(root, "vae", "config.json"))
        text_cfg = CLIPTextConfig(**_read_json(os.path.join(root, "text_encoder", "config.json")))
        unet = FlaxUNet2DConditionModel.from_config(
            unet_cfg, dtype=dtype, use_memory_efficient_attention=efficient_attention)
        vae = FlaxAutoencoderKL.from_config(vae_cfg, dtype=dtype)
        tokenizer_dir = os.path.join(root, "tokenizer")
        if not os.path.isdir(tokenizer_dir):
            raise PretrainedFolderError(f"{tokenizer_dir} is missing (expected a CLIPTokenizer folder).")
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    else:
        unet = FlaxUNet2DConditionModel(
            **config.model.unet.to_dict(), dtype=dtype, use_memory_efficient_attention=efficient_attention)
        vae = FlaxAutoencoderKL(**config.model.vae.to_dict(), dtype=dtype)
        tokenizer = builtin_tokenizer(config.data.max_length)
        text_cfg = CLIPTextConfig(**config.model.text_encoder.to_dict())
    text_encoder = FlaxCLIPTextModel(text_cfg, dtype=dtype, _do_init=False).module
    return Models(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_config=text_cfg,
                  tokenizer=tokenizer, attention=config.model.attention, **vae_loss_networks(config, dtype))


def vae_loss_networks(config: ml_collections.ConfigDict, dtype) -> dict[str, Any]:
    """The VAE stage's discriminator and LPIPS modules that `vae_train` asks for (none in the UNet stage)."""
    vae_train = config.vae_train
    if config.train.get("stage", "unet") != "vae":
        return {}
    networks = {}
    if vae_train.get("gan_weight", 0) > 0:  # .get: the saved configs of runs from before these keys
        networks[DISCRIMINATOR] = discriminator_lib.PatchDiscriminator(
            channels=vae_train.discriminator_channels, num_layers=vae_train.discriminator_layers, dtype=dtype)
    if vae_train.get("perceptual_weight", 0) > 0:
        networks[PERCEPTUAL] = lpips_lib.LPIPS(widths=lpips_lib.read_widths(vae_train.perceptual_weights),
                                               dtype=dtype)
    return networks


def vae_config_from_folder(folder: str) -> dict:
    """The FlaxAutoencoderKL kwargs in a diffusers VAE folder's config.json (keys the class has no field for,
    such as diffusers' bookkeeping or PyTorch-only options, are left out)."""
    fields = {f.name for f in dataclasses.fields(FlaxAutoencoderKL)} - {"dtype", "parent", "name"}
    return {k: tuple(v) if isinstance(v, list) else v  # JSON lists: tuples in our configs
            for k, v in _read_json(os.path.join(folder, "config.json")).items() if k in fields}


def load_vae_params_from_folder(models: Models, config: ml_collections.ConfigDict, folder: str) -> Params:
    """float32 VAE params (on host) of a diffusers VAE folder (PyTorch safetensors/bin or Flax msgpack)."""
    return pytorch_weights.load_diffusers_weights(folder, param_shapes(models, config, ("vae",))["vae"])


# --- parameters -------------------------------------------------------------------------------------


def _init_fns(models: Models, config: ml_collections.ConfigDict):
    """Per component, a function rng -> float32 params (cheap to trace with jax.eval_shape)."""
    image_size = config.data.resolution
    latent_size = image_size // models.vae_scale_factor
    seq_len = config.data.max_length

    def init_unet(rng):
        sample = jnp.zeros((1, models.unet.in_channels, latent_size, latent_size), jnp.float32)
        context = jnp.zeros((1, seq_len, models.unet.cross_attention_dim), jnp.float32)
        return models.unet.init(rng, sample, jnp.ones((1,), jnp.int32), context)["params"]

    def init_vae(rng):
        sample = jnp.zeros((1, models.vae.in_channels, image_size, image_size), jnp.float32)
        params_rng, dropout_rng, gaussian_rng = jax.random.split(rng, 3)
        rngs = {"params": params_rng, "dropout": dropout_rng, "gaussian": gaussian_rng}
        return models.vae.init(rngs, sample)["params"]

    def init_text_encoder(rng):
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return models.text_encoder.init(rng, ids, jnp.ones_like(ids), position_ids(ids))["params"]

    image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return {"unet": init_unet, "vae": init_vae, "text_encoder": init_text_encoder,
            DISCRIMINATOR: lambda rng: models.discriminator.init(rng, image)["params"],
            PERCEPTUAL: lambda rng: models.perceptual.init(rng, image, image)["params"]}


def param_shapes(models: Models, config: ml_collections.ConfigDict,
                 components: tuple[str, ...] = COMPONENTS) -> dict[str, Params]:
    """ShapeDtypeStructs of the components' params, without allocating any of them."""
    fns = _init_fns(models, config)
    return {name: jax.eval_shape(fns[name], jax.random.key(0)) for name in components}


def init_params(models: Models, config: ml_collections.ConfigDict, rng: jax.Array, out_shardings=None,
                components: tuple[str, ...] = COMPONENTS):
    """Random float32 params of `components`; created directly with `out_shardings` when given. A component's
    init does not depend on which others are created with it."""
    fns = _init_fns(models, config)
    rngs = dict(zip(COMPONENTS, jax.random.split(rng, len(COMPONENTS))))
    rngs.update({name: jax.random.fold_in(rng, i + 1) for i, name in enumerate((DISCRIMINATOR, PERCEPTUAL))})

    def init_all(rngs):
        return {name: fns[name](rngs[name]) for name in components}

    return jax.jit(init_all, out_shardings=out_shardings)(rngs)


def load_pretrained_params(models: Models, config: ml_collections.ConfigDict,
                           components: tuple[str, ...] = COMPONENTS) -> dict[str, Params]:
    """float32 params of `components` from `config.model.pretrained` (Flax msgpack or PyTorch
    safetensors/bin), on host."""
    root = _pretrained_dir(config)
    shapes = param_shapes(models, config)
    loaders = {
        "unet": lambda: pytorch_weights.load_diffusers_weights(os.path.join(root, "unet"), shapes["unet"]),
        "vae": lambda: pytorch_weights.load_diffusers_weights(os.path.join(root, "vae"), shapes["vae"]),
        "text_encoder": lambda: pytorch_weights.load_clip_text_weights(
            os.path.join(root, "text_encoder"), shapes["text_encoder"]),
    }
    return {name: loaders[name]() for name in components}


def load_perceptual_params(config: ml_collections.ConfigDict) -> Params:
    """float32 host params of LPIPS's VGG from `vae_train.perceptual_weights`."""
    return lpips_lib.load_params(config.vae_train.perceptual_weights)


# --- forward functions used by the step and the sampler -------------------------------------------


def position_ids(input_ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)


def encode_text(models: Models, params: Params, input_ids: jax.Array) -> jax.Array:
    """Last hidden state of the CLIP text encoder (what SD conditions on), [B, 77, D]."""
    out = models.text_encoder.apply(
        {"params": params}, input_ids, jnp.ones_like(input_ids), position_ids(input_ids), deterministic=True)
    return out[0]


def image_latent_moments(models: Models, params: Params, pixel_values_nhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the VAE posterior (channels-last, unscaled) for images in [-1, 1]: what a latent
    cache stores, so that sampling from it later equals encoding the image then."""
    pixels = jnp.transpose(pixel_values_nhwc, (0, 3, 1, 2))
    posterior = models.vae.apply({"params": params}, pixels, method=models.vae.encode).latent_dist
    return posterior.mean, posterior.std  # diffusers' Flax posterior is channels-last


def sample_latents(models: Models, mean: jax.Array, std: jax.Array, rng: jax.Array) -> jax.Array:
    """Latents (NCHW, multiplied by the scaling factor) drawn from the posterior, as diffusers' `sample`."""
    latents_nhwc = mean + std * jax.random.normal(rng, mean.shape)
    return jnp.transpose(latents_nhwc, (0, 3, 1, 2)) * models.vae_scaling_factor


def encode_images(models: Models, params: Params, pixel_values_nhwc: jax.Array, rng: jax.Array) -> jax.Array:
    """Samples VAE latents (NCHW, already multiplied by the scaling factor) for images in [-1, 1]."""
    mean, std = image_latent_moments(models, params, pixel_values_nhwc)
    return sample_latents(models, mean, std, rng)


def decode_latents(models: Models, params: Params, latents: jax.Array) -> jax.Array:
    """Images NHWC in [-1, 1] (unclipped) from scaled NCHW latents."""
    # Handed over channels-last: diffusers guesses the layout from the last dim, which is ambiguous when the
    # latent width equals the number of latent channels (4x4 latents).
    latents_nhwc = jnp.transpose(latents / models.vae_scaling_factor, (0, 2, 3, 1))
    return decode_unscaled_latents(models, params, latents_nhwc)


def decode_unscaled_latents(models: Models, params: Params, latents_nhwc: jax.Array) -> jax.Array:
    """Images NHWC in [-1, 1] (unclipped) from channels-last latents as the encoder gives them (unscaled)."""
    images = models.vae.apply({"params": params}, latents_nhwc, method=models.vae.decode).sample
    return jnp.transpose(images, (0, 2, 3, 1))


def decode_with_last_layer_vjp(models: Models, params: Params, latents_nhwc: jax.Array):
    """(images as decode_unscaled_latents gives them, g -> gradient at the decoder's last conv kernel of a loss
    whose gradient at the images is g). The VAE stage's adaptive GAN weight compares two such gradients;
    the map runs back through that one conv only (the rest of the decoder does not depend on its kernel)."""
    decoder = params["decoder"]
    last = decoder["conv_out"]

    def decode(kernel_offset):
        shifted_last = {**last, "kernel": last["kernel"] + kernel_offset}
        return decode_unscaled_latents(models, {**params, "decoder": {**decoder, "conv_out": shifted_last}},
                                       latents_nhwc)

    images, vjp = jax.vjp(decode, jnp.zeros_like(last["kernel"]))
    return images, lambda grad: vjp(grad.astype(images.dtype))[0]


def predict_noise(models: Models, params: Params, noisy_latents, timesteps, text_embeddings) -> jax.Array:
    timesteps = jnp.asarray(timesteps)  # diffusers wraps a non-jax timesteps array in one more dimension
    with attention_lib.attention_kernel(models.attention):
        return models.unet.apply({"params": params}, noisy_latents, timesteps, text_embeddings).sample
