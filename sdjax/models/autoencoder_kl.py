"""Stable Diffusion's KL autoencoder (the VAE), as a Flax Linen module of our own.

diffusers removed its Flax models (0.40), so sdjax keeps the VAE here. The module has the fields, submodule
names and parameter tree of diffusers 0.39's `FlaxAutoencoderKL`, so checkpoints, the weight converters
(`pytorch_weights`, `pytorch_export`: the attention is still `query/key/value/proj_attn`, PyTorch's
`to_q/to_k/to_v/to_out.0`), LoRA targets and sharding rules read it unchanged. The numerics are PyTorch
`diffusers.AutoencoderKL`'s, the reference: tests/test_autoencoder_model.py compares the two.

Layouts: images go in and out NCHW, as in diffusers; inside, and for latents, channels-last (NHWC), as
diffusers' Flax VAE: `encode(pixels_nchw).latent_dist` has channels-last `mean` / `std`, and
`decode(latents_nhwc).sample` is NCHW.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.batch_sharding import shard_batch

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
ACTIVATION = "silu"
# GroupNorm's epsilon in every block of diffusers' VAE.
NORM_EPS = 1e-6

# Keys of a diffusers `vae/config.json` that only PyTorch's AutoencoderKL reads, with the values that leave it
# computing what this module computes: a config with another value is a model this module is not.
_PYTORCH_ONLY_KEYS = {
    "shift_factor": (None,),  # a latent shift (SD3, Flux) that the pipelines apply
    "latents_mean": (None,),  # per-channel latent statistics (SDXL-style pipelines)
    "latents_std": (None,),
    "use_quant_conv": (True,),
    "use_post_quant_conv": (True,),
    "mid_block_add_attention": (True,),
}
# A pipeline hint only (whether fp16 pipelines run the VAE in fp32): any value computes the same here.
_IGNORED_KEYS = ("force_upcast",)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: Any = "SAME") -> nn.Conv:
    return nn.Conv(features, kernel_size=(kernel, kernel), strides=(stride, stride), padding=padding,
                   dtype=dtype, name=name)


def _group_norm(groups: int, name: str) -> nn.GroupNorm:
    # No compute dtype, as in diffusers' Flax VAE: the statistics and the output are float32 (the next conv
    # casts); variance as PyTorch computes it, from the centred values.
    return nn.GroupNorm(num_groups=groups, epsilon=NORM_EPS, use_fast_variance=False, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus the input (through a 1x1 conv where the width changes)."""

    in_channels: int
    out_channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        for i in (1, 2):
            x = nn.swish(_group_norm(self.groups, f"norm{i}")(x))
            x = shard_batch(_conv(self.out_channels, 3, self.dtype, f"conv{i}")(x))
        if self.in_channels != self.out_channels:
            residual = _conv(self.out_channels, 1, self.dtype, "conv_shortcut", padding="VALID")(residual)
        return shard_batch(x + residual)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels, with a residual: the VAE's mid-block attention."""

    channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, channels = x.shape
        h = _group_norm(self.groups, "group_norm")(x).reshape(batch, height * width, channels)
        query, key, value = (nn.Dense(self.channels, dtype=self.dtype, name=name)(h)
                             for name in ("query", "key", "value"))
        scores = jnp.einsum("bqc,bkc->bqk", query, key) / math.sqrt(channels)
        # Softmax in float32 whatever the compute dtype, as PyTorch's fused attention kernels keep it (diffusers'
        # Flax VAE took it in the compute dtype).
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(value.dtype)
        h = jnp.einsum("bqk,bkc->bqc", weights, value)
        h = nn.Dense(self.channels, dtype=self.dtype, name="proj_attn")(h)
        return shard_batch(h.reshape(batch, height, width, channels) + x)


class UNetMidBlock2D(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (diffusers' UNetMidBlock2D, one layer)."""

    channels: int
    groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = ResnetBlock2D(self.channels, self.channels, self.groups, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.channels, self.groups, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.channels, self.groups, self.dtype, name="resnets_1")(x)


class Downsample2D(nn.Module):
    """Halves height and width: a stride-2 3x3 conv after padding one pixel on the bottom and right only (as
    the original LDM autoencoder and diffusers' PyTorch VAE do, not SAME padding)."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return _conv(self.channels, 3, self.dtype, "conv", stride=2, padding="VALID")(x)


class Upsample2D(nn.Module):
    """Doubles height and width: nearest-neighbour (each pixel repeated 2x2), then a 3x3 conv."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, self.dtype, "conv")(x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets, then (but in the last block) a downsampling."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            x = ResnetBlock2D(in_channels, self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets, then (but in the last block) an upsampling."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            x = ResnetBlock2D(in_channels, self.out_channels, self.groups, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Images NHWC -> the posterior's moments NHWC (2 x `out_channels`: mean and log-variance), before
    quant_conv."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths, groups = self.block_out_channels, self.norm_num_groups
        x = _conv(widths[0], 3, self.dtype, "conv_in")(x)
        for i, width in enumerate(widths):
            x = DownEncoderBlock2D(widths[max(i - 1, 0)], width, self.layers_per_block, groups,
                                   add_downsample=i < len(widths) - 1, dtype=self.dtype, name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(widths[-1], groups, self.dtype, name="mid_block")(x)
        x = nn.swish(_group_norm(groups, "conv_norm_out")(x))
        return _conv(2 * self.out_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latents NHWC (after post_quant_conv) -> images NHWC."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    norm_num_groups: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        widths, groups = tuple(reversed(self.block_out_channels)), self.norm_num_groups
        x = _conv(widths[0], 3, self.dtype, "conv_in")(x)
        x = UNetMidBlock2D(widths[0], groups, self.dtype, name="mid_block")(x)
        for i, width in enumerate(widths):
            # One resnet more per block than the encoder's, as in diffusers.
            x = UpDecoderBlock2D(widths[max(i - 1, 0)], width, self.layers_per_block + 1, groups,
                                 add_upsample=i < len(widths) - 1, dtype=self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.swish(_group_norm(groups, "conv_norm_out")(x))
        return _conv(self.out_channels, 3, self.dtype, "conv_out")(x)


@flax.struct.dataclass
class DiagonalGaussianDistribution:
    """The VAE posterior N(mean, exp(logvar)), channels-last, as diffusers' (log-variance clipped to
    [-30, 20])."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussianDistribution:
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape)

    def mode(self) -> jax.Array:
        return self.mean


@flax.struct.dataclass
class EncoderOutput:
    latent_dist: DiagonalGaussianDistribution


@flax.struct.dataclass
class DecoderOutput:
    sample: jax.Array  # images NCHW


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE: images NCHW <-> latents NHWC (`encode`, `decode`); calling it reconstructs.

    The fields are diffusers' `FlaxAutoencoderKL`'s (its `vae/config.json` keys, read by `from_config`);
    `dtype` is the compute dtype (parameters are float32)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,)
    up_block_types: tuple[str, ...] = (UP_BLOCK,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = ACTIVATION
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    dtype: jnp.dtype = jnp.float32

    def __post_init__(self):
        _check_architecture(self.down_block_types, self.up_block_types, self.block_out_channels, self.act_fn)
        super().__post_init__()

    @classmethod
    def from_config(cls, config: dict, **overrides) -> AutoencoderKL:
        """The VAE of a diffusers `vae/config.json` (as a dict), with `overrides` (e.g. `dtype`) on top.

        diffusers' bookkeeping keys (`_class_name`, ...) are skipped; PyTorch-only keys are accepted at the
        values under which PyTorch computes what this module does; anything else is a ValueError."""
        fields = set(_config_fields())
        values = {}
        for key, value in {**config, **overrides}.items():
            if key.startswith("_") or key in _IGNORED_KEYS:
                continue
            if key in _PYTORCH_ONLY_KEYS:
                if value not in _PYTORCH_ONLY_KEYS[key]:
                    raise ValueError(f"VAE config {key}={value!r} is not supported: sdjax's AutoencoderKL "
                                     f"computes the model with {key}={_PYTORCH_ONLY_KEYS[key][0]!r} only.")
                continue
            if key not in fields and key != "dtype":
                raise ValueError(f"VAE config key {key}={value!r} is not supported: sdjax's AutoencoderKL takes "
                                 f"{sorted(fields)} (and {sorted(_PYTORCH_ONLY_KEYS)} at their defaults).")
            values[key] = tuple(value) if isinstance(value, list) else value  # JSON lists: hashable tuples
        return cls(**values)

    @property
    def config(self) -> dict:
        """The diffusers config fields (what `vae/config.json` holds, less diffusers' bookkeeping)."""
        return {name: getattr(self, name) for name in _config_fields()}

    def setup(self):
        common = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
                      norm_num_groups=self.norm_num_groups, dtype=self.dtype)
        self.encoder = Encoder(out_channels=self.latent_channels, **common)
        self.decoder = Decoder(out_channels=self.out_channels, **common)
        self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, "quant_conv", padding="VALID")
        self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, "post_quant_conv", padding="VALID")

    def encode(self, sample: jax.Array) -> EncoderOutput:
        """Images NCHW -> the posterior (channels-last)."""
        moments = self.quant_conv(self.encoder(jnp.transpose(sample, (0, 2, 3, 1))))
        return EncoderOutput(latent_dist=DiagonalGaussianDistribution.from_moments(moments))

    def decode(self, latents: jax.Array) -> DecoderOutput:
        """Latents NHWC (unscaled) -> images NCHW. Always channels-last: diffusers' Flax VAE guessed the layout
        from the last dimension, which fails on latents as wide as they have channels."""
        images = self.decoder(self.post_quant_conv(latents))
        return DecoderOutput(sample=jnp.transpose(images, (0, 3, 1, 2)))

    def __call__(self, sample: jax.Array, sample_posterior: bool = False) -> DecoderOutput:
        """Images NCHW -> their reconstruction NCHW, through the posterior's mean or (`sample_posterior`) a
        sample of it (rng stream "gaussian")."""
        posterior = self.encode(sample).latent_dist
        latents = posterior.sample(self.make_rng("gaussian")) if sample_posterior else posterior.mode()
        return self.decode(latents)


def _config_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(AutoencoderKL) if f.name not in ("parent", "name", "dtype"))


def _check_architecture(down_block_types, up_block_types, block_out_channels, act_fn) -> None:
    levels = len(block_out_channels)
    for key, types, supported in (("down_block_types", down_block_types, DOWN_BLOCK),
                                  ("up_block_types", up_block_types, UP_BLOCK)):
        if any(t != supported for t in types) or len(types) != levels:
            raise ValueError(f"VAE config {key}={tuple(types)!r} is not supported: sdjax's AutoencoderKL takes "
                             f"{supported!r} for each of the {levels} levels of block_out_channels.")
    if act_fn != ACTIVATION:
        raise ValueError(f"VAE config act_fn={act_fn!r} is not supported: sdjax's AutoencoderKL takes "
                         f"{ACTIVATION!r} only.")
