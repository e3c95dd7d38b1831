"""Exponential moving average of the trained params, with the warmup of diffusers' `EMAModel`.

diffusers' training scripts (train_text_to_image.py --use_ema) update the average after every optimizer
step with decay min(max_decay, (1 + n) / (10 + n)), n counting from 0: early steps average over few
updates, so the EMA tracks the fast-moving start of training instead of staying near the random init.
optax has EMAs of gradients, not of params with this warmup, so this small module is our own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def decay_at(step: jax.Array, max_decay: float) -> jax.Array:
    """The decay used for the update after optimizer step `step` (0-based)."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(max_decay), (1.0 + step) / (10.0 + step))


def update(ema_params, params, decay: jax.Array):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf, in the params' dtype."""
    return jax.tree.map(lambda ema, p: ema - (1.0 - decay).astype(ema.dtype) * (ema - p), ema_params, params)
