"""Reading diffusers/transformers weight files into float32 Flax param trees, without torch.

diffusers 0.39's Flax `from_pretrained(from_pt=True)` only reads `diffusion_pytorch_model.bin`, needs torch,
and first initialises a full random copy of the model. Hub folders ship `.safetensors` (often fp16, sometimes
sharded), so we read those directly and rename into the param *shapes* from `jax.eval_shape`: no torch, and
no second copy of an 860M-param UNet in memory. The key renaming is sdjax/models/weight_names.py.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from flax import serialization
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open

import sdjax.models.weight_names as weight_names

_DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
)
_TRANSFORMERS_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "model.fp16.safetensors",
    "pytorch_model.bin",
)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    tensors = {}
    with safe_open(path, framework="flax") as f:  # flax framework reads bf16 too; numpy cannot
        for key in f.keys():
            tensors[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    return tensors


def _read_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install 'sdjax[torch]'), or convert the "
            "folder to .safetensors."
        ) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}


def _read_weight_files(folder: str, candidates: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The first of `candidates` present in `folder` (single file or sharded index), as float32 arrays."""
    for name in candidates:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state = {}
            for shard in shards:
                shard_path = os.path.join(folder, shard)
                state.update(_read_safetensors(shard_path) if shard.endswith(".safetensors") else _read_bin(shard_path))
            return state
        return _read_safetensors(path) if name.endswith(".safetensors") else _read_bin(path)
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*")))
    raise ValueError(f"No weights in {folder}: expected one of {list(candidates)}, found {found}.")


def pytorch_to_flax(state: dict[str, np.ndarray], shapes, where: str,
                    rename=weight_names.flax_name_and_layout_diffusers):
    """Renames/transposes a PyTorch state dict into the Flax param tree described by `shapes`."""
    expected = flatten_dict(shapes)
    flat = {}
    for pt_key, tensor in state.items():
        if weight_names.is_pytorch_buffer(pt_key):
            continue
        key, value = rename(pt_key, tensor, expected)
        flat[key] = value
    missing = sorted(".".join(k) for k in expected.keys() - flat.keys())
    unexpected = sorted(".".join(k) for k in flat.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"Weights in {where} do not match the model built from its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} ({len(unexpected)})."
        )
    for key, value in flat.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"{where}: weight {'.'.join(key)} has shape {value.shape}, the model expects {expected[key].shape}.")
    return unflatten_dict({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in flat.items()})


def load_flax_msgpack(path: str, shapes):
    with open(path, "rb") as f:
        return serialization.from_bytes(shapes, f.read())


def load_diffusers_weights(folder: str, shapes):
    """UNet or VAE params from a diffusers model folder (Flax msgpack or PyTorch weights)."""
    flax_file = os.path.join(folder, "diffusion_flax_model.msgpack")
    if os.path.isfile(flax_file):
        return load_flax_msgpack(flax_file, shapes)
    return pytorch_to_flax(_read_weight_files(folder, _DIFFUSERS_WEIGHT_FILES), shapes, folder)


def load_clip_text_weights(folder: str, shapes):
    """CLIP text encoder params from a transformers folder (Flax msgpack or PyTorch weights)."""
    flax_file = os.path.join(folder, "flax_model.msgpack")
    if os.path.isfile(flax_file):
        return load_flax_msgpack(flax_file, shapes)
    state = _read_weight_files(folder, _TRANSFORMERS_WEIGHT_FILES)
    return pytorch_to_flax(state, shapes, folder, rename=weight_names.flax_name_and_layout_transformers)
