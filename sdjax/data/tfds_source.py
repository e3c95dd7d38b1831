"""A TFDS dataset by name and split (e.g. `coco_captions`), read at random through `tfds.data_source`.

`tfds.data_source` reads datasets prepared in the array_record format without TensorFlow; the image feature
is left encoded (`SkipDecoding`) so it is decoded like every other source's (JPEG draft scaling, bad images
skipped and counted). Prepare a dataset once with
`tfds build NAME --file_format=array_record --data_dir=DIR` (TFDS' tfrecord format is sequential only and
would need tf.data).

`data.tfds_data_dir` may be a `gs://` folder (e.g. one `tfds build --data_dir=gs://...` wrote, or a copy of a
local one): TFDS reads the dataset's metadata through etils.epath (gcsfs), and array_record's reader has its
own GCS client (google-cloud-cpp, application default credentials; against an emulator it reads
`CLOUD_STORAGE_EMULATOR_ENDPOINT`), so each record is a ranged read of the bucket object.

Feature names: `data.image_column` (default `image`) and `data.caption_column`; a `/` reaches into nested
features, e.g. `captions/text` for coco_captions, whose five captions per image are picked from at random.
"""

from __future__ import annotations

from sdjax.data.records import DataError


def _nested_get(example: dict, path: str):
    for part in path.split("/"):
        example = example[part]
    return example


def _nested_dict(path: str, leaf) -> dict:
    head, _, rest = path.partition("/")
    return {head: _nested_dict(rest, leaf) if rest else leaf}


def _feature_names(features, prefix: str = "") -> list[str]:
    names = []
    for name, feature in getattr(features, "items", lambda: [])():
        names += [prefix + name] + _feature_names(getattr(feature, "feature", feature), prefix + name + "/")
    return names


class TfdsSource:
    """Random access to {"image": encoded bytes, "caption": str | list} of a prepared TFDS dataset."""

    def __init__(self, name: str, split: str, data_dir: str = "", image_column: str = "image",
                 caption_column: str = "text"):
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise DataError("data.source=tfds needs tensorflow-datasets: pip install 'sdjax[tfds]'") from None
        self.name, self.split, self.image_column, self.caption_column = name, split, image_column, caption_column
        try:
            self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False,
                                           decoders=_nested_dict(image_column, tfds.decode.SkipDecoding()))
        except Exception as e:  # noqa: BLE001  (tfds raises many kinds; the user needs the same advice for all)
            raise DataError(f"cannot open TFDS dataset data.path={name!r} split data.split={split!r} in "
                            f"data.tfds_data_dir={data_dir or '(TFDS default)'!r}: {e}. Prepare it first: "
                            f"tfds build {name} --file_format=array_record"
                            + (f" --data_dir={data_dir}" if data_dir else "")) from e
        known = _feature_names(self.source.dataset_info.features)
        for key, column in (("data.image_column", image_column), ("data.caption_column", caption_column)):
            if column not in known:
                raise DataError(f"{key}={column!r} is not a feature of TFDS dataset {name!r}; its features: {known}")
        if not len(self.source):
            raise DataError(f"TFDS dataset {name!r} split {split!r} holds no records.")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        example = self.source[index]
        return {"image": _nested_get(example, self.image_column), "caption": _nested_get(example, self.caption_column)}

    def describe(self, index: int) -> str:
        return f"tfds:{self.name}/{self.split}[{index}]"

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r})"
