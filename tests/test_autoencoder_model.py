"""sdjax's AutoencoderKL (sdjax/models/autoencoder_kl.py): diffusers' PyTorch AutoencoderKL computes the same
from the same weights (posterior mean and std, decoded images, reconstructions, and gradients w.r.t. images,
latents and every parameter), with 2 and 3 levels; the parameter count of SD's VAE; `from_config` on diffusers
configs. (Against diffusers 0.39's FlaxAutoencoderKL, which it replaced, while both existed: the same
parameter tree and config, outputs within 5.8e-6, gradients within 2e-6 relative.)

Tolerances: float32 on CPU, tiny models. Outputs: max abs diff <= 1e-4 against PyTorch. Gradients: max abs
diff <= 1e-4 x the largest gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as PyTorchAutoencoderKL
from flax.traverse_util import flatten_dict

from sdjax.models import pytorch_weights
from sdjax.models.autoencoder_kl import AutoencoderKL

ATOL_PYTORCH = 1e-4
ATOL_OLD_FLAX = 1e-5
GRAD_RTOL_PYTORCH = 1e-4  # of the largest gradient magnitude
GRAD_RTOL_OLD_FLAX = 1e-5

IMAGE = 16  # pixels; latents 8x8 with 2 levels, 4x4 with 3 (as wide as the latents have channels)


def _levels(widths, layers_per_block):
    return dict(block_out_channels=widths, layers_per_block=layers_per_block, norm_num_groups=4, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * len(widths),
                up_block_types=("UpDecoderBlock2D",) * len(widths), sample_size=IMAGE)


CONFIGS = {"2_levels": _levels((8, 16), 2), "3_levels": _levels((8, 16, 16), 1)}


def _pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 3, IMAGE, IMAGE)).astype(np.float32)


def _latents(name: str) -> np.ndarray:
    """Channels-last latents at the VAE's latent size."""
    side = IMAGE // 2 ** (len(CONFIGS[name]["block_out_channels"]) - 1)
    return np.random.default_rng(1).standard_normal((2, side, side, 4)).astype(np.float32)


def _init_rngs():
    return {"params": jax.random.key(0), "gaussian": jax.random.key(1), "dropout": jax.random.key(2)}


def _shapes(module):
    sample = jnp.zeros((1, 3, IMAGE, IMAGE), jnp.float32)
    return jax.eval_shape(lambda: module.init(_init_rngs(), sample))["params"]


@functools.cache
def _pytorch_model_and_params(name: str):
    """The PyTorch VAE (float32, eval mode) with random weights, and those weights in our param tree."""
    torch.manual_seed(0)
    model = PyTorchAutoencoderKL(**CONFIGS[name]).eval()
    with torch.no_grad():  # off init's zero biases and unit norms, so a misplaced weight shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, pytorch_weights.pytorch_to_flax(state, _shapes(AutoencoderKL(**CONFIGS[name])), "vae")


def _max_diffs(ours: dict, theirs: dict) -> dict:
    assert ours.keys() == theirs.keys()
    return {name: float(np.max(np.abs(np.asarray(ours[name]) - np.asarray(theirs[name])))) for name in ours}


def _loss_weights(name: str) -> dict:
    """Random weights of a scalar loss over the posterior's mean and std and the decoded latents."""
    side, rng = _latents(name).shape[1], np.random.default_rng(2)
    shapes = {"mean": (2, side, side, 4), "std": (2, side, side, 4), "decoded": (2, 3, IMAGE, IMAGE)}
    return {key: rng.standard_normal(shape).astype(np.float32) for key, shape in shapes.items()}


SAMPLE_RNG = jax.random.key(3)


def _outputs_and_gradients(vae, name: str):
    """A compiled (params, pixels, latents) -> (outputs, gradients) of `vae` (ours or diffusers' Flax VAE):
    outputs {mean, std (channels-last), sample (SAMPLE_RNG), decoded (NCHW, from channels-last latents),
    reconstructed (the call: through the mean)}; gradients of `_loss_weights`' loss w.r.t. every parameter,
    ("pixels",) and ("latents",)."""
    weights = _loss_weights(name)

    def loss(params, pixels, latents):
        posterior = vae.apply({"params": params}, pixels, method=vae.encode).latent_dist
        outputs = {"mean": posterior.mean, "std": posterior.std,
                   "decoded": vae.apply({"params": params}, latents, method=vae.decode).sample}
        return sum(jnp.sum(outputs[key] * w) for key, w in weights.items()), \
            {**outputs, "sample": posterior.sample(SAMPLE_RNG)}

    def outputs_and_gradients(params, pixels, latents):
        (_, outputs), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, pixels, latents)
        outputs["reconstructed"] = vae.apply({"params": params}, pixels).sample
        return outputs, {**flatten_dict(grads[0]), ("pixels",): grads[1], ("latents",): grads[2]}

    return jax.jit(outputs_and_gradients)


@functools.cache
def _ours(name: str):
    """Our VAE's outputs and gradients for CONFIGS[name] (computed once, for every test that compares them)."""
    params = _pytorch_model_and_params(name)[1]
    return _outputs_and_gradients(AutoencoderKL(**CONFIGS[name]), name)(params, _pixels(), _latents(name))


# --- PyTorch, the reference ----------------------------------------------------------------------------


@functools.cache
def _pytorch(name: str):
    """The PyTorch VAE's outputs and gradients, as `_outputs_and_gradients` names them (no sample)."""
    model, _ = _pytorch_model_and_params(name)
    pixels = torch.from_numpy(_pixels()).requires_grad_()
    latents = torch.from_numpy(_latents(name)).requires_grad_()
    posterior = model.encode(pixels).latent_dist
    outputs = {"mean": posterior.mean.permute(0, 2, 3, 1), "std": posterior.std.permute(0, 2, 3, 1),
               "decoded": model.decode(latents.permute(0, 3, 1, 2)).sample}
    model.zero_grad()
    sum(torch.sum(outputs[key] * torch.from_numpy(w)) for key, w in _loss_weights(name).items()).backward()
    with torch.no_grad():
        outputs["reconstructed"] = model(pixels).sample
    grads = flatten_dict(pytorch_weights.pytorch_to_flax(
        {key: p.grad.numpy() for key, p in model.named_parameters()}, _shapes(AutoencoderKL(**CONFIGS[name])),
        "gradients"))
    grads.update({("pixels",): pixels.grad.numpy(), ("latents",): latents.grad.numpy()})
    return {key: value.detach().numpy() for key, value in outputs.items()}, grads


@pytest.mark.parametrize("name", CONFIGS)
def test_outputs_match_pytorch(name):
    """Posterior mean and std, decoded latents (channels-last in: with 3 levels the latents are 4x4 with 4
    channels, where diffusers' Flax VAE guessed the layout) and the reconstruction."""
    ours = {key: value for key, value in _ours(name)[0].items() if key != "sample"}
    diffs = _max_diffs(ours, _pytorch(name)[0])
    assert max(diffs.values()) <= ATOL_PYTORCH, diffs


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_match_pytorch(name):
    """Of a loss over the posterior's mean and std and the decoded latents: w.r.t. the images, the latents and
    every parameter."""
    ours, theirs = _ours(name)[1], _pytorch(name)[1]
    scale = max(float(np.max(np.abs(g))) for g in theirs.values())
    diffs = _max_diffs(ours, theirs)
    assert max(diffs.values()) <= GRAD_RTOL_PYTORCH * scale, (scale, sorted(diffs.items(), key=lambda kv: -kv[1])[:3])


@pytest.mark.parametrize("name", CONFIGS)
def test_sample_draws_mean_plus_std_times_normal_noise(name):
    """The posterior's `sample(rng)`: mean + std * jax.random.normal(rng), channels-last, as diffusers' Flax
    posterior (what sdjax's latent cache relies on: a sample from stored moments equals encoding then)."""
    outputs = _ours(name)[0]
    assert outputs["sample"].shape == _latents(name).shape
    expected = outputs["mean"] + outputs["std"] * jax.random.normal(SAMPLE_RNG, outputs["mean"].shape)
    np.testing.assert_allclose(outputs["sample"], expected, atol=1e-6)


def test_sampled_reconstruction_uses_the_gaussian_rng_stream():
    name = "2_levels"
    vae, params = AutoencoderKL(**CONFIGS[name]), _pytorch_model_and_params(name)[1]
    pixels = _pixels()

    def reconstruct(params, seed):
        return vae.apply({"params": params}, pixels, sample_posterior=True,
                         rngs={"gaussian": jax.random.key(seed)}).sample

    run = jax.jit(reconstruct)
    first, again, other = run(params, 0), run(params, 0), run(params, 1)
    np.testing.assert_array_equal(first, again)
    assert float(np.max(np.abs(first - other))) > 1e-3


# --- configs ---------------------------------------------------------------------------------------------


def test_parameter_count_of_sd_vae():
    from tiny import load_config_file
    for config_name in ("sd15", "sd21", "sdxl"):  # the same VAE architecture
        shapes = _shapes(AutoencoderKL(**load_config_file(config_name).model.vae.to_dict()))
        assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 83_653_863, config_name


# SD 1.5's vae/config.json as diffusers writes it today (SDXL's differs in sample_size and scaling_factor).
SD_VAE_CONFIG_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.39.0", "_name_or_path": "/models/sd15/vae",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "force_upcast": True, "in_channels": 3, "latent_channels": 4, "latents_mean": None, "latents_std": None,
    "layers_per_block": 2, "mid_block_add_attention": True, "norm_num_groups": 32, "out_channels": 3,
    "sample_size": 512, "scaling_factor": 0.18215, "shift_factor": None, "use_post_quant_conv": True,
    "use_quant_conv": True,
}


def test_from_config_reads_a_diffusers_config():
    vae = AutoencoderKL.from_config(SD_VAE_CONFIG_JSON, dtype=jnp.bfloat16)
    assert vae.block_out_channels == (128, 256, 512, 512) and vae.latent_channels == 4
    assert vae.scaling_factor == 0.18215 and vae.dtype == jnp.bfloat16 and vae.layers_per_block == 2
    assert AutoencoderKL.from_config({**SD_VAE_CONFIG_JSON, "force_upcast": False}).sample_size == 512


def test_from_config_overrides_win():
    assert AutoencoderKL.from_config(SD_VAE_CONFIG_JSON, scaling_factor=0.5).scaling_factor == 0.5


@pytest.mark.parametrize("key,value,message", [
    ("use_quant_conv", False, r"use_quant_conv=False is not supported.*use_quant_conv=True"),
    ("use_post_quant_conv", False, r"use_post_quant_conv=False is not supported"),
    ("mid_block_add_attention", False, r"mid_block_add_attention=False is not supported"),
    ("shift_factor", 0.1159, r"shift_factor=0.1159 is not supported.*shift_factor=None"),
    ("latents_mean", [0.0] * 4, r"latents_mean=\[0.0, 0.0, 0.0, 0.0\] is not supported"),
    ("mid_block_type", "UNetMidBlock2D", r"key mid_block_type='UNetMidBlock2D' is not supported.*'act_fn'"),
    ("act_fn", "gelu", r"act_fn='gelu' is not supported.*'silu'"),
    ("down_block_types", ["DownEncoderBlock2D"] * 3, r"down_block_types=.* for each of the 4 levels"),
    ("up_block_types", ["AttnUpDecoderBlock2D"] * 4, r"up_block_types=.*'UpDecoderBlock2D'"),
])
def test_from_config_rejects_what_it_cannot_compute(key, value, message):
    with pytest.raises(ValueError, match=message):
        AutoencoderKL.from_config({**SD_VAE_CONFIG_JSON, key: value})


def test_config_round_trips():
    vae = AutoencoderKL(**CONFIGS["3_levels"], scaling_factor=0.13025)
    assert vae.config["block_out_channels"] == (8, 16, 16) and "dtype" not in vae.config
    assert AutoencoderKL.from_config(vae.config) == vae
