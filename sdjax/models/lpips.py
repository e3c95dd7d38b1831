"""LPIPS (Zhang et al. 2018), the perceptual term of the VAE stage's optional loss (`vae_train.perceptual_weight`).

The distance of the `lpips` package (v0.1, VGG16 trunk), which the Stable Diffusion / LDM autoencoder
objective adds to L1: both images through VGG16; at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 the
features are unit-normalised over channels, their squared difference is weighted per channel by the
calibrated linear layers (non-negative 1x1 convs), averaged over space and summed over the five layers.

The weights come from one local file (nothing is downloaded): `vae_train.perceptual_weights`, a safetensors
file of `lpips.LPIPS(net="vgg").state_dict()` (ImageNet VGG16 trunk + calibrated linear layers):

    python -c 'import lpips, safetensors.torch as st; st.save_file(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg.safetensors")'

The published Flax ports (lpips-j, lpips-jax) fetch their weights from the network at import or init; this
module reads the same state dict that the PyTorch package uses, so the two give the same distance
(tests/test_vae_losses.py checks it against a PyTorch implementation of the package's forward pass).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

# VGG16's `features` indices of its 13 convs, grouped by the five slices LPIPS reads out (after each
# slice's last ReLU); `lpips` keeps these indices in its state dict keys ("net.slice2.5.weight").
_SLICE_CONV_INDICES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
# The `lpips` v0.1 ScalingLayer: inputs in [-1, 1] are shifted and scaled as ImageNet's mean/std would.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
_NORMALIZE_EPS = 1e-10  # lpips.normalize_tensor's
# The tensors sdjax reads from an lpips state dict (its ScalingLayer buffers are the constants above).
_EXPECTED_KEYS = tuple([f"net.slice{s + 1}.{i}.{p}" for s, convs in enumerate(_SLICE_CONV_INDICES) for i in convs
                        for p in ("weight", "bias")] + [f"lin{s}.model.1.weight" for s in range(5)])


class LPIPSWeightsError(ValueError):
    """`vae_train.perceptual_weights` is not an `lpips` VGG state dict in safetensors."""


def _conv_name(slice_index: int, conv_index: int) -> str:
    return f"conv{slice_index + 1}_{conv_index + 1}"  # VGG's names: conv1_1 ... conv5_3


class LPIPS(nn.Module):
    """(images, images) NHWC in [-1, 1] -> LPIPS distance per example [B]."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)  # channels of VGG16's five slices
    dtype: jnp.dtype = jnp.float32

    def features(self, images: jax.Array) -> list[jax.Array]:
        x = (images.astype(jnp.float32) - jnp.array(_SHIFT)) / jnp.array(_SCALE)
        x = x.astype(self.dtype)
        outputs = []
        for s, (width, convs) in enumerate(zip(self.widths, _SLICE_CONV_INDICES)):
            if s > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for c in range(len(convs)):
                x = nn.relu(nn.Conv(width, (3, 3), padding=1, dtype=self.dtype, name=_conv_name(s, c))(x))
            outputs.append(x)
        return outputs

    @nn.compact
    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        batch = images_a.shape[0]
        features = self.features(jnp.concatenate([images_a, images_b]))  # one pass over both
        distance = jnp.zeros((batch,), jnp.float32)
        for s, (width, feature) in enumerate(zip(self.widths, features)):
            feature = feature.astype(jnp.float32)
            feature = feature / (jnp.sqrt(jnp.sum(jnp.square(feature), axis=-1, keepdims=True)) + _NORMALIZE_EPS)
            squared_difference = jnp.square(feature[:batch] - feature[batch:])
            channel_weights = self.param(f"lin{s}", nn.initializers.uniform(1.0 / width), (width,), jnp.float32)
            distance = distance + jnp.mean(squared_difference @ channel_weights, axis=(1, 2))
        return distance


def read_widths(path: str) -> tuple[int, ...]:
    """The five slice widths of the VGG trunk in an `lpips` state dict file (64, 128, 256, 512, 512 for
    VGG16), from its header alone."""
    with _open_checked(path) as f:
        return tuple(int(f.get_slice(f"lin{s}.model.1.weight").get_shape()[1]) for s in range(5))


def load_params(path: str) -> dict:
    """float32 Flax params of `LPIPS` from an `lpips` state dict file: conv kernels OIHW -> HWIO, linear
    layers [1, C, 1, 1] -> [C]."""
    params = {}
    with _open_checked(path) as f:
        for s, convs in enumerate(_SLICE_CONV_INDICES):
            for c, index in enumerate(convs):
                prefix = f"net.slice{s + 1}.{index}"
                kernel = np.asarray(f.get_tensor(f"{prefix}.weight"), np.float32)
                params[_conv_name(s, c)] = {"kernel": np.transpose(kernel, (2, 3, 1, 0)),
                                            "bias": np.asarray(f.get_tensor(f"{prefix}.bias"), np.float32)}
            params[f"lin{s}"] = np.asarray(f.get_tensor(f"lin{s}.model.1.weight"), np.float32).reshape(-1)
    return params


def _open_checked(path: str):
    """The safetensors file at `path`, open, once its keys are those of an lpips VGG state dict; else
    LPIPSWeightsError naming the file and what it lacks."""
    try:
        f = safe_open(path, framework="numpy")
    except FileNotFoundError:
        raise LPIPSWeightsError(f"vae_train.perceptual_weights={path!r}: no such file") from None
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise LPIPSWeightsError(f"vae_train.perceptual_weights={path!r} is not a safetensors file ({e}); "
                                "expected lpips.LPIPS(net='vgg').state_dict() saved with safetensors") from None
    keys = set(f.keys())
    missing = [k for k in _EXPECTED_KEYS if k not in keys]
    if missing:
        raise LPIPSWeightsError(
            f"vae_train.perceptual_weights={path!r} is not an lpips VGG state dict: it lacks {missing[:3]} "
            f"({len(missing)} of {len(_EXPECTED_KEYS)} tensors). Expected the safetensors file of "
            "lpips.LPIPS(net='vgg').state_dict() (see sdjax/models/lpips.py).")
    return f
