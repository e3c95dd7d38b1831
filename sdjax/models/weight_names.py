"""PyTorch <-> Flax names and layouts of the Stable Diffusion models' weights, in numpy.

One weight at a time: a PyTorch key and tensor (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
CLIPTextModel and CLIPTextModelWithProjection) give the Flax key and the array in Flax layout, and back. The
rules are those of diffusers' and transformers' `modeling_flax_pytorch_utils`, which diffusers 0.40 and
transformers 5 removed with the rest of their Flax code; written here without torch, diffusers or transformers.

    PyTorch                                    Flax
    down_blocks.0.resnets.1                    down_blocks_0/resnets_1    (diffusers; CLIP keeps layers/0)
    conv weight [O, I, H, W]                   kernel [H, W, I, O]
    linear weight [out, in]                    kernel [in, out]
    norm weight                                scale
    embedding weight                           embedding
    VAE attention to_q, to_k, to_v, to_out.0   query, key, value, proj_attn

A PyTorch `weight` is a norm's or an embedding's when the Flax tree has a `scale` or `embedding` there, so the
PyTorch -> Flax direction is given the Flax param shapes (from `jax.eval_shape`, or the params themselves).
Left out: their rules for layers these models do not have (batch norm statistics, weight_norm), and diffusers'
naming of an embedding's weight `scale` (a slip that SD's UNets and VAEs never meet: they have no
embedding layer).
"""

from __future__ import annotations

from collections.abc import Container

import numpy as np

DIFFUSERS, TRANSFORMERS = "diffusers", "transformers"

# diffusers' Flax VAE kept its attention's old PyTorch names; the UNet's attention is to_q etc. in both.
_VAE_ATTENTION_IN_FLAX = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
_VAE_ATTENTION_IN_PYTORCH = {flax: pytorch for pytorch, flax in _VAE_ATTENTION_IN_FLAX.items()}
# Names of PyTorch attributes that end in _<digit> themselves (TimestepEmbedding's), not a list index.
_NAMED_WITH_DIGIT = ("linear_1", "linear_2")
# LayerNorm's parameter names in old PyTorch checkpoints.
_LEGACY_NORM_NAMES = {"gamma": "weight", "beta": "bias"}
# transformers' Flax CLIP text models nest everything but the projection in this module.
_CLIP_TEXT_MODEL = "text_model"
# Buffers in PyTorch checkpoints, not weights: CLIP's position ids (0, 1, ..., which the Flax model takes as an
# input). SD 1.x's text_encoder/model.safetensors carries them; transformers no longer saves them.
_BUFFERS = ("position_ids",)


def is_pytorch_buffer(pytorch_key: str) -> bool:
    """Whether `pytorch_key` names a buffer rather than a weight (it has no Flax param)."""
    return pytorch_key.rsplit(".", 1)[-1] in _BUFFERS


def _check_library(library: str) -> None:
    if library not in (DIFFUSERS, TRANSFORMERS):
        raise ValueError(f"library must be {DIFFUSERS!r} or {TRANSFORMERS!r}, not {library!r}.")


def _flax_path(pytorch_key: str, library: str) -> tuple[str, ...]:
    """The Flax module path and leaf name of a PyTorch key, before layouts are considered."""
    _check_library(library)
    if library == TRANSFORMERS:
        return tuple(pytorch_key.split("."))
    path = []
    for part in pytorch_key.split("."):
        if part.isdigit() and path:  # a ModuleList index: Flax names the list's modules down_blocks_0, ...
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def _flax_kernel(weight: np.ndarray) -> np.ndarray:
    """A conv's [O, I, H, W] as [H, W, I, O], a linear's [out, in] as [in, out] (views, no copy)."""
    return np.transpose(weight, (2, 3, 1, 0)) if weight.ndim == 4 else weight.T


def _in_tree(key: tuple[str, ...], flax_shapes: Container[tuple[str, ...]], library: str) -> tuple[str, ...]:
    """`key`, or `key` inside CLIP's text_model where only that is in the tree: the weights of a bare
    CLIPTextTransformer go into a CLIPTextModel, as transformers loads them."""
    if library == TRANSFORMERS and key not in flax_shapes and (_CLIP_TEXT_MODEL,) + key in flax_shapes:
        return (_CLIP_TEXT_MODEL,) + key
    return key


def flax_name_and_layout(pytorch_key: str, tensor: np.ndarray, flax_shapes: Container[tuple[str, ...]],
                         library: str) -> tuple[tuple[str, ...], np.ndarray]:
    """(Flax key, array in Flax layout) of one PyTorch weight; `library` is "diffusers" or "transformers".

    `flax_shapes`: the flat Flax param tree ({key tuple: shape or array}), consulted for key names only. A key
    that the Flax tree does not have comes back in its likeliest Flax spelling, for the caller to report."""
    *module, leaf = _flax_path(pytorch_key, library)
    module = tuple(module)
    leaf = _LEGACY_NORM_NAMES.get(leaf, leaf)
    array = tensor
    if leaf == "weight":
        for flax_leaf in ("scale", "embedding"):  # a norm's or an embedding's: the same layout as in PyTorch
            key = _in_tree(module + (flax_leaf,), flax_shapes, library)
            if key in flax_shapes:
                return key, tensor
        leaf, array = "kernel", _flax_kernel(tensor)
    if library == DIFFUSERS and module and module[-1] in _VAE_ATTENTION_IN_FLAX:
        vae_key = module[:-1] + (_VAE_ATTENTION_IN_FLAX[module[-1]], leaf)
        if vae_key in flax_shapes:
            return vae_key, array
    return _in_tree(module + (leaf,), flax_shapes, library), array


def flax_name_and_layout_diffusers(pytorch_key: str, tensor: np.ndarray, flax_shapes):
    """`flax_name_and_layout` for diffusers' UNet and VAE (`pytorch_weights.pytorch_to_flax`'s `rename`)."""
    return flax_name_and_layout(pytorch_key, tensor, flax_shapes, DIFFUSERS)


def flax_name_and_layout_transformers(pytorch_key: str, tensor: np.ndarray, flax_shapes):
    """`flax_name_and_layout` for transformers' CLIP text models (`pytorch_weights.pytorch_to_flax`'s `rename`)."""
    return flax_name_and_layout(pytorch_key, tensor, flax_shapes, TRANSFORMERS)


def _pytorch_part(part: str, library: str) -> str:
    """A Flax module name as PyTorch spells it: diffusers' down_blocks_0 is down_blocks.0."""
    if library == DIFFUSERS and part not in _NAMED_WITH_DIGIT:
        name, _, index = part.rpartition("_")
        if name and index.isdigit():
            return f"{name}.{index}"
    return part


def pytorch_name_and_layout(flax_key: tuple[str, ...], array: np.ndarray, library: str) -> tuple[str, np.ndarray]:
    """(PyTorch key, array in PyTorch layout) of one Flax param; `library` is "diffusers" or "transformers".

    The inverse of `flax_name_and_layout`; the layout is a view where a transpose is needed (no copy)."""
    _check_library(library)
    *module, leaf = flax_key
    if library == DIFFUSERS and module and module[-1] in _VAE_ATTENTION_IN_PYTORCH:
        module[-1] = _VAE_ATTENTION_IN_PYTORCH[module[-1]]
    parts = [_pytorch_part(part, library) for part in module]
    if leaf == "kernel":  # conv HWIO -> OIHW; dense (in, out) -> (out, in)
        array = np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T
        leaf = "weight"
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return ".".join(parts + [leaf]), array
