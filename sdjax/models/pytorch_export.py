"""Flax param trees -> PyTorch state dicts (diffusers / transformers names and layouts), without torch.

The inverse of `pytorch_weights`. The rules are those of diffusers' and transformers'
`load_flax_weights_in_pytorch_model`, which need torch and a PyTorch model instance to fill, so we apply them
to numpy arrays ourselves; one rule more: diffusers' Flax VAE still names its attention `query/key/value/
proj_attn`, where the PyTorch VAE has `to_q/to_k/to_v/to_out.0`. Every converted key is mapped back with
diffusers'/transformers' own PyTorch->Flax renaming (on shapes only, no copies), so a rule that does not invert
exactly fails the export rather than writing weights that PyTorch would load into the wrong place.
"""

from __future__ import annotations

import importlib.metadata
import re

import numpy as np
from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
from transformers.modeling_flax_pytorch_utils import rename_key_and_reshape_tensor as transformers_rename

_INDEXED = re.compile(r"^(.*[^_\d])_(\d+)$")  # Flax "down_blocks_0" is PyTorch "down_blocks.0"
_NAMED_WITH_DIGIT = ("linear_1", "linear_2")  # TimestepEmbedding's own attribute names in PyTorch too
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# Config keys of diffusers' Flax models that their PyTorch classes do not take (they would warn about them).
_FLAX_ONLY_CONFIG_KEYS = ("use_memory_efficient_attention", "split_head_dim")


def diffusers_model_config(module, class_name: str) -> dict:
    """config.json of a diffusers Flax model (`module`) saved as `class_name` (its PyTorch or Flax class)."""
    pytorch = not class_name.startswith("Flax")
    values = {k: v for k, v in module.config.items()
              if not k.startswith("_") and not (pytorch and k in _FLAX_ONLY_CONFIG_KEYS)}
    return {"_class_name": class_name, "_diffusers_version": importlib.metadata.version("diffusers"), **values}


def _pytorch_key(flax_key: tuple[str, ...], library: str) -> list[str]:
    parts = []
    for i, part in enumerate(flax_key):
        if library == "diffusers" and part in _VAE_ATTENTION and i == len(flax_key) - 2:
            part = _VAE_ATTENTION[part]
        match = _INDEXED.match(part)
        if match and part not in _NAMED_WITH_DIGIT:
            part = f"{match.group(1)}.{match.group(2)}"
        parts.append(part)
    return parts


def pytorch_name_and_layout(flax_key: tuple[str, ...], array, library: str):
    """(PyTorch key, array in PyTorch layout) for one Flax param; `library` is "diffusers" or "transformers".

    The layout is a view where a transpose is needed (no copy)."""
    parts = _pytorch_key(flax_key, library)
    leaf = parts[-1]
    if leaf == "kernel":  # conv HWIO -> OIHW; dense (in, out) -> (out, in)
        array = np.transpose(array, (3, 2, 0, 1)) if array.ndim == 4 else array.T
        leaf = "weight"
    elif leaf in ("scale", "embedding"):
        leaf = "weight"
    return ".".join(parts[:-1] + [leaf]), array


def _check_inverse(pytorch_key: str, pytorch_shape, flax_key, flax_shapes: dict, library: str, where: str):
    dummy = np.broadcast_to(np.zeros((), np.float32), pytorch_shape)  # shape only: a view of one element
    if library == "diffusers":
        back, tensor = rename_key_and_reshape_tensor(tuple(rename_key(pytorch_key).split(".")), dummy, flax_shapes)
    else:
        back, tensor = transformers_rename(tuple(pytorch_key.split(".")), dummy, flax_shapes, "text_model")
    if back != flax_key or tuple(tensor.shape) != tuple(flax_shapes[flax_key].shape):
        raise ValueError(f"{where}: Flax param {'.'.join(flax_key)} became PyTorch {pytorch_key}, which "
                         f"{library} maps back to {'.'.join(back)}: the export cannot name it for PyTorch.")


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
