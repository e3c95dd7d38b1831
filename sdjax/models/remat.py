"""Activation checkpointing (remat) for the UNet: `train.remat` = none | minimal | full.

The backward pass needs every activation of the forward pass. Remat keeps fewer of them and recomputes the
rest, block by block, when the gradient reaches that block:
- `none`: keep everything (fastest, most memory).
- `minimal`: inside each ResNet / Transformer block keep the outputs of convolutions and of the weight
  matmuls (projections, MLPs), recompute the cheap rest: norms, activations, attention scores and softmax.
- `full`: keep only each block's inputs; recompute the whole block (about one more forward pass).

The blocks are the UNet's `FlaxResnetBlock2D` and `FlaxTransformer2DModel` (the same granularity as
diffusers' PyTorch `enable_gradient_checkpointing`). diffusers builds them inside the UNet's own `setup`,
with no option to wrap them, so a Flax method interceptor wraps each block's `__call__` in `nn.remat` as it
is called. The parameter tree does not change: checkpoints, pretrained weights and sharding rules are the
same with or without remat.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
from diffusers.models.attention_flax import FlaxTransformer2DModel
from diffusers.models.resnet_flax import FlaxResnetBlock2D

BLOCKS = (FlaxResnetBlock2D, FlaxTransformer2DModel)


def _conv_saveable(prim, *_, **__) -> bool:
    return prim is jax.lax.conv_general_dilated_p


# jax.checkpoint policies: which intermediate values are kept for the backward pass. Convolutions are most of a
# UNet's FLOPs, so `minimal` keeps them; batched matmuls (attention scores) are the largest activations, so
# it does not.
POLICIES = {
    "minimal": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _conv_saveable),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _remat_interceptor(policy):
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, BLOCKS):
            return next_fun(*args, **kwargs)
        # `deterministic` is a Python bool (dropout on/off): closed over, so remat traces it as a constant.
        deterministic = kwargs.pop("deterministic", True)
        method = context.orig_method.func  # the undecorated __call__ (orig_method is bound to the module)

        def block(module, *block_args):
            return method(module, *block_args, deterministic=deterministic)

        return nn.remat(block, policy=policy)(context.module, *args, **kwargs)

    return interceptor


def remat_unet_blocks(policy_name: str):
    """A context in which the UNet's blocks are rematerialized with `policy_name` (a no-op for "none").

    Enter it around the UNet's `apply` inside the function being differentiated.
    """
    if policy_name == "none":
        return contextlib.nullcontext()
    if policy_name not in POLICIES:
        raise ValueError(f"train.remat={policy_name!r} is not one of ['none', {', '.join(map(repr, POLICIES))}].")
    return nn.intercept_methods(_remat_interceptor(POLICIES[policy_name]))
