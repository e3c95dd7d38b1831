"""A bad config fails at once, naming the key, the value and what is allowed; nothing is compiled first."""

import pytest

from sdjax import cli
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax import train as train_lib
from sdjax.config import ConfigError
from sdjax.validation import validate, validate_against_models


def _validate(config, num_devices=8, process_count=1):
    validate(config, num_devices, process_count)
    validate_against_models(config, models_lib.build_models(config))


def test_tiny_and_demo_configs_are_valid(tiny_config):
    from tiny import load_config_file
    _validate(tiny_config)
    _validate(load_config_file("demo"))


@pytest.mark.parametrize("key,value,expected", [
    ("train.batch_size", 12, "multiple of the data-parallel devices"),
    ("data.resolution", 20, "multiple of 8"),
    ("train.precision", "fp16", "expected one of ['bf16', 'fp32']"),
    ("diffusion.prediction_type", "sample", "expected one of ['epsilon', 'v_prediction']"),
    ("optimizer.decay", "exp", "expected one of ['constant', 'linear', 'cosine']"),
    ("optimizer.warmup_steps", 10, "between 0 and train.steps=4"),
    ("optimizer.learning_rate", 0.0, "expected > 0"),
    ("data.caption_dropout", 1.0, "rate in [0, 1)"),
    ("data.source", "laion", "expected one of"),
    ("mesh.fsdp", 3, "do not divide the 8 devices"),
    ("model.unet.cross_attention_dim", 32, "text encoder's hidden_size (64)"),
    ("model.text_encoder.vocab_size", 100, "tokenizer's"),
    ("model.unet.block_out_channels", (32, 48), "multiple of 32"),
    ("model.flash_block_size", 200, "multiple of 128"),
    ("model.flash_min_tokens", -1, "number of tokens >= 0"),
    ("train.xla_optimization_level", "fast", "expected one of ['', 'O0', 'O1', 'O2', 'O3']"),
])
def test_bad_value_names_key_value_and_allowed(tiny_config, key, value, expected):
    group, _, name = key.rpartition(".")
    node = tiny_config
    for part in group.split("."):
        node = node[part]
    node[name] = value
    with pytest.raises(ConfigError) as error:
        _validate(tiny_config)
    message = str(error.value)
    assert f"config.{key}=" in message and repr(value) in message and expected in message, message


def test_batch_must_split_over_processes(tiny_config):
    tiny_config.train.batch_size = 8
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        tiny_config.mesh.data = 8
        validate(tiny_config, 8, process_count=3)


def test_mesh_that_does_not_tile_devices(tiny_config):
    tiny_config.mesh.data, tiny_config.mesh.fsdp = 2, 2
    with pytest.raises(ConfigError, match="multiply to 4, but 8 devices"):
        validate(tiny_config, 8)


def test_train_rejects_bad_config_before_compiling(tiny_config, tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the state was created (and compiled) before the config was validated")

    monkeypatch.setattr(step_lib, "create_train_state", must_not_run)
    tiny_config.train.batch_size = 12
    with pytest.raises(ConfigError, match="train.batch_size"):
        train_lib.train(tiny_config, str(tmp_path))


def test_cli_unknown_key_fails_with_its_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sdjax", "train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
                  "--config.train.stepz=5"])
    assert "stepz" in str(exit_info.value)


def test_cli_wrong_type_fails_with_its_name(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sdjax", "train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
                  "--config.train.steps=many"])
    assert "train.steps" in str(exit_info.value)


def test_cli_bad_value_exits_with_config_message(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sdjax", "train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
                  "--config.train.batch_size=7"])
    assert "config.train.batch_size=7 is invalid" in str(exit_info.value)
