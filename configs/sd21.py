"""Stable Diffusion 2.1 (768-v): UNet 866M with linear projections and per-block head dims, v-prediction,
768 px, OpenCLIP ViT-H/14 text encoder (1024 wide, 23 layers, gelu) in CLIPTextModel form, 8x VAE.

Set model.pretrained to a local diffusers folder of SD 2.1 to fine-tune it; without it the architecture is
built with random weights (for `sdjax plan` and tests only).
"""

import ml_collections

from sdjax.config import base_config


def get_config():
    c = base_config()
    # A new dict rather than update(): attention_head_dim changes type (int in SD 1.5, per-block tuple here).
    c.model.unet = ml_collections.ConfigDict({
        **c.model.unet.to_dict(), "sample_size": 96, "attention_head_dim": (5, 10, 20, 20),
        "cross_attention_dim": 1024, "use_linear_projection": True})
    c.model.vae.update(sample_size=768)
    c.model.text_encoder.update(vocab_size=49408, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu",
                                projection_dim=512)
    c.data.resolution = 768
    c.data.random_flip = True
    c.diffusion.update(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="v_prediction")
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, decay="constant", weight_decay=1e-2)
    c.train.update(steps=15_000, batch_size=32, precision="bf16", log_every=50)
    return c
