"""data.source="auto" (the demo config's): one override, --config.data.path=..., points the demo at real data."""

import pytest

from sdjax import data as data_lib
from sdjax import run_config


@pytest.fixture
def auto_config(tiny_config):
    tiny_config.data.source = "auto"
    tiny_config.train.eval_every = 2
    return tiny_config


def test_no_path_is_the_demo(auto_config):
    assert data_lib.resolved_source(auto_config) == "demo"


def test_image_folder_path_is_imagefolder(auto_config, tmp_path):
    from data_fixtures import write_imagefolder
    auto_config.data.path = write_imagefolder(tmp_path / "images", 8)
    assert data_lib.resolved_source(auto_config) == "imagefolder"
    assert auto_config.data.source == "auto"  # pure: the run writes the answer in once (run_config.resolve)
    assert len(data_lib.make_source(auto_config)) == 8
    run_config.resolve(auto_config)
    assert auto_config.data.source == "imagefolder"


def test_shard_folder_and_pattern_are_webdataset(auto_config, tmp_path):
    from data_fixtures import write_shards
    shards = write_shards(tmp_path / "shards", 8, per_shard=4)
    for path in (str(tmp_path / "shards"), shards[0]):
        auto_config.data.path = path
        assert data_lib.resolved_source(auto_config) == "webdataset"


def test_unrecognised_path_says_what_to_set(auto_config, tmp_path):
    auto_config.data.path = str(tmp_path / "missing")
    with pytest.raises(data_lib.DataError, match="data.source=tfds"):
        data_lib.resolved_source(auto_config)
