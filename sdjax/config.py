"""The config schema (every key a run reads, with its default) and its validation.

Config files in `configs/` start from `base_config()` and override what they need; the command line then
overrides any field (`--config.train.steps=50`). `validate` runs before anything is compiled and names the
key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util

import ml_collections

PRECISIONS = ("bf16", "fp32")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
OPTIMIZERS = ("adamw", "adafactor", "adamw_bf16")  # sdjax/optim.py
REMAT_POLICIES = ("none", "minimal", "full")  # sdjax/models/remat.py
DECAYS = ("constant", "linear", "cosine")
ATTENTIONS = ("auto", "default", "memory_efficient", "dot_product", "per_head")  # sdjax/models/attention.py
MESH_AXES = ("data", "fsdp")
SCHEDULERS = ("ddim", "pndm", "lms", "dpm", "euler", "ddpm")  # sampling schedulers (sdjax/models/schedulers.py)
STAGES = ("unet", "vae")  # what a run trains (train.stage): sdjax/step.py stage_components


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a local diffusers-format folder; when set, it replaces unet/vae/text_encoder below
    # UNet attention kernel: "auto" (fastest measured per platform) | "default" (diffusers as written) |
    # "memory_efficient" (diffusers' chunked) | "dot_product" (cuDNN flash on GPU) | "per_head" (CPU); see
    # sdjax/models/attention.py
    c.model.attention = "auto"
    # A trained VAE for the UNet stage, replacing model.vae: a `sdjax train-vae` workdir or a diffusers folder.
    c.model.vae_from = ""
    # A VAE config file (configs/demo_vae.py): `sdjax train` first trains the VAE with it into model.vae_from
    # (default WORKDIR/vae), or resumes it there; skipped when a finished VAE run is already there.
    c.model.vae_config = ""
    c.model.unet = ml_collections.ConfigDict(dict(  # FlaxUNet2DConditionModel kwargs (SD 1.5 shapes)
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768))
    c.model.vae = ml_collections.ConfigDict(dict(  # FlaxAutoencoderKL kwargs (SD 1.5 shapes)
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
        sample_size=512, scaling_factor=0.18215))
    c.model.text_encoder = ml_collections.ConfigDict(dict(  # transformers CLIPTextConfig kwargs (CLIP ViT-L/14)
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))

    c.data = ml_collections.ConfigDict()
    c.data.source = "demo"  # | "imagefolder" | "webdataset" | "tfds" | "auto" (from data.path; see data/sources.py)
    c.data.path = ""  # imagefolder: folder; webdataset: shards (/d/{00000..00099}.tar, glob, folder); tfds: name
    c.data.split = "train"  # tfds split
    c.data.eval_path = ""  # held-out data for train.eval_every, like data.path (imagefolder, webdataset)
    c.data.eval_split = ""  # tfds: held-out split for train.eval_every (e.g. "validation")
    c.data.tfds_data_dir = ""  # where the TFDS dataset was prepared ("" = TFDS' default)
    c.data.image_column = "image"  # tfds: the image feature
    c.data.caption_column = "text"  # imagefolder: metadata column; tfds: feature ("captions/text" for coco_captions)
    c.data.index_cache_dir = "~/.cache/sdjax/tar_index"  # webdataset: member indexes of scanned shards ("" = none)
    c.data.resolution = 512
    c.data.max_length = 77  # caption tokens, padded
    c.data.random_crop = False  # centre crop otherwise
    c.data.random_flip = False
    c.data.caption_dropout = 0.1  # empty caption at this rate: what classifier-free guidance needs
    c.data.min_image_size = 0  # images whose shorter side is below this are skipped as bad
    c.data.max_bad_fraction = 0.1  # fail when more of the records read are bad (unreadable, no caption, ...)
    c.data.num_threads = 2  # decoding threads feeding the step (per worker process when num_workers > 0)
    c.data.num_workers = 0  # worker processes decoding batches (grain mp_prefetch); 0: threads of this process
    c.data.prefetch = 4  # batches decoded ahead
    c.data.latent_cache = ""  # a folder written by `sdjax cache-latents`: train on its VAE latents, not images
    c.data.aspect_buckets = False  # batches of one aspect-ratio bucket each (fine-tuning on mixed shapes)
    c.data.bucket_step = 64  # bucket sides are multiples of this (of the VAE x UNet downsampling)
    c.data.bucket_max_aspect = 2.0  # the most elongated bucket (long side / short side)
    # Generated on the fly from (seed, index), so size costs nothing; a large one means a run never sees an
    # image twice. Measured on the demo (UNet stage, 2000 steps): with 2048 examples (31 epochs) it drew the
    # shapes of the held-out captions at 0.40, with 200,000 at 0.60 (eval-demo, 48 images each).
    c.data.demo_num_examples = 1_000_000
    c.data.demo_num_eval_examples = 64
    c.data.demo_seed = 0
    c.data.demo_held_out = ()  # demo captions the train split never shows (`sdjax eval-demo` samples them)

    c.diffusion = ml_collections.ConfigDict()
    c.diffusion.num_train_timesteps = 1000
    c.diffusion.beta_schedule = "scaled_linear"
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction_type = "epsilon"
    # With model.pretrained: the keys above come from its scheduler/scheduler_config.json when it has one.
    c.diffusion.schedule_from_pretrained = True
    c.diffusion.prediction_type_override = ""  # | "epsilon" | "v_prediction": train with this one instead

    c.loss = ml_collections.ConfigDict()  # options of the diffusion loss (sdjax/step.py, sdjax/models/noise.py)
    c.loss.snr_gamma = 0.0  # Min-SNR-gamma loss weighting (5.0 is the paper's); 0: plain MSE
    c.loss.noise_offset = 0.0  # per-channel offset added to the noise (e.g. 0.05-0.1: darker/brighter images)
    c.loss.input_perturbation = 0.0  # extra noise on the inputs only (e.g. 0.1); the target keeps the noise

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"  # | "adafactor" (factored 2nd moment, no 1st) | "adamw_bf16" (bf16 moments)
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.decay = "constant"  # after warmup: | "linear" | "cosine" (to end_learning_rate at train.steps)
    c.optimizer.end_learning_rate = 0.0
    c.optimizer.weight_decay = 1e-2
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.grad_clip_norm = 1.0  # global norm; 0 disables clipping
    c.optimizer.text_encoder_learning_rate = 0.0  # train.train_text_encoder: its peak LR; 0: learning_rate

    c.train = ml_collections.ConfigDict()
    c.train.stage = "unet"  # the UNet over a frozen VAE and text encoder | "vae" (the VAE alone: sdjax train-vae)
    c.train.steps = 10_000
    c.train.batch_size = 16  # global, over all hosts and devices
    c.train.seed = 0
    c.train.precision = "bf16"  # compute dtype; params and optimizer state stay float32
    c.train.log_every = 10
    c.train.compilation_cache_dir = "~/.cache/sdjax/xla"  # XLA's persistent cache; "" disables it
    c.train.remat = "none"  # UNet activations recomputed in the backward pass: | "minimal" | "full" (less memory)
    c.train.grad_accum = 1  # micro-batches per step (same update, 1/grad_accum of the activation memory)
    c.train.checkpoint_every = 1000  # steps between (async) checkpoints; also saved at the end and on SIGTERM
    c.train.keep_checkpoints = 3  # the newest checkpoints kept; older ones are deleted
    c.train.keep_checkpoint_every = 0  # also keep every checkpoint whose step is a multiple of this; 0: none
    c.train.checkpoint_dir = ""  # "" is WORKDIR/checkpoints; any local or gs:// path
    c.train.ema_decay = 0.0  # EMA of the UNet params, max decay (e.g. 0.9999, warmed up); 0 keeps no EMA
    c.train.sample_every = 0  # steps between sample grids of `sample.prompts` (WORKDIR/samples, TensorBoard); 0: never
    c.train.eval_every = 0  # steps between validation losses on the eval split (fixed noise, timesteps); 0: never
    c.train.train_text_encoder = False  # also fine-tune the whole text encoder (optimizer.text_encoder_learning_rate)
    c.train.frozen_precision = "fp32"  # | "bf16": storage of the frozen params (half the memory; see step.py)

    c.dreambooth = ml_collections.ConfigDict()  # sdjax/data/dreambooth.py; replaces data.source / data.path
    c.dreambooth.instance_data_dir = ""  # a folder of images of the subject; set: DreamBooth training
    c.dreambooth.instance_prompt = ""  # every instance image's caption, e.g. "a photo of sks dog"
    c.dreambooth.with_prior_preservation = False  # half of each batch: class images, loss weighted as below
    c.dreambooth.class_data_dir = ""  # class images; the missing ones are sampled from the base model
    c.dreambooth.class_prompt = ""  # e.g. "a photo of a dog"
    c.dreambooth.num_class_images = 100  # at least this many class images (generated when fewer are there)
    c.dreambooth.prior_loss_weight = 1.0

    c.lora = ml_collections.ConfigDict()  # low-rank adapters (sdjax/lora.py); only they are trained
    c.lora.rank = 0  # 0: no LoRA (the UNet itself is trained)
    c.lora.alpha = 0.0  # adapters are scaled by alpha / rank; 0 means alpha = rank (scale 1)
    c.lora.unet_target_modules = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections (PyTorch names)
    c.lora.text_encoder_target_modules = ()  # e.g. ("q_proj", "k_proj", "v_proj", "out_proj")

    c.vae_train = ml_collections.ConfigDict()  # the VAE stage's objective and scaling factor (sdjax/vae.py)
    c.vae_train.l1_weight = 1.0  # mean |x - reconstruction| over pixels in [-1, 1]
    c.vae_train.l2_weight = 0.0  # mean squared error over pixels
    c.vae_train.kl_weight = 1e-6  # KL(posterior || N(0, 1)), mean over latent elements
    c.vae_train.scaling_examples = 1024  # training examples whose latents set the scaling factor (1 / std)
    c.vae_train.grid_images = 8  # held-out images in the reconstruction grids (train.sample_every)
    # Optional terms of the LDM autoencoder objective (0: off). LPIPS distance between image and
    # reconstruction (sdjax/models/lpips.py; the LDM/SD VAEs use weight 1.0), with the VGG weights of a local
    # lpips state dict file; and a patch-GAN (sdjax/models/discriminator.py; LDM: 0.5, from step 50001):
    # the decoder minimises gan_weight * -logits(reconstruction), the discriminator a hinge loss.
    c.vae_train.perceptual_weight = 0.0
    c.vae_train.perceptual_weights = ""  # safetensors of lpips.LPIPS(net="vgg").state_dict()
    c.vae_train.gan_weight = 0.0
    c.vae_train.gan_start_step = 0  # adversarial terms (generator and discriminator) are off before this step
    # LDM's adaptive weight: gan_weight x the ratio of the reconstruction and generator terms' gradient norms
    # at the decoder's last layer (logged as gan_weight); False: gan_weight as it is.
    c.vae_train.gan_adaptive_weight = True
    c.vae_train.discriminator_channels = 64
    c.vae_train.discriminator_layers = 3  # stride-2 convs: 3 judges 70x70 pixel patches

    c.sample = ml_collections.ConfigDict()  # the grids sampled during training (`sdjax sample` has flags)
    c.sample.prompts = ("a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse")
    c.sample.negative_prompt = ""  # the unconditional side of classifier-free guidance
    c.sample.images_per_prompt = 4  # grid columns; image j of every grid uses the same seed
    c.sample.seed = 0
    c.sample.scheduler = "ddim"  # | "pndm" | "lms" | "dpm" | "euler" | "ddpm"
    c.sample.steps = 50
    c.sample.guidance = 7.5  # classifier-free guidance scale; 1 is the conditional prediction alone

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: every device not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.fsdp_min_size = 2**14  # params with fewer elements stay replicated under FSDP
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"config.{key}={value!r} is invalid: {allowed}.")
        self.key = key


def _choice(config, key: str, options) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in options:
        raise ConfigError(key, value, f"expected one of {list(options)}")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved; raises ConfigError if they cannot tile `num_devices`."""
    sizes = {axis: int(config.mesh[axis]) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}", size, "expected a positive axis size or -1 (fill)")
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ConfigError(f"mesh.{free[1]}", -1, "only one mesh axis may be -1")
    fixed = 1
    for size in sizes.values():
        fixed *= size if size != -1 else 1
    if free:
        if num_devices % fixed:
            culprit = next(axis for axis, size in sizes.items() if size not in (-1, 1))
            raise ConfigError(f"mesh.{culprit}", sizes[culprit], f"the fixed mesh axes ({fixed} devices) do not "
                                                                 f"divide the {num_devices} devices present")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError("mesh", dict(sizes), f"the axis sizes multiply to {fixed}, but {num_devices} devices "
                                               "are present (set one axis to -1 to fill)")
    return sizes


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
    """Raises ConfigError for the first value that would fail later; cheap, nothing is built or compiled."""
    _choice(config, "train.precision", PRECISIONS)
    _choice(config, "diffusion.prediction_type", PREDICTION_TYPES)
    _choice(config, "diffusion.beta_schedule", BETA_SCHEDULES)
    _choice(config, "optimizer.name", OPTIMIZERS)
    _choice(config, "optimizer.decay", DECAYS)
    _choice(config, "model.attention", ATTENTIONS)
    _choice(config, "train.remat", REMAT_POLICIES)
    _choice(config, "sample.scheduler", SCHEDULERS)
    _choice(config, "train.stage", STAGES)
    from sdjax.data import SOURCES
    from sdjax.data.sources import resolve_auto_source
    _choice(config, "data.source", SOURCES)
    resolve_auto_source(config)

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
    from sdjax.data import has_eval_split
    if config.train.eval_every and not has_eval_split(config):
        held_out = "data.eval_split" if config.data.source == "tfds" else "data.eval_path"
        raise ConfigError("train.eval_every", config.train.eval_every,
                          f"data.source={config.data.source!r} has no held-out data: set {held_out}, or "
                          "train.eval_every=0")
    if config.train.eval_every and config.data.source == "demo" and \
            config.data.demo_num_eval_examples < config.train.batch_size:
        raise ConfigError("data.demo_num_eval_examples", config.data.demo_num_eval_examples,
                          f"train.eval_every needs at least one global batch (train.batch_size="
                          f"{config.train.batch_size}) of eval examples")

    sizes = mesh_shape(config, num_devices)
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
        from sdjax.vae import find_config_file
        find_config_file(model.vae_config)  # raises ConfigError naming the key when it is not there
    if config.data.demo_held_out:
        from sdjax.data.shapes import scene_from_caption
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
        from sdjax.models.lpips import LPIPSWeightsError, read_widths
        try:
            read_widths(vae.perceptual_weights)
        except LPIPSWeightsError as e:
            raise ConfigError("vae_train.perceptual_weights", vae.perceptual_weights, str(e)) from None
    if vae.gan_weight > 0:
        if vae.gan_start_step < 0:
            raise ConfigError("vae_train.gan_start_step", vae.gan_start_step, "expected a step >= 0")
        if vae.discriminator_channels < 1:
            raise ConfigError("vae_train.discriminator_channels", vae.discriminator_channels, "expected >= 1")
        from sdjax.models.discriminator import smallest_image_size
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
    import os
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
    from sdjax.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
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
    from sdjax.data.records import MAX_BAD_FRACTION
    data = config.data
    if data.source != "demo" and not data.path and not data.latent_cache:
        raise ConfigError("data.path", data.path, f"data.source={data.source!r} needs a path: a folder "
                                                  "(imagefolder), shards (webdataset) or a dataset name (tfds)")
    if data.source == "demo" and data.path:
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


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py), loaded by path as `--config FILE` loads it."""
    spec = importlib.util.spec_from_file_location("sdjax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()
