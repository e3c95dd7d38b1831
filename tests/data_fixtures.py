"""Small caption-image datasets written by the tests, in each layout sdjax reads. Record i has the caption
"record i" (so a batch's token ids tell which records it holds) and an image of its own colour and size."""

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image


def image_bytes(index: int, size=(24, 20), fmt: str = "JPEG") -> bytes:
    """A (width, height) image whose left half has colour `index` and right half another."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (index * 37 % 256, index * 91 % 256, index * 53 % 256)
    pixels[:, width // 2:] = (255 - index * 17 % 256, 40, 200)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def caption(index: int) -> str:
    return f"record {index}"


def write_imagefolder(root, num: int, metadata: str = "jsonl", extra_rows=(), sizes=None) -> str:
    """JPEGs (even i) and PNGs (odd i) of varied sizes with a metadata.jsonl/.csv; `extra_rows` are appended."""
    os.makedirs(root, exist_ok=True)
    rows = []
    for i in range(num):
        name = f"images/{i:03d}.{'jpg' if i % 2 == 0 else 'png'}"
        os.makedirs(os.path.join(root, "images"), exist_ok=True)
        size = sizes[i] if sizes else (20 + i % 7, 18 + i % 5)
        with open(os.path.join(root, name), "wb") as f:
            f.write(image_bytes(i, size, "JPEG" if i % 2 == 0 else "PNG"))
        rows.append({"file_name": name, "text": caption(i)})
    rows += list(extra_rows)
    if metadata == "jsonl":
        with open(os.path.join(root, "metadata.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    else:
        with open(os.path.join(root, "metadata.csv"), "w") as f:
            f.write("file_name,text\n")
            f.writelines(f"{row['file_name']},{row.get('text', '')}\n" for row in rows)
    return str(root)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, num: int, per_shard: int) -> list[str]:
    """img2dataset-style shards 00000.tar, ...: `{key}.jpg` + `{key}.txt` (every third record: `.json` only)."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for shard, start in enumerate(range(0, num, per_shard)):
        path = os.path.join(folder, f"{shard:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, num)):
                key = f"{shard:05d}{i:04d}"
                _add_member(tar, f"{key}.jpg", image_bytes(i))
                if i % 3 == 2:
                    _add_member(tar, f"{key}.json", json.dumps({"caption": caption(i), "width": 24}).encode())
                else:
                    _add_member(tar, f"{key}.txt", caption(i).encode())
        paths.append(path)
    return paths


def write_tfds(data_dir, num: int, register: bool = True) -> str:
    """A prepared TFDS dataset `tiny_captions` (array_record) with coco_captions' features: image + captions/text.
    `register=False`: without registering its builder (TFDS registers a name once per process and test files
    share worker processes; TFDS reads an unregistered dataset from its data_dir alone)."""
    import tensorflow_datasets as tfds

    class TinyCaptions(tfds.core.GeneratorBasedBuilder, skip_registration=not register):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
            }))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(num):
                yield i, {"image": image_bytes(i, fmt="PNG"),
                          "captions": {"text": [caption(i), f"{caption(i)} again"]}}

    TinyCaptions(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return "tiny_captions"
