"""An image folder with captions, in the layout users already have.

- The Hugging Face "imagefolder" convention: `metadata.jsonl` (or `metadata.csv`) beside the images, one row
  per image with `file_name` (relative to the folder) and a caption column (`data.caption_column`, default
  `text`; in JSONL it may hold a list of captions, one is picked per step).
- Otherwise, caption files beside the images: `photo.jpg` + `photo.txt` (the usual fine-tuning layout).

The metadata is read once; images are read when a record is asked for, so startup does not touch them.
A row that is malformed, lacks a caption or names a missing file becomes a bad record (skipped, counted).

The folder may be a `gs://` URL (files.py): the metadata file is one GET, each image (and caption file) one
more; the caption-file layout lists the bucket prefix once at startup. Many small objects are the slow way
to read a bucket (each GET has ~10-50 ms latency, hidden only by many reader threads): for large sets on a
pod prefer webdataset shards or the latent cache (launch/README.md, "Data on a pod").
"""

from __future__ import annotations

import csv
import io
import json
import os

import sdjax.data.files as files
from sdjax.data.records import BadRecord, DataError

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def _rows_from_jsonl(path: str) -> list[dict]:
    rows = []
    with io.StringIO(files.read_text(path)) as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = {"error": f"{path} line {line_number} is not JSON ({e})"}
            rows.append(row if isinstance(row, dict) else {"error": f"{path} line {line_number} is not an object"})
    return rows


def _rows_from_csv(path: str) -> list[dict]:
    with io.StringIO(files.read_text(path), newline="") as f:
        return list(csv.DictReader(f))


def _entries_from_metadata(root: str, path: str, caption_column: str) -> list[tuple]:
    """(file path, caption or None, error or None) per metadata row."""
    rows = _rows_from_jsonl(path) if path.endswith(".jsonl") else _rows_from_csv(path)
    if rows and not any("file_name" in row for row in rows):
        raise DataError(f"{path} has no `file_name` column (its columns: {sorted(rows[0])}); the imagefolder "
                        "layout needs `file_name` (the image path relative to the folder) and a caption column.")
    entries = []
    for row in rows:
        file_name = row.get("file_name")
        error = row.get("error") or (None if file_name else "row without file_name")
        entries.append((files.join(root, file_name) if file_name else None, row.get(caption_column), error))
    return entries


def _entries_from_caption_files(root: str) -> list[tuple]:
    """(image path, None, None) per image below `root`; the caption is read from the .txt beside it."""
    images = [path for path in files.walk_files(root) if path.lower().endswith(IMAGE_EXTENSIONS)]
    return [(image, None, None) for image in images]


class ImageFolderSource:
    """Random access to {"image": encoded bytes, "caption": str | list of str | None} of an image folder."""

    def __init__(self, root: str, caption_column: str = "text", key: str = "data.path"):
        if not files.isdir(root):
            raise DataError(f"{key}={root!r} is not a folder (data.source=imagefolder expects a local or gs:// "
                            f"folder of images with {' or '.join(METADATA_FILES)}, or with a .txt caption beside "
                            "each image).")
        self.root = root = root.rstrip("/") if files.is_remote(root) else root
        present = [name for name in METADATA_FILES if files.isfile(files.join(root, name))]
        if len(present) > 1:
            raise DataError(f"{root} holds both {present[0]} and {present[1]}; keep one.")
        self.metadata = files.join(root, present[0]) if present else None
        if self.metadata:
            self.entries = _entries_from_metadata(root, self.metadata, caption_column)
        else:
            self.entries = _entries_from_caption_files(root)
        if not self.entries:
            raise DataError(f"{root} holds no records: expected {' or '.join(METADATA_FILES)} with rows, or images "
                            f"({', '.join(IMAGE_EXTENSIONS)}) each with a .txt caption beside it.")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        path, caption, error = self.entries[index]
        if error:
            raise BadRecord(error)
        if self.metadata is None:
            caption = _read_caption_file(os.path.splitext(path)[0] + ".txt")
        return {"image": files.read_bytes(path), "caption": caption}

    def describe(self, index: int) -> str:
        path, _, _ = self.entries[index]
        return path or f"{self.metadata} row {index + 1}"

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r})"


def _read_caption_file(path: str) -> str:
    try:
        return files.read_text(path)
    except FileNotFoundError:
        raise BadRecord(f"no caption file {path}") from None
