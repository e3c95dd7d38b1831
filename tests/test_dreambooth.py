"""DreamBooth: batches are [instance half; class half], the loss is mean(instance) + prior_loss_weight *
mean(class) over those halves, and missing class images are generated up to num_class_images."""

import os

import jax
import numpy as np
import pytest
from PIL import Image

from sdjax import config as config_lib
from sdjax import data as data_lib
from sdjax import models as models_lib
from sdjax import sample as sample_lib
from sdjax import step as step_lib
from sdjax import validation
from sdjax.data import dreambooth

INSTANCE_COLOR, CLASS_COLOR = (255, 0, 0), (0, 0, 255)
PRIOR_LOSS_WEIGHT = 3.0


def _write_images(folder, color, count):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (24, 20), color).save(os.path.join(folder, f"{i}.png"))


@pytest.fixture
def dreambooth_config(tiny_config, tmp_path):
    _write_images(tmp_path / "instance", INSTANCE_COLOR, 3)
    _write_images(tmp_path / "class", CLASS_COLOR, 5)
    tiny_config.dreambooth.update(
        instance_data_dir=str(tmp_path / "instance"), instance_prompt="a photo of sks dog",
        with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a photo of dog",
        num_class_images=5, prior_loss_weight=PRIOR_LOSS_WEIGHT)
    tiny_config.data.caption_dropout = 0.0
    tiny_config.train.eval_every = 0
    validation.validate(tiny_config, jax.device_count())
    return tiny_config


def _token_ids(models, prompt, config):
    return np.asarray(models.tokenizer(prompt, padding="max_length", max_length=config.data.max_length).input_ids)


def test_prior_preservation_batch_is_instance_half_then_class_half_and_the_loss_weights_the_halves(
        dreambooth_config):
    config = dreambooth_config
    models = models_lib.build_models(config)
    batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    half = config.train.batch_size // 2
    red, blue = (np.array(c) / 127.5 - 1 for c in (INSTANCE_COLOR, CLASS_COLOR))
    np.testing.assert_allclose(batch["pixel_values"][:half], np.broadcast_to(red, batch["pixel_values"][:half].shape))
    np.testing.assert_allclose(batch["pixel_values"][half:], np.broadcast_to(blue, batch["pixel_values"][half:].shape))
    assert (batch["input_ids"][:half] == _token_ids(models, "a photo of sks dog", config)).all()
    assert (batch["input_ids"][half:] == _token_ids(models, "a photo of dog", config)).all()

    params = models_lib.init_params(models, config, jax.random.key(0))
    rngs = jax.random.split(jax.random.key(1), config.train.batch_size)
    example_losses = jax.jit(step_lib.make_example_losses(models, config))
    loss = step_lib.combine_example_losses(example_losses(params, batch, rngs), config)
    # Each half on its own (an example's loss depends on its data and key only).
    instance = example_losses(params, jax.tree.map(lambda x: x[:half], batch), rngs[:half])
    prior = example_losses(params, jax.tree.map(lambda x: x[half:], batch), rngs[half:])
    np.testing.assert_allclose(loss, np.mean(instance) + PRIOR_LOSS_WEIGHT * np.mean(prior), rtol=1e-5)
    assert not np.isclose(np.mean(instance), np.mean(prior), rtol=1e-3)  # the halves are told apart


def test_missing_class_images_are_sampled_up_to_num_class_images(dreambooth_config):
    config = dreambooth_config
    config.dreambooth.num_class_images = 12
    assert dreambooth.missing_class_images(config) == 7
    calls = []

    def sampler(params, prompts, negative_prompt, seed, guidance):
        calls.append((list(prompts), seed))
        return np.full((len(prompts), 16, 16, 3), 128, np.uint8)

    paths = sample_lib.sample_class_images(sampler, {}, config, batch_size=4)
    assert [os.path.basename(p) for p in paths] == [f"class_{i:05d}.png" for i in range(5, 12)]
    assert [len(prompts) for prompts, _ in calls] == [4, 3] and calls[0][0][0] == "a photo of dog"
    assert calls[0][1] != calls[1][1]  # new seeds for each batch
    assert len(dreambooth.image_files(config.dreambooth.class_data_dir)) == 12
    assert dreambooth.missing_class_images(config) == 0


def test_dreambooth_settings_are_checked(dreambooth_config):
    dreambooth_config.dreambooth.class_prompt = ""
    with pytest.raises(config_lib.ConfigError, match="dreambooth.class_prompt"):
        validation.validate(dreambooth_config, jax.device_count())
    dreambooth_config.dreambooth.class_prompt = "a photo of dog"
    dreambooth_config.train.batch_size = 8
    dreambooth_config.train.grad_accum = 8  # micro-batches of 1 cannot each hold both halves
    with pytest.raises(config_lib.ConfigError, match="train.batch_size"):
        validation.validate(dreambooth_config, num_devices=1)


def test_dreambooth_config_needs_the_instance_folder_then_validates(dreambooth_config):
    from tiny import load_config_file
    config = load_config_file("dreambooth")
    with pytest.raises(config_lib.ConfigError, match="dreambooth.instance_data_dir"):
        validation.validate(config, 8)
    config.dreambooth.instance_data_dir = dreambooth_config.dreambooth.instance_data_dir
    config.dreambooth.class_data_dir = dreambooth_config.dreambooth.class_data_dir
    validation.validate(config, 8)
