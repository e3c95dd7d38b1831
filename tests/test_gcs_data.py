"""Training data on gs:// (`data.path`, `data.eval_path`, `data.index_cache_dir`, `data.tfds_data_dir`),
against a real GCS API server on this machine (tests/gcs_server.py): every source reads the same records,
in the same order, with the same bad-record counts and the same host slices as from local disk, and a path
that names nothing fails as it does locally."""

import io
import os
import tarfile

import fsspec
import numpy as np
import pytest

from data_fixtures import image_bytes, write_imagefolder, write_shards, write_tfds
from gcs_server import GcsServer
from sdjax import data as data_lib
from sdjax.data import sources, webdataset
from sdjax.models.tokenizer import builtin_tokenizer

BUCKET = "sdjax-data-test"


@pytest.fixture(scope="module")
def server():
    server = GcsServer()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


def _upload(local_folder, prefix: str) -> str:
    """A copy of `local_folder` at gs://BUCKET/prefix; its URL."""
    fsspec.filesystem("gs").put(f"{local_folder}/", f"{BUCKET}/{prefix}", recursive=True)
    return f"gs://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def shards(server, tmp_path_factory):
    """(local folder, gs:// folder) of 3 shards of 20 records, and a 4th holding one record whose image is
    not an image (so batches skip and count it)."""
    local = tmp_path_factory.mktemp("shards")
    write_shards(local, 20, per_shard=7)
    with tarfile.open(local / "00003.tar", "w") as tar:
        for name, payload in (("bad.jpg", b"not an image"), ("bad.txt", b"bad record")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, fileobj=io.BytesIO(payload))
    return str(local), _upload(local, "shards")


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer(77)


def _config(source, path, **data):
    from tiny import tiny_config
    config = tiny_config()
    config.data.update(source=source, path=str(path), caption_dropout=0.0, **data)
    return config


def _assert_same_batches(local, remote, steps):
    for step in steps:
        expected, got = local[step], remote[step]
        assert sorted(got) == sorted(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"step {step}: {key}")


# --- webdataset shards ---------------------------------------------------------------------------------


def test_shard_patterns_in_a_bucket_expand_like_local_ones(shards):
    local, remote = shards
    names = [f"{i:05d}.tar" for i in range(4)]
    for spec, expected in (("{00000..00002}.tar", names[:3]), ("*.tar", names), ("0000[13].tar", names[1::2]),
                           ("", names)):
        assert webdataset.expand_shards(f"{remote}/{spec}") == [f"{remote}/{n}" for n in expected]
        assert webdataset.expand_shards(os.path.join(local, spec)) == [os.path.join(local, n) for n in expected]
    assert webdataset.expand_shards(f"{remote}/00003.tar::{local}/00000.tar") == [
        f"{remote}/00003.tar", os.path.join(local, "00000.tar")]


def test_batches_from_bucket_shards_equal_local_ones_with_bad_records_counted(shards, tokenizer):
    local, remote = shards
    remote_index = f"gs://{BUCKET}/tar-index"  # an index cache in the bucket, shared by a pod's hosts
    datasets = [data_lib.make_train_dataset(_config("webdataset", f"{folder}/*.tar", index_cache_dir=index),
                                            tokenizer) for folder, index in ((local, ""), (remote, remote_index))]
    _assert_same_batches(*datasets, steps=range(6))  # 48 examples: two epochs and a half, each with the bad one
    assert sum(int(datasets[1][step]["skipped"].sum()) for step in range(6)) >= 2
    assert len(fsspec.filesystem("gs", use_listings_cache=False).ls(remote_index.removeprefix("gs://"))) == 4


def test_bucket_index_cache_is_read_instead_of_scanning(shards, monkeypatch):
    _, remote = shards
    config = _config("webdataset", f"{remote}/{{00000..00001}}.tar", index_cache_dir=f"gs://{BUCKET}/index2")
    first = data_lib.make_source(config)
    monkeypatch.setattr(webdataset, "scan_shard", lambda path: pytest.fail(f"{path} scanned again"))
    second = data_lib.make_source(config)
    assert list(second.keys) == list(first.keys) and len(second) == 14


def test_scanning_a_bucket_shard_reads_it_in_large_blocks_not_per_header(server, tmp_path, monkeypatch):
    write_shards(tmp_path, 300, per_shard=300)  # 600 members: a request per header would be 600 requests
    remote = _upload(tmp_path, "many-members")
    import gcsfs
    requests = []
    fetch = gcsfs.core.GCSFile._fetch_range
    monkeypatch.setattr(gcsfs.core.GCSFile, "_fetch_range",
                        lambda self, start, end: requests.append((start, end)) or fetch(self, start, end))
    index = webdataset.scan_shard(f"{remote}/00000.tar")
    assert len(index["keys"]) == 300 and len(requests) <= 2


def test_two_hosts_read_disjoint_slices_of_bucket_shards_as_from_local_ones(shards, tokenizer):
    local, remote = shards
    for process_index in range(2):
        local_host, remote_host = (data_lib.make_train_dataset(_config("webdataset", folder), tokenizer,
                                                               process_index, 2) for folder in (local, remote))
        _assert_same_batches(local_host, remote_host, steps=range(3))
    remote_hosts = [data_lib.make_train_dataset(_config("webdataset", remote), tokenizer, p, 2) for p in range(2)]
    whole = data_lib.make_train_dataset(_config("webdataset", remote), tokenizer)
    for step in range(3):
        np.testing.assert_array_equal(
            np.concatenate([host[step]["input_ids"] for host in remote_hosts]), whole[step]["input_ids"])


def test_worker_processes_read_bucket_shards(shards, tokenizer):
    _, remote = shards
    dataset = data_lib.make_train_dataset(_config("webdataset", remote), tokenizer)
    batches = data_lib.iterate_from(dataset, 1, num_threads=2, prefetch=2, num_workers=1)
    try:
        for step in (1, 2):
            got, expected = next(batches), dataset[step]
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
    finally:
        batches.close()


# --- image folders ----------------------------------------------------------------------------------------


def test_image_folder_in_a_bucket_gives_the_local_batches(server, tmp_path, tokenizer):
    local = write_imagefolder(tmp_path / "jsonl", 12, extra_rows=[{"file_name": "missing.jpg", "text": "gone"}])
    remote = _upload(local, "imagefolder")
    datasets = [data_lib.make_train_dataset(_config("imagefolder", folder), tokenizer) for folder in (local, remote)]
    _assert_same_batches(*datasets, steps=range(4))
    assert sum(int(datasets[1][step]["skipped"].sum()) for step in range(4)) >= 1  # the missing file


def test_caption_file_layout_in_a_bucket_lists_records_in_the_local_order(server, tmp_path):
    for name in ("b", "a/z", "a/c/x", "b2/y"):  # files before subfolders in each folder, as os.walk sorted
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / f"{name}.png").write_bytes(image_bytes(len(name), fmt="PNG"))
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}")
    remote = _upload(tmp_path, "captions")
    local_records, remote_records = (data_lib.make_source(_config("imagefolder", folder))
                                     for folder in (tmp_path, remote))
    assert [remote_records[i] for i in range(4)] == [local_records[i] for i in range(4)]
    assert [remote_records[i]["caption"] for i in range(4)] == [
        "caption of b", "caption of a/z", "caption of a/c/x", "caption of b2/y"]


def test_auto_source_reads_bucket_paths(shards, server, tmp_path):
    _, remote_shards = shards
    remote_folder = _upload(write_imagefolder(tmp_path, 2), "auto-folder")
    assert sources.resolved_source(_config("auto", remote_shards)) == "webdataset"
    assert sources.resolved_source(_config("auto", f"{remote_shards}/{{00000..00001}}.tar")) == "webdataset"
    assert sources.resolved_source(_config("auto", remote_folder)) == "imagefolder"
    with pytest.raises(data_lib.DataError, match="gs://no-such-bucket-x/data"):
        sources.resolved_source(_config("auto", "gs://no-such-bucket-x/data"))


# --- bad paths ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source,path,key", [
    ("webdataset", f"gs://{BUCKET}/shards/{{00007..00009}}.tar", "data.path"),
    ("webdataset", f"gs://{BUCKET}/shards/*.tgz", "data.path"),
    ("webdataset", "gs://no-such-bucket-x/shards/*.tar", "data.path"),
    ("webdataset", "gs://no-such-bucket-x/shards", "data.eval_path"),
    ("imagefolder", "gs://no-such-bucket-x/images", "data.path"),
    ("imagefolder", f"gs://{BUCKET}/no-such-folder", "data.eval_path"),
], ids=["brace-misses", "glob-misses", "glob-no-bucket", "folder-no-bucket", "images-no-bucket", "images-no-folder"])
def test_a_bucket_path_that_names_nothing_is_a_data_error_naming_key_and_path(shards, source, path, key):
    config = _config(source, path if key == "data.path" else shards[0], eval_path=path)
    split = "train" if key == "data.path" else "eval"
    with pytest.raises(data_lib.DataError, match=f"{key}=.*{path.split('/')[2]}") as error:
        data_lib.make_source(config, split)
    assert path in str(error.value) or path.split("{")[0] in str(error.value)


# --- TFDS -----------------------------------------------------------------------------------------------------


def test_tfds_dataset_in_a_bucket_reads_the_local_records(server, tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    # array_record's reader has its own GCS client (google-cloud-cpp), pointed at the server by this variable.
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", server.url)
    name = write_tfds(tmp_path, 4, register=False)
    remote = _upload(tmp_path, "tfds")
    local_records, remote_records = (
        data_lib.make_source(_config("tfds", name, tfds_data_dir=str(d), caption_column="captions/text"))
        for d in (tmp_path, remote))
    assert len(remote_records) == len(local_records) == 4
    for i in range(4):
        assert remote_records[i]["image"] == local_records[i]["image"]
        assert list(remote_records[i]["caption"]) == list(local_records[i]["caption"])
    with pytest.raises(data_lib.DataError, match="data.tfds_data_dir='gs://no-such-bucket-x/tfds'"):
        data_lib.make_source(_config("tfds", name, tfds_data_dir="gs://no-such-bucket-x/tfds"))
