"""Flax param trees -> PyTorch state dicts (diffusers / transformers names and layouts), without torch.

The inverse of `pytorch_weights`, with the names and layouts of sdjax/models/weight_names.py (the rules of
diffusers' and transformers' `load_flax_weights_in_pytorch_model`, which needed torch and a PyTorch model
instance to fill, and are gone upstream with their Flax code). Every converted key is mapped back PyTorch ->
Flax (on shapes only, no copies), so a rule that does not invert exactly fails the export rather than writing
weights that PyTorch would load into the wrong place.
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np

import sdjax.models.weight_names as weight_names
from sdjax.models.weight_names import pytorch_name_and_layout

# Config keys of diffusers' Flax models that their PyTorch classes do not take (they would warn about them).
_FLAX_ONLY_CONFIG_KEYS = ("use_memory_efficient_attention", "split_head_dim")


def diffusers_version() -> dict:
    """{"_diffusers_version": the installed diffusers'}, the bookkeeping key diffusers writes into its configs;
    empty where diffusers is not installed (sdjax does not need it to export; diffusers reads folders without
    the key)."""
    try:
        return {"_diffusers_version": importlib.metadata.version("diffusers")}
    except importlib.metadata.PackageNotFoundError:
        return {}


def diffusers_model_config(module, class_name: str) -> dict:
    """config.json of a diffusers Flax model (`module`) saved as `class_name` (its PyTorch or Flax class)."""
    pytorch = not class_name.startswith("Flax")
    values = {k: v for k, v in module.config.items()
              if not k.startswith("_") and not (pytorch and k in _FLAX_ONLY_CONFIG_KEYS)}
    return {"_class_name": class_name, **diffusers_version(), **values}


def _check_inverse(pytorch_key: str, pytorch_shape, flax_key, flax_shapes: dict, library: str, where: str):
    dummy = np.broadcast_to(np.zeros((), np.float32), pytorch_shape)  # shape only: a view of one element
    back, tensor = weight_names.flax_name_and_layout(pytorch_key, dummy, flax_shapes, library)
    if back != flax_key or tuple(tensor.shape) != tuple(flax_shapes[flax_key].shape):
        raise ValueError(f"{where}: Flax param {'.'.join(flax_key)} became PyTorch {pytorch_key}, which "
                         f"maps back to {'.'.join(back)} ({library} names): the export cannot name it for PyTorch.")


def flax_to_pytorch_state(flat_params: dict, library: str, where: str) -> dict[str, np.ndarray]:
    """{PyTorch key: contiguous float32 array} from a flattened Flax param dict, which it empties as it goes
    (each Flax array can be freed once converted: one copy of the component in memory, not two)."""
    flax_shapes = {k: np.broadcast_to(np.zeros((), np.float32), v.shape) for k, v in flat_params.items()}
    state = {}
    for flax_key in list(flat_params):
        array = np.asarray(flat_params.pop(flax_key))
        pytorch_key, array = pytorch_name_and_layout(flax_key, array, library)
        _check_inverse(pytorch_key, array.shape, flax_key, flax_shapes, library, where)
        state[pytorch_key] = np.ascontiguousarray(array, dtype=np.float32)
    return state


# --- LoRA adapters -> diffusers' LoRA file -----------------------------------------------------------

# component -> (library whose names it takes, key prefix in the LoRA file) as `load_lora_weights` reads it.
_LORA_COMPONENTS = {"unet": ("diffusers", "unet"), "text_encoder": ("transformers", "text_encoder")}


def lora_to_pytorch_state(adapters: dict, base_shapes: dict, rank: int, alpha: float) -> tuple[dict, dict]:
    """(state dict, safetensors metadata) of `pytorch_lora_weights.safetensors` for diffusers'
    `StableDiffusionPipeline.load_lora_weights`.

    Keys are PEFT's: `unet.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] (PyTorch Linear
    layout: our Flax A [in, r] and B [r, out] transposed), `text_encoder.<module>...` likewise. The metadata
    holds each component's PEFT LoraConfig (r, lora_alpha, the exact target modules) under diffusers'
    `lora_adapter_metadata` key: without it diffusers would assume alpha = r and scale the adapters wrongly
    whenever lora.alpha != lora.rank. `base_shapes`: the base components' params (or shapes), to check that
    every module name maps back to the adapted kernel."""
    from flax.traverse_util import flatten_dict

    state, config = {}, {}
    for component, tree in adapters.items():
        library, prefix = _LORA_COMPONENTS[component]
        flat = flatten_dict(tree)
        flax_shapes = {k: np.broadcast_to(np.zeros((), np.float32), v.shape)
                       for k, v in flatten_dict(base_shapes[component]).items()}
        modules = []
        for path in sorted({key[:-1] for key in flat}):
            kernel_key = path + ("kernel",)
            weight_name, weight = pytorch_name_and_layout(kernel_key, flax_shapes[kernel_key], library)
            _check_inverse(weight_name, weight.shape, kernel_key, flax_shapes, library, f"LoRA {component}")
            module = weight_name.removesuffix(".weight")
            # PEFT matches a target module by its name's end: without CLIP's `text_model.` prefix the name
            # matches transformers 4's CLIPTextModel and 5's, which dropped that level (diffusers strips the
            # prefix from the keys below itself where the model has none).
            modules.append(module.removeprefix("text_model."))
            for name, array in (("lora_A", flat[path + ("lora_A",)]), ("lora_B", flat[path + ("lora_B",)])):
                state[f"{prefix}.{module}.{name}.weight"] = np.ascontiguousarray(np.asarray(array).T, np.float32)
        config.update({f"{prefix}.r": rank, f"{prefix}.lora_alpha": alpha, f"{prefix}.target_modules": modules,
                       f"{prefix}.rank_pattern": {}, f"{prefix}.alpha_pattern": {}})
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    return state, metadata
