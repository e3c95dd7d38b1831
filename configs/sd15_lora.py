"""LoRA fine-tuning of Stable Diffusion 1.5 on your image folder (diffusers' train_text_to_image_lora recipe).

    sdjax train --config configs/sd15_lora.py --workdir runs/lora \
        --config.model.pretrained=/path/to/sd15 --config.data.path=/path/to/images

Rank-4 adapters on the UNet's attention projections are the only trained params (797,184 of the UNet's
859,520,964); the frozen base is stored in bfloat16. Add `--config.lora.text_encoder_target_modules='("q_proj", "k_proj",
"v_proj", "out_proj")'` to adapt the text encoder too. `sdjax export` writes pytorch_lora_weights.safetensors.
"""

import os

from sdjax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15.py"))
    c.data.source = "auto"  # data.path: an image folder (imagefolder) or .tar shards (webdataset)
    c.lora.update(rank=4, alpha=4.0)
    c.train.frozen_precision = "bf16"
    c.optimizer.update(learning_rate=1e-4, warmup_steps=0, decay="cosine", end_learning_rate=0.0)
    c.loss.snr_gamma = 5.0
    c.train.update(steps=3000, batch_size=32, checkpoint_every=500, sample_every=500)
    c.sample.prompts = ("a photograph of an astronaut riding a horse",)
    return c
