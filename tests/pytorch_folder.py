"""Writes a tiny diffusers-format folder with PyTorch (safetensors) weights, as users download them."""

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from sdjax.models import text_encoder_config
from sdjax.models.tokenizer import builtin_tokenizer


def write_pytorch_folder(config, path: str, seed: int = 0) -> dict:
    """Random-init PyTorch UNet/VAE/text encoder(s) for `config.model`, saved in diffusers layout (SDXL's when
    the config has a model.text_encoder_2)."""
    torch.manual_seed(seed)
    tokenizer = builtin_tokenizer(config.data.max_length)
    modules = {"unet": UNet2DConditionModel(**config.model.unet.to_dict()),
               "vae": AutoencoderKL(**config.model.vae.to_dict()),
               "text_encoder": CLIPTextModel(text_encoder_config(config.model.text_encoder, tokenizer))}
    tokenizers = ("tokenizer",)
    if config.model.get("text_encoder_2"):
        modules["text_encoder_2"] = CLIPTextModelWithProjection(
            text_encoder_config(config.model.text_encoder_2, tokenizer))
        tokenizers += ("tokenizer_2",)
    # Non-zero everywhere, so a weight that is dropped or transposed wrongly shows in the outputs.
    with torch.no_grad():
        for name, module in modules.items():
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
            module.eval().save_pretrained(os.path.join(path, name))
    for name in tokenizers:
        tokenizer.save_pretrained(os.path.join(path, name))
    return modules


def with_text_model_prefix(state: dict) -> dict:
    """A CLIP text model's state dict with its keys as checkpoint files name them: transformers 5 flattened
    CLIPTextModel (`embeddings...`, where files and transformers 4 have `text_model.embeddings...`; it loads
    either); CLIPTextModelWithProjection kept the prefix."""
    return {key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}": value
            for key, value in state.items()}
