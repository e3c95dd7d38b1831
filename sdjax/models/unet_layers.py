"""The UNet's building blocks: timestep embeddings, ResNet blocks, down/up sampling, and the down, mid and up
blocks that stack them with the spatial transformers of `unet_attention`.

Linen modules on NHWC features with the parameter trees of diffusers' Flax classes (`FlaxResnetBlock2D`,
`FlaxCrossAttnDownBlock2D`, ...) and the numerics of its PyTorch ones. `remat` (`train.remat`: none | minimal
| full) wraps each ResnetBlock2D and Transformer2DModel in `nn.remat` with sdjax/models/remat.py's policy: the
granularity of PyTorch's `enable_gradient_checkpointing`; the parameter tree stays the same.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

import sdjax.models.remat as remat_lib
from sdjax.models.unet_attention import Transformer2DModel

REMAT = ("none", *remat_lib.POLICIES)


def check_remat(name: str) -> None:
    if name not in REMAT:
        raise ValueError(f"train.remat={name!r} is not one of {list(REMAT)}.")


def rematerialized(block: type[nn.Module], remat: str) -> type[nn.Module]:
    """`block` (a module called as (self, x, y, deterministic)), recomputed in the backward pass with policy
    `remat`; `deterministic` is static (it switches dropout)."""
    if remat == "none":
        return block
    return nn.remat(block, policy=remat_lib.POLICIES[remat], static_argnums=(3,))


# --- timestep embeddings -----------------------------------------------------------------------------------


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding [N, dim] of timesteps [N] (possibly fractional), as PyTorch's
    `get_timestep_embedding`: frequencies max_period^(-i / (dim/2 - freq_shift)); sin then cos, or cos then sin
    with `flip_sin_to_cos`. (diffusers' Flax version computed the same frequencies in another order of float
    operations.)"""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    parts = (jnp.cos(angles), jnp.sin(angles)) if flip_sin_to_cos else (jnp.sin(angles), jnp.cos(angles))
    return jnp.concatenate(parts, axis=-1)


class TimestepEmbedding(nn.Module):
    """Linear, SiLU, linear: the learned embedding of a sinusoidal one (or of SDXL's pooled text + time ids)."""

    dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, embedding):
        embedding = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(embedding)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(embedding))


# --- ResNet blocks and resampling --------------------------------------------------------------------------


def _conv3x3(features: int, dtype, name: str, strides: int = 1) -> nn.Conv:
    return nn.Conv(features, kernel_size=(3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                   dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, + the projected time embedding, GroupNorm, SiLU, dropout, 3x3 conv; plus the
    input (through a 1x1 conv where the channels change)."""

    in_channels: int
    out_channels: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states, temb, deterministic=True):
        residual = hidden_states
        hidden_states = nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="norm1")(hidden_states))
        hidden_states = _conv3x3(self.out_channels, self.dtype, "conv1")(hidden_states)
        temb = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        hidden_states = hidden_states + temb[:, None, None, :]
        hidden_states = nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="norm2")(hidden_states))
        hidden_states = nn.Dropout(self.dropout)(hidden_states, deterministic=deterministic)
        hidden_states = _conv3x3(self.out_channels, self.dtype, "conv2")(hidden_states)
        if self.in_channels != self.out_channels:
            residual = nn.Conv(self.out_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                               name="conv_shortcut")(residual)
        return hidden_states + residual


class Downsample2D(nn.Module):
    """A 3x3 conv of stride 2 (padding 1): half the height and width."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        return _conv3x3(self.out_channels, self.dtype, "conv", strides=2)(hidden_states)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to twice the height and width, then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        hidden_states = jnp.repeat(jnp.repeat(hidden_states, 2, axis=1), 2, axis=2)
        return _conv3x3(self.out_channels, self.dtype, "conv")(hidden_states)


# --- down, mid and up blocks -------------------------------------------------------------------------------


class _Block(nn.Module):
    """What every down, mid and up block is built with; their ResNet and transformer layers come from here."""

    dropout: float
    remat: str
    dtype: jnp.dtype

    def resnet(self, in_channels: int, out_channels: int, name: str) -> nn.Module:
        return rematerialized(ResnetBlock2D, self.remat)(in_channels, out_channels, self.dropout, self.dtype,
                                                         name=name)


class _AttentionBlock(_Block):
    """A block with a spatial transformer after each ResNet block."""

    heads: int
    transformer_depth: int
    use_linear_projection: bool
    only_cross_attention: bool
    kernel: str
    scan_layers: bool

    def transformer(self, channels: int, name: str) -> nn.Module:
        # A scanned stack is rematerialised a layer at a time inside its scan (Transformer2DModel), not whole.
        scanned = self.scan_layers and self.transformer_depth > 1
        return rematerialized(Transformer2DModel, "none" if scanned else self.remat)(
            channels, self.heads, channels // self.heads, self.transformer_depth, self.dropout,
            self.use_linear_projection, self.only_cross_attention, self.kernel, self.dtype, self.scan_layers,
            self.remat if scanned else "none", name=name)


class DownBlock2D(_Block):
    """`num_layers` ResNet blocks, then a Downsample2D unless it is the last level. Returns the features and
    each layer's output (the skip connections the up blocks take)."""

    in_channels: int
    out_channels: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, hidden_states, temb, deterministic=True):
        outputs = ()
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            hidden_states = self.resnet(in_channels, self.out_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
            outputs += (hidden_states,)
        if self.add_downsample:
            hidden_states = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class CrossAttnDownBlock2D(_AttentionBlock):
    """DownBlock2D with a Transformer2DModel after each ResNet block, attending to `context`."""

    in_channels: int
    out_channels: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, hidden_states, temb, context, deterministic=True):
        outputs = ()
        for i in range(self.num_layers):
            in_channels = self.in_channels if i == 0 else self.out_channels
            hidden_states = self.resnet(in_channels, self.out_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
            hidden_states = self.transformer(self.out_channels, f"attentions_{i}")(
                hidden_states, context, deterministic)
            outputs += (hidden_states,)
        if self.add_downsample:
            hidden_states = Downsample2D(self.out_channels, self.dtype, name="downsamplers_0")(hidden_states)
            outputs += (hidden_states,)
        return hidden_states, outputs


class UNetMidBlock2DCrossAttn(_AttentionBlock):
    """ResNet block, Transformer2DModel, ResNet block, at the lowest resolution."""

    channels: int

    @nn.compact
    def __call__(self, hidden_states, temb, context, deterministic=True):
        hidden_states = self.resnet(self.channels, self.channels, "resnets_0")(hidden_states, temb, deterministic)
        hidden_states = self.transformer(self.channels, "attentions_0")(hidden_states, context, deterministic)
        return self.resnet(self.channels, self.channels, "resnets_1")(hidden_states, temb, deterministic)


def _up_resnet_in_channels(block, i: int) -> int:
    """Channels into an up block's i-th ResNet block: the features so far plus the skip connection it takes
    (the last one comes from the level below: `in_channels`)."""
    skip = block.in_channels if i == block.num_layers - 1 else block.out_channels
    return (block.prev_output_channel if i == 0 else block.out_channels) + skip


class UpBlock2D(_Block):
    """`num_layers` ResNet blocks, each on the features concatenated with the last of the remaining skip
    connections, then an Upsample2D unless it is the last level."""

    in_channels: int
    out_channels: int
    prev_output_channel: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, hidden_states, skips, temb, deterministic=True):
        for i in range(self.num_layers):
            hidden_states = jnp.concatenate((hidden_states, skips[-1 - i]), axis=-1)
            hidden_states = self.resnet(_up_resnet_in_channels(self, i), self.out_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
        if self.add_upsample:
            hidden_states = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(hidden_states)
        return hidden_states


class CrossAttnUpBlock2D(_AttentionBlock):
    """UpBlock2D with a Transformer2DModel after each ResNet block, attending to `context`."""

    in_channels: int
    out_channels: int
    prev_output_channel: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, hidden_states, skips, temb, context, deterministic=True):
        for i in range(self.num_layers):
            hidden_states = jnp.concatenate((hidden_states, skips[-1 - i]), axis=-1)
            hidden_states = self.resnet(_up_resnet_in_channels(self, i), self.out_channels, f"resnets_{i}")(
                hidden_states, temb, deterministic)
            hidden_states = self.transformer(self.out_channels, f"attentions_{i}")(
                hidden_states, context, deterministic)
        if self.add_upsample:
            hidden_states = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(hidden_states)
        return hidden_states
