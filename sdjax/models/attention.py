"""`model.attention`: which kernel the UNet's attention layers run.

- `auto` (the default): the fastest measured on each platform: `dot_product` on GPU, `per_head` on a CPU
  that is one JAX device when the layer's scores are too big for its caches (`PER_HEAD_MIN_SCORE_BYTES`),
  `default` elsewhere (TPU; smaller scores; several emulated CPU devices, where 8 devices' loops over heads
  on 2 cores ran 3x slower than materialised scores). Chosen when the step is lowered for its
  devices (`jax.lax.platform_dependent`), so `sdjax plan` on a CPU host gets the TPU choice for a TPU topology.
- `default`: diffusers' Flax attention as written (scores materialised whole, softmax in the compute dtype).
- `memory_efficient`: diffusers' chunked attention (`use_memory_efficient_attention`): the scores are never
  materialised whole, at the price of a sequential loop over chunks.
- `dot_product`: `jax.nn.dot_product_attention`, which on GPU runs cuDNN's fused flash attention where cuDNN
  takes the shapes (bf16/fp16, head dim a multiple of 8 up to 128, even sequence lengths for training: the
  UNet's self-attention; cross-attention over 77 caption tokens is not, and runs XLA's kernel) and elsewhere
  XLA's kernel. Same parameters and same function as `default`: only the kernel changes.
- `per_head`: one (batch, head) at a time (`lax.map`), its scores recomputed in the backward pass
  (`jax.checkpoint`). Written for XLA:CPU, where it is measurably better: the whole-batch scores of
  diffusers' attention ((batch*heads, queries, keys) floats, 268 MB at 32x32 latents, batch 8, 8 heads) do
  not stay in cache and cost layout copies, while one head's (4 MB) does. At that size, forward + backward
  of one attention layer took 569 ms as written and 223 ms per head on a 2-core CPU (XLA's kernel behind
  `jax.nn.dot_product_attention`: 1306 ms); see docs/benchmarks.md. On accelerators a sequential loop over
  heads is slow.

diffusers' `FlaxAttention` has no switch for other kernels, so a Flax method interceptor replaces its
`__call__` with one that runs the module's own projections (`to_q`, `to_k`, `to_v`, `to_out_0`) around the
chosen kernel. The parameter tree is unchanged.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from diffusers.models.attention_flax import FlaxAttention

KERNELS = ("auto", "default", "memory_efficient", "dot_product", "per_head")


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

    @jax.checkpoint
    def one_head(qkv):
        q, k, v = qkv
        return nn.softmax((q @ k.T) * scale, axis=-1) @ v

    attended = jax.lax.map(one_head, (by_head(query), by_head(key), by_head(value)))
    return _heads_out_of_batch(attended, query.shape[0])


# `auto` on a one-device CPU loops over heads only when the whole batch's float32 scores are at least this
# big. Measured on the 2-core Xeon: 268 MB of scores (32x32 latents, batch 8, 8 heads; benchmarks/
# train_step.py) made the step 1805 ms per head vs 2851 ms materialised; 2 MB (the demo's 8x8 latents, batch
# 32, 4 heads) made the demo's UNet step 1.6x slower per head (93 vs 149 images/s): the loop costs more than
# the cache misses it saves once the scores fit in cache.
PER_HEAD_MIN_SCORE_BYTES = 8 * 2**20


def scores_bytes(query, key) -> int:
    """float32 bytes of the whole batch's attention scores: batch * heads * queries * keys * 4."""
    batch, queries, heads, _ = query.shape
    return 4 * batch * heads * queries * key.shape[1]


def auto_kernel(query, key, value, scale):
    if jax.default_backend() == "gpu":
        return dot_product_kernel(query, key, value, scale)
    materialized = functools.partial(materialized_kernel, scale=scale)
    per_head = jax.local_device_count("cpu") == 1 and scores_bytes(query, key) >= PER_HEAD_MIN_SCORE_BYTES
    on_cpu = functools.partial(per_head_kernel, scale=scale) if per_head else materialized
    return jax.lax.platform_dependent(query, key, value, cpu=on_cpu, default=materialized)


_KERNEL_FUNCTIONS = {"auto": auto_kernel, "dot_product": dot_product_kernel, "per_head": per_head_kernel}


def _attention_call(kernel, module: FlaxAttention, hidden_states, context=None, deterministic=True):
    context = hidden_states if context is None else context
    batch = hidden_states.shape[0]

    def heads(x):  # (batch, length, heads * dim_head) -> (batch, length, heads, dim_head)
        return x.reshape(batch, -1, module.heads, module.dim_head)

    query, key, value = heads(module.query(hidden_states)), heads(module.key(context)), heads(module.value(context))
    attended = kernel(query, key, value, module.scale)
    hidden_states = module.proj_attn(attended.reshape(batch, -1, module.heads * module.dim_head))
    return module.dropout_layer(hidden_states, deterministic=deterministic)


def _interceptor(kernel):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, FlaxAttention):
            return next_fun(*args, **kwargs)
        return _attention_call(kernel, context.module, *args, **kwargs)

    return interceptor


def attention_kernel(name: str):
    """A context in which the UNet's attention layers run kernel `name` (a no-op for the kernels diffusers
    selects itself: `default`, `memory_efficient`). Enter it around the UNet's `apply`."""
    if name not in KERNELS:
        raise ValueError(f"model.attention={name!r} is not one of {list(KERNELS)}.")
    if name not in _KERNEL_FUNCTIONS:
        return contextlib.nullcontext()
    return nn.intercept_methods(_interceptor(_KERNEL_FUNCTIONS[name]))
