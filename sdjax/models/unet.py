"""sdjax's Stable Diffusion UNet (SD 1.x, SD 2.x, SDXL): `UNet2DConditionModel`, a Linen module.

It takes the fields of diffusers 0.39's `FlaxUNet2DConditionModel` and has its parameter tree (same names,
same shapes), so checkpoints, weight converters (pytorch_weights.py, pytorch_export.py), LoRA targets and
sharding rules are unchanged; it computes what diffusers' PyTorch `UNet2DConditionModel` computes (tests/
test_unet_model.py checks both). Fields of its own: `attention`, the kernel of its attention layers
(`model.attention`, with splash's `flash_block_size` and `flash_min_tokens`), `remat`, which blocks are recomputed in the backward pass (`train.remat`), and
`scan_layers`, whether deeper transformer stacks and runs of same-shaped layers in a down or up block run as
one `nn.scan` each (`model.scan_layers`; their parameters are then stacked: sdjax/models/layer_stacks.py).

`from_config` reads a diffusers `unet/config.json`; `config` gives one back (the exporter writes it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

import sdjax.models.attention as attention_lib
from sdjax.models.unet_attention import check_kernel
from sdjax.models.unet_layers import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    TimestepEmbedding,
    UNetMidBlock2DCrossAttn,
    UpBlock2D,
    check_remat,
    timestep_embedding,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# Keys of PyTorch's UNet2DConditionModel config that this UNet has no field for, with the values it computes
# as given (every SD 1.x / 2.x / SDXL config has these); any other value is an error.
_PYTORCH_DEFAULTS = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional",
    "time_embedding_dim": None, "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
}
# PyTorch config keys accepted at any value, and why that is harmless.
_PYTORCH_HARMLESS = {
    # Upcasts the attention scores to float32 in PyTorch fp16 only (and not at all under PyTorch 2's SDPA);
    # sdjax computes the softmax in its compute dtype (`default`) or float32 (the other kernels).
    "upcast_attention",
    # Read only by PyTorch's UNetMidBlock2DSimpleCrossAttn; the UNetMidBlock2DCrossAttn here has no such option.
    "mid_block_only_cross_attention",
}


@flax.struct.dataclass
class UNetOutput:
    sample: jax.Array  # NCHW, as the input


class UNet2DConditionModel(nn.Module):
    """The noise (or v, x0) prediction for NCHW latents at `timesteps`, conditioned on `encoder_hidden_states`
    (batch, tokens, cross_attention_dim) and, for SDXL (`addition_embed_type="text_time"`), on
    `added_cond_kwargs` {"text_embeds": pooled text [B, P], "time_ids": size and crop [B, 6]}.

    `attention_head_dim` is, as in diffusers, the number of heads per level (a diffusers naming slip kept for its
    configs: https://github.com/huggingface/diffusers/issues/2011); `num_attention_heads` must stay None, as
    diffusers requires. `dtype` is the compute dtype; params are float32 as passed.
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    dropout: float = 0.0
    use_linear_projection: bool = False
    dtype: jnp.dtype = jnp.float32
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # diffusers' switch for its chunked attention: the same as attention="memory_efficient".
    use_memory_efficient_attention: bool = False
    # diffusers' Flax layout option for the same computation; kept so its configs load, no effect here.
    split_head_dim: bool = False
    transformer_layers_per_block: int | tuple[int, ...] = 1
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    addition_embed_type_num_heads: int = 64  # diffusers' "text" embedding only; kept so its configs load
    projection_class_embeddings_input_dim: int | None = None
    attention: str = "default"  # model.attention: one of sdjax/models/attention.py KERNELS
    flash_block_size: int = attention_lib.tpu_attention.MAX_BLOCK  # model.flash_block_size (flash, auto on TPU)
    flash_min_tokens: int = attention_lib.FLASH_MIN_TOKENS  # model.flash_min_tokens (auto on TPU)
    remat: str = "none"  # train.remat: none | minimal | full
    # model.scan_layers: transformer stacks deeper than 1 (SDXL's) and runs of same-shaped layers in a down or up
    # block run as one nn.scan each, over stacked parameters
    scan_layers: bool = False

    # --- diffusers configs ---------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The diffusers config fields (every field but sdjax's own settings: `dtype`, `attention`,
        `flash_block_size`, `flash_min_tokens`, `remat`, `scan_layers`), as config.json has them."""
        return {name: getattr(self, name) for name in _config_fields()}

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides) -> UNet2DConditionModel:
        """The UNet of a diffusers `unet/config.json` dict (PyTorch's or Flax's); `overrides` (dtype, attention,
        remat, ...) win over it. Bookkeeping keys (`_class_name`, ...) are ignored; PyTorch-only keys must have
        the value this UNet computes with; a value it cannot honour is a ValueError that names it."""
        fields = set(_config_fields())
        kwargs = {}
        for key, value in config.items():
            if key.startswith("_") or key in _PYTORCH_HARMLESS:
                continue
            if key in _PYTORCH_DEFAULTS:
                if value != _PYTORCH_DEFAULTS[key]:
                    raise ValueError(f"UNet config: {key}={value!r} is not supported; sdjax's UNet computes "
                                     f"{key}={_PYTORCH_DEFAULTS[key]!r} only.")
                continue
            if key not in fields:
                raise ValueError(f"UNet config: unknown key {key}={value!r}; sdjax's UNet takes "
                                 f"{sorted(fields | set(_PYTORCH_DEFAULTS) | _PYTORCH_HARMLESS)}.")
            if key in ("layers_per_block", "cross_attention_dim", "sample_size") and isinstance(value, list):
                raise ValueError(f"UNet config: {key}={value!r} is not supported; sdjax's UNet takes one int "
                                 "(the same for every level; square samples).")
            kwargs[key] = tuple(value) if isinstance(value, list) else value
        return cls(**{**kwargs, **overrides})

    # --- the network ---------------------------------------------------------------------------------------

    def __post_init__(self):
        self._check()
        super().__post_init__()

    def _check(self) -> None:
        """Values it cannot compute with are errors when it is built (from_config included)."""
        check_kernel(self.attention)
        check_remat(self.remat)
        if self.use_memory_efficient_attention and self.attention not in ("default", "memory_efficient"):
            raise ValueError(f"UNet: use_memory_efficient_attention=True selects the memory_efficient kernel, "
                             f"which contradicts attention={self.attention!r}; set one of them.")
        if self.num_attention_heads is not None:
            raise ValueError("UNet config: num_attention_heads must be None: as in diffusers, the heads per "
                             "level are given by attention_head_dim (diffusers issue 2011).")
        for field, types in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            if unknown := [t for t in getattr(self, field) if t not in types]:
                raise ValueError(f"UNet config: {field} has {unknown}; sdjax's UNet supports {list(types)}.")
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(f"UNet config: mid_block_type={self.mid_block_type!r} is not supported; sdjax's "
                             f"UNet supports {list(MID_BLOCKS)}.")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNet config: addition_embed_type={self.addition_embed_type!r} is not supported; "
                             "sdjax's UNet supports None and 'text_time' (SDXL).")
        levels = len(self.block_out_channels)
        for field in ("down_block_types", "up_block_types"):
            if len(getattr(self, field)) != levels:
                raise ValueError(f"UNet config: {field} has {len(getattr(self, field))} blocks, "
                                 f"block_out_channels {levels} levels; they must match.")

    def _per_level(self, value) -> tuple:
        return tuple(value) if isinstance(value, (tuple, list)) else (value,) * len(self.block_out_channels)

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, added_cond_kwargs=None, train=False):
        deterministic = not train
        channels = self.block_out_channels
        heads = self._per_level(self.attention_head_dim)
        depths = self._per_level(self.transformer_layers_per_block)
        only_cross = self._per_level(self.only_cross_attention)
        kernel = attention_lib.Kernel("memory_efficient" if self.use_memory_efficient_attention else self.attention,
                                      self.flash_block_size, self.flash_min_tokens)
        block = {"dropout": self.dropout, "remat": self.remat, "dtype": self.dtype, "scan_layers": self.scan_layers}
        attention = {"use_linear_projection": self.use_linear_projection, "kernel": kernel}
        context = encoder_hidden_states

        # 1. time (PyTorch broadcasts one timestep to the batch)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        time_embed_dim = channels[0] * 4
        temb = TimestepEmbedding(time_embed_dim, self.dtype, name="time_embedding")(
            timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift))
        if self.addition_embed_type == "text_time":
            temb = temb + self._text_time_embedding(added_cond_kwargs, time_embed_dim)

        # 2. in
        hidden_states = nn.Conv(channels[0], kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                name="conv_in")(jnp.transpose(sample, (0, 2, 3, 1)))

        # 3. down: each level's outputs are skip connections for the up blocks
        skips = (hidden_states,)
        for i, block_type in enumerate(self.down_block_types):
            level = dict(in_channels=channels[max(i - 1, 0)], out_channels=channels[i],
                         num_layers=self.layers_per_block, add_downsample=i < len(channels) - 1,
                         name=f"down_blocks_{i}", **block)
            if block_type == "CrossAttnDownBlock2D":
                hidden_states, outputs = CrossAttnDownBlock2D(
                    heads=heads[i], transformer_depth=depths[i], only_cross_attention=only_cross[i],
                    **attention, **level)(hidden_states, temb, context, deterministic)
            else:
                hidden_states, outputs = DownBlock2D(**level)(hidden_states, temb, deterministic)
            skips += outputs

        # 4. mid (no only_cross_attention: PyTorch's UNetMidBlock2DCrossAttn has none either)
        if self.mid_block_type is not None:
            hidden_states = UNetMidBlock2DCrossAttn(
                channels=channels[-1], heads=heads[-1], transformer_depth=depths[-1], only_cross_attention=False,
                name="mid_block", **attention, **block)(hidden_states, temb, context, deterministic)

        # 5. up: each level takes layers_per_block + 1 skip connections, the last ones first
        levels = len(channels) - 1
        for i, block_type in enumerate(self.up_block_types):
            num_layers = self.layers_per_block + 1
            level_skips, skips = skips[-num_layers:], skips[:-num_layers]
            level = dict(in_channels=channels[levels - min(i + 1, levels)], out_channels=channels[levels - i],
                         prev_output_channel=channels[levels - max(i - 1, 0)], num_layers=num_layers,
                         add_upsample=i < levels, name=f"up_blocks_{i}", **block)
            if block_type == "CrossAttnUpBlock2D":
                hidden_states = CrossAttnUpBlock2D(
                    heads=heads[levels - i], transformer_depth=depths[levels - i],
                    only_cross_attention=only_cross[levels - i], **attention, **level)(
                    hidden_states, level_skips, temb, context, deterministic)
            else:
                hidden_states = UpBlock2D(**level)(hidden_states, level_skips, temb, deterministic)

        # 6. out
        hidden_states = nn.silu(nn.GroupNorm(num_groups=32, epsilon=1e-5, name="conv_norm_out")(hidden_states))
        hidden_states = nn.Conv(self.out_channels, kernel_size=(3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                                name="conv_out")(hidden_states)
        return UNetOutput(sample=jnp.transpose(hidden_states, (0, 3, 1, 2)))

    def _text_time_embedding(self, added_cond_kwargs, time_embed_dim: int) -> jax.Array:
        """SDXL's added embedding: the pooled text embedding and the sinusoidal embeddings of the 6 size and crop
        numbers, side by side, through a TimestepEmbedding."""
        if added_cond_kwargs is None or any(added_cond_kwargs.get(k) is None for k in ("text_embeds", "time_ids")):
            raise ValueError('UNet: addition_embed_type="text_time" (SDXL) needs added_cond_kwargs with '
                             '"text_embeds" and "time_ids".')
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = timestep_embedding(jnp.ravel(time_ids), self.addition_time_embed_dim, self.flip_sin_to_cos,
                                         self.freq_shift).reshape(text_embeds.shape[0], -1)
        return TimestepEmbedding(time_embed_dim, self.dtype, name="add_embedding")(
            jnp.concatenate([text_embeds, time_embeds], axis=-1))


# The fields that are sdjax's settings, not diffusers' config.json keys.
_SDJAX_FIELDS = ("dtype", "attention", "flash_block_size", "flash_min_tokens", "remat", "scan_layers", "parent",
                 "name")


def _config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(UNet2DConditionModel) if f.name not in _SDJAX_FIELDS]
