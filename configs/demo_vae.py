"""The demo's VAE stage: the demo's tiny FlaxAutoencoderKL (32 px -> 8x8x4 latents) trained alone on the
captioned shapes, so that the UNet stage (configs/demo.py) learns on latents that mean something.
`sdjax train --config configs/demo.py` runs it first (into WORKDIR/vae); on its own:

    sdjax train-vae --config configs/demo_vae.py --workdir workdirs/demo_vae
    sdjax train --config configs/demo.py --config.model.vae_config= --config.model.vae_from=workdirs/demo_vae \
        --workdir workdirs/demo
"""

import os

from sdjax.config import load_config_file


def get_config():
    # the same data, model.vae and precision as the UNet stage
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py"))
    c.train.stage = "vae"
    c.model.vae_config = ""

    c.vae_train.update(l1_weight=1.0, l2_weight=0.0, kl_weight=1e-5, scaling_examples=1024, grid_images=8)

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.decay = "cosine"
    c.optimizer.end_learning_rate = 1e-4

    # 800 steps of 16: 0.131-0.214 s a step on 2-core AMD EPYC VMs (1.7-2.9 minutes of the demo), 0.23 s on a
    # 2-core Intel Xeon. 400 steps of 32, the same images at about the same cost, rounded the squares' corners
    # (eval-demo on the VAE run: squares 0.77 then, 1.00 now); 800 steps of 32 took 6.9 minutes for the same
    # (docs/demo.md).
    c.train.steps = 800
    c.train.batch_size = 16
    c.train.log_every = 25
    c.train.ema_decay = 0.0
    c.train.sample_every = 400  # reconstruction grids in WORKDIR/samples and TensorBoard
    c.train.eval_every = 400  # eval_l1, eval_mse
    c.train.checkpoint_every = 400
    return c
