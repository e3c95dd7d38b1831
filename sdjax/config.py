"""The config schema: every key a run reads, with its default, and the values a choice key allows.

Config files in `configs/` start from `base_config()` and override what they need; the command line then
overrides any field (`--config.train.steps=50`). What sdjax fills in for a run (sdjax/run_config.py) and the
checks of a config (sdjax/validation.py) live above; their errors are `ConfigError`s, which name the key, the
value and what is allowed.

This module is the bottom layer of sdjax: it imports nothing of sdjax, and everything may import it.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

PRECISIONS = ("bf16", "fp32")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
OPTIMIZERS = ("adamw", "adafactor", "adamw_bf16")  # sdjax/optim.py
REMAT_POLICIES = ("none", "minimal", "full")  # sdjax/models/remat.py
DECAYS = ("constant", "linear", "cosine")
ATTENTIONS = ("auto", "default", "memory_efficient", "dot_product", "per_head", "flash")  # sdjax/models/attention.py
SCHEDULERS = ("ddim", "pndm", "lms", "dpm", "euler", "ddpm")  # sampling schedulers (sdjax/models/schedulers.py)
STAGES = ("unet", "vae")  # what a run trains (train.stage): sdjax/step.py stage_components
XLA_OPTIMIZATION_LEVELS = ("", "O0", "O1", "O2", "O3")  # train.xla_optimization_level: sdjax/step.py jit_train_step


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.pretrained = ""  # a local diffusers-format folder; when set, it replaces unet/vae/text_encoder below
    # UNet attention kernel: "auto" (fastest measured per platform) | "default" (diffusers as written) |
    # "memory_efficient" (diffusers' chunked) | "dot_product" (cuDNN flash on GPU) | "per_head" (CPU) |
    # "flash" (Pallas splash attention on TPU; `auto` picks it there for long self-attention); see
    # sdjax/models/attention.py
    c.model.attention = "auto"
    # Splash attention (`flash`, and `auto` on TPU): the largest block of queries/keys (a multiple of 128;
    # blocks are chosen per sequence length up to it, sdjax/models/tpu_attention.py), and the self-attention
    # length from which `auto` runs the kernel on TPU (shorter ones and cross-attention stay with XLA).
    c.model.flash_block_size = 512
    c.model.flash_min_tokens = 1024
    # Run SDXL's transformer stacks (2 and 10 deep), each run of same-shaped layers in the UNet's down and up
    # blocks (SD 1.5: 5 runs of 2-3) and the CLIP text encoders' layers as one `nn.scan` each, so the compiler
    # sees one layer, not ten (MaxText's name). Same computation; the params of a scanned
    # stack are stored stacked (sdjax/models/layer_stacks.py), so a checkpoint resumes only with the setting it
    # was saved with. Pretrained folders load and exports are written either way. docs/models.md has its
    # compile times.
    c.model.scan_layers = False
    # A trained VAE for the UNet stage, replacing model.vae: a `sdjax train-vae` workdir or a diffusers folder.
    c.model.vae_from = ""
    # A VAE config file (configs/demo_vae.py): `sdjax train` first trains the VAE with it into model.vae_from
    # (default WORKDIR/vae), or resumes it there; skipped when a finished VAE run is already there.
    c.model.vae_config = ""
    c.model.unet = ml_collections.ConfigDict(dict(  # UNet2DConditionModel fields (sdjax/models/unet.py; SD 1.5 shapes)
        sample_size=64, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
        cross_attention_dim=768))
    c.model.vae = ml_collections.ConfigDict(dict(  # AutoencoderKL fields (sdjax/models/autoencoder_kl.py; SD 1.5 shapes)
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
    # `sdjax cache-latents` also stores the frozen text encoders' states, and training from that cache conditions
    # on them: the step runs the UNet alone (docs/data.md#latent-cache). Not with a trained text encoder.
    c.data.cache_text_states = False
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
    # XLA's effort at making the train step fast (openxla.org/xla/effort_levels): "" leaves the backend's
    # default (O2 on TPU) | "O0" | "O1" (on TPU it compiles faster: SD 1.5's FSDP step for v5e in 278 instead
    # of 1239 s, with 2.8 GiB more temporaries a chip and no pipelined FSDP all-gathers; docs/planning.md) |
    # "O2" | "O3". XLA:GPU reads the levels its own way (openxla.org/xla/gpu_optimization_levels).
    c.train.xla_optimization_level = ""
    c.train.remat = "none"  # UNet activations recomputed in the backward pass: | "minimal" | "full" (less memory)
    c.train.grad_accum = 1  # micro-batches per step (same update, 1/grad_accum of the activation memory)
    # The frozen VAE encodes each (micro-)batch's images in this many parts in sequence (`lax.map`), each part
    # taken from every device's examples: same latents, 1/vae_encode_chunks of the VAE's full-resolution
    # activations, the step's largest buffers at large batches (SD 1.5, 512 px: about 0.24 GiB an image).
    c.train.vae_encode_chunks = 1
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
    c.mesh.num_slices = 0  # TPU slices over DCN (multislice): 0 = the devices' slice count; data spans them
    return c


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"config.{key}={value!r} is invalid: {allowed}.")
        self.key = key


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file (configs/*.py), loaded by path as `--config FILE` loads it."""
    spec = importlib.util.spec_from_file_location("sdjax_config_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def find_config_file(path: str) -> str:
    """A config file as given, or else relative to the sdjax checkout (`model.vae_config=configs/demo_vae.py`
    works from any directory when sdjax is installed editable)."""
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (path, os.path.join(checkout, path)):
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError("model.vae_config", path, "expected a config file (e.g. configs/demo_vae.py)")
