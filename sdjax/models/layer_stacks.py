"""`model.scan_layers`: the parameter trees of scanned layer stacks, and the conversion to and from the
unrolled trees.

Unrolled, a stack's layers are siblings (diffusers' and transformers' names: what pretrained folders, exports
and runs without `scan_layers` use); scanned (`nn.scan`, so the compiler sees one layer), they are one
subtree whose arrays have a leading layer axis:

  UNet  .../attentions_0/transformer_blocks_0/attn1/to_q/kernel [in, out], ..., transformer_blocks_{d-1}/...
        .../attentions_0/transformer_blocks/attn1/to_q/kernel   [d, in, out]       (depth d > 1 only)
        down_blocks_0/resnets_0/conv1/kernel, attentions_0/..., resnets_1/..., attentions_1/...
        down_blocks_0/layers_0_to_1/resnet/conv1/kernel [2, 3, 3, in, out], layers_0_to_1/attention/...
  CLIP  text_model/encoder/layers/0/self_attn/q_proj/kernel     [in, out], ..., layers/{n-1}/...
        text_model/encoder/layers/self_attn/q_proj/kernel       [n, in, out]

The UNet scans transformer stacks deeper than one layer (SDXL's 2 and 10) and, in its down and up blocks,
each run of consecutive layers (ResNet block, with its transformer in cross-attention blocks) whose ResNet
blocks have the same shapes (the same input channels: e.g. SD 1.5's first down block, and the last two layers
of its last up block); the mid block's two ResNet blocks are not consecutive. A run of layers with deep
stacks has both axes, [run, depth, ...]. CLIP scans all its layers. The functions take any nested dict of
arrays, numpy arrays or ShapeDtypeStructs with these names (params, LoRA adapters mirroring them, shapes);
`stack_tree` finds a block's runs from its ResNet blocks' shapes, so it takes trees that have them (params,
their shapes), not LoRA adapters alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

UNET_BLOCKS = "transformer_blocks"  # the UNet stack's unrolled children are `transformer_blocks_{i}`
CLIP_LAYERS = "layers"  # CLIP's unrolled layers are `layers/{i}`
_UNET_BLOCK = re.compile(rf"{UNET_BLOCKS}_(\d+)")
_UNET_LEVEL = re.compile(r"(down|up)_blocks_\d+")  # the blocks whose runs of layers are scanned
_RUN = re.compile(r"layers_(\d+)_to_(\d+)")  # a scanned run of a block's layers
_RESNET, _ATTENTION = "resnets_{}", "attentions_{}"
# The params components that have stacks (the VAE, discriminator and LPIPS have none); LoRA's adapters
# mirror them under "lora".
STACKED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "lora")


def _stack(leaves: list) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    if isinstance(first, np.ndarray):
        return np.stack(leaves)
    return jnp.stack(leaves)


def _unstack(leaf, index: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[index]


def _layer_count(stacked: Mapping) -> int:
    return jax.tree.leaves(stacked)[0].shape[0]


def _stack_subtrees(subtrees: list) -> Any:
    return jax.tree.map(lambda *leaves: _stack(list(leaves)), *subtrees)


def _unstack_subtree(stacked: Mapping) -> list:
    return [jax.tree.map(lambda leaf: _unstack(leaf, i), stacked) for i in range(_layer_count(stacked))]


def _is_unrolled_clip(key: str, value) -> bool:
    return key == CLIP_LAYERS and isinstance(value, Mapping) and bool(value) and all(k.isdigit() for k in value)


def _shapes(tree) -> Any:
    return jax.tree.map(lambda leaf: tuple(leaf.shape), tree)


def _stack_runs(block: Mapping) -> dict:
    """A down or up block's tree with each run of consecutive same-shaped layers (ResNet block + transformer)
    stacked as `layers_{first}_to_{last}` {"resnet", "attention"}; single layers keep their names."""
    indices = sorted(int(key.split("_")[1]) for key in block if re.fullmatch(r"resnets_\d+", key))
    runs = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1 and \
                _shapes(block[_RESNET.format(runs[-1][-1])]) == _shapes(block[_RESNET.format(i)]):
            runs[-1].append(i)
        else:
            runs.append([i])
    runs = [run for run in runs if len(run) > 1]
    in_runs = {name.format(i) for run in runs for i in run for name in (_RESNET, _ATTENTION)}
    out = {key: value for key, value in block.items() if key not in in_runs}
    for run in runs:
        layers = [{"resnet": block[_RESNET.format(i)],
                   **({"attention": block[_ATTENTION.format(i)]} if _ATTENTION.format(i) in block else {})}
                  for i in run]
        out[f"layers_{run[0]}_to_{run[-1]}"] = _stack_subtrees([stack_tree(layer) for layer in layers])
    return out


def stack_tree(tree: Mapping) -> dict:
    """The scanned tree of an unrolled one (stacks already scanned are left as they are)."""
    out, blocks = {}, {}
    for key, value in tree.items():
        if (match := _UNET_BLOCK.fullmatch(key)) and isinstance(value, Mapping):
            blocks[int(match.group(1))] = value
        elif _is_unrolled_clip(key, value):
            out[key] = _stack_subtrees([stack_tree(value[str(i)]) for i in range(len(value))])
        elif _UNET_LEVEL.fullmatch(key) and isinstance(value, Mapping):
            out[key] = {k: v if _RUN.fullmatch(k) else stack_tree(v) if isinstance(v, Mapping) else v
                        for k, v in _stack_runs(value).items()}
        elif isinstance(value, Mapping):
            out[key] = stack_tree(value)
        else:
            out[key] = value
    if len(blocks) == 1:  # a one-layer UNet stack is not scanned
        out[f"{UNET_BLOCKS}_0"] = stack_tree(blocks[0])
    elif blocks:
        out[UNET_BLOCKS] = _stack_subtrees([stack_tree(blocks[i]) for i in range(len(blocks))])
    return out


def unstack_tree(tree: Mapping) -> dict:
    """The unrolled tree of a scanned one (unrolled parts are left as they are)."""
    out = {}
    for key, value in tree.items():
        if not isinstance(value, Mapping):
            out[key] = value
        elif key == UNET_BLOCKS:
            out.update({f"{UNET_BLOCKS}_{i}": layer for i, layer in enumerate(_unstack_subtree(value))})
        elif key == CLIP_LAYERS and not _is_unrolled_clip(key, value):
            out[key] = {str(i): layer for i, layer in enumerate(_unstack_subtree(value))}
        elif match := _RUN.fullmatch(key):
            for offset, layer in enumerate(_unstack_subtree(value)):  # LoRA's adapters have no "resnet"
                index = int(match.group(1)) + offset
                if "resnet" in layer:
                    out[_RESNET.format(index)] = unstack_tree(layer["resnet"])
                if "attention" in layer:
                    out[_ATTENTION.format(index)] = unstack_tree(layer["attention"])
        else:
            out[key] = unstack_tree(value)
    return out


def stack_params(params: Mapping) -> dict:
    """`params` ({component: tree}) with the stacks of STACKED_COMPONENTS scanned."""
    return {name: stack_tree(tree) if name in STACKED_COMPONENTS else tree for name, tree in params.items()}


def unstack_params(params: Mapping) -> dict:
    """`params` ({component: tree}) with every scanned stack unrolled: diffusers' and transformers' names."""
    return {name: unstack_tree(tree) if name in STACKED_COMPONENTS else tree for name, tree in params.items()}
