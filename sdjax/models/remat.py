"""Activation checkpointing (remat) for the UNet: `train.remat` = none | minimal | full.

The backward pass needs every activation of the forward pass. Remat keeps fewer of them and recomputes the
rest, block by block, when the gradient reaches that block:
- `none`: keep everything (fastest, most memory).
- `minimal`: inside each ResNet / Transformer block keep the outputs of convolutions and of the weight
  matmuls (projections, MLPs), recompute the cheap rest: norms, activations, attention scores and softmax.
- `full`: keep only each block's inputs; recompute the whole block (about one more forward pass).

The blocks are the UNet's `ResnetBlock2D` and `Transformer2DModel` (the same granularity as diffusers'
PyTorch `enable_gradient_checkpointing`): the UNet wraps them in `nn.remat` with the policy below
(sdjax/models/unet_layers.py `rematerialized`). The parameter tree does not change: checkpoints, pretrained
weights and sharding rules are the same with or without remat.
"""

from __future__ import annotations

import jax


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
