"""Stable Diffusion 1.5: UNet 860M (epsilon prediction), VAE 84M, CLIP ViT-L/14 text encoder 123M, 512 px.

Fine-tuning: set model.pretrained to a local diffusers folder of SD 1.5 (e.g. one saved with
`StableDiffusionPipeline.save_pretrained`); without it the architecture is built from these shapes with random
weights (for `sdjax plan` and tests only).

    sdjax train --config configs/sd15.py --config.model.pretrained=/path/to/sd15 \
        --config.data.source=imagefolder --config.data.path=/path/to/images --workdir DIR
"""

from sdjax.config import base_config


def get_config():
    c = base_config()  # the base shapes are SD 1.5's: UNet (320, 640, 1280, 1280), CLIP ViT-L/14, 8x VAE
    c.data.resolution = 512
    c.data.random_flip = True
    c.diffusion.update(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                       beta_end=0.012, prediction_type="epsilon")
    c.optimizer.update(learning_rate=1e-5, warmup_steps=500, decay="constant", weight_decay=1e-2)
    c.train.update(steps=15_000, batch_size=32, precision="bf16", log_every=50)
    return c
