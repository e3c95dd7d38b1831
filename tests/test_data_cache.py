"""The latent cache: `sdjax cache-latents` encodes a folder once; training from it gives the same batches
(caption choice and dropout included) and the same loss as training from the images."""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest

from data_fixtures import caption, write_imagefolder
from sdjax import cli
from sdjax import data as data_lib
from sdjax import training_setup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_RECORDS = 16


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(config training from images, config training from the cache, the cache folder, what the CLI printed)."""
    from pytorch_folder import write_pytorch_folder
    from tiny import tiny_config

    tmp = tmp_path_factory.mktemp("cache")
    # The same 16 images twice: the cache is written from the folder with a bad row (skipped), training from
    # images reads the one without, so both datasets hold the same records in the same order.
    good, with_bad = tmp / "images", tmp / "images_and_a_bad_row"
    write_imagefolder(good, NUM_RECORDS)
    write_imagefolder(with_bad, NUM_RECORDS, extra_rows=[{"file_name": "missing.jpg", "text": "gone"}])
    for folder in (good, with_bad):
        rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
        for i, row in enumerate(rows[:NUM_RECORDS]):  # several captions per image: one is picked per step
            row["text"] = [caption(i), f"{caption(i)} again"]
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    config = tiny_config()
    write_pytorch_folder(config, str(tmp / "pretrained"))
    config.model.pretrained = str(tmp / "pretrained")
    config.data.update(source="imagefolder", path=str(good), caption_dropout=0.5)
    overrides = [f"--config.{key}={value}" for key, value in (
        ("model.pretrained", config.model.pretrained), ("model.vae_config", ""), ("data.source", "imagefolder"),
        ("data.path", with_bad), ("data.resolution", 16), ("data.max_length", config.data.max_length),
        ("data.caption_dropout", 0.5), ("train.batch_size", 8),
        ("train.precision", "fp32"), ("data.num_threads", 1), ("train.eval_every", 0))]
    out = tmp / "latents"
    main = [os.path.join(ROOT, "configs", "demo.py"), "--out", str(out), *overrides]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["sdjax", "cache-latents", "--config", *main]) == 0
    summary = json.loads(printed.getvalue())

    from_cache = config.copy_and_resolve_references()
    from_cache.data.latent_cache = str(out)
    return config, from_cache, out, summary


def test_cache_holds_every_good_record_once(cached):
    config, from_cache, out, summary = cached
    assert (summary["records"], summary["skipped"]) == (NUM_RECORDS, 1)  # the missing image was skipped
    source = data_lib.latent_cache.CachedLatentsSource(str(out), from_cache)
    assert len(source) == NUM_RECORDS
    record = source[0]
    assert record["latent_mean"].shape == record["latent_std"].shape == (4, 4, 4)  # 16 px / VAE factor 4
    assert record["latent_mean"].dtype == np.float32 and (record["latent_std"] > 0).all()
    assert record["input_ids"].shape == (2, 77)


def test_cache_written_for_another_resolution_is_refused(cached):
    _, from_cache, out, _ = cached
    other = from_cache.copy_and_resolve_references()
    other.data.resolution = 32
    with pytest.raises(data_lib.DataError, match="data.resolution=16.*32"):
        data_lib.latent_cache.CachedLatentsSource(str(out), other)


@pytest.mark.slow  # compiles the tiny train step twice (images, latents): ~105 s on 2 shared cores
def test_training_from_cache_gives_the_same_batch_and_loss(cached):
    config, from_cache, _, _ = cached
    setup = training_setup.build(config)
    models = setup.models
    image_batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    latent_batch = data_lib.make_train_dataset(from_cache, models.tokenizer)[0]
    assert "pixel_values" not in latent_batch
    np.testing.assert_array_equal(latent_batch["input_ids"], image_batch["input_ids"])  # same pick, same dropout

    losses = []
    for batch in (image_batch, latent_batch):
        # A fresh state each time (the step donates it); compiled as `sdjax train` compiles it, so the image
        # batch's program is shared with tests/test_data_train.py through the compilation cache.
        state = setup.create_state(jax.random.key(0))
        losses.append(float(setup.train_step(state, setup.global_batch(batch), jax.random.key(3))[1]["loss"]))
    # The VAE encoder ran in another compiled program: float32 rounding differs, nothing else.
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
