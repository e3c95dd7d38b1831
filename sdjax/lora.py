"""LoRA: low-rank adapters on the attention projections of the UNet (and optionally the CLIP text encoder).

An adapter on a Dense kernel W [in, out] (Flax layout) is A [in, r] and B [r, out], and the layer computes
with W + (alpha / r) * A @ B. A starts random (PEFT's default: uniform in +-1/sqrt(in)), B at zero, so at
init the model is the base model. Only A and B are trained; W stays frozen.

The adapters live in the params as one more component, `params["lora"] = {"unet": ..., "text_encoder": ...}`,
each a tree that mirrors the base component's module paths down to the adapted Dense
(`.../attn1/to_q/{lora_A, lora_B}`). The train state makes "lora" its only trainable component, so the
optimizer state, gradients and EMA are the adapters' alone.

Why merge the adapters into the kernels before the forward pass, rather than intercept each Dense call
(x @ W + scale * (x @ A) @ B)? Merging reuses diffusers' and transformers' Flax modules unchanged (works
with remat, memory-efficient attention and any sharding of W), and costs in * out * r FLOPs per adapted
kernel per step whatever the batch, while the per-token path costs tokens * (in + out) * r per image: for
SD 1.5, where a projection sees 4096 tokens per 512 px image, merging is cheaper. Its price: the backward
pass forms each adapted kernel's full gradient (x^T dy, as full fine-tuning of those kernels would) before
projecting it onto A and B.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict, unflatten_dict

# The modules that may carry adapters, by PyTorch name (as `lora.*_target_modules` and diffusers name them).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENT = "lora"  # the params key that holds the adapters


def enabled(config: ml_collections.ConfigDict) -> bool:
    """Whether the run trains LoRA adapters (configs saved before LoRA existed have no `lora` group)."""
    return "lora" in config and config.lora.rank > 0


def scale(lora_config: ml_collections.ConfigDict) -> float:
    """alpha / rank; `lora.alpha = 0` means alpha = rank (scale 1), as in diffusers' and PEFT's scripts."""
    alpha = lora_config.alpha or lora_config.rank
    return float(alpha) / lora_config.rank


def alpha(lora_config: ml_collections.ConfigDict) -> float:
    return float(lora_config.alpha or lora_config.rank)


def targets(lora_config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
    """component -> the PyTorch names of its adapted modules (components without targets left out)."""
    per_component = {"unet": tuple(lora_config.unet_target_modules),
                     "text_encoder": tuple(lora_config.text_encoder_target_modules)}
    return {component: names for component, names in per_component.items() if names}


def _flax_name(pytorch_name: str) -> str:
    return pytorch_name.replace(".", "_")  # diffusers' Flax attention names its output Dense "to_out_0"


def adapted_modules(component_params, target_names) -> list[tuple[str, ...]]:
    """Paths of the Dense modules of a component whose name is one of `target_names` (PyTorch names). A Dense
    kernel is 2-d, with leading layer axes in scanned layers (`model.scan_layers`: a stack's depth, a run's
    length, or both, sdjax/models/layer_stacks.py); adapters then get those axes too."""
    flax_names = {_flax_name(name) for name in target_names}
    return sorted(path[:-1] for path, leaf in flatten_dict(component_params).items()
                  if path[-1] == "kernel" and len(path) > 1 and path[-2] in flax_names and len(leaf.shape) >= 2)


def init_adapters(params: dict[str, Any], lora_config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """{component: adapter tree} for `params` (the base components); float32, B = 0 (see module doc)."""
    rank = lora_config.rank
    adapters = {}
    for component, names in targets(lora_config).items():
        base = flatten_dict(params[component])
        flat = {}
        for index, path in enumerate(adapted_modules(params[component], names)):
            *layers, fan_in, fan_out = base[path + ("kernel",)].shape  # layers: a scanned stack's depth
            bound = 1.0 / fan_in**0.5
            key = jax.random.fold_in(jax.random.fold_in(rng, len(adapters)), index)
            flat[path + ("lora_A",)] = jax.random.uniform(key, (*layers, fan_in, rank), jnp.float32, -bound, bound)
            flat[path + ("lora_B",)] = jnp.zeros((*layers, rank, fan_out), jnp.float32)
        adapters[component] = unflatten_dict(flat)
    return adapters


def add_adapters(params: dict[str, Any], config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
    """`params` with fresh adapters under "lora" when the config asks for LoRA; else `params` as they are."""
    if not enabled(config):
        return params
    return {**params, COMPONENT: init_adapters(params, config.lora, rng)}


def merge(params: dict[str, Any], adapter_scale: float) -> dict[str, Any]:
    """The base components with every adapter folded into its kernel: W + scale * A @ B (float32), and no
    "lora" entry. Params without adapters come back as they are."""
    if COMPONENT not in params:
        return params
    merged = {k: v for k, v in params.items() if k != COMPONENT}
    for component, adapter_tree in params[COMPONENT].items():
        flat = dict(flatten_dict(merged[component]))
        adapters = flatten_dict(adapter_tree)
        for path in sorted({key[:-1] for key in adapters}):
            kernel = flat[path + ("kernel",)].astype(jnp.float32)
            delta = adapters[path + ("lora_A",)] @ adapters[path + ("lora_B",)]
            flat[path + ("kernel",)] = kernel + adapter_scale * delta
        merged[component] = unflatten_dict(flat)
    return merged


def num_params(tree) -> int:
    return sum(int(leaf.size) for leaf in jax.tree.leaves(tree))
