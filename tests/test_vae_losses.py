"""The VAE stage's optional loss terms: LPIPS gives the `lpips` package's distance from its state dict file,
the patch-GAN's two terms each train only their own network, and a VAE run with both terms trains, checkpoints
and resumes with the LPIPS network frozen in its state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdjax import checkpoint as checkpoint_lib
from sdjax import data as data_lib
from sdjax import models as models_lib
from sdjax import train as train_lib
from sdjax import training_setup
from sdjax import vae as vae_lib
from sdjax.config import ConfigError
from sdjax.models import lpips as lpips_lib
from sdjax.models.discriminator import PatchDiscriminator
from sdjax.validation import validate

# VGG16's layer plan with narrow widths: the same code path as (64, 128, 256, 512, 512), fast on CPU.
NARROW_WIDTHS = (8, 16, 16, 32, 32)


class TorchLPIPS(torch.nn.Module):
    """The `lpips` package's LPIPS(net="vgg") written out in PyTorch (its ScalingLayer, torchvision's VGG16
    `features` cut into the package's five slices, NetLinLayer with dropout, normalize_tensor, spatial
    average), with the package's module names, so its state_dict has the package's keys."""

    def __init__(self, widths):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        plan = [widths[0]] * 2 + ["M"] + [widths[1]] * 2 + ["M"] + [widths[2]] * 3 + ["M"] + [widths[3]] * 3 + \
            ["M"] + [widths[4]] * 3  # torchvision's vgg16 "D" config up to relu5_3
        features, channels = [], 3
        for item in plan:
            if item == "M":
                features.append(torch.nn.MaxPool2d(2, 2))
            else:
                features += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU()]
                channels = item
        self.net = torch.nn.Module()
        for s, (start, stop) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):
            block = torch.nn.Sequential()
            for x in range(start, stop):
                block.add_module(str(x), features[x])
            self.net.add_module(f"slice{s + 1}", block)
        for s, width in enumerate(widths):
            lin = torch.nn.Module()
            lin.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(width, 1, 1, bias=False))
            torch.nn.init.uniform_(lin.model[1].weight, 0.0, 1.0 / width)  # calibrated weights are >= 0
            self.add_module(f"lin{s}", lin)

    def forward(self, in0, in1):
        h0, h1 = (in0 - self.shift) / self.scale, (in1 - self.shift) / self.scale
        value = 0
        for s in range(5):
            h0, h1 = getattr(self.net, f"slice{s + 1}")(h0), getattr(self.net, f"slice{s + 1}")(h1)
            f0 = h0 / (torch.sqrt(torch.sum(h0 ** 2, dim=1, keepdim=True)) + 1e-10)
            f1 = h1 / (torch.sqrt(torch.sum(h1 ** 2, dim=1, keepdim=True)) + 1e-10)
            value = value + getattr(self, f"lin{s}").model((f0 - f1) ** 2).mean([2, 3], keepdim=True)
        return value


def write_lpips_weights(path, widths=NARROW_WIDTHS, seed=0) -> TorchLPIPS:
    """A random LPIPS VGG in the `lpips` package's state dict layout, saved as safetensors at `path`."""
    torch.manual_seed(seed)
    network = TorchLPIPS(widths).eval()
    state = network.state_dict()
    state = {("scaling_layer." + k if k in ("shift", "scale") else k): v.contiguous() for k, v in state.items()}
    save_file(state, str(path))
    return network


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg.safetensors"
    return path, write_lpips_weights(path)


def test_lpips_matches_the_pytorch_lpips_forward(lpips_file):
    path, torch_lpips = lpips_file
    assert lpips_lib.read_widths(str(path)) == NARROW_WIDTHS
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 32, 32, 3)).astype(np.float32)
    others = np.clip(images + rng.normal(0, 0.3, images.shape), -1, 1).astype(np.float32)
    ours = lpips_lib.LPIPS(widths=NARROW_WIDTHS).apply({"params": lpips_lib.load_params(str(path))}, images, others)
    with torch.no_grad():
        theirs = torch_lpips(torch.from_numpy(images).permute(0, 3, 1, 2),
                             torch.from_numpy(others).permute(0, 3, 1, 2)).reshape(-1).numpy()
    assert np.all(theirs > 0)
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-7)
    same = lpips_lib.LPIPS(widths=NARROW_WIDTHS).apply({"params": lpips_lib.load_params(str(path))}, images, images)
    np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-7)


def test_perceptual_weight_needs_an_lpips_weights_file_naming_the_key(tmp_path):
    config = gan_vae_config("")
    with pytest.raises(ConfigError, match="lpips.LPIPS") as error:
        validate(config, num_devices=8)
    assert error.value.key == "vae_train.perceptual_weights"
    wrong = tmp_path / "not_lpips.safetensors"
    save_file({"weight": torch.zeros(3)}, str(wrong))
    config.vae_train.perceptual_weights = str(wrong)
    with pytest.raises(ConfigError, match="not an lpips VGG state dict"):
        validate(config, num_devices=8)


def test_discriminator_too_deep_for_the_images_is_refused_before_compiling():
    config = gan_vae_config("")
    config.vae_train.perceptual_weight = 0.0
    config.vae_train.discriminator_layers = 3  # 16 px: 2x2 after three halvings, nothing after two 4x4 convs
    with pytest.raises(ConfigError, match="data.resolution=16") as error:
        validate(config, num_devices=8)
    assert error.value.key == "vae_train.discriminator_layers"


def test_each_adversarial_term_trains_only_its_own_network():
    discriminator = PatchDiscriminator(channels=8, num_layers=2)
    rng = np.random.default_rng(0)
    pixels = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    reconstruction = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
    params = discriminator.init(jax.random.key(0), pixels)["params"]

    def term_grads(name):
        return jax.grad(lambda p, x: vae_lib.adversarial_losses(discriminator, p, pixels, x)[0][name],
                        argnums=(0, 1))(params, reconstruction)

    to_discriminator, to_reconstruction = term_grads("generator_loss")
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(to_discriminator))
    assert float(jnp.max(jnp.abs(to_reconstruction))) > 0
    to_discriminator, to_reconstruction = term_grads("discriminator_loss")
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(to_discriminator)) > 0
    assert float(jnp.max(jnp.abs(to_reconstruction))) == 0
    generator_grad = vae_lib.adversarial_losses(discriminator, params, pixels, reconstruction)[1]
    np.testing.assert_allclose(generator_grad, term_grads("generator_loss")[1], rtol=1e-6)


def test_last_layer_gradient_of_the_adaptive_gan_weight_is_the_decoders_conv_out_kernel_gradient():
    from tiny import tiny_vae_config
    config = tiny_vae_config()
    models = models_lib.build_models(config)
    params = models_lib.init_params(models, config, jax.random.key(0), components=("vae",))["vae"]
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.normal(size=(2, 6, 6, models.latent_channels)), jnp.float32)
    images, last_layer_grad = models_lib.decode_with_last_layer_vjp(models, params, latents)
    np.testing.assert_array_equal(images, models_lib.decode_unscaled_latents(models, params, latents))
    upstream = jnp.asarray(rng.normal(size=images.shape), jnp.float32)  # d loss / d images of some loss
    full = jax.grad(lambda p: jnp.sum(upstream * models_lib.decode_unscaled_latents(models, p, latents)))(params)
    np.testing.assert_allclose(last_layer_grad(upstream), full["decoder"]["conv_out"]["kernel"], rtol=1e-4,
                               atol=1e-6)


def gan_vae_config(perceptual_weights):
    from tiny import tiny_vae_config
    config = tiny_vae_config()
    # LDM's weight 0.5 with its adaptive rescaling, from when the reconstructions resemble the images.
    config.vae_train.update(perceptual_weight=1.0, perceptual_weights=str(perceptual_weights), gan_weight=0.5,
                            gan_start_step=12, discriminator_channels=16, discriminator_layers=2)
    return config


def test_vae_step_with_perceptual_and_gan_terms_trains_the_vae_and_its_discriminator(lpips_file):
    path, _ = lpips_file
    config = gan_vae_config(path)
    validate(config, num_devices=8)
    setup = training_setup.build(config)  # train.stage="vae": the VAE stage's step
    state = setup.create_state(jax.random.key(0))
    assert set(state.params) == {"vae", "discriminator"} and set(state.frozen) == {"perceptual"}
    frozen_before = jax.device_get(state.frozen)
    expected = lpips_lib.load_params(str(path))  # the file's weights, not a random init
    jax.tree.map(np.testing.assert_array_equal, frozen_before["perceptual"], expected)

    batch = setup.global_batch(data_lib.make_train_dataset(config, setup.models.tokenizer)[0])
    history = []
    for index in range(24):
        state, metrics = setup.train_step(state, batch, jax.random.key(1))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        history.append(metrics)
        reconstruction_terms = (metrics["l1"] + config.vae_train.kl_weight * metrics["kl"]
                                + config.vae_train.perceptual_weight * metrics["perceptual"])
        adversarial = metrics["gan_weight"] * metrics["generator_loss"] + metrics["discriminator_loss"]
        on = index >= config.vae_train.gan_start_step
        np.testing.assert_allclose(metrics["loss"], reconstruction_terms + on * adversarial, rtol=1e-5, atol=1e-6)
    assert history[-1]["l1"] < 0.6 * history[0]["l1"] and history[-1]["perceptual"] < history[0]["perceptual"]
    # The discriminator learns to tell the images from their reconstructions (last 6 steps vs its first).
    first, last = history[config.vae_train.gan_start_step], history[-6:]
    separation = lambda m: m["logits_real"] - m["logits_fake"]  # noqa: E731
    assert np.mean([separation(m) for m in last]) > separation(first) + 0.2
    assert np.mean([m["discriminator_loss"] for m in last]) < first["discriminator_loss"] - 0.1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.frozen), frozen_before)


@pytest.mark.slow  # compiles the step twice (two runs)
def test_vae_run_with_gan_and_perceptual_terms_checkpoints_and_resumes(lpips_file, tmp_path):
    path, _ = lpips_file
    config = gan_vae_config(path)
    config.train.steps = 4
    config.train.sample_every = 0
    config.train.checkpoint_every = 2
    workdir = str(tmp_path / "run")
    train_lib.train(config, workdir)
    config.train.steps = 6
    result = train_lib.train(config, workdir)  # resumes from step 4
    assert int(result.state.step) == 6 and set(result.last_metrics) >= {"generator_loss", "perceptual"}
    assert checkpoint_lib.load_inference_checkpoint(workdir, step=4).step == 4
    loaded = checkpoint_lib.load_inference_checkpoint(workdir)
    assert {"vae", "discriminator", "perceptual"} <= set(loaded.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.params["perceptual"], lpips_lib.load_params(str(path)))
    assert vae_lib.is_finished(workdir)
