"""Learning-rate schedule and optimizer (optax)."""

from __future__ import annotations

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
    opt = config.optimizer
    schedule = make_lr_schedule(config)
    chain = []
    if opt.grad_clip_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay))
    return optax.chain(*chain)
