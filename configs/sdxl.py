"""Stable Diffusion XL 1.0 (base): UNet 2.6B (epsilon prediction, size/crop micro-conditioning), two text
encoders (CLIP ViT-L/14 123M and OpenCLIP ViT-bigG/14 695M with its projection), 8x VAE, 1024 px.

diffusers 0.39's FlaxUNet2DConditionModel trains SDXL's UNet (addition_embed_type "text_time"); sdjax
conditions it as diffusers' SDXL pipelines do: both encoders' penultimate hidden states side by side (2048
wide), the second's pooled projection, and the micro-conditioning (each image's size before resizing, its
crop's top-left corner, the target size: sdjax/data/preprocess.py `Crop`). Set model.pretrained to a local diffusers SDXL folder (with
text_encoder_2/ and tokenizer_2/) to fine-tune it; without it the architecture is built with random weights
(for `sdjax plan` and tests only). It needs FSDP on 16 GiB chips (`sdjax plan` tells).

    sdjax train --config configs/sdxl.py --config.model.pretrained=/path/to/sdxl \
        --config.data.source=imagefolder --config.data.path=/path/to/images --config.mesh.fsdp=4 --workdir DIR
"""

import ml_collections

from sdjax.config import base_config


def get_config():
    c = base_config()
    # A new dict rather than update(): attention_head_dim changes type (int in SD 1.5, per-block tuple here).
    c.model.unet = ml_collections.ConfigDict({
        **c.model.unet.to_dict(), "sample_size": 128, "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "attention_head_dim": (5, 10, 20), "transformer_layers_per_block": (1, 2, 10),
        "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816})
    c.model.vae.update(sample_size=1024, scaling_factor=0.13025)
    # model.text_encoder stays CLIP ViT-L/14 (base config); the second is OpenCLIP ViT-bigG/14.
    c.model.text_encoder_2 = ml_collections.ConfigDict(dict(
        vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280))
    c.data.resolution = 1024
    c.data.random_flip = True
    c.diffusion.update(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="epsilon")
    # diffusers' train_text_to_image_sdxl example: 1e-6, constant; a larger global batch takes a larger rate.
    c.optimizer.update(learning_rate=4e-6, warmup_steps=500, decay="constant", weight_decay=1e-2)
    c.train.update(steps=10_000, batch_size=32, precision="bf16", log_every=50)
    return c
