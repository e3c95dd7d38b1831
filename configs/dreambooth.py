"""DreamBooth on Stable Diffusion 1.5: teach the model one subject from a few photos, with prior preservation.

    sdjax train --config configs/dreambooth.py --workdir DIR \
        --config.model.pretrained=/path/to/sd15 \
        --config.dreambooth.instance_data_dir=/path/to/dog_photos \
        --config.dreambooth.instance_prompt="a photo of sks dog" \
        --config.dreambooth.class_prompt="a photo of dog" --config.dreambooth.class_data_dir=DIR/class_images

Every batch is half instance images (captioned with the instance prompt) and half class images (the class
prompt), the second half's loss weighted by `dreambooth.prior_loss_weight`; the class images the folder lacks
(up to `num_class_images`) are sampled from the pretrained model before training. The UNet is fine-tuned in
full (diffusers' train_dreambooth.py recipe: constant LR 5e-6, 400 steps x 4 instance images); add
`--config.lora.rank=4` to train LoRA adapters instead (then raise the learning rate to ~1e-4), or
`--config.train.train_text_encoder=True` to fine-tune the text encoder too.
"""

import os

from sdjax.config import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sd15.py"))
    c.dreambooth.instance_prompt = "a photo of sks dog"
    c.dreambooth.with_prior_preservation = True
    c.dreambooth.class_prompt = "a photo of dog"
    c.dreambooth.num_class_images = 200
    c.dreambooth.prior_loss_weight = 1.0
    c.data.caption_dropout = 0.0  # the prompts are the point
    c.data.random_flip = False
    c.optimizer.update(learning_rate=5e-6, warmup_steps=0, decay="constant", weight_decay=1e-2)
    c.train.update(steps=400, batch_size=8, checkpoint_every=200, sample_every=100, eval_every=0)
    c.sample.prompts = ("a photo of sks dog", "a photo of sks dog in a bucket", "a photo of dog")
    c.sample.images_per_prompt = 2
    return c
