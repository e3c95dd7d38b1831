"""The three Stable Diffusion models, built from config or loaded from a local diffusers folder.

The modules are sdjax's own Linen code (unet.py, autoencoder_kl.py, clip_text.py): diffusers 0.40 and
transformers 5 removed their Flax models. Their parameter trees are those of diffusers' and transformers'
former Flax classes, so runs and checkpoints made with those read unchanged; their numerics are those of the
PyTorch classes, which the tests compare them with. The rest of sdjax sees `Models` and plain parameter
pytrees.

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
from transformers import CLIPTextConfig, CLIPTokenizer

from sdjax.models import layer_stacks, pytorch_weights
from sdjax.models import discriminator as discriminator_lib, lpips as lpips_lib
from sdjax.models.autoencoder_kl import AutoencoderKL
from sdjax.models.clip_text import CLIPTextEncoder, CLIPTextEncoderWithProjection
from sdjax.models.tokenizer import TokenizerPair, builtin_tokenizer
from sdjax.models.unet import UNet2DConditionModel

Params = Any
COMPONENTS = ("unet", "vae", "text_encoder")
# SDXL's second text encoder (OpenCLIP ViT-bigG with its projection), beside COMPONENTS in an SDXL model.
TEXT_ENCODER_2 = "text_encoder_2"
# The VAE stage's loss networks (sdjax/vae.py), present only when its config asks for their loss terms: the
# patch-GAN discriminator is trained beside the VAE; LPIPS's VGG is frozen and read from a file.
DISCRIMINATOR, PERCEPTUAL = "discriminator", "perceptual"


class PretrainedFolderError(ValueError):
    """A `model.pretrained` folder is missing, incomplete or not in diffusers layout."""


@dataclasses.dataclass(frozen=True)
class Models:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    text_encoder_config: CLIPTextConfig
    tokenizer: CLIPTokenizer | TokenizerPair  # SDXL: both tokenizers as one (their ids side by side)
    discriminator: discriminator_lib.PatchDiscriminator | None = None  # vae_train.gan_weight > 0
    perceptual: lpips_lib.LPIPS | None = None  # vae_train.perceptual_weight > 0
    # SDXL: the second text encoder, with its projection (None in SD 1.x / 2.x)
    text_encoder_2: CLIPTextEncoderWithProjection | None = None
    text_encoder_2_config: CLIPTextConfig | None = None

    @property
    def sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def components(self) -> tuple[str, ...]:
        return _components(self.sdxl)

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


def has_second_text_encoder(config: ml_collections.ConfigDict) -> bool:
    """Whether `config.model` is SDXL's, with a second text encoder: a pretrained folder with text_encoder_2/,
    or a `model.text_encoder_2` config (configs/sdxl.py)."""
    if config.model.pretrained:
        return os.path.isdir(os.path.join(config.model.pretrained, TEXT_ENCODER_2))
    return bool(config.model.get(TEXT_ENCODER_2))


def components(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The model components of `config`: SD's three, and SDXL's second text encoder."""
    return _components(has_second_text_encoder(config))


def _components(sdxl: bool) -> tuple[str, ...]:
    return COMPONENTS + ((TEXT_ENCODER_2,) if sdxl else ())


def _folder_tokenizer(root: str, name: str) -> CLIPTokenizer:
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise PretrainedFolderError(f"{folder} is missing (expected a CLIPTokenizer folder).")
    return CLIPTokenizer.from_pretrained(folder)


def text_encoder_config(values: ml_collections.ConfigDict, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The CLIPTextConfig of `values` (model.text_encoder*) with `tokenizer`'s special token ids unless `values`
    sets them: CLIP's pooled output (SDXL conditions on it) is the hidden state at the end-of-text id, and with
    CLIPTextConfig's default ids (the pretrained vocabulary's 49407) it would pool the builtin tokenizer's
    captions at position 0, the same for every caption."""
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return CLIPTextConfig(**{**special, **values.to_dict()})


def build_models(config: ml_collections.ConfigDict) -> Models:
    """Builds the modules (no parameters) for `config.model`, from a pretrained folder when given."""
    dtype = compute_dtype(config.train.precision)
    # The UNet runs model.attention's kernel and rematerializes its blocks as train.remat says (remat only acts
    # under a gradient: sampling with the same module recomputes nothing).
    # model.scan_layers: SDXL's transformer stacks, runs of same-shaped UNet layers and the CLIP layers run as
    # one nn.scan each, their params stacked (layer_stacks.py); .get: configs saved before the key existed.
    scan_layers = bool(config.model.get("scan_layers", False))
    unet_options = dict(dtype=dtype, attention=config.model.attention, remat=config.train.remat,
                        scan_layers=scan_layers, flash_block_size=config.model.get("flash_block_size", 512),
                        flash_min_tokens=config.model.get("flash_min_tokens", 1024))
    text_cfg_2 = None
    if config.model.pretrained:
        root = _pretrained_dir(config)
        unet_cfg = _read_json(os.path.join(root, "unet", "config.json"))
        vae_cfg = _read_json(os.path.join(root, "vae", "config.json"))
        text_cfg = CLIPTextConfig(**_read_json(os.path.join(root, "text_encoder", "config.json")))
        unet = _from_folder_config(UNet2DConditionModel, unet_cfg, os.path.join(root, "unet", "config.json"),
                                   **unet_options)
        vae = _from_folder_config(AutoencoderKL, vae_cfg, os.path.join(root, "vae", "config.json"), dtype=dtype)
        tokenizer = _folder_tokenizer(root, "tokenizer")
        if has_second_text_encoder(config):
            text_cfg_2 = CLIPTextConfig(**_read_json(os.path.join(root, TEXT_ENCODER_2, "config.json")))
            tokenizer = TokenizerPair(tokenizer, _folder_tokenizer(root, "tokenizer_2"))
    else:
        unet = UNet2DConditionModel(**config.model.unet.to_dict(), **unet_options)
        vae = AutoencoderKL(**config.model.vae.to_dict(), dtype=dtype)
        tokenizer = builtin_tokenizer(config.data.max_length)
        text_cfg = text_encoder_config(config.model.text_encoder, tokenizer)
        if has_second_text_encoder(config):
            text_cfg_2 = text_encoder_config(config.model.text_encoder_2, tokenizer)
            tokenizer = TokenizerPair(tokenizer, tokenizer)
    text_encoder = CLIPTextEncoder(text_cfg, dtype=dtype, scan_layers=scan_layers)
    text_encoder_2 = None if text_cfg_2 is None else CLIPTextEncoderWithProjection(text_cfg_2, dtype=dtype,
                                                                                   scan_layers=scan_layers)
    return Models(unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_config=text_cfg,
                  tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                  text_encoder_2_config=text_cfg_2, **vae_loss_networks(config, dtype))


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


def _from_folder_config(cls, values: dict, path: str, **overrides):
    """`cls.from_config` of a folder's config.json; a setting sdjax's module cannot compute names the file."""
    try:
        return cls.from_config(values, **overrides)
    except ValueError as e:
        raise PretrainedFolderError(f"{path}: {e}") from None


def vae_config_from_folder(folder: str) -> dict:
    """The AutoencoderKL fields of a diffusers VAE folder's config.json (diffusers' bookkeeping keys left out;
    a setting sdjax's VAE cannot compute is a PretrainedFolderError naming it)."""
    path = os.path.join(folder, "config.json")
    return _from_folder_config(AutoencoderKL, _read_json(path), path).config


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
        added = None
        if models.sdxl:
            added = {"text_embeds": jnp.zeros((1, models.text_encoder_2_config.projection_dim), jnp.float32),
                     "time_ids": jnp.zeros((1, SDXL_TIME_IDS), jnp.float32)}
        return models.unet.init(rng, sample, jnp.ones((1,), jnp.int32), context, added)["params"]

    def init_vae(rng):
        sample = jnp.zeros((1, models.vae.in_channels, image_size, image_size), jnp.float32)
        params_rng, dropout_rng, gaussian_rng = jax.random.split(rng, 3)
        rngs = {"params": params_rng, "dropout": dropout_rng, "gaussian": gaussian_rng}
        return models.vae.init(rngs, sample)["params"]

    def text_encoder_init(module):
        ids = jnp.zeros((1, seq_len), jnp.int32)
        return lambda rng: module.init(rng, ids, jnp.ones_like(ids), position_ids(ids))["params"]

    image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return {"unet": init_unet, "vae": init_vae, "text_encoder": text_encoder_init(models.text_encoder),
            TEXT_ENCODER_2: text_encoder_init(models.text_encoder_2),
            DISCRIMINATOR: lambda rng: models.discriminator.init(rng, image)["params"],
            PERCEPTUAL: lambda rng: models.perceptual.init(rng, image, image)["params"]}


def param_shapes(models: Models, config: ml_collections.ConfigDict,
                 components: tuple[str, ...] | None = None) -> dict[str, Params]:
    """ShapeDtypeStructs of the components' params (default: all of the model's), without allocating any."""
    fns = _init_fns(models, config)
    return {name: jax.eval_shape(fns[name], jax.random.key(0)) for name in components or models.components}


def init_params(models: Models, config: ml_collections.ConfigDict, rng: jax.Array, out_shardings=None,
                components: tuple[str, ...] | None = None):
    """Random float32 params of `components` (default: all of the model's); created directly with
    `out_shardings` when given. A component's init does not depend on which others are created with it."""
    fns = _init_fns(models, config)
    components = components or models.components
    rngs = dict(zip(COMPONENTS, jax.random.split(rng, len(COMPONENTS))))
    rngs.update({name: jax.random.fold_in(rng, i + 1)
                 for i, name in enumerate((DISCRIMINATOR, PERCEPTUAL, TEXT_ENCODER_2))})

    def init_all(rngs):
        return {name: fns[name](rngs[name]) for name in components}

    return jax.jit(init_all, out_shardings=out_shardings)(rngs)


def load_pretrained_params(models: Models, config: ml_collections.ConfigDict,
                           components: tuple[str, ...] | None = None) -> dict[str, Params]:
    """float32 params of `components` (default: all of the model's) from `config.model.pretrained` (Flax
    msgpack or PyTorch safetensors/bin), on host."""
    root = _pretrained_dir(config)
    components = components or models.components
    # The files have the unrolled names; with model.scan_layers the stacks are stacked once read.
    shapes = layer_stacks.unstack_params(param_shapes(models, config, components))
    text_encoders = ("text_encoder", TEXT_ENCODER_2)
    params = {name: (pytorch_weights.load_clip_text_weights if name in text_encoders else
                     pytorch_weights.load_diffusers_weights)(os.path.join(root, name), shapes[name])
              for name in components}
    return layer_stacks.stack_params(params) if models.unet.scan_layers else params


def load_perceptual_params(config: ml_collections.ConfigDict) -> Params:
    """float32 host params of LPIPS's VGG from `vae_train.perceptual_weights`."""
    return lpips_lib.load_params(config.vae_train.perceptual_weights)


# --- forward functions used by the step and the sampler -------------------------------------------


def position_ids(input_ids: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)


def encode_text(models: Models, params: Params, input_ids: jax.Array) -> jax.Array:
    """Last hidden state of the CLIP text encoder (what SD conditions on), [B, 77, D]."""
    return _run_text_encoder(models.text_encoder, params, input_ids)[0]


def _run_text_encoder(module, params: Params, input_ids: jax.Array, output_hidden_states: bool = False):
    return module.apply({"params": params}, input_ids, jnp.ones_like(input_ids), position_ids(input_ids),
                        deterministic=True, output_hidden_states=output_hidden_states)


def token_ids_shape(models: Models, max_length: int) -> tuple[int, ...]:
    """The shape of one caption's token ids: [max_length], SDXL's [2, max_length] (one row per tokenizer)."""
    return (2, max_length) if models.sdxl else (max_length,)


def text_conditioning(models: Models, params: Params, input_ids: jax.Array) -> dict[str, jax.Array]:
    """What the UNet is conditioned on, from token ids, as `predict_noise`'s keyword arguments (`params` holds
    every component):
      SD    input_ids [B, L]: {"context": the CLIP text encoder's last hidden state [B, L, D]};
      SDXL  input_ids [B, 2, L] (a row per tokenizer: TokenizerPair): {"context": both encoders' penultimate
            hidden states side by side [B, L, D1 + D2], "text_embeds": the second's pooled projection [B, P]},
            as diffusers' SDXL pipelines condition."""
    if not models.sdxl:
        return {"context": encode_text(models, params["text_encoder"], input_ids)}
    first = _run_text_encoder(models.text_encoder, params["text_encoder"], input_ids[:, 0], True)
    second = _run_text_encoder(models.text_encoder_2, params[TEXT_ENCODER_2], input_ids[:, 1], True)
    return {"context": jnp.concatenate([first.hidden_states[-2], second.hidden_states[-2]], axis=-1),
            "text_embeds": second.text_embeds}


def batch_conditioning(models: Models, params: Params, batch: dict) -> dict[str, jax.Array]:
    """`text_conditioning` of a training batch's captions; SDXL also takes the batch's `time_ids` (each image's
    size and crop, data/preprocess.py), where it has them (a latent cache's batches do not)."""
    conditioning = text_conditioning(models, params, batch["input_ids"])
    if models.sdxl and "time_ids" in batch:
        conditioning["time_ids"] = batch["time_ids"]
    return conditioning


# SDXL's size and crop conditioning: (original height, width, crop top, left, target height, width).
SDXL_TIME_IDS = 6


def sdxl_time_ids(models: Models, latents: jax.Array) -> jax.Array:
    """SDXL's micro-conditioning [B, 6] for latents [B, C, h, w] when no batch gave it: (H, W, 0, 0, H, W) at
    their image size H x W, an image taken as it is, uncropped: what diffusers' SDXL pipelines pass when
    sampling by default. (Training batches from images carry each one's own: data/preprocess.py `Crop`.)"""
    height, width = (side * models.vae_scale_factor for side in latents.shape[-2:])
    time_ids = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
    return jnp.broadcast_to(time_ids, (latents.shape[0], SDXL_TIME_IDS))


def image_latent_moments(models: Models, params: Params, pixel_values_nhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the VAE posterior (channels-last, unscaled) for images in [-1, 1]: what a latent
    cache stores, so that sampling from it later equals encoding the image then."""
    pixels = jnp.transpose(pixel_values_nhwc, (0, 3, 1, 2))
    posterior = models.vae.apply({"params": params}, pixels, method=models.vae.encode).latent_dist
    return posterior.mean, posterior.std  # channels-last, as the VAE gives them


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


def predict_noise(models: Models, params: Params, noisy_latents, timesteps, context,
                  text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
    """The UNet's prediction for NCHW latents; `context` (and SDXL's pooled `text_embeds`) as
    `text_conditioning` gives them; SDXL's `time_ids` [B, 6] default to `sdxl_time_ids`."""
    timesteps = jnp.asarray(timesteps)  # diffusers wraps a non-jax timesteps array in one more dimension
    added = None
    if models.sdxl:
        added = {"text_embeds": text_embeds,
                 "time_ids": sdxl_time_ids(models, noisy_latents) if time_ids is None else time_ids}
    return models.unet.apply({"params": params}, noisy_latents, timesteps, context, added).sample
