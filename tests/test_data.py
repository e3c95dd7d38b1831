"""The input pipeline: every source yields right batches; hosts split them; batches are deterministic and
resumable; bad records are replaced, counted, and only an all-bad source (or too many bad) fails."""

import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from data_fixtures import caption, image_bytes, write_imagefolder, write_shards, write_tfds
from sdjax import data as data_lib
from sdjax.data import buckets, records, webdataset
from sdjax.data.preprocess import choose_caption, random_flip, resize_and_crop, to_model_inputs, tokenize
from sdjax.models.tokenizer import builtin_tokenizer

NUM_RECORDS = 24


@pytest.fixture(scope="module")
def tokenizer():
    return builtin_tokenizer(77)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), NUM_RECORDS)


def _config(source="imagefolder", path="", **data):
    from tiny import tiny_config
    config = tiny_config()
    config.data.source, config.data.path, config.data.caption_dropout = source, str(path), 0.0
    config.data.update(data)
    return config


def _records_of(batch, tokenizer) -> list[int]:
    """Which records (by caption) a batch holds."""
    ids = {tuple(tokenize(tokenizer, caption(i), 77)): i for i in range(100)}
    return [ids[tuple(row)] for row in batch["input_ids"]]


def _assert_batch(batch, batch_size=8, resolution=16):
    assert batch["pixel_values"].shape == (batch_size, resolution, resolution, 3)
    assert batch["pixel_values"].dtype == np.float32
    assert -1.0 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1.0
    assert batch["input_ids"].shape == (batch_size, 77) and batch["input_ids"].dtype == np.int32
    assert batch["skipped"].shape == (batch_size,) and batch["skipped"].dtype == np.int32


# --- sources ----------------------------------------------------------------------------------------


def test_imagefolder_jsonl_of_jpeg_and_png_gives_batches(folder, tokenizer):
    dataset = data_lib.make_train_dataset(_config(path=folder), tokenizer)
    batch = dataset[0]
    _assert_batch(batch)
    assert set(_records_of(batch, tokenizer)) <= set(range(NUM_RECORDS))
    assert batch["skipped"].sum() == 0


def test_imagefolder_csv_and_caption_file_layouts(tmp_path, tokenizer):
    csv_folder = write_imagefolder(tmp_path / "csv", 4, metadata="csv")
    source = data_lib.make_source(_config(path=csv_folder))
    assert [source[i]["caption"] for i in range(4)] == [caption(i) for i in range(4)]

    txt_folder = tmp_path / "txt"
    txt_folder.mkdir()
    for i in range(3):
        (txt_folder / f"{i}.jpg").write_bytes(image_bytes(i))
        (txt_folder / f"{i}.txt").write_text(caption(i))
    source = data_lib.make_source(_config(path=txt_folder))
    assert [source[i]["caption"] for i in range(3)] == [caption(i) for i in range(3)]
    _assert_batch(data_lib.make_train_dataset(_config(path=txt_folder), tokenizer)[0])


def test_webdataset_shards_by_brace_pattern_give_batches(tmp_path, tokenizer, monkeypatch):
    write_shards(tmp_path / "shards", NUM_RECORDS, per_shard=10)
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    config = _config("webdataset", pattern, index_cache_dir=str(tmp_path / "index"))
    source = data_lib.make_source(config)
    assert len(source) == NUM_RECORDS
    assert sorted(source[i]["caption"] for i in range(NUM_RECORDS)) == sorted(caption(i) for i in range(NUM_RECORDS))
    batch = data_lib.make_train_dataset(config, tokenizer)[1]
    _assert_batch(batch)
    assert batch["skipped"].sum() == 0

    # The member index is cached: a second start does not scan the shards again.
    monkeypatch.setattr(webdataset, "scan_shard", lambda path: pytest.fail(f"{path} scanned again"))
    assert len(data_lib.make_source(config)) == NUM_RECORDS


def test_shard_spec_forms(tmp_path):
    paths = write_shards(tmp_path, 6, per_shard=2)
    assert webdataset.expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    assert webdataset.expand_shards(str(tmp_path)) == paths  # a folder of shards
    assert webdataset.expand_shards(f"{paths[0]}::{tmp_path}/0000[12].tar") == paths
    with pytest.raises(data_lib.DataError, match="nothing.tar"):
        webdataset.expand_shards(f"{paths[0]}::{tmp_path}/nothing.tar")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    data_dir = tmp_path_factory.mktemp("tfds")
    write_tfds(data_dir, 12)
    return str(data_dir)


def test_tfds_data_source_with_several_captions(tfds_dir, tokenizer):
    config = _config("tfds", "tiny_captions", tfds_data_dir=tfds_dir, caption_column="captions/text")
    source = data_lib.make_source(config)
    assert len(source) == 12
    record = source[0]
    assert isinstance(record["image"], bytes)  # left encoded: decoded (and checked) like every source
    batch = data_lib.make_train_dataset(config, tokenizer)[0]
    _assert_batch(batch)
    texts = {tuple(tokenize(tokenizer, f"{caption(i)}{suffix}", 77)) for i in range(12) for suffix in ("", " again")}
    assert all(tuple(row) in texts for row in batch["input_ids"])


def test_tfds_unknown_feature_or_dataset_is_named(tfds_dir):
    with pytest.raises(data_lib.DataError, match="captions/text"):
        data_lib.make_source(_config("tfds", "tiny_captions", tfds_data_dir=tfds_dir, caption_column="text"))
    with pytest.raises(data_lib.DataError, match="no_such_set"):
        data_lib.make_source(_config("tfds", "no_such_set", tfds_data_dir=tfds_dir))


def test_demo_source_gives_batches(tokenizer):
    _assert_batch(data_lib.make_train_dataset(_config("demo"), tokenizer)[0])


def test_builtin_tokenizer_keeps_each_caption_word_whole_and_round_trips_other_text(tokenizer):
    from sdjax.models.tokenizer import CAPTION_WORDS
    split = {word: tokenizer.tokenize(word) for word in CAPTION_WORDS if len(tokenizer.tokenize(word)) != 1}
    assert not split, f"caption words split into pieces: {split}"
    # a demo caption: one token per word, so the colour words sit at the same positions in every caption
    assert tokenizer.tokenize("a green triangle on a black background") == [
        "a</w>", "green</w>", "triangle</w>", "on</w>", "a</w>", "black</w>", "background</w>"]
    text = "zebras grazing near a lake"  # words the vocabulary lacks: byte pieces
    assert tokenizer.decode(tokenize(tokenizer, text, 77), skip_special_tokens=True) == text


# --- preprocessing ----------------------------------------------------------------------------------


def test_resize_shorter_side_then_centre_crop():
    image = np.zeros((20, 40, 3), np.uint8)  # height 20, width 40: scaled to 16 x 32, then 8 columns cut per side
    image[:, 16:24] = 255  # a white band over columns 16..24 -> 12.8..19.2 scaled -> 4.8..11.2 after the crop
    out = np.asarray(resize_and_crop({"image": image}, 16, rng=None)["image"])
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    column_means = out[..., 0].mean(axis=0)
    assert column_means[:4].max() < 10 and column_means[12:].max() < 10 and column_means[5:11].min() > 240


def test_random_crop_depends_on_rng_only():
    image = (np.random.default_rng(0).random((20, 60, 3)) * 255).astype(np.uint8)
    crops = [np.asarray(resize_and_crop({"image": image}, 16, np.random.default_rng(seed))["image"])
             for seed in range(6)]
    again = np.asarray(resize_and_crop({"image": image}, 16, np.random.default_rng(0))["image"])
    assert np.array_equal(crops[0], again)
    assert len({c.tobytes() for c in crops}) > 1


def test_crop_coordinates_are_sdxls_micro_conditioning_also_after_a_flip(tokenizer):
    # A horizontal ramp, 20 x 60: scaled to 16 x 48, a random 16 x 16 crop at `left` shows scaled columns
    # left..left+15; the flipped crop is the crop at 32 - left of the mirrored scaled image.
    image = np.broadcast_to(np.linspace(0, 255, 60, dtype=np.float32)[None, :, None], (20, 60, 3)).astype(np.uint8)
    scaled = np.asarray(Image.fromarray(image).resize((48, 16), Image.Resampling.BICUBIC), np.float32)
    lefts = set()
    for seed in range(8):
        record = resize_and_crop({"image": image, "caption": "a"}, 16, np.random.default_rng(seed))
        crop = record["crop"]
        assert (crop.original_height, crop.original_width, crop.top, crop.max_left) == (20, 60, 0, 32)
        np.testing.assert_allclose(np.asarray(record["image"], np.float32), scaled[:, crop.left:crop.left + 16], atol=3)
        flipped = random_flip(record, SimpleNamespace(random=lambda: 0.0))  # an rng draw below 0.5: flipped
        mirrored = scaled[:, ::-1]
        left = flipped["crop"].left
        assert left == 32 - crop.left
        np.testing.assert_allclose(np.asarray(flipped["image"], np.float32), mirrored[:, left:left + 16], atol=3)
        inputs = to_model_inputs(flipped, tokenizer, 8)
        np.testing.assert_array_equal(inputs["time_ids"], [20, 60, 0, left, 16, 16])
        lefts.add(crop.left)
    assert len(lefts) > 1


def test_one_caption_of_several_picked_by_rng():
    record = {"caption": ("a", "b", "c")}
    picks = [choose_caption(record, np.random.default_rng(seed))["caption"] for seed in range(30)]
    assert set(picks) == {"a", "b", "c"}
    assert picks == [choose_caption(record, np.random.default_rng(seed))["caption"] for seed in range(30)]


def test_caption_dropout_rate(folder, tokenizer):
    config = _config(path=folder, caption_dropout=0.25)
    config.train.batch_size = 96
    batch = data_lib.make_train_dataset(config, tokenizer)[0]
    empty = tokenize(tokenizer, "", 77)
    dropped = np.mean([np.array_equal(row, empty) for row in batch["input_ids"]])
    assert 0.1 < dropped < 0.4


# --- hosts, determinism, resume ---------------------------------------------------------------------


def test_two_processes_read_disjoint_records_that_cover_the_epoch(folder, tokenizer):
    config = _config(path=folder)
    whole = data_lib.make_train_dataset(config, tokenizer)
    hosts = [data_lib.make_train_dataset(config, tokenizer, process_index=p, process_count=2) for p in range(2)]
    seen = []
    for step in range(NUM_RECORDS // config.train.batch_size):  # one epoch
        parts = [host[step] for host in hosts]
        assert parts[0]["pixel_values"].shape[0] == 4
        for key in ("pixel_values", "input_ids"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[step][key])
        seen += _records_of(parts[0], tokenizer) + _records_of(parts[1], tokenizer)
    assert sorted(seen) == list(range(NUM_RECORDS))


def test_same_seed_same_batches_other_seed_and_next_epoch_differ(folder, tokenizer):
    config = _config(path=folder, random_crop=True, random_flip=True)
    first, second = (data_lib.make_train_dataset(config, tokenizer) for _ in range(2))
    for step in (0, 5):
        for key in ("pixel_values", "input_ids"):
            np.testing.assert_array_equal(first[step][key], second[step][key])
    epoch = NUM_RECORDS // config.train.batch_size
    assert _records_of(first[0], tokenizer) != _records_of(first[epoch], tokenizer)  # reshuffled
    config.train.seed = 1
    assert _records_of(data_lib.make_train_dataset(config, tokenizer)[0], tokenizer) != _records_of(first[0], tokenizer)


def test_resume_at_saved_step_gives_the_same_next_batch(folder, tokenizer):
    dataset = data_lib.make_train_dataset(_config(path=folder, random_crop=True), tokenizer)
    straight = data_lib.iterate_from(dataset, 0, num_threads=2, prefetch=2)
    expected = [next(straight) for _ in range(5)][3:]
    straight.close()
    resumed = data_lib.iterate_from(dataset, 3, num_threads=2, prefetch=2)  # the position a checkpoint saves: the step
    for batch in expected:
        got = next(resumed)
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key])
    resumed.close()


def test_worker_processes_give_the_same_batches_and_counts(tmp_path, tokenizer):
    folder = write_imagefolder(tmp_path, 12, extra_rows=[{"file_name": "missing.jpg", "text": "x"}])
    dataset = data_lib.make_train_dataset(_config(path=folder), tokenizer)
    batches = data_lib.iterate_from(dataset, 2, num_threads=1, prefetch=2, num_workers=2)
    try:
        for step in (2, 3, 4):
            got, expected = next(batches), dataset[step]
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
    finally:
        batches.close()


# --- bad data ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    good = 16
    write_imagefolder(root, good, extra_rows=[
        {"file_name": "corrupt.jpg", "text": "corrupt"},
        {"file_name": "empty.jpg", "text": "empty"},
        {"file_name": "notes.jpg", "text": "not an image"},
        {"file_name": "tiny.png", "text": "too small"},
        {"file_name": "images/000.jpg"},  # no caption
        {"file_name": "missing.jpg", "text": "missing file"},
    ])
    (root / "corrupt.jpg").write_bytes(image_bytes(99, (64, 64))[:300])  # truncated JPEG
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.jpg").write_text("these are not pixels")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "tiny.png")
    return str(root), good, 6


def test_each_kind_of_bad_record_is_replaced_and_counted(bad_folder):
    root, good, bad = bad_folder
    source = records.CheckedSource(data_lib.make_source(_config(path=root)), (16, 16), min_image_size=8)
    results = [source[i] for i in range(good + bad)]
    assert [r["skipped"] for r in results[:good]] == [0] * good
    assert all(r["skipped"] >= 1 for r in results[good:])
    assert all(r["caption"][0].startswith("record ") for r in results)  # a good record took each bad one's place
    assert [r["caption"] for r in results[good:]] == [source[i]["caption"] for i in range(good, good + bad)]


def test_bad_records_keep_batches_whole_and_counts_travel_with_them(bad_folder, tokenizer):
    root, good, bad = bad_folder
    config = _config(path=root, min_image_size=8)
    config.train.batch_size = (good + bad) // 2
    dataset = data_lib.make_train_dataset(config, tokenizer)
    epoch = [dataset[0], dataset[1]]
    for batch in epoch:
        _assert_batch(batch, batch_size=config.train.batch_size)
        assert set(_records_of(batch, tokenizer)) <= set(range(good))
    assert sum(int(b["skipped"].sum()) for b in epoch) >= bad  # each bad record once, plus bad substitutes


def test_all_bad_source_fails_naming_it(tmp_path, tokenizer):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(b"")
        (tmp_path / f"{i}.txt").write_text("x")
    with pytest.raises(data_lib.DataError, match=str(tmp_path)):
        data_lib.make_train_dataset(_config(path=tmp_path), tokenizer)


def test_too_many_bad_records_fail_past_the_threshold():
    data_lib.check_bad_fraction(25, 256, 0.1, "data.path='/x'")  # 9.8%: fine
    data_lib.check_bad_fraction(30, 200, 0.1, "data.path='/x'")  # 15%, but too few reads to judge
    with pytest.raises(data_lib.DataError, match=r"data.path='/x'.*max_bad_fraction=0.1"):
        data_lib.check_bad_fraction(30, 256, 0.1, "data.path='/x'")


def test_empty_or_missing_sources_fail_naming_the_path(tmp_path):
    with pytest.raises(data_lib.DataError, match=str(tmp_path)):
        data_lib.make_source(_config(path=tmp_path))  # a folder without images or metadata
    with pytest.raises(data_lib.DataError, match="nowhere"):
        data_lib.make_source(_config(path=tmp_path / "nowhere"))
    with pytest.raises(data_lib.DataError, match="shards-.*tar"):
        data_lib.make_source(_config("webdataset", f"{tmp_path}/shards-{{000..003}}.tar"))


def test_truncated_shard_keeps_its_whole_records(tmp_path):
    (path,) = write_shards(tmp_path, 4, per_shard=4)
    cut = int(webdataset.scan_shard(path)["image"][2, 0]) + 10  # inside the third record's image
    with open(path, "r+b") as f:
        f.truncate(cut)
    source = data_lib.make_source(_config("webdataset", path, index_cache_dir=""))
    checked = records.CheckedSource(source, (16, 16), 0)
    assert len(source) == 3
    assert [checked[i]["skipped"] > 0 for i in range(3)] == [False, False, True]


def test_webdataset_record_without_caption_or_image_is_bad(tmp_path):
    import tarfile
    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, payload in (("a.jpg", image_bytes(1)), ("a.txt", b"ok"), ("b.jpg", image_bytes(2)),
                              ("c.txt", b"caption only"), ("d.jpg", image_bytes(4)), ("d.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    source = data_lib.make_source(_config("webdataset", str(path), index_cache_dir=""))
    assert [source.describe(i).rsplit(":", 1)[1] for i in range(len(source))] == ["a", "b", "c", "d"]
    checked = records.CheckedSource(source, (16, 16), 0)
    assert [checked[i]["skipped"] > 0 for i in range(4)] == [False, True, True, True]


# --- aspect-ratio buckets ---------------------------------------------------------------------------


def test_bucket_sizes_keep_area_and_aspect():
    sizes = buckets.bucket_sizes(512, 64, 2.0)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and max(h / w, w / h) <= 2.0


def test_bucketed_batches_are_one_shape_each_and_split_over_hosts(tmp_path, tokenizer):
    sizes = [(48, 30), (30, 48), (32, 32)] * 8  # wide, tall, square (width, height)
    folder = write_imagefolder(tmp_path, len(sizes), sizes=sizes)
    config = _config(path=folder, aspect_buckets=True, bucket_step=8, resolution=32)
    config.train.batch_size = 4
    whole = data_lib.make_train_dataset(config, tokenizer)
    hosts = [data_lib.make_train_dataset(config, tokenizer, process_index=p, process_count=2) for p in range(2)]
    shapes = set()
    for step in range(6):  # one epoch: 3 buckets x 8 records / 4
        batch = whole[step]
        shape = batch["pixel_values"].shape[1:3]
        shapes.add(shape)
        orientations = {np.sign(sizes[i][0] - sizes[i][1]) for i in _records_of(batch, tokenizer)}
        assert len(orientations) == 1  # all wide, all tall or all square
        np.testing.assert_array_equal(np.concatenate([h[step]["pixel_values"] for h in hosts]), batch["pixel_values"])
    assert shapes == {(24, 40), (40, 24), (32, 32)}


# --- config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("data,key,expected", [
    (dict(source="webdataset", path=""), "data.path", "needs a path"),
    (dict(source="demo", path="/my/images"), "data.source", "demo source ignores it"),
    (dict(max_bad_fraction=0.9), "data.max_bad_fraction", r"\[0, 0.5\]"),
    (dict(num_workers=-1), "data.num_workers", ">= 0"),
    (dict(latent_cache="/cache"), "data.latent_cache", "model.pretrained"),
])
def test_data_config_errors_name_the_key(data, key, expected):
    from sdjax.config import ConfigError
    from sdjax.validation import validate
    from tiny import tiny_config
    config = tiny_config()
    config.data.update(data)
    with pytest.raises(ConfigError, match=expected) as error:
        validate(config, 8)
    assert error.value.key == key


def test_held_out_split_of_each_source(folder, tfds_dir):
    config = _config(path=folder)
    assert not data_lib.has_eval_split(config)
    with pytest.raises(data_lib.DataError, match="data.eval_path"):
        data_lib.make_source(config, "eval")
    config.data.eval_path = folder
    assert data_lib.has_eval_split(config) and len(data_lib.make_source(config, "eval")) == NUM_RECORDS
    tfds_config = _config("tfds", "tiny_captions", tfds_data_dir=tfds_dir, caption_column="captions/text",
                          eval_split="train[:4]")
    assert len(data_lib.make_source(tfds_config, "eval")) == 4
