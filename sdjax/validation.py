"""The checks of a config, before anything is built or compiled: `validate` (the config alone, and the
devices it will run on) and `validate_against_models` (with the modules built, shapes of a pretrained folder
too). Pure: they raise `ConfigError` (or `DataError`) for the first value that would fail later, naming the
key, the value and what is allowed, and change nothing. What sdjax fills in for a run (an "auto" data source,
a warmup longer than a short run, ...) is decided before, in sdjax/run_config.py.

The checks that need another module's knowledge (the data sources, the loss networks' weight files, the LoRA
targets, the mesh) live here, one layer above those modules, so that sdjax/config.py imports nothing of sdjax.
"""

from __future__ import annotations

import os

import ml_collections

from sdjax import data as data_lib
from sdjax import lora as lora_lib
from sdjax.config import (ATTENTIONS, BETA_SCHEDULES, DECAYS, OPTIMIZERS, PRECISIONS, PREDICTION_TYPES,
                          REMAT_POLICIES, SCHEDULERS, STAGES, XLA_OPTIMIZATION_LEVELS, ConfigError,
                          find_config_file)
from sdjax.data.records import MAX_BAD_FRACTION
from sdjax.data.shapes import scene_from_caption
from sdjax.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from sdjax.mesh import resolve_num_slices, slice_shapes
from sdjax.models.discriminator import smallest_image_size
from sdjax.models.lpips import LPIPSWeightsError, read_widths


def _choice(config, key: str, options) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in options:
        raise ConfigError(key, value, f"expected one of {list(options)}")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1,
             num_slices: int = 1) -> None:
    """Raises ConfigError for the first value that would fail later; cheap, nothing is built or compiled.
    `num_slices`: the slices the devices are in (mesh.device_slices; mesh.num_slices=0 stands for it)."""
    _choice(config, "train.precision", PRECISIONS)
    _choice(config, "diffusion.prediction_type", PREDICTION_TYPES)
    _choice(config, "diffusion.beta_schedule", BETA_SCHEDULES)
    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.decay", DECAYS)
    _choice(config, "model.attention", ATTENTIONS)
    block = config.model.get("flash_block_size", 512)
    if not isinstance(block, int) or block < 128 or block % 128:
        raise ConfigError("model.flash_block_size", block, "expected a multiple of 128 (a TPU vreg's lanes), "
                          "e.g. 512 (the default) or 256")
    min_tokens = config.model.get("flash_min_tokens", 1024)
    if not isinstance(min_tokens, int) or min_tokens < 0:
        raise ConfigError("model.flash_min_tokens", min_tokens,
                          "expected a number of tokens >= 0 (1024: SD's two top attention levels at 512 px)")
    _choice(config, "train.remat", REMAT_POLICIES)
    if config.train.get("xla_optimization_level", ""):
        _choice(config, "train.xla_optimization_level", XLA_OPTIMIZATION_LEVELS)
    _choice(config, "sample.scheduler", SCHEDULERS)
    _choice(config, "train.stage", STAGES)
    _choice(config, "data.source", data_lib.SOURCES)

    for key in ("train.steps", "train.batch_size", "train.log_every", "data.resolution", "data.max_length",
                "diffusion.num_train_timesteps"):
        group, name = key.split(".")
        if config[group][name] <= 0:
            raise ConfigError(key, config[group][name], "expected a positive integer")
    if config.optimizer.learning_rate <= 0:
        raise ConfigError("optimizer.learning_rate", config.optimizer.learning_rate, "expected > 0")
    if not 0 <= config.optimizer.warmup_steps <= config.train.steps:
        raise ConfigError("optimizer.warmup_steps", config.optimizer.warmup_steps,
                          f"expected between 0 and train.steps={config.train.steps}")
    if not 0 <= config.data.caption_dropout < 1:
        raise ConfigError("data.caption_dropout", config.data.caption_dropout, "expected a rate in [0, 1)")
    _validate_data(config)
    _validate_checkpointing(config.train)

    if not 0 <= config.train.ema_decay < 1:
        raise ConfigError("train.ema_decay", config.train.ema_decay, "expected a decay in [0, 1) (0 disables EMA)")
    for key in ("train.sample_every", "train.eval_every"):
        group, name = key.split(".")
        if config[group][name] < 0:
            raise ConfigError(key, config[group][name], "expected a number of steps >= 0 (0 disables)")
    _validate_sampling(config)
    _validate_vae(config)
    _choice(config, "train.frozen_precision", PRECISIONS)
    _validate_lora(config)
    _validate_loss_options(config)
    _validate_dreambooth(config)
    if config.train.eval_every and not data_lib.has_eval_split(config):
        raise ConfigError("train.eval_every", config.train.eval_every,
                          f"{data_lib.source_name(config)} has no held-out data: set "
                          f"{data_lib.held_out_key(config)}, or train.eval_every=0")
    if config.train.eval_every and data_lib.resolved_source(config) == "demo" and \
            config.data.demo_num_eval_examples < config.train.batch_size:
        raise ConfigError("data.demo_num_eval_examples", config.data.demo_num_eval_examples,
                          f"train.eval_every needs at least one global batch (train.batch_size="
                          f"{config.train.batch_size}) of eval examples")

    # The mesh: its axes tile the devices, and with several slices data spans them and fsdp fits in one.
    ici, dcn = slice_shapes(config, num_devices, resolve_num_slices(config, num_slices))
    sizes = {axis: ici[axis] * dcn[axis] for axis in ici}
    data_parallel = sizes["data"] * sizes["fsdp"]
    if config.train.batch_size % data_parallel:
        raise ConfigError("train.batch_size", config.train.batch_size,
                          f"the global batch must be a multiple of the data-parallel devices "
                          f"(mesh.data x mesh.fsdp = {sizes['data']} x {sizes['fsdp']} = {data_parallel})")
    if config.train.batch_size % process_count:
        raise ConfigError("train.batch_size", config.train.batch_size,
                          f"the global batch must be a multiple of the {process_count} processes")
    per_device_batch = config.train.batch_size // data_parallel
    if config.train.grad_accum < 1 or per_device_batch % config.train.grad_accum:
        # Every micro-batch takes the same share of every device's examples, so none idles or waits.
        raise ConfigError("train.grad_accum", config.train.grad_accum,
                          f"expected a divisor of the per-device batch (train.batch_size / data-parallel devices "
                          f"= {config.train.batch_size} / {data_parallel} = {per_device_batch})")
    chunks = config.train.get("vae_encode_chunks", 1)
    if chunks < 1 or (per_device_batch // config.train.grad_accum) % chunks:
        raise ConfigError("train.vae_encode_chunks", chunks,
                          f"expected a divisor of the per-device (micro-)batch (train.batch_size / data-parallel "
                          f"devices / train.grad_accum = {config.train.batch_size} / {data_parallel} / "
                          f"{config.train.grad_accum} = {per_device_batch // config.train.grad_accum})")


def _validate_sampling(config: ml_collections.ConfigDict) -> None:
    sample = config.sample
    if config.train.sample_every:
        if not sample.prompts or not all(isinstance(p, str) for p in sample.prompts):
            raise ConfigError("sample.prompts", sample.prompts, "train.sample_every needs a tuple of prompt strings")
        if sample.images_per_prompt < 1:
            raise ConfigError("sample.images_per_prompt", sample.images_per_prompt, "expected at least 1")
    min_steps, max_steps = (2 if sample.scheduler == "pndm" else 1), config.diffusion.num_train_timesteps
    if not min_steps <= sample.steps <= max_steps:
        raise ConfigError("sample.steps", sample.steps,
                          f"expected between {min_steps} and diffusion.num_train_timesteps={max_steps}")
    if sample.guidance < 0:
        raise ConfigError("sample.guidance", sample.guidance, "expected a guidance scale >= 0")


def _validate_vae(config: ml_collections.ConfigDict) -> None:
    """The VAE stage's objective, and where the UNet stage's VAE comes from."""
    model, vae = config.model, config.vae_train
    for key in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "gan_weight"):
        if vae[key] < 0:
            raise ConfigError(f"vae_train.{key}", vae[key], "expected a weight >= 0")
    if config.train.stage == "vae":
        if vae.l1_weight == 0 and vae.l2_weight == 0:
            raise ConfigError("vae_train.l1_weight", vae.l1_weight, "the VAE needs a reconstruction loss: set "
                                                                   "vae_train.l1_weight or vae_train.l2_weight > 0")
        if vae.scaling_examples < 1:
            raise ConfigError("vae_train.scaling_examples", vae.scaling_examples, "expected at least 1")
        if vae.grid_images < 1 and config.train.sample_every:
            raise ConfigError("vae_train.grid_images", vae.grid_images, "expected at least 1 with train.sample_every")
        for key in ("vae_from", "vae_config", "pretrained"):
            if model[key]:
                raise ConfigError(f"model.{key}", model[key], "the VAE stage (train.stage='vae') trains model.vae "
                                                              "from scratch: expected ''")
        if config.data.latent_cache:
            raise ConfigError("data.latent_cache", config.data.latent_cache, "the VAE stage trains on images")
        _validate_vae_loss_networks(config)
    if (model.vae_from or model.vae_config) and model.pretrained:
        key = "vae_from" if model.vae_from else "vae_config"
        raise ConfigError(f"model.{key}", model[key], "model.pretrained brings its own VAE: set one of the two")
    if model.vae_config:
        find_config_file(model.vae_config)  # raises ConfigError naming the key when it is not there
    if config.data.demo_held_out:
        for caption in config.data.demo_held_out:
            try:
                scene_from_caption(caption)
            except ValueError as e:
                raise ConfigError("data.demo_held_out", config.data.demo_held_out, str(e)) from None


def _validate_vae_loss_networks(config: ml_collections.ConfigDict) -> None:
    """The optional perceptual and patch-GAN terms of the VAE stage: their weights file and sizes."""
    vae = config.vae_train
    if vae.perceptual_weight > 0:
        if not vae.perceptual_weights:
            raise ConfigError("vae_train.perceptual_weights", vae.perceptual_weights,
                              "vae_train.perceptual_weight > 0 needs LPIPS's VGG weights: a local safetensors file "
                              "of lpips.LPIPS(net='vgg').state_dict() (how to make it: sdjax/models/lpips.py)")
        try:
            read_widths(vae.perceptual_weights)
        except LPIPSWeightsError as e:
            raise ConfigError("vae_train.perceptual_weights", vae.perceptual_weights, str(e)) from None
    if vae.gan_weight > 0:
        if vae.gan_start_step < 0:
            raise ConfigError("vae_train.gan_start_step", vae.gan_start_step, "expected a step >= 0")
        if vae.discriminator_channels < 1:
            raise ConfigError("vae_train.discriminator_channels", vae.discriminator_channels, "expected >= 1")
        if vae.discriminator_layers < 1 or config.data.resolution < smallest_image_size(vae.discriminator_layers):
            raise ConfigError("vae_train.discriminator_layers", vae.discriminator_layers,
                              f"expected at least 1, and data.resolution={config.data.resolution} >= 3 * 2**layers "
                              "(each layer halves the image; the last two convs need a 3x3 map)")


def _validate_loss_options(config: ml_collections.ConfigDict) -> None:
    _choice(config, "diffusion.prediction_type_override", ("",) + PREDICTION_TYPES)
    for key in ("snr_gamma", "noise_offset", "input_perturbation"):
        if config.loss[key] < 0:
            raise ConfigError(f"loss.{key}", config.loss[key], "expected >= 0 (0 disables it)")
    if config.optimizer.text_encoder_learning_rate < 0:
        raise ConfigError("optimizer.text_encoder_learning_rate", config.optimizer.text_encoder_learning_rate,
                          "expected > 0, or 0 for optimizer.learning_rate")


def _validate_dreambooth(config: ml_collections.ConfigDict) -> None:
    db = config.dreambooth
    if not db.instance_data_dir:
        if db.with_prior_preservation or db.instance_prompt:
            raise ConfigError("dreambooth.instance_data_dir", db.instance_data_dir,
                              "DreamBooth (dreambooth.instance_prompt or with_prior_preservation set) needs the "
                              "folder of the subject's images")
        return
    if not os.path.isdir(db.instance_data_dir):
        raise ConfigError("dreambooth.instance_data_dir", db.instance_data_dir, "expected a folder of images")
    if not db.instance_prompt.strip():
        raise ConfigError("dreambooth.instance_prompt", db.instance_prompt,
                          "expected the prompt that names the subject, e.g. 'a photo of sks dog'")
    if config.train.eval_every:
        raise ConfigError("train.eval_every", config.train.eval_every, "DreamBooth has no held-out data: set 0")
    if config.data.latent_cache or config.data.aspect_buckets:
        raise ConfigError("data.latent_cache" if config.data.latent_cache else "data.aspect_buckets",
                          config.data.latent_cache or True, "not available with DreamBooth (leave it unset)")
    if not db.with_prior_preservation:
        return
    if not db.class_data_dir or not db.class_prompt.strip():
        key = "class_data_dir" if not db.class_data_dir else "class_prompt"
        raise ConfigError(f"dreambooth.{key}", db[key], "prior preservation needs dreambooth.class_data_dir (a "
                          "folder, filled with generated images when short) and dreambooth.class_prompt")
    if db.num_class_images < 1:
        raise ConfigError("dreambooth.num_class_images", db.num_class_images, "expected at least 1")
    if db.prior_loss_weight < 0:
        raise ConfigError("dreambooth.prior_loss_weight", db.prior_loss_weight, "expected >= 0")
    half = config.train.batch_size // 2
    if config.train.batch_size % 2 or half % config.train.grad_accum:
        # Every micro-batch must be [instance half; class half] too (sdjax/step.py split_micro_batches).
        raise ConfigError("train.batch_size", config.train.batch_size, "prior preservation needs an even batch "
                          f"(instance half, class half) whose half is a multiple of train.grad_accum="
                          f"{config.train.grad_accum}")


def _validate_lora(config: ml_collections.ConfigDict) -> None:
    lora = config.lora
    if not isinstance(lora.rank, int) or lora.rank < 0:
        raise ConfigError("lora.rank", lora.rank, "expected an integer >= 0 (0 disables LoRA)")
    if lora.alpha < 0:
        raise ConfigError("lora.alpha", lora.alpha, "expected >= 0 (0 means alpha = lora.rank)")
    for key, allowed in (("unet_target_modules", UNET_TARGETS), ("text_encoder_target_modules", TEXT_ENCODER_TARGETS)):
        value = lora[key]
        if isinstance(value, str) or any(name not in allowed for name in value):
            raise ConfigError(f"lora.{key}", value, f"expected a tuple of names among {list(allowed)}")
    if lora.rank == 0:
        return
    if not lora.unet_target_modules and not lora.text_encoder_target_modules:
        raise ConfigError("lora.unet_target_modules", lora.unet_target_modules,
                          "lora.rank > 0 needs target modules in the UNet or the text encoder")
    if config.train.train_text_encoder:
        raise ConfigError("train.train_text_encoder", True, "a LoRA run (lora.rank > 0) trains adapters only: "
                          "use lora.text_encoder_target_modules for the text encoder, or lora.rank=0")


def _validate_checkpointing(train: ml_collections.ConfigDict) -> None:
    if train.checkpoint_every <= 0:
        raise ConfigError("train.checkpoint_every", train.checkpoint_every, "expected a positive number of steps")
    if train.keep_checkpoints < 1:
        raise ConfigError("train.keep_checkpoints", train.keep_checkpoints, "expected at least 1")
    if train.keep_checkpoint_every < 0 or train.keep_checkpoint_every % train.checkpoint_every:
        # Checkpoints exist only at multiples of checkpoint_every (and at the end), so other values keep none.
        raise ConfigError("train.keep_checkpoint_every", train.keep_checkpoint_every,
                          f"expected 0 or a multiple of train.checkpoint_every={train.checkpoint_every}")


def _validate_data(config: ml_collections.ConfigDict) -> None:
    data = config.data
    source = data_lib.resolved_source(config)
    if source != "demo" and not data.path and not data.latent_cache:
        raise ConfigError("data.path", data.path, f"data.source={data.source!r} needs a path: a folder "
                                                  "(imagefolder), shards (webdataset) or a dataset name (tfds)")
    if source == "demo" and data.path:
        raise ConfigError("data.source", data.source, f"data.path={data.path!r} is set but the demo source "
                                                      "ignores it: set data.source=imagefolder, webdataset or tfds")
    if not 0 <= data.max_bad_fraction <= MAX_BAD_FRACTION:
        raise ConfigError("data.max_bad_fraction", data.max_bad_fraction,
                          f"expected a fraction in [0, {MAX_BAD_FRACTION}] (clean a dataset that is worse)")
    for key, least in (("min_image_size", 0), ("num_workers", 0), ("num_threads", 1), ("prefetch", 1),
                       ("bucket_step", 1)):
        if data[key] < least:
            raise ConfigError(f"data.{key}", data[key], f"expected an integer >= {least}")
    if data.bucket_max_aspect < 1:
        raise ConfigError("data.bucket_max_aspect", data.bucket_max_aspect, "expected a ratio >= 1")
    if data.latent_cache:
        if not config.model.pretrained:
            raise ConfigError("data.latent_cache", data.latent_cache, "a latent cache needs model.pretrained (the "
                                                                      "VAE it was written with)")
        for key in ("random_crop", "random_flip", "aspect_buckets"):
            if data[key]:
                raise ConfigError(f"data.{key}", data[key], "expected False with data.latent_cache (the cache "
                                                            "holds the centre crop, encoded once)")
    if data.get("cache_text_states"):
        _validate_cached_text_states(config)


def _validate_cached_text_states(config: ml_collections.ConfigDict) -> None:
    """Cached text states are the frozen text encoders' outputs, read from a latent cache: a run that trains
    a text encoder must compute them in the step."""
    if not config.data.latent_cache:
        raise ConfigError("data.cache_text_states", True, "the text states come from a latent cache: set data."
                          "latent_cache=DIR (written by `sdjax cache-latents --config.data.cache_text_states=True`)")
    if config.train.train_text_encoder:
        raise ConfigError("data.cache_text_states", True, "train.train_text_encoder=True trains the text encoder, "
                          "so its states change every step: set data.cache_text_states=False (the cache's token ids "
                          "then go through the text encoder in the step) or train.train_text_encoder=False")
    if lora_lib.enabled(config) and config.lora.text_encoder_target_modules:
        raise ConfigError("data.cache_text_states", True, "LoRA adapters in the text encoder "
                          f"(lora.text_encoder_target_modules={tuple(config.lora.text_encoder_target_modules)}) "
                          "change its states every step: set data.cache_text_states=False, or "
                          "lora.text_encoder_target_modules=()")


def validate_against_models(config: ml_collections.ConfigDict, models) -> None:
    """Checks that need the built modules (shapes of a pretrained folder too); still nothing compiled."""
    unet = models.unet
    downsamples = sum(1 for kind in unet.down_block_types) - 1
    multiple = models.vae_scale_factor * 2**downsamples
    if config.data.resolution % multiple:
        raise ConfigError("data.resolution", config.data.resolution,
                          f"expected a multiple of {multiple} (the VAE downsamples by {models.vae_scale_factor}, "
                          f"the UNet by {2**downsamples} more)")
    if config.data.aspect_buckets and config.data.bucket_step % multiple:
        raise ConfigError("data.bucket_step", config.data.bucket_step,
                          f"expected a multiple of {multiple} (every bucket side must be, like data.resolution)")
    if models.latent_channels != unet.in_channels:
        raise ConfigError("model.unet.in_channels", unet.in_channels,
                          f"expected the VAE's latent_channels ({models.latent_channels})")
    _validate_text_conditioning(config, models)
    for channels in list(unet.block_out_channels):
        if channels % 32:
            raise ConfigError("model.unet.block_out_channels", tuple(unet.block_out_channels),
                              "diffusers' Flax UNet uses GroupNorm(32): every entry must be a multiple of 32")


def _validate_text_conditioning(config: ml_collections.ConfigDict, models) -> None:
    """The UNet takes what the text encoder(s) give: their hidden states' width, and SDXL's pooled projection
    and micro-conditioning; the tokenizer(s) fit the encoders' vocabularies and positions."""
    unet = models.unet
    encoders = {"model.text_encoder": (models.text_encoder_config, models.tokenizer)}
    if models.sdxl:
        encoders = {"model.text_encoder": (models.text_encoder_config, models.tokenizer.first),
                    "model.text_encoder_2": (models.text_encoder_2_config, models.tokenizer.second)}
    widths = [encoder.hidden_size for encoder, _ in encoders.values()]
    if sum(widths) != unet.cross_attention_dim:
        expected = (f"the text encoder's hidden_size ({widths[0]})" if len(widths) == 1 else
                    f"the text encoders' hidden sizes together ({sum(widths)}: {' + '.join(map(str, widths))})")
        raise ConfigError("model.unet.cross_attention_dim", unet.cross_attention_dim, f"expected {expected}")
    if (unet.addition_embed_type == "text_time") != models.sdxl:
        raise ConfigError("model.unet.addition_embed_type", unet.addition_embed_type,
                          "expected 'text_time' (SDXL's) exactly when there is a second text encoder "
                          "(model.text_encoder_2, or text_encoder_2/ in model.pretrained)")
    if models.sdxl:
        # the pooled text projection and the 6 micro-conditioning numbers, each embedded in addition_time_embed_dim
        pooled = models.text_encoder_2_config.projection_dim + 6 * unet.addition_time_embed_dim
        if unet.projection_class_embeddings_input_dim != pooled:
            raise ConfigError("model.unet.projection_class_embeddings_input_dim",
                              unet.projection_class_embeddings_input_dim,
                              f"expected model.text_encoder_2.projection_dim + 6 x addition_time_embed_dim ({pooled})")
    for key, (encoder, tokenizer) in encoders.items():
        if encoder.vocab_size < len(tokenizer):
            raise ConfigError(f"{key}.vocab_size", encoder.vocab_size,
                              f"expected at least the tokenizer's {len(tokenizer)} tokens")
        if config.data.max_length > encoder.max_position_embeddings:
            raise ConfigError("data.max_length", config.data.max_length,
                              f"expected at most {key}.max_position_embeddings ({encoder.max_position_embeddings})")
