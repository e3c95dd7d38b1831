"""Learning-rate schedule and optimizer (optax).

`optimizer.name` picks what the optimizer keeps per parameter (float32 params: 4 bytes each):
- `adamw`: float32 first and second moments, 8 bytes.
- `adamw_bf16`: the same AdamW with both moments stored in bfloat16, 4 bytes: the JAX counterpart of the
  original recipe's 8-bit Adam (bitsandbytes has no JAX/TPU kernel).
- `adafactor`: no first moment and a factored second moment (a row and a column vector per matrix or conv
  kernel whose two largest dims are >= 128), a fraction of a byte for large weights.
All three apply decoupled weight decay and the LR schedule the same way (lr * (direction + wd * param)).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def make_lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, then constant, linear or cosine decay to train.steps."""
    opt, steps = config.optimizer, config.train.steps
    peak, end, warmup = opt.learning_rate, opt.end_learning_rate, opt.warmup_steps
    decay_steps = max(steps - warmup, 1)
    if opt.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
    elif opt.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping (over all trained params), then the optimizer; with `train.train_text_encoder` the
    text encoder's params get their own instance of it, at `optimizer.text_encoder_learning_rate`. The VAE
    stage's patch-GAN discriminator has its own objective, so its own clipping and optimizer instance
    (the same settings): its gradients neither shrink the VAE's by clipping nor enter its moments."""
    opt = config.optimizer
    clip = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
    update = _optimizer(config, make_lr_schedule(config))
    if config.train.get("stage", "unet") == "vae" and config.vae_train.gan_weight > 0:
        per_network = optax.chain(*clip, *update)  # multi_transform gives each network its own state of it
        return optax.multi_transform({"vae": per_network, "discriminator": per_network},
                                     lambda params: {name: name for name in params})
    if not config.train.train_text_encoder:
        return optax.chain(*clip, *update)
    text_config = config.copy_and_resolve_references()
    text_config.optimizer.learning_rate = opt.text_encoder_learning_rate or opt.learning_rate
    text_update = _optimizer(text_config, make_lr_schedule(text_config))
    # Labels by component: a prefix of the params tree {"unet": ..., "text_encoder": ... (SDXL: "text_encoder_2")}.
    return optax.chain(*clip, optax.multi_transform(
        {"unet": optax.chain(*update), "text_encoder": optax.chain(*text_update)},
        lambda params: {name: "text_encoder" if name.startswith("text_encoder") else "unet" for name in params}))


def _optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule) -> list[optax.GradientTransformation]:
    """The transformations of `optimizer.name` over `schedule`, without clipping."""
    opt = config.optimizer
    chain = []
    if opt.name == "adamw":
        chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
    elif opt.name == "adamw_bf16":
        # optax.adamw is this chain; only the moments' storage differs.
        chain += [with_bf16_state(optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps), seed=config.train.seed),
                  optax.add_decayed_weights(opt.weight_decay), optax.scale_by_learning_rate(schedule)]
    elif opt.name == "adafactor":
        # optax.adafactor without its parameter-scale multiplier (so learning rates are on Adam's scale, as in
        # the diffusers recipes' Adafactor(scale_parameter=False, relative_step=False)), and with weight decay
        # scaled by the LR as in AdamW (optax.adafactor adds it after the LR). optimizer.b1/b2/eps are Adam's.
        chain += [optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                  optax.add_decayed_weights(opt.weight_decay), optax.scale_by_learning_rate(schedule)]
    else:
        raise ValueError(f"optimizer.name={opt.name!r} is not one of adamw, adamw_bf16, adafactor.")
    return chain


# --- bfloat16 optimizer state -----------------------------------------------------------------------


class Bf16State(NamedTuple):
    count: jax.Array  # updates so far: seeds the rounding noise of the next one (with train.seed)
    inner: optax.OptState  # the wrapped transformation's state, float32 leaves stored as bfloat16


def _mix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer (on a scalar here: the step's rounding seed)."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def stochastic_round_to_bf16(x: jax.Array, seed: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounding up or down with probability proportional to the distance.

    Round-to-nearest would freeze an exponential moving average: Adam's second moment moves by (1 - b2) =
    0.1% per step, below half a bfloat16 ulp (0.2%), so it could never decay. The noise is a hash of the value
    and `seed`, uniform over seeds: an entry stored with a fresh seed each step is rounded without bias over
    the steps, E[stored] = x. Not jax.random: a threefry draw per state array made compiling the tiny UNet's
    optimizer update 11x slower on CPU (157 s vs 14 s, measured); the hash fuses into the update's loops.
    Entries rounded with one seed are not independent as threefry's would be: in a measured 2000-step run of
    4096 second moments, each entry was as noisy as with threefry (7% relative), their mean 2% (threefry 0.1%).
    """
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = _mix32(bits + jnp.asarray(seed, jnp.uint32)) >> 16  # uniform over the 16 bits bf16 drops
    truncated = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(truncated, jnp.float32).astype(jnp.bfloat16)


def with_bf16_state(inner: optax.GradientTransformation, seed: int) -> optax.GradientTransformation:
    """`inner` with its float32 state kept in bfloat16 between steps (half the memory); it still computes in
    float32, and stores through unbiased stochastic rounding."""

    def init(params):
        state = inner.init(params)
        return Bf16State(count=jnp.zeros([], jnp.int32),
                         inner=jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state))

    def update(updates, state, params=None):
        inner_state = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        # One seed per step for all arrays (a seed per array tripled the compile time, measured); entries
        # still get different noise, since it also hashes their values.
        step_seed = _mix32(state.count.astype(jnp.uint32) + _mix32(jnp.uint32(seed)))
        stored = jax.tree.map(lambda x: stochastic_round_to_bf16(x, step_seed) if x.dtype == jnp.float32 else x,
                              inner_state)
        return updates, Bf16State(count=state.count + 1, inner=stored)

    return optax.GradientTransformation(init, update)
