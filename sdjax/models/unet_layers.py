"""The UNet's building blocks: timestep embeddings, ResNet blocks, down/up sampling, and the down, mid and up
blocks that stack them with the spatial transformers of `unet_attention`.

Linen modules on NHWC features with the parameter trees of diffusers' Flax classes (`FlaxResnetBlock2D`,
`FlaxCrossAttnDownBlock2D`, ...) and the numerics of its PyTorch ones. `remat` (`train.remat`: none | minimal
| full) wraps each ResnetBlock2D and Transformer2DModel in `nn.remat` with sdjax/models/remat.py's policy: the
granularity of PyTorch's `enable_gradient_checkpointing`; the parameter tree stays the same. With
`scan_layers`, a block's runs of same-shaped layers are scanned (`_Block.layers`), their params stacked.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.models.batch_sharding import shard_batch
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
        hidden_states = shard_batch(nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="norm1")(hidden_states)))
        hidden_states = shard_batch(_conv3x3(self.out_channels, self.dtype, "conv1")(hidden_states))
        temb = shard_batch(nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(
            nn.silu(shard_batch(temb))))
        hidden_states = hidden_states + temb[:, None, None, :]
        hidden_states = shard_batch(nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="norm2")(hidden_states)))
        hidden_states = nn.Dropout(self.dropout)(hidden_states, deterministic=deterministic)
        hidden_states = shard_batch(_conv3x3(self.out_channels, self.dtype, "conv2")(hidden_states))
        if self.in_channels != self.out_channels:
            residual = nn.Conv(self.out_channels, kernel_size=(1, 1), padding="VALID", dtype=self.dtype,
                               name="conv_shortcut")(residual)
        return shard_batch(hidden_states + residual)


class Downsample2D(nn.Module):
    """A 3x3 conv of stride 2 (padding 1): half the height and width."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        return shard_batch(_conv3x3(self.out_channels, self.dtype, "conv", strides=2)(hidden_states))


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to twice the height and width, then a 3x3 conv."""

    out_channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        # Pinned on both sides: jax 0.12's XLA otherwise moved the backward's sum over the repeated pixels
        # (the transpose of the repeat) with an all-to-all (tests/test_fsdp.py).
        hidden_states = shard_batch(jnp.repeat(shard_batch(jnp.repeat(hidden_states, 2, axis=1)), 2, axis=2))
        return shard_batch(_conv3x3(self.out_channels, self.dtype, "conv")(hidden_states))


# --- down, mid and up blocks -------------------------------------------------------------------------------


def resnet_layer(in_channels: int, out_channels: int, dropout: float, remat: str, dtype, name: str) -> nn.Module:
    return rematerialized(ResnetBlock2D, remat)(in_channels, out_channels, dropout, dtype, name=name)


def transformer_layer(channels: int, heads: int, depth: int, dropout: float, use_linear_projection: bool,
                      only_cross_attention: bool, kernel, dtype, scan_layers: bool, remat: str,
                      name: str) -> nn.Module:
    # A scanned stack is rematerialised a layer at a time inside its scan (Transformer2DModel), not whole.
    scanned = scan_layers and depth > 1
    return rematerialized(Transformer2DModel, "none" if scanned else remat)(
        channels, heads, channels // heads, depth, dropout, use_linear_projection, only_cross_attention, kernel,
        dtype, scan_layers, remat if scanned else "none", name=name)


class _Block(nn.Module):
    """What every down, mid and up block is built with; their ResNet and transformer layers come from here.

    `scan_layers` (model.scan_layers): a run of consecutive layers of the same shape (the same ResNet input
    channels: SD 1.5's first down block and the last two layers of its last up block at 64x64, ...) runs as
    one `nn.scan` over a `_Layer` named `layers_{first}_to_{last}`, whose `resnet` and `attention` parameters
    are stacked on a leading axis (sdjax/models/layer_stacks.py converts to and from `resnets_{i}`,
    `attentions_{i}`); the compiler sees one layer per run. Each layer's ResNet block and transformer are
    rematerialised as unrolled ones are (`remat`), inside the scan."""

    dropout: float
    remat: str
    dtype: jnp.dtype
    scan_layers: bool = False

    def resnet(self, in_channels: int, out_channels: int, name: str) -> nn.Module:
        return resnet_layer(in_channels, out_channels, self.dropout, self.remat, self.dtype, name)

    def attention_fields(self) -> dict:
        """The _Layer fields of this block's transformer (none: a block of ResNet blocks only)."""
        return {}

    def layers(self, hidden_states, in_channels: list[int], temb, context, deterministic, skips=None):
        """The block's layers, layer i: [`skips[i]` concatenated to the features (up blocks)], a ResNet block
        from `in_channels[i]` to `out_channels`, [a transformer]. Returns the features and each layer's
        output."""
        attention = self.attention_fields()
        outputs = []
        for first, last in _runs(in_channels) if self.scan_layers else [(i, i) for i in range(len(in_channels))]:
            if first == last:
                if skips is not None:
                    hidden_states = jnp.concatenate((hidden_states, skips[first]), axis=-1)
                hidden_states = self.resnet(in_channels[first], self.out_channels, f"resnets_{first}")(
                    hidden_states, temb, deterministic)
                if attention:
                    hidden_states = self.transformer(self.out_channels, f"attentions_{first}")(
                        hidden_states, context, deterministic)
                outputs.append(hidden_states)
                continue
            layer = _Layer(in_channels[first], self.out_channels, self.dropout, self.remat, self.dtype,
                           **attention, name=f"layers_{first}_to_{last}")
            run_skips = None if skips is None else jnp.stack(skips[first:last + 1])
            hidden_states, run_outputs = _scan_run(layer, hidden_states, run_skips, temb, context, deterministic,
                                                   last - first + 1)
            outputs.extend(run_outputs[i] for i in range(last - first + 1))
        return hidden_states, outputs


def _runs(in_channels: list[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive equal entries: [640, 320, 320] -> [(0, 0), (1, 2)]."""
    runs = []
    for i, channels in enumerate(in_channels):
        if runs and in_channels[runs[-1][1]] == channels:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


class _Layer(nn.Module):
    """One layer of a down or up block, as a scanned run repeats it: the skip connection concatenated (up
    blocks: `skip` not None), a ResNet block (`resnet`), and with `heads` a transformer (`attention`)."""

    in_channels: int
    out_channels: int
    dropout: float
    remat: str
    dtype: jnp.dtype
    heads: int = 0
    transformer_depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    kernel: str = "default"
    scan_layers: bool = False

    @nn.compact
    def __call__(self, hidden_states, skip, temb, context, deterministic=True):
        if skip is not None:
            hidden_states = shard_batch(jnp.concatenate((shard_batch(hidden_states), shard_batch(skip)), axis=-1))
        hidden_states = resnet_layer(self.in_channels, self.out_channels, self.dropout, self.remat, self.dtype,
                                     "resnet")(hidden_states, temb, deterministic)
        if self.heads:
            hidden_states = transformer_layer(
                self.out_channels, self.heads, self.transformer_depth, self.dropout, self.use_linear_projection,
                self.only_cross_attention, self.kernel, self.dtype, self.scan_layers, self.remat, "attention")(
                hidden_states, context, deterministic)
        return hidden_states


def _scan_run(layer: _Layer, hidden_states, skips, temb, context, deterministic: bool, length: int):
    """`length` applications of `layer`, each with its own parameters (stacked on axis 0), dropout rng and
    skip connection (`skips` stacked on axis 0, or None); returns the features and each layer's output."""

    def apply_one(layer, hidden_states, skip):
        hidden_states = layer(hidden_states, skip, temb, context, deterministic)
        return hidden_states, hidden_states

    scanned = nn.scan(apply_one, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      length=length)
    return scanned(layer, hidden_states, skips)


class _AttentionBlock(_Block):
    """A block with a spatial transformer after each ResNet block."""

    heads: int = 1
    transformer_depth: int = 1
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    kernel: str = "default"

    def attention_fields(self) -> dict:
        return dict(heads=self.heads, transformer_depth=self.transformer_depth,
                    use_linear_projection=self.use_linear_projection,
                    only_cross_attention=self.only_cross_attention, kernel=self.kernel, scan_layers=self.scan_layers)

    def transformer(self, channels: int, name: str) -> nn.Module:
        return transformer_layer(channels, self.heads, self.transformer_depth, self.dropout,
                                 self.use_linear_projection, self.only_cross_attention, self.kernel, self.dtype,
                                 self.scan_layers, self.remat, name)


class DownBlock2D(_Block):
    """`num_layers` ResNet blocks, then a Downsample2D unless it is the last level. Returns the features and
    each layer's output (the skip connections the up blocks take)."""

    in_channels: int = 0
    out_channels: int = 0
    num_layers: int = 1
    add_downsample: bool = False

    @nn.compact
    def __call__(self, hidden_states, temb, deterministic=True):
        return _down(self, hidden_states, temb, None, deterministic)


class CrossAttnDownBlock2D(_AttentionBlock):
    """DownBlock2D with a Transformer2DModel after each ResNet block, attending to `context`."""

    in_channels: int = 0
    out_channels: int = 0
    num_layers: int = 1
    add_downsample: bool = False

    @nn.compact
    def __call__(self, hidden_states, temb, context, deterministic=True):
        return _down(self, hidden_states, temb, context, deterministic)


def _down(block, hidden_states, temb, context, deterministic):
    in_channels = [block.in_channels] + [block.out_channels] * (block.num_layers - 1)
    hidden_states, outputs = block.layers(hidden_states, in_channels, temb, context, deterministic)
    if block.add_downsample:
        hidden_states = Downsample2D(block.out_channels, block.dtype, name="downsamplers_0")(hidden_states)
        outputs.append(hidden_states)
    return hidden_states, tuple(outputs)


class UNetMidBlock2DCrossAttn(_AttentionBlock):
    """ResNet block, Transformer2DModel, ResNet block, at the lowest resolution (never scanned: its two ResNet
    blocks are not consecutive)."""

    channels: int = 0

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

    in_channels: int = 0
    out_channels: int = 0
    prev_output_channel: int = 0
    num_layers: int = 1
    add_upsample: bool = False

    @nn.compact
    def __call__(self, hidden_states, skips, temb, deterministic=True):
        return _up(self, hidden_states, skips, temb, None, deterministic)


class CrossAttnUpBlock2D(_AttentionBlock):
    """UpBlock2D with a Transformer2DModel after each ResNet block, attending to `context`."""

    in_channels: int = 0
    out_channels: int = 0
    prev_output_channel: int = 0
    num_layers: int = 1
    add_upsample: bool = False

    @nn.compact
    def __call__(self, hidden_states, skips, temb, context, deterministic=True):
        return _up(self, hidden_states, skips, temb, context, deterministic)


def _up(block, hidden_states, skips, temb, context, deterministic):
    in_channels = [_up_resnet_in_channels(block, i) for i in range(block.num_layers)]
    layer_skips = [skips[-1 - i] for i in range(block.num_layers)]  # the last one first
    hidden_states, _ = block.layers(hidden_states, in_channels, temb, context, deterministic, layer_skips)
    if block.add_upsample:
        hidden_states = Upsample2D(block.out_channels, block.dtype, name="upsamplers_0")(hidden_states)
    return hidden_states
