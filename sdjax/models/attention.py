"""`model.attention`: which kernel the UNet's attention layers run.

- `auto` (the default): per platform: on TPU `flash` for self-attention over at least `FLASH_MIN_TOKENS`
  tokens, `default` for the rest (cross-attention over the caption's 77 tokens, shorter sequences); on GPU
  `dot_product`; on a CPU that is one JAX device `per_head` when the layer's scores are too big for its
  caches (`PER_HEAD_MIN_SCORE_BYTES`), else `default` (smaller scores; several emulated CPU devices, where 8
  devices' loops over heads on 2 cores ran 3x slower than materialised scores). Chosen when the step is
  lowered for its devices (`jax.lax.platform_dependent`), so `sdjax plan` on a CPU host gets the TPU choice
  for a TPU topology.
- `flash`: JAX's Pallas splash attention (flash attention as a TPU Mosaic kernel; tpu_attention.py) for every
  self-attention layer, `default` for cross-attention. The scores live a block at a time in the TPU core's
  VMEM, never whole in HBM, forward and backward. Off TPU it runs in Pallas' interpreter, slowly: a way to
  test it on CPU, not to train.
- `default`: attention as written (scores materialised whole, softmax in the compute dtype), as diffusers'
  Flax attention computed it.
- `memory_efficient`: chunked attention (diffusers' `use_memory_efficient_attention`; ours in
  unet_attention.py): the scores are never
  materialised whole, at the price of a sequential loop over chunks.
- `dot_product`: `jax.nn.dot_product_attention`, which on GPU runs cuDNN's fused flash attention where cuDNN
  takes the shapes (bf16/fp16, head dim a multiple of 8 up to 128, even sequence lengths for training: the
  UNet's self-attention; cross-attention over 77 caption tokens is not, and runs XLA's kernel) and elsewhere
  XLA's kernel. Same parameters and same function as `default`: only the kernel changes.
- `per_head`: one (batch, head) at a time (`lax.map`), with flash attention's backward pass (the scores
  recomputed from the saved log-sum-exp; `_per_head_attention`). Written for XLA:CPU, where it is measurably
  better: the whole-batch scores of diffusers' attention ((batch*heads, queries, keys) floats, 268 MB at
  32x32 latents, batch 8, 8 heads) do not stay in cache and cost layout copies, while one head's (4 MB)
  does. At that size, forward + backward of one attention layer took 569 ms as written and 124-155 ms per
  head on a 2-core CPU (XLA's kernel behind `jax.nn.dot_product_attention`: 1306 ms); see
  docs/benchmarks.md. On accelerators a sequential loop over heads is slow.

The UNet's attention layers (sdjax/models/unet_attention.py) take the kernel by name; the parameters are the
same whichever runs.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

import sdjax.models.tpu_attention as tpu_attention
import sdjax.models.batch_sharding as batch_sharding

def fused_attention_kernel(query: jax.Array, key: jax.Array) -> str:
    """cuDNN's flash attention where it takes the shapes (checked on jax 0.11.2 / H200: an odd key length,
    77 caption tokens, is refused in training), else XLA's. Query and key are (batch, length, heads, dim)."""
    head_dim, query_length, key_length = query.shape[-1], query.shape[1], key.shape[1]
    if (jax.default_backend() == "gpu" and query.dtype in (jnp.bfloat16, jnp.float16)
            and head_dim % 8 == 0 and head_dim <= 128 and query_length % 2 == 0 and key_length % 2 == 0):
        return "cudnn"
    return "xla"


# Each kernel: (query, key, value) as (batch, length, heads, dim_head), scale -> (batch, q_length, heads, dim_head).


def dot_product_kernel(query, key, value, scale):
    return jax.nn.dot_product_attention(query, key, value, scale=scale,
                                        implementation=fused_attention_kernel(query, key))


def _heads_into_batch(x):  # (batch, length, heads, dim_head) -> (batch * heads, length, dim_head)
    batch, length, heads, dim_head = x.shape
    return jnp.transpose(x, (0, 2, 1, 3)).reshape(batch * heads, length, dim_head)


def _heads_out_of_batch(x, batch):  # the inverse
    _, length, dim_head = x.shape
    return jnp.transpose(x.reshape(batch, -1, length, dim_head), (0, 2, 1, 3))


def materialized_kernel(query, key, value, scale):
    """diffusers' `default` computation, heads folded into the batch as it does (the layout XLA handled
    best of those measured: with heads as a separate axis, 8 emulated CPU devices ran the step 1.5x slower)."""
    by_head = _heads_into_batch
    scores = jnp.einsum("bid,bjd->bij", by_head(query), by_head(key)) * scale
    attended = jnp.einsum("bij,bjd->bid", nn.softmax(scores, axis=-1), by_head(value))
    return _heads_out_of_batch(attended, query.shape[0])


def per_head_kernel(query, key, value, scale):
    by_head = _heads_into_batch
    attended = _per_head_attention(by_head(query), by_head(key), by_head(value), scale)
    return _heads_out_of_batch(attended, query.shape[0])


# The per-head loop with a backward pass of its own (flash attention's, one head at a time): the forward pass
# keeps each query's log-sum-exp, the backward pass recomputes the scores from it. Written for XLA:CPU, where
# it is measurably better than `jax.checkpoint` + autodiff of the same loop: autodiff's backward contracts the
# (queries, keys) probabilities over their queries (dV = P^T dO, dK = dS^T Q), and XLA:CPU runs a dot that
# contracts its big operand over its rows ~5x slower than one over its columns (64 heads of 1024 x 1024,
# head dim 8, 2-core EPYC: P^T dO 165 ms, the same product from scores computed transposed 29 ms). So the
# backward pass recomputes the scores both ways, (queries, keys) for dQ and (keys, queries) for dK and dV, and
# every dot contracts over columns: one layer's forward + backward at that size 124-155 ms, against 364-378
# ms with `jax.checkpoint` (benchmarks/attention_kernels.py). Softmax statistics are float32 in any dtype.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _per_head_attention(q, k, v, scale):  # (batch * heads, length, dim_head) each
    return _per_head_forward(q, k, v, scale)[0]


def _scores(a, b, scale):  # a @ b^T * scale, float32: (length_a, length_b)
    return jnp.einsum("id,jd->ij", a, b, preferred_element_type=jnp.float32) * scale


def _per_head_forward(q, k, v, scale):
    def one_head(qkv):
        q, k, v = qkv
        scores = _scores(q, k, scale)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        attended = jnp.einsum("ij,jd->id", weights, v, preferred_element_type=jnp.float32) / total
        return attended.astype(q.dtype), (peak + jnp.log(total))[:, 0]

    attended, log_sum_exp = jax.lax.map(one_head, (q, k, v))
    return attended, (q, k, v, attended, log_sum_exp)


def _per_head_backward(scale, residuals, d_attended):
    q, k, v, attended, log_sum_exp = residuals
    # D_i = sum_d dO_id O_id, the softmax-gradient term of flash attention's backward pass.
    d_total = jnp.sum(d_attended.astype(jnp.float32) * attended.astype(jnp.float32), axis=-1)

    def one_head(args):
        q, k, v, d_out, lse, d_sum = args
        f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
        probs = jnp.exp(_scores(q, k, scale) - lse[:, None])  # (queries, keys)
        d_scores = probs * (f32("id,jd->ij", d_out, v) - d_sum[:, None])
        d_q = f32("ij,jd->id", d_scores, k) * scale
        probs_t = jnp.exp(_scores(k, q, scale) - lse[None, :])  # (keys, queries): the same, transposed
        d_v = f32("ji,id->jd", probs_t, d_out)
        d_scores_t = probs_t * (f32("jd,id->ji", v, d_out) - d_sum[None, :])
        d_k = f32("ji,id->jd", d_scores_t, q) * scale
        return d_q.astype(q.dtype), d_k.astype(k.dtype), d_v.astype(v.dtype)

    return jax.lax.map(one_head, (q, k, v, d_attended, log_sum_exp, d_total))


_per_head_attention.defvjp(_per_head_forward, _per_head_backward)


# `auto` on a one-device CPU loops over heads only when the whole batch's float32 scores are at least this
# big. Measured on the 2-core Xeon: 268 MB of scores (32x32 latents, batch 8, 8 heads; benchmarks/
# train_step.py) made the step 1805 ms per head vs 2851 ms materialised; 2 MB (the demo's 8x8 latents, batch
# 32, 4 heads) made the demo's UNet step 1.6x slower per head (93 vs 149 images/s): the loop costs more than
# the cache misses it saves once the scores fit in cache. Rechecked with `_per_head_attention`'s backward (one
# layer's forward + backward, per head vs materialised, 2-core EPYC): 2 MiB 3.2 vs 2.4 ms, 4 MiB 6.4 vs 6.8 ms,
# 16 MiB 28 vs 56 ms.
PER_HEAD_MIN_SCORE_BYTES = 8 * 2**20


def scores_bytes(query, key) -> int:
    """float32 bytes of the whole batch's attention scores: batch * heads * queries * keys * 4."""
    batch, queries, heads, _ = query.shape
    return 4 * batch * heads * queries * key.shape[1]


# `auto` runs `flash` on TPU for self-attention over at least this many tokens. Below it the materialised
# scores are small (1024 tokens, batch 4, 8 heads: 64 MiB of bf16 scores), the kernel's grid has few steps to
# pipeline and its padding (lengths to a multiple of 128) is a larger share of the work. 1024 is MaxDiffusion's
# flash_min_seq_length; not timed on a chip here (no TPU on this project's machines): SD's attention levels
# at 512 px have 4096, 1024, 256 and 64 tokens, so it sends the first two levels to the kernel.
FLASH_MIN_TOKENS = 1024


def is_self_attention(query, key) -> bool:
    return query.shape[1] == key.shape[1]


def flash_kernel(query, key, value, scale, max_block: int = tpu_attention.MAX_BLOCK):
    if not is_self_attention(query, key):  # cross-attention: (queries, 77) scores are small
        return materialized_kernel(query, key, value, scale)
    return tpu_attention.attention(query, key, value, scale, max_block=max_block)


def _tpu_kernel(query, key, value, scale, max_block: int = tpu_attention.MAX_BLOCK,
                min_tokens: int = FLASH_MIN_TOKENS):
    """`auto` on TPU: flash for long self-attention whose batch divides the mesh, else materialised."""
    if (is_self_attention(query, key) and query.shape[1] >= min_tokens
            and query.shape[0] % batch_sharding.batch_shards() == 0):
        return tpu_attention.attention(query, key, value, scale, interpret=False, max_block=max_block)
    return materialized_kernel(query, key, value, scale)


def auto_kernel(query, key, value, scale, max_block: int = tpu_attention.MAX_BLOCK,
                min_tokens: int = FLASH_MIN_TOKENS):
    if jax.default_backend() == "gpu":
        return dot_product_kernel(query, key, value, scale)
    materialized = functools.partial(materialized_kernel, scale=scale)
    per_head = jax.local_device_count("cpu") == 1 and scores_bytes(query, key) >= PER_HEAD_MIN_SCORE_BYTES
    on_cpu = functools.partial(per_head_kernel, scale=scale) if per_head else materialized
    on_tpu = functools.partial(_tpu_kernel, scale=scale, max_block=max_block, min_tokens=min_tokens)
    return jax.lax.platform_dependent(query, key, value, cpu=on_cpu, tpu=on_tpu, default=materialized)


# diffusers' jax_memory_efficient_attention defaults: the scores held at once are (query chunk, key chunk) per
# (batch, head).
QUERY_CHUNK = 1024
KEY_CHUNK = 4096


def _pad_length(x: jax.Array, multiple: int) -> jax.Array:  # pads axis 1 (length) with zeros to a multiple
    return jnp.pad(x, ((0, 0), (0, -x.shape[1] % multiple), (0, 0), (0, 0)))


def _chunks(x: jax.Array, size: int) -> jax.Array:  # (batch, length, ...) -> (length / size, batch, size, ...)
    return jnp.swapaxes(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 0, 1)


def memory_efficient_kernel(query, key, value, scale, query_chunk: int = QUERY_CHUNK, key_chunk: int = KEY_CHUNK):
    """Attention that never holds more scores than (batch, heads, query_chunk, key_chunk) (Rabe & Staats 2021,
    diffusers' `use_memory_efficient_attention`): queries a chunk at a time (`lax.map`), keys a chunk at a time
    (`lax.scan`) with a running max and sum of the softmax, each key chunk recomputed in the backward pass
    (`jax.checkpoint`). Lengths that are not a multiple of the chunk are padded; padded keys are masked out.

    Unlike diffusers' Flax layer (which used query chunks of length / 64 and needed lengths that divide evenly),
    the chunks are diffusers' function defaults and any length works; the softmax statistics are float32 in
    any compute dtype."""
    batch, query_length, heads, dim_head = query.shape
    key_length = key.shape[1]
    query_chunk, key_chunk = min(query_chunk, query_length), min(key_chunk, key_length)
    queries = _chunks(_pad_length(query, query_chunk), query_chunk)
    keys = _chunks(_pad_length(key, key_chunk), key_chunk)
    values = _chunks(_pad_length(value, key_chunk), key_chunk)
    is_key = (jnp.arange(keys.shape[0] * key_chunk) < key_length).reshape(-1, key_chunk)

    def attend(query_block):  # (batch, query_chunk, heads, dim_head)
        @jax.checkpoint
        def add_key_chunk(carry, chunk):
            attended, total, peak = carry  # (batch, heads, query_chunk) + (dim_head,) for attended
            key_block, value_block, valid = chunk
            scores = jnp.einsum("bqhd,bkhd->bhqk", query_block, key_block,
                                preferred_element_type=jnp.float32) * scale
            scores = jnp.where(valid, scores, -jnp.inf)
            # The shift only keeps exp() in range; the result does not depend on it, so neither does its gradient.
            new_peak = jax.lax.stop_gradient(jnp.maximum(peak, jnp.max(scores, axis=-1)))
            rescale = jnp.exp(peak - new_peak)
            weights = jnp.exp(scores - new_peak[..., None])
            attended = attended * rescale[..., None] + jnp.einsum(
                "bhqk,bkhd->bhqd", weights, value_block, preferred_element_type=jnp.float32)
            return (attended, total * rescale + jnp.sum(weights, axis=-1), new_peak), None

        shape = (batch, heads, query_chunk)
        start = (jnp.zeros(shape + (dim_head,), jnp.float32), jnp.zeros(shape, jnp.float32),
                 jnp.full(shape, -jnp.inf, jnp.float32))
        (attended, total, _), _ = jax.lax.scan(add_key_chunk, start, (keys, values, is_key))
        return jnp.transpose(attended / total[..., None], (0, 2, 1, 3)).astype(query.dtype)

    attended = jax.lax.map(attend, queries)  # (query chunks, batch, query_chunk, heads, dim_head)
    return jnp.swapaxes(attended, 0, 1).reshape(batch, -1, heads, dim_head)[:, :query_length]


@dataclasses.dataclass(frozen=True)
class Kernel:
    """`model.attention`'s kernel with the splash settings `flash` and `auto` take: `max_block`, the largest
    splash block (`model.flash_block_size`; blocks are chosen per length up to it, tpu_attention.py), and
    `min_tokens`, `auto`'s threshold for the kernel on TPU (`model.flash_min_tokens`). Hashable, so the UNet's
    modules carry it as a field; a bare name means the defaults."""
    name: str
    max_block: int = tpu_attention.MAX_BLOCK
    min_tokens: int = FLASH_MIN_TOKENS

    def __call__(self, query, key, value, scale):
        if self.name == "flash":
            return flash_kernel(query, key, value, scale, max_block=self.max_block)
        if self.name == "auto":
            return auto_kernel(query, key, value, scale, max_block=self.max_block, min_tokens=self.min_tokens)
        return KERNELS[self.name](query, key, value, scale)


def as_kernel(kernel: str | Kernel) -> Kernel:
    return kernel if isinstance(kernel, Kernel) else Kernel(kernel)


# model.attention -> kernel (the values of config.ATTENTIONS; described at the top of this file).
KERNELS = {
    "auto": auto_kernel,
    "default": materialized_kernel,
    "memory_efficient": memory_efficient_kernel,
    "dot_product": dot_product_kernel,
    "per_head": per_head_kernel,
    "flash": flash_kernel,
}
