"""`sdjax train` on a user's image folder or webdataset shards, pointed to on the command line: it trains,
and the bad records it met show in metrics.jsonl; a source that is all bad stops it with a message."""

import io
import json
import os
import tarfile

import numpy as np
import pytest

from data_fixtures import write_imagefolder, write_shards
from sdjax import cli
from sdjax.metrics import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny test model (tests/tiny.py) on the demo config: the step compiles once for all tests. Neither
# train.eval_every (these sources have no held-out data: the run turns it off) nor optimizer.warmup_steps (the
# demo's 100 is shortened to the 4 steps) needs an override; no sample grids, and no VAE stage (800 steps).
TINY = ["--config.train.steps=4", "--config.train.batch_size=8", "--config.data.resolution=16",
        "--config.train.precision=fp32", "--config.train.compilation_cache_dir=", "--config.train.log_every=1",
        "--config.mesh.fsdp_min_size=256", "--config.data.num_threads=1", "--config.train.sample_every=0",
        "--config.model.vae_config="]


def _train(workdir, *overrides):
    return cli.main(["sdjax", "train", "--config", os.path.join(ROOT, "configs", "demo.py"),
                     "--workdir", str(workdir), *TINY, *overrides])


@pytest.mark.slow  # compiles the tiny train step: ~110 s on 2 shared cores (the next test reuses it)
def test_train_on_image_folder_counts_bad_records(tmp_path):
    folder = write_imagefolder(tmp_path / "data", 16, extra_rows=[{"file_name": "missing.jpg", "text": "gone"}])
    assert _train(tmp_path / "run", "--config.data.source=imagefolder", f"--config.data.path={folder}") == 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["skipped"] >= 1  # 32 examples read: the whole 17-record epoch, the missing one too


def test_train_on_webdataset_shards_locally_and_in_a_bucket_alike(tmp_path):
    """The same shards (one with a bad record) on local disk and in a gs:// bucket (a GCS API server on
    127.0.0.1): the same losses and bad-record counts. The bucket's shard index is cached in the bucket."""
    import fsspec

    from gcs_server import GcsServer
    local = tmp_path / "shards"
    write_shards(local, 20, per_shard=8)
    with tarfile.open(local / "00003.tar", "w") as tar:  # an image that is not one: skipped and counted
        for name, payload in (("bad.jpg", b"not an image"), ("bad.txt", b"bad record")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, fileobj=io.BytesIO(payload))
    server = GcsServer()
    try:
        bucket = server.make_bucket("sdjax-shards")
        fsspec.filesystem("gs").put(f"{local}/", f"{bucket}/shards", recursive=True)
        for name, folder, index in (("local", local, tmp_path / "index"), ("gcs", f"{bucket}/shards", f"{bucket}/index")):
            assert _train(tmp_path / name, "--config.data.source=webdataset",
                          f"--config.data.path={folder}/{{00000..00003}}.tar",
                          f"--config.data.index_cache_dir={index}") == 0
    finally:
        server.stop()
    local_metrics, remote_metrics = (read_metrics(tmp_path / name) for name in ("local", "gcs"))
    assert len(local_metrics) == 4 and local_metrics[-1]["skipped"] >= 1  # 32 of 25 records: the bad one met
    assert [m["loss"] for m in remote_metrics] == [m["loss"] for m in local_metrics]
    assert [m["skipped"] for m in remote_metrics] == [m["skipped"] for m in local_metrics]


@pytest.mark.parametrize("named", [True, False], ids=["source-named", "path-alone"])
def test_own_images_train_the_same_whether_the_source_is_named_or_auto(tmp_path, capsys, named):
    """The README's own-data commands on the demo config: `data.source=imagefolder` or `data.path` alone, both
    train, with evaluation off and the warmup fitted to the run, each said in one line and kept in config.json
    (before, naming the source stopped the run: "data.source='imagefolder' has no held-out data")."""
    folder = write_imagefolder(tmp_path / "pets", 8)
    source = ["--config.data.source=imagefolder"] if named else []
    assert _train(tmp_path / "run", *source, f"--config.data.path={folder}") == 0
    out = capsys.readouterr().out
    assert "has no held-out data: in-training evaluation is off (train.eval_every=1000 -> 0)" in out
    assert "optimizer.warmup_steps=100 is longer than the run (train.steps=4): shortened to 4" in out
    assert ("data.source='auto': data.path=" in out) == (not named)
    with open(tmp_path / "run" / "config.json") as f:
        saved = json.load(f)
    assert saved["data"]["source"] == "imagefolder" and saved["train"]["eval_every"] == 0
    assert saved["optimizer"]["warmup_steps"] == 4
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


def test_train_on_all_bad_source_exits_naming_it(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
        (tmp_path / f"{i}.txt").write_text("x")
    with pytest.raises(SystemExit, match=f"could not be used.*{tmp_path}"):
        _train(tmp_path / "run", "--config.data.source=imagefolder", f"--config.data.path={tmp_path}")
