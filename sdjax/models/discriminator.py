"""The patch-GAN discriminator of the VAE stage's optional adversarial loss (`vae_train.gan_weight`).

The architecture of pix2pix's NLayerDiscriminator as the Stable Diffusion / LDM autoencoder uses it
(taming-transformers): a 4x4 stride-2 conv, then `num_layers - 1` more stride-2 convs doubling the channels
(at most 8x), one stride-1 conv, and a 4x4 conv to one logit per patch. Each logit judges one receptive
field (70x70 pixels with 3 layers), not the whole image, so the loss pushes the decoder towards sharp local
texture, which L1 alone blurs.

One difference, on purpose: GroupNorm instead of BatchNorm. BatchNorm would put running statistics into
the train state and make an example's logits depend on the other examples of its (micro-)batch; GroupNorm
is per example, so gradient accumulation stays exact, as for every other loss in sdjax.

diffusers and transformers have no such module, in Flax or PyTorch, so it is ours.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

# taming-transformers initialises the discriminator's convs from N(0, 0.02) (pix2pix's weights_init).
_CONV_INIT = nn.initializers.normal(0.02)


class PatchDiscriminator(nn.Module):
    """Images NHWC in [-1, 1] -> logits [B, h, w] (real > 0 > fake), one per overlapping patch."""

    channels: int = 64
    num_layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = images.astype(self.dtype)
        x = nn.Conv(self.channels, (4, 4), strides=2, padding=1, kernel_init=_CONV_INIT, dtype=self.dtype)(x)
        x = nn.leaky_relu(x, 0.2)
        for layer in range(1, self.num_layers + 1):
            stride = 2 if layer < self.num_layers else 1
            features = self.channels * min(2 ** layer, 8)
            x = nn.Conv(features, (4, 4), strides=stride, padding=1, use_bias=False, kernel_init=_CONV_INIT,
                        dtype=self.dtype)(x)
            x = nn.GroupNorm(num_groups=min(32, features), dtype=self.dtype)(x)
            x = nn.leaky_relu(x, 0.2)
        x = nn.Conv(1, (4, 4), strides=1, padding=1, kernel_init=_CONV_INIT, dtype=self.dtype)(x)
        return x[..., 0].astype(jnp.float32)


def smallest_image_size(num_layers: int) -> int:
    """The smallest image side that leaves the discriminator at least one 1x1 logit: `num_layers` halvings,
    then two 4x4 convs with padding 1 (each takes one pixel off)."""
    return 3 * 2 ** num_layers


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """The discriminator's hinge loss, as taming-transformers': 0.5 * (mean relu(1 - real) + mean relu(1 +
    fake))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """What the decoder minimises: -mean logits of its reconstructions."""
    return -jnp.mean(logits_fake)
