"""CLIP's text encoder (Stable Diffusion's caption encoder), as Flax Linen modules of our own.

transformers 5 removed its Flax models, so sdjax keeps the text encoders here: `CLIPTextEncoder` (SD 1.x's
CLIP ViT-L/14, SD 2.x's OpenCLIP ViT-H/14, SDXL's first encoder) and `CLIPTextEncoderWithProjection` (SDXL's
second, OpenCLIP ViT-bigG/14, whose pooled output is projected). They are built from a
`transformers.CLIPTextConfig` and have the parameter trees of transformers 4.57's `FlaxCLIPTextModule` /
`FlaxCLIPTextModelWithProjectionModule` (`text_model/embeddings`, `text_model/encoder/layers/N`,
`text_model/final_layer_norm`, `text_projection`), so checkpoints, the weight converters, LoRA targets and
sharding rules read them unchanged. The numerics are PyTorch `CLIPTextModel`'s, the reference:
tests/test_clip_text_model.py compares the two.
"""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from transformers import CLIPTextConfig

from sdjax.models.batch_sharding import shard_batch

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP's (SD 1.x)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf), as PyTorch's (OpenCLIP: SD 2.x, SDXL)
}
# The weight init of transformers' Flax CLIP (runs from scratch; pretrained weights replace it): N(0, 0.01)
# for the embeddings and the layers' dense kernels.
_INIT = jax.nn.initializers.normal(0.01)
# transformers' pooling rule for old configs (before transformers PR #24773 fixed CLIP's eos_token_id): with
# eos_token_id 2 the end-of-text token is taken to be the highest id of each caption.
_LEGACY_EOS_TOKEN_ID = 2


@flax.struct.dataclass
class CLIPTextOutput:
    """What the text encoders return. `output[0]` is `last_hidden_state` (in transformers' WithProjection
    output it is `text_embeds`: read the fields by name)."""

    last_hidden_state: jax.Array  # [B, L, D], after the final layer norm
    pooler_output: jax.Array  # [B, D]: last_hidden_state at each caption's end-of-text token
    # output_hidden_states=True: the embeddings, then each layer's output (the last before the final norm)
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None  # [B, P]: the projected pooler_output (CLIPTextEncoderWithProjection)

    def __getitem__(self, index: int) -> jax.Array:
        return (self.last_hidden_state, self.pooler_output)[index]


def _layer_norm(config: CLIPTextConfig, dtype, name: str) -> nn.LayerNorm:
    # Variance from the centred values, as PyTorch computes it.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention over the caption."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, deterministic: bool) -> jax.Array:
        """`allowed` [B, 1, L, L]: whether each query position may attend to each key position."""
        width, heads = self.config.hidden_size, self.config.num_attention_heads
        head_dim = width // heads

        def project(name):
            return nn.Dense(width, dtype=self.dtype, kernel_init=_INIT, name=name)

        def split_heads(h):  # [B, L, D] -> [B, H, L, D/H]
            return h.reshape(h.shape[:2] + (heads, head_dim)).transpose(0, 2, 1, 3)

        query, key, value = (split_heads(shard_batch(project(name)(x))) for name in ("q_proj", "k_proj", "v_proj"))
        scores = jnp.einsum("bhqd,bhkd->bhqk", query, key) * head_dim ** -0.5
        # Softmax in float32 whatever the compute dtype, as PyTorch's CLIP (transformers' Flax CLIP took it in
        # the compute dtype).
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        weights = nn.Dropout(self.config.attention_dropout)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, value).reshape(x.shape[:2] + (width,))
        return shard_batch(project("out_proj")(shard_batch(out)))


class CLIPMLP(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, kernel_init=_INIT, name="fc1")(x)
        x = shard_batch(_ACTIVATIONS[self.config.hidden_act](x))
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, kernel_init=_INIT, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, deterministic: bool) -> jax.Array:
        h = _layer_norm(self.config, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h, allowed, deterministic)
        h = _layer_norm(self.config, self.dtype, "layer_norm2")(x)
        return shard_batch(x + CLIPMLP(self.config, self.dtype, name="mlp")(h))


class CLIPEncoderLayers(nn.Module):
    """The encoder layers, named "0", "1", ... (transformers' FlaxCLIPLayerCollection: the `layers` level of
    the parameter tree). Returns the last output and, with `output_hidden_states`, every layer's input and the
    last output."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, deterministic: bool, output_hidden_states: bool):
        hidden_states = (x,)
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, self.dtype, name=str(i))(x, allowed, deterministic)
            hidden_states += (x,)
        return x, hidden_states if output_hidden_states else None


class CLIPEncoder(nn.Module):
    """Holds the layers (the `encoder` level of the parameter tree). With `scan_layers` they run as one
    `nn.scan` over a layer whose parameters are stacked on a leading axis: `layers/self_attn/...` of shape
    (num_hidden_layers, ...) instead of `layers/0/self_attn/...`, ... (sdjax/models/layer_stacks.py converts
    between the two); the compiler then sees one layer."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array, deterministic: bool, output_hidden_states: bool):
        if not self.scan_layers:
            return CLIPEncoderLayers(self.config, self.dtype, name="layers")(x, allowed, deterministic,
                                                                             output_hidden_states)

        def apply_one(layer, x, _):
            x = layer(x, allowed, deterministic)
            return x, (x if output_hidden_states else None)

        scanned = nn.scan(apply_one, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                          length=self.config.num_hidden_layers)
        last, outputs = scanned(CLIPEncoderLayer(self.config, self.dtype, name="layers"), x, None)
        if not output_hidden_states:
            return last, None
        return last, (x, *(outputs[i] for i in range(self.config.num_hidden_layers)))


class CLIPTextEmbeddings(nn.Module):
    """Token embedding + learned position embedding. No compute dtype, as transformers' Flax CLIP: the
    residual stream stays float32 (each layer's compute-dtype output is added to it)."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array, position_ids: jax.Array) -> jax.Array:
        width = self.config.hidden_size
        tokens = nn.Embed(self.config.vocab_size, width, embedding_init=_INIT, name="token_embedding")
        positions = nn.Embed(self.config.max_position_embeddings, width, embedding_init=_INIT,
                             name="position_embedding")
        return shard_batch(tokens(input_ids.astype(jnp.int32)) + positions(position_ids.astype(jnp.int32)))


class CLIPTextTransformer(nn.Module):
    """Token ids -> CLIPTextOutput (no projection): the `text_model` level of the parameter tree."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, position_ids, deterministic: bool,
                 output_hidden_states: bool) -> CLIPTextOutput:
        length = input_ids.shape[-1]
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        allowed = jnp.tril(jnp.ones((length, length), bool))[None, None]  # causal, as CLIP
        if attention_mask is not None:
            allowed = allowed & (attention_mask[:, None, None, :] > 0)
        x = CLIPTextEmbeddings(self.config, name="embeddings")(input_ids, position_ids)
        x, hidden_states = CLIPEncoder(self.config, self.dtype, self.scan_layers, name="encoder")(
            x, allowed, deterministic, output_hidden_states)
        last_hidden_state = _layer_norm(self.config, self.dtype, "final_layer_norm")(x)
        return CLIPTextOutput(last_hidden_state=last_hidden_state, hidden_states=hidden_states,
                              pooler_output=_pool(last_hidden_state, input_ids, self.config.eos_token_id))


def _pool(last_hidden_state: jax.Array, input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """Each caption's state at its (first) end-of-text token, as PyTorch's CLIPTextTransformer picks it."""
    if eos_token_id == _LEGACY_EOS_TOKEN_ID:
        positions = jnp.argmax(input_ids, axis=-1)
    else:
        positions = jnp.argmax(input_ids == eos_token_id, axis=-1)  # the first, where padding is eos too
    return jnp.take_along_axis(last_hidden_state, positions[:, None, None], axis=1)[:, 0]


def _check_config(config: CLIPTextConfig) -> None:
    if config.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"CLIP text config hidden_act={config.hidden_act!r} is not supported: sdjax's CLIP text "
                         f"encoder takes {sorted(_ACTIVATIONS)}.")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"CLIP text config hidden_size={config.hidden_size} is not a multiple of "
                         f"num_attention_heads={config.num_attention_heads}.")


class CLIPTextEncoder(nn.Module):
    """CLIP's text encoder without projection (transformers' CLIPTextModel). `dtype` is the compute dtype
    (parameters are float32); `scan_layers` (`model.scan_layers`) runs the layers as one `nn.scan`
    (CLIPEncoder)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    scan_layers: bool = False

    def __post_init__(self):
        _check_config(self.config)
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """Token ids [B, L] (attention_mask [B, L]: 0 at keys to ignore; position_ids default 0..L-1)."""
        return CLIPTextTransformer(self.config, self.dtype, self.scan_layers, name="text_model")(
            input_ids, attention_mask, position_ids, deterministic, output_hidden_states)


class CLIPTextEncoderWithProjection(CLIPTextEncoder):
    """CLIP's text encoder with the projection of its pooled output, `text_embeds` (transformers'
    CLIPTextModelWithProjection: SDXL's second text encoder)."""

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                 position_ids: jax.Array | None = None, deterministic: bool = True,
                 output_hidden_states: bool = False) -> CLIPTextOutput:
        """As CLIPTextEncoder's, with `text_embeds` [B, projection_dim] set."""
        output = CLIPTextTransformer(self.config, self.dtype, self.scan_layers, name="text_model")(
            input_ids, attention_mask, position_ids, deterministic, output_hidden_states)
        projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")
        return output.replace(text_embeds=projection(output.pooler_output))
