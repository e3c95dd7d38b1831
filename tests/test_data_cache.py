"""The latent cache: `sdjax cache-latents` encodes a folder once (with or without the text encoders' states,
locally or into a bucket on the test GCS server); training from it gives the same batches (caption choice and
dropout included) and the same loss as training from the images; a cache of other models or settings, or a
cut-off one, is refused by name."""

import contextlib
import io
import json
import os
import shutil

import jax
import numpy as np
import pytest

from data_fixtures import caption, write_imagefolder
from sdjax import cli
from sdjax import data as data_lib
from sdjax import models as models_lib
from sdjax import step as step_lib
from sdjax import training_setup
from sdjax import validation
from sdjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_RECORDS = 16


def _write_captioned_images(folder, extra_rows=()):
    """NUM_RECORDS images of varied sizes (so their crops differ: SDXL's time ids), two captions each."""
    write_imagefolder(folder, NUM_RECORDS, extra_rows=list(extra_rows))
    rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
    for i, row in enumerate(rows[:NUM_RECORDS]):  # several captions per image: one is picked per step
        row["text"] = [caption(i), f"{caption(i)} again"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def _cache_with_cli(out, overrides: dict) -> dict:
    """`sdjax cache-latents --config configs/demo.py --out OUT --config.KEY=VALUE ...`'s printed summary."""
    argv = [os.path.join(ROOT, "configs", "demo.py"), "--out", str(out),
            *(f"--config.{key}={value}" for key, value in overrides.items())]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["sdjax", "cache-latents", "--config", *argv]) == 0
    return json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def gcs_bucket():
    from gcs_server import GcsServer
    server = GcsServer()
    yield server.make_bucket("sdjax-latent-cache")
    server.stop()
    os.environ.pop("CLOUD_STORAGE_EMULATOR_ENDPOINT", None)  # set from STORAGE_EMULATOR_HOST by the reader


@pytest.fixture(scope="module")
def cached(tmp_path_factory, gcs_bucket):
    """Configs training from images, from the cache, and from the cache with text states in the bucket (and the
    same cache copied to local disk), the caches and what the CLI printed."""
    import fsspec
    from pytorch_folder import write_pytorch_folder
    from tiny import tiny_config

    tmp = tmp_path_factory.mktemp("cache")
    # The same 16 images twice: the cache is written from the folder with a bad row (skipped), training from
    # images reads the one without, so both datasets hold the same records in the same order.
    good, with_bad = tmp / "images", tmp / "images_and_a_bad_row"
    _write_captioned_images(good)
    _write_captioned_images(with_bad, extra_rows=[{"file_name": "missing.jpg", "text": "gone"}])

    config = tiny_config()
    write_pytorch_folder(config, str(tmp / "pretrained"))
    config.model.pretrained = str(tmp / "pretrained")
    config.data.update(source="imagefolder", path=str(good), caption_dropout=0.5)
    overrides = {"model.pretrained": config.model.pretrained, "model.vae_config": "", "data.source": "imagefolder",
                 "data.path": with_bad, "data.resolution": 16, "data.max_length": config.data.max_length,
                 "data.caption_dropout": 0.5, "train.batch_size": 8, "train.precision": "fp32",
                 "data.num_threads": 1, "train.eval_every": 0}
    out = tmp / "latents"
    summary = _cache_with_cli(out, overrides)
    in_bucket = f"{gcs_bucket}/latents_and_text_states"
    _cache_with_cli(in_bucket, {**overrides, "data.cache_text_states": True, "train.train_text_encoder": False})
    on_disk = str(tmp / "latents_and_text_states")
    fs, bare = fsspec.core.url_to_fs(in_bucket)
    fs.get(bare + "/", on_disk + "/", recursive=True)

    def reading(cache, text_states=False):
        from_cache = config.copy_and_resolve_references()
        from_cache.data.update(latent_cache=str(cache), cache_text_states=text_states)
        return from_cache

    return {"config": config, "from_cache": reading(out), "out": out, "summary": summary, "tmp": tmp,
            "from_bucket": reading(in_bucket, True), "from_disk": reading(on_disk, True), "in_bucket": in_bucket}


def test_cache_holds_every_good_record_once(cached):
    summary = cached["summary"]
    assert (summary["records"], summary["skipped"]) == (NUM_RECORDS, 1)  # the missing image was skipped
    source = data_lib.latent_cache.CachedLatentsSource(str(cached["out"]), cached["from_cache"])
    assert len(source) == NUM_RECORDS
    record = source[0]
    assert record["latent_mean"].shape == record["latent_std"].shape == (4, 4, 4)  # 16 px / VAE factor 4
    assert record["latent_mean"].dtype == np.float32 and (record["latent_std"] > 0).all()
    assert record["input_ids"].shape == (2, 77)
    assert "encoder_hidden_states" not in record


def test_cache_with_text_states_holds_every_captions_states(cached):
    source = data_lib.latent_cache.CachedLatentsSource(cached["in_bucket"], cached["from_bucket"])
    assert len(source) == NUM_RECORDS
    record = source[3]
    width = cached["config"].model.text_encoder.hidden_size
    assert record["encoder_hidden_states"].shape == (2, 77, width)  # both captions, as the step would use them
    assert record["encoder_hidden_states"].dtype == np.float32  # train.precision=fp32
    assert not np.allclose(record["encoder_hidden_states"][0], record["encoder_hidden_states"][1])


def test_cache_written_for_another_resolution_is_refused(cached):
    other = cached["from_cache"].copy_and_resolve_references()
    other.data.resolution = 32
    with pytest.raises(data_lib.DataError, match="data.resolution=16.*32"):
        data_lib.latent_cache.CachedLatentsSource(str(cached["out"]), other)


def test_text_states_cached_for_another_precision_are_refused(cached):
    other = cached["from_bucket"].copy_and_resolve_references()
    other.train.precision = "bf16"
    with pytest.raises(data_lib.DataError, match=f"{cached['in_bucket']} was written with train.precision='fp32'.*"
                                                 "'bf16'"):
        data_lib.latent_cache.CachedLatentsSource(cached["in_bucket"], other)


def test_cache_made_by_other_models_is_refused_naming_the_model(cached):
    """Another VAE refuses every cache; another text encoder only one holding its states."""
    from pytorch_folder import write_pytorch_folder
    tmp, config = cached["tmp"], cached["config"]
    other_seed = str(tmp / "pretrained_seed_1")
    write_pytorch_folder(config, other_seed, seed=1)
    other_text_encoder = tmp / "pretrained_other_text_encoder"  # the same VAE and tokenizer
    shutil.copytree(config.model.pretrained, other_text_encoder)
    shutil.rmtree(other_text_encoder / "text_encoder")
    shutil.copytree(os.path.join(other_seed, "text_encoder"), other_text_encoder / "text_encoder")

    def reading(from_cache, pretrained):
        other = from_cache.copy_and_resolve_references()
        other.model.pretrained = str(pretrained)
        return other

    made_by = os.path.realpath(os.path.join(config.model.pretrained, "vae"))
    with pytest.raises(data_lib.DataError, match=f"{cached['out']} was made by vae {made_by} .*this run uses vae "
                                                 f"{os.path.realpath(other_seed)}/vae"):
        data_lib.latent_cache.CachedLatentsSource(str(cached["out"]), reading(cached["from_cache"], other_seed))
    with pytest.raises(data_lib.DataError, match=f"{cached['in_bucket']} was made by text_encoder .*this run uses "
                                                 f"text_encoder {other_text_encoder}/text_encoder"):
        data_lib.latent_cache.CachedLatentsSource(cached["in_bucket"],
                                                  reading(cached["from_bucket"], other_text_encoder))
    data_lib.latent_cache.CachedLatentsSource(str(cached["out"]), reading(cached["from_cache"], other_text_encoder))


def test_cut_off_cache_in_a_bucket_is_refused(cached):
    import fsspec
    fs, bare = fsspec.core.url_to_fs(cached["in_bucket"])
    cut = f"{bare}_cut_off"
    fs.copy(bare + "/", cut + "/", recursive=True)
    shard = data_lib.latent_cache.shard_name(0, 1)
    fs.rm_file(f"{cut}/{shard}")
    cut_url = f"{cached['in_bucket']}_cut_off"
    with pytest.raises(data_lib.DataError, match=f"{cut_url} lacks its shard {cut_url}/{shard}"):
        data_lib.latent_cache.CachedLatentsSource(cut_url, cached["from_bucket"])
    fs.rm_file(f"{cut}/cache.json")
    with pytest.raises(data_lib.DataError, match=f"{cut_url}.* is not a complete latent cache: it holds no cache.json"):
        data_lib.latent_cache.CachedLatentsSource(cut_url, cached["from_bucket"])


def test_cached_text_states_are_refused_to_a_run_training_the_text_encoder_or_without_a_cache(cached):
    trains_it = cached["from_bucket"].copy_and_resolve_references()
    trains_it.train.train_text_encoder = True
    with pytest.raises(ConfigError, match="data.cache_text_states.*train.train_text_encoder=True"):
        validation.validate(trains_it, jax.device_count())
    with_lora = cached["from_bucket"].copy_and_resolve_references()
    with_lora.lora.update(rank=4, text_encoder_target_modules=("q_proj",))
    with pytest.raises(ConfigError, match="data.cache_text_states.*lora.text_encoder_target_modules"):
        validation.validate(with_lora, jax.device_count())
    from_images = cached["config"].copy_and_resolve_references()
    from_images.data.cache_text_states = True
    with pytest.raises(ConfigError, match="data.cache_text_states.*set data.latent_cache"):
        validation.validate(from_images, jax.device_count())


def test_step_on_cached_text_states_runs_the_unet_alone(cached):
    """Traced with the UNet's params only: a step that ran the VAE or a text encoder would not find theirs."""
    config = cached["from_bucket"]
    models = models_lib.build_models(config)
    example_losses = step_lib.make_example_losses(models, config)
    unet_only = {"unet": models_lib.param_shapes(models, config, ("unet",))["unet"]}
    rngs = jax.random.split(jax.random.key(0), config.train.batch_size)
    batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    batch.pop("skipped")
    losses = jax.eval_shape(example_losses, unet_only, batch, rngs)
    assert losses.shape == (config.train.batch_size,)
    token_batch = data_lib.make_train_dataset(cached["from_cache"], models.tokenizer)[0]
    token_batch.pop("skipped")
    with pytest.raises(KeyError, match="text_encoder"):  # the same check fails where the text encoder runs
        jax.eval_shape(example_losses, unet_only, token_batch, rngs)


@pytest.mark.slow  # compiles the tiny train step three times (images, latents, UNet alone): ~140 s on 2 shared cores
def test_training_from_cache_gives_the_same_batch_and_loss(cached):
    config = cached["config"]
    setup = training_setup.build(config)
    models = setup.models
    image_batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    latent_batch = data_lib.make_train_dataset(cached["from_cache"], models.tokenizer)[0]
    bucket_batch = data_lib.make_train_dataset(cached["from_bucket"], models.tokenizer)[0]
    disk_batch = data_lib.make_train_dataset(cached["from_disk"], models.tokenizer)[0]
    assert "pixel_values" not in latent_batch
    np.testing.assert_array_equal(latent_batch["input_ids"], image_batch["input_ids"])  # same pick, same dropout
    np.testing.assert_array_equal(latent_batch["time_ids"], image_batch["time_ids"])  # the same centre crops
    assert "input_ids" not in bucket_batch
    assert bucket_batch.keys() == disk_batch.keys()
    for key in bucket_batch:
        np.testing.assert_array_equal(bucket_batch[key], disk_batch[key], err_msg=key)
    # The states of the caption each example picked (or of the empty one it dropped to), as the step computes them.
    states = models_lib.batch_conditioning(models, setup.create_state(jax.random.key(0)).frozen, image_batch)
    np.testing.assert_allclose(bucket_batch["encoder_hidden_states"], states["context"], atol=1e-5)

    losses = []
    for batch in (image_batch, latent_batch, bucket_batch, disk_batch):
        # A fresh state each time (the step donates it); compiled as `sdjax train` compiles it, so the image
        # batch's program is shared with tests/test_data_train.py through the compilation cache.
        state = setup.create_state(jax.random.key(0))
        losses.append(float(setup.train_step(state, setup.global_batch(batch), jax.random.key(3))[1]["loss"]))
    # The VAE and text encoders ran in other compiled programs: float32 rounding differs, nothing else.
    np.testing.assert_allclose(losses[1:], [losses[0]] * 3, rtol=1e-5)
    assert losses[2] == losses[3]  # the bucket's cache and its copy on disk: the same records


def test_sdxl_cache_holds_both_encoders_states_pooled_projection_and_time_ids_and_trains_on_them(cached):
    """An SDXL cache with text states conditions the UNet as the images do (both encoders' states side by side,
    the pooled projection, each crop's time ids), so the loss from it is the loss from the images."""
    from pytorch_folder import write_pytorch_folder
    from tiny import tiny_sdxl_config

    from sdjax.cache_latents import cache_latents

    config = tiny_sdxl_config()
    config.model.pretrained = str(cached["tmp"] / "pretrained_sdxl")
    write_pytorch_folder(config, config.model.pretrained)
    config.data.update(source="imagefolder", path=cached["config"].data.path, caption_dropout=0.5)
    out = str(cached["tmp"] / "sdxl_latents")
    config.data.cache_text_states = True
    assert cache_latents(config.copy_and_resolve_references(), out)["records"] == NUM_RECORDS
    from_cache = config.copy_and_resolve_references()
    from_cache.data.latent_cache = out
    config.data.cache_text_states = False

    models = models_lib.build_models(config)
    params = models_lib.load_pretrained_params(models, config)
    image_batch = data_lib.make_train_dataset(config, models.tokenizer)[0]
    cached_batch = data_lib.make_train_dataset(from_cache, models.tokenizer)[0]
    for batch in (image_batch, cached_batch):
        batch.pop("skipped")
    expected = models_lib.batch_conditioning(models, params, image_batch)
    conditioning = step_lib.cached_conditioning(models, cached_batch)
    assert conditioning.keys() == expected.keys() == {"context", "text_embeds", "time_ids"}
    for key in expected:
        np.testing.assert_allclose(conditioning[key], expected[key], atol=1e-5, err_msg=key)
    assert len(np.unique(np.asarray(conditioning["time_ids"]), axis=0)) > 1  # each image's own size and crop

    example_losses = jax.jit(step_lib.make_example_losses(models, config))
    rngs = jax.random.split(jax.random.key(3), config.train.batch_size)
    np.testing.assert_allclose(example_losses(params, cached_batch, rngs), example_losses(params, image_batch, rngs),
                               rtol=1e-5)
