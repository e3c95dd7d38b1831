"""What sdjax fills in for a run (sdjax/run_config.py), and the one-override runs a newcomer is told to try:
`--config.train.steps=N` alone on any shipped config, and own images named by their kind or found by
`data.path` alone, treated the same (tests/test_data_train.py trains both)."""

import glob
import os

import pytest

from sdjax import cli, run_config, validation
from sdjax.config import ConfigError, load_config_file
from tiny import ROOT

SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def test_command_line_keys_are_read_off_the_overrides():
    argv = ["sdjax train", "--config", "configs/demo.py", "--config.train.steps=20", "--workdir=w",
            "--config.data.path", "/data", "--config=configs/demo.py"]
    assert run_config.command_line_keys(argv) == {"train.steps", "data.path"}


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=os.path.basename)
def test_every_shipped_config_takes_a_short_run_alone(path, tmp_path):
    """`--config.train.steps=20` and nothing else: a warmup longer than the run is shortened to it, with one
    line saying so (before, validation refused any N below the warmup)."""
    config = load_config_file(path)
    if config.dreambooth.instance_prompt:  # DreamBooth needs its folders, whatever the run's length
        config.dreambooth.instance_data_dir = config.dreambooth.class_data_dir = str(tmp_path)
    warmup = config.optimizer.warmup_steps
    config.train.steps = 20
    notices = run_config.resolve(config, {"train.steps"})
    validation.validate(config, 8)
    assert config.optimizer.warmup_steps == min(warmup, 20)
    shortened = [n for n in notices if "optimizer.warmup_steps" in n]
    assert len(shortened) == (warmup > 20)
    if warmup > 20:
        assert f"optimizer.warmup_steps={warmup} is longer than the run (train.steps=20): shortened to 20" in \
            shortened[0]


def test_a_warmup_set_longer_than_the_run_on_the_command_line_is_refused(tiny_config):
    tiny_config.optimizer.warmup_steps = 50
    tiny_config.train.steps = 20
    assert run_config.resolve(tiny_config, {"train.steps", "optimizer.warmup_steps"}) == []
    with pytest.raises(ConfigError, match="optimizer.warmup_steps=50 is invalid"):
        validation.validate(tiny_config, 8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from data_fixtures import write_imagefolder
    return write_imagefolder(tmp_path_factory.mktemp("pets"), 8)


@pytest.mark.parametrize("source", ["imagefolder", "auto"])
def test_own_images_without_held_out_data_have_evaluation_off_whatever_the_source_is_called(tiny_config,
                                                                                           image_folder, source):
    tiny_config.data.source = source
    tiny_config.data.path = image_folder
    tiny_config.train.eval_every = 1000  # from the config file, as in configs/demo.py
    notices = run_config.resolve(tiny_config)
    validation.validate(tiny_config, 8)
    assert tiny_config.data.source == "imagefolder" and tiny_config.train.eval_every == 0
    assert any("has no held-out data: in-training evaluation is off (train.eval_every=1000 -> 0); set "
               "data.eval_path to evaluate" in n for n in notices), notices


def test_eval_every_set_on_the_command_line_without_held_out_data_is_refused(image_folder, tmp_path):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["sdjax", "train", "--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", str(tmp_path),
                  "--config.data.source=imagefolder", f"--config.data.path={image_folder}",
                  "--config.train.eval_every=5"])
    assert "config.train.eval_every=5 is invalid" in str(stopped.value.code)
    assert "has no held-out data: set data.eval_path, or train.eval_every=0" in str(stopped.value.code)
    assert not os.listdir(tmp_path)  # refused before anything was written


def test_the_demo_source_keeps_its_evaluation(tiny_config):
    tiny_config.data.source = "auto"
    tiny_config.train.eval_every = 2
    assert run_config.resolve(tiny_config) == []
    assert tiny_config.data.source == "demo" and tiny_config.train.eval_every == 2


def test_a_latent_cache_turns_off_the_config_files_flip_unless_it_is_set_on_the_command_line(tmp_path):
    """configs/sd15.py flips images; its centre-cropped latent cache cannot: the flip is turned off with a
    line saying so, for `sdjax cache-latents` and for `sdjax train` from the cache alike."""
    config = load_config_file(os.path.join(ROOT, "configs", "sd15.py"))
    assert config.data.random_flip
    config.data.latent_cache, config.model.pretrained = str(tmp_path), str(tmp_path)
    notices = run_config.resolve(config, {"data.latent_cache"})
    assert not config.data.random_flip
    assert [n for n in notices if n.startswith("data.random_flip=True does not apply to a latent cache")]
    validation.validate(config, 8)

    config.data.random_flip = True
    run_config.resolve(config, {"data.latent_cache", "data.random_flip"})
    with pytest.raises(ConfigError, match="data.random_flip"):
        validation.validate(config, 8)
