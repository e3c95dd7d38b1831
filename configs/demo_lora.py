"""LoRA on the tiny demo models: the whole LoRA path (train, sample, export, load in PyTorch) with no download.

    sdjax train --config configs/demo_lora.py --workdir workdirs/demo_lora
    sdjax sample --workdir workdirs/demo_lora --prompt "a red circle on a blue background"
    sdjax export --workdir workdirs/demo_lora --out workdirs/demo_lora_export

Only the rank-4 adapters on the UNet's attention projections (to_q, to_k, to_v, to_out.0) and the text
encoder's (q/k/v/out_proj) are trained; the base weights are frozen and stored in bfloat16. The base is the
demo architecture at its random init (same seed, same weights), so it runs on a fresh machine; to adapt a
trained demo model instead, export one (`sdjax export` of a configs/demo.py run) and add
`--config.model.pretrained=THAT_FOLDER`. The export is OUT/pytorch_lora_weights.safetensors plus, for a random
base, the base pipeline itself:

    pipe = StableDiffusionPipeline.from_pretrained(OUT); pipe.load_lora_weights(OUT)
"""

import os

from sdjax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    c.lora.rank = 4
    c.lora.alpha = 8.0  # scale alpha / rank = 2
    c.lora.unet_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    c.lora.text_encoder_target_modules = ("q_proj", "k_proj", "v_proj", "out_proj")
    c.train.frozen_precision = "bf16"
    c.train.train_text_encoder = False  # the demo trains the whole text encoder; LoRA trains its adapters only
    c.optimizer.learning_rate = 1e-3  # adapters start at B = 0: higher rates than full fine-tuning are usual
    c.train.steps = 300
    c.train.ema_decay = 0.0
    return c
