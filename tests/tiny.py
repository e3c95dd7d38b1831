"""The smallest config that still exercises every part of the step (used by most tests)."""

import os


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# LLVM at -O0 for XLA:CPU (conftest.py sets it for the tests and the processes they start): the tests' tiny
# steps spend far longer compiling than running. Measured on the 2-core VM, the whole suite: 1829-1884 s ->
# 1039-1391 s (docs/tests.md).
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def load_config_file(name: str):
    """configs/NAME.py's config."""
    from sdjax import config as config_lib
    return config_lib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))


def tiny_config():
    c = load_config_file("demo")
    c.model.vae_config = ""  # no VAE stage: the tests' UNet runs on a random VAE (tests/test_vae.py trains one)
    c.data.source = "demo"
    c.data.demo_held_out = ()  # every caption: the batches the tests' tolerances were measured on
    c.data.resolution = 16
    # The UNet the tests' tolerances and compile counts were measured on; the demo's is wider, (64, 64).
    c.model.unet.block_out_channels = (32, 64)
    c.train.ema_decay = 0.999  # the tests cover the EMA path (the demo trains without)
    c.data.demo_num_examples = 64
    c.data.max_length = 77  # CLIP's: the tests' shapes and tolerances were written for it (the demo uses 16)
    c.data.num_threads = 1
    c.train.batch_size = 8
    c.train.steps = 4
    c.train.log_every = 1
    c.train.precision = "fp32"
    c.train.compilation_cache_dir = ""
    c.optimizer.warmup_steps = 2
    c.optimizer.learning_rate = 1e-3  # the demo trains at 2e-3
    c.optimizer.end_learning_rate = 1e-4
    c.mesh.fsdp_min_size = 256
    # The tolerances were measured on the plain epsilon loss with a frozen text encoder; the demo's v-prediction,
    # Min-SNR and text-encoder training have tests of their own (and the two-stage run in test_vae.py).
    c.diffusion.prediction_type = "epsilon"
    c.loss.snr_gamma = 0.0
    c.train.train_text_encoder = False
    return c


def tiny_sdxl_config():
    """tiny_config in SDXL's form (configs/sdxl.py): a second, projecting text encoder, the UNet's cross-
    attention over both encoders' hidden states (64 + 32 wide), its "text_time" embedding of the pooled
    projection and the micro-conditioning, and a stack of transformer blocks."""
    import ml_collections
    c = tiny_config()
    c.model.text_encoder_2 = ml_collections.ConfigDict(dict(
        vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        hidden_act="gelu", projection_dim=24))
    # Two transformer blocks at the second level (its mid block), as SDXL's stacks of 2 and 10: what
    # model.scan_layers scans.
    c.model.unet.update(cross_attention_dim=64 + 32, addition_embed_type="text_time", addition_time_embed_dim=8,
                        projection_class_embeddings_input_dim=24 + 6 * 8, transformer_layers_per_block=(1, 2))
    return c


DEMO_UNET_TRAINING = ("diffusion.prediction_type", "loss.snr_gamma", "train.train_text_encoder")


def with_demo_unet_training(config):
    """`config` with the demo's UNet-stage training settings (DEMO_UNET_TRAINING) again, in place."""
    demo = load_config_file("demo")
    for key in DEMO_UNET_TRAINING:
        section, name = key.split(".")
        config[section][name] = demo[section][name]
    return config


def tiny_vae_config():
    """tiny_config's VAE trained alone (the VAE stage), at a constant learning rate."""
    c = tiny_config()
    c.train.stage = "vae"
    c.train.steps = 30
    c.train.sample_every = 30  # one reconstruction grid, at the end
    c.train.eval_every = 0
    c.optimizer.update(learning_rate=2e-3, warmup_steps=0)
    c.vae_train.update(kl_weight=1e-5, scaling_examples=12, grid_images=4)
    return c


def run_train_steps(config, devices=None, num_steps: int = 2):
    """State and (loss, grad_norm) of `num_steps` steps on the first batches of the demo data, with the step
    compiled over a mesh of `devices` (default: all) as `sdjax train` compiles it."""
    import jax

    from sdjax import data as data_lib
    from sdjax import training_setup

    setup = training_setup.build(config, devices)
    state = setup.create_state(jax.random.key(0))
    dataset = data_lib.make_train_dataset(config, setup.models.tokenizer)
    losses = []
    for i in range(num_steps):
        state, metrics = setup.train_step(state, setup.global_batch(dataset[i]), jax.random.key(1))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    return state, losses


# Params after the same steps summed in another order (another sharding, two processes) agree to this,
# absolute (they are O(0.1)), when compared under comparable_config.
PARAMS_ATOL = 1e-5


def comparable_config(config):
    """`config` (in place) with Adam's eps at 1e-3, for comparing params between two reduction orders. Adam's
    g / (sqrt(v) + eps) is +-lr for any g >> eps, also for the rounding noise (~1e-9) in the exactly zero
    gradients of biases right before a GroupNorm: at eps 1e-8 that noise becomes lr-sized updates that differ
    between any two orders (seen: 1.01e-4 at lr 5e-4 under the tests' -O0 compiles). At 1e-3 such noise moves
    nothing, while gradients well above 1e-3 still take near-lr steps."""
    config.optimizer.eps = 1e-3
    return config


def small_state(step, ema=True):
    """A TrainState of a few small arrays, for tests of checkpoints that need no model."""
    import jax.numpy as jnp

    from sdjax import step as step_lib
    return step_lib.TrainState(
        step=jnp.asarray(step, jnp.int32), params={"unet": {"w": jnp.full((4,), 1.0)}},
        frozen={"vae": {"w": jnp.full((2,), 3.0)}, "text_encoder": {"w": jnp.full((3,), 4.0)}},
        opt_state=({"mu": {"unet": {"w": jnp.zeros((4,))}}},),
        ema_params={"unet": {"w": jnp.full((4,), 2.0)}} if ema else None)
