"""Writes a tiny diffusers-format folder with PyTorch (safetensors) weights, as users download them."""

import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdjax.models.tokenizer import builtin_tokenizer


def write_pytorch_folder(config, path: str, seed: int = 0) -> dict:
    """Random-init PyTorch UNet/VAE/text encoder for `config.model`, saved in diffusers layout."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config.model.unet.to_dict()).eval()
    vae = AutoencoderKL(**config.model.vae.to_dict()).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**config.model.text_encoder.to_dict())).eval()
    # Non-zero everywhere, so a weight that is dropped or transposed wrongly shows in the outputs.
    with torch.no_grad():
        for module in (unet, vae, text_encoder):
            for p in module.parameters():
                p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(os.path.join(path, "unet"))
    vae.save_pretrained(os.path.join(path, "vae"))
    text_encoder.save_pretrained(os.path.join(path, "text_encoder"))
    builtin_tokenizer(config.data.max_length).save_pretrained(os.path.join(path, "tokenizer"))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder}
