"""Webdataset `.tar` shards as img2dataset writes them for LAION-style sets: `{key}.jpg` + `{key}.txt`
(or a `{key}.json` with a "caption"), read at random.

A tar is sequential, but an uncompressed one stores each member's bytes at a fixed offset. At startup every
shard is scanned once for its members (headers only) and the index is cached under `data.index_cache_dir`,
keyed by the shard's path, size and mtime; records are then read with one `pread` each. This keeps the
pipeline random access (a batch is a function of (seed, step), resume needs no iterator state) without the
`webdataset` package, whose readers only stream.

`data.path` is a shard pattern with braces (`/data/{00000..00099}.tar`), a glob, a folder of shards, or
several of these joined by `::` (webdataset's separator).
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import json
import os
import re
import tarfile
import threading

import numpy as np
from absl import logging

from sdjax.data.records import BadRecord, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_INDEX_VERSION = 1


def expand_braces(pattern: str) -> list[str]:
    """`a{1..3}b` -> [a1b, a2b, a3b] (zero padding kept: {000..002}), `a{x,y}` -> [ax, ay]."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [expanded for option in options for expanded in expand_braces(head + option + tail)]


def expand_shards(spec: str) -> list[str]:
    """Shard files named by `spec`; DataError naming the part that matches nothing."""
    shards = []
    for part in spec.split("::"):
        for path in expand_braces(part.strip()):
            if os.path.isdir(path):
                found = sorted(glob.glob(os.path.join(path, "*.tar")))
            elif glob.has_magic(path):
                found = sorted(glob.glob(path))
            else:
                found = [path] if os.path.isfile(path) else []
            if not found:
                raise DataError(f"data.path={spec!r}: {path!r} matches no shard file (data.source=webdataset expects "
                                ".tar shards as a brace pattern like /data/{00000..00099}.tar, a glob, or a folder).")
            shards += found
    return shards


def _split_member_name(name: str) -> tuple[str, str]:
    """webdataset's convention: the key is the path up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, extension = base.partition(".")
    return os.path.join(folder, stem), extension.lower()


def scan_shard(path: str) -> dict:
    """{keys, image, text, json: int64 [n, 2] (offset, size; -1 when absent)} for one tar shard."""
    records: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:  # a shard cut off mid-member just ends early: its last records read as bad
                if member.isfile():
                    key, extension = _split_member_name(member.name)
                    records.setdefault(key, {})[extension] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as e:
        if not records:
            raise DataError(f"{path} is not a readable uncompressed tar ({e}); img2dataset writes plain .tar "
                            "shards, which can be read at random.") from None
        logging.warning("%s is unreadable after %d records (%s); using those.", path, len(records), e)

    def column(extensions):
        rows = [next((r[e] for e in extensions if e in r), (-1, -1)) for r in records.values()]
        return np.asarray(rows, np.int64).reshape(-1, 2)

    return {"keys": np.asarray(list(records), dtype=str), "image": column(IMAGE_EXTENSIONS),
            "text": column(("txt",)), "json": column(("json",))}


def _index_cache_path(cache_dir: str, shard: str) -> str:
    stat = os.stat(shard)
    digest = hashlib.sha1(f"{_INDEX_VERSION}:{os.path.realpath(shard)}".encode()).hexdigest()[:20]
    return os.path.join(os.path.expanduser(cache_dir), f"{digest}-{stat.st_size}-{stat.st_mtime_ns}.npz")


def shard_index(shard: str, cache_dir: str) -> dict:
    """scan_shard, cached: a shard that has not changed (same size and mtime) is not scanned again."""
    cache_path = _index_cache_path(cache_dir, shard) if cache_dir else None
    if cache_path and os.path.isfile(cache_path):
        try:
            with np.load(cache_path) as cached:
                return dict(cached)
        except (OSError, ValueError) as e:  # a damaged cache file: scan again
            logging.warning("ignoring the damaged tar index %s (%s)", cache_path, e)
    index = scan_shard(shard)
    if cache_path:
        try:
            os.makedirs(os.path.dirname(cache_path), exist_ok=True)
            temporary = f"{cache_path}.{os.getpid()}.tmp.npz"
            np.savez(temporary, **index)
            os.replace(temporary, cache_path)  # atomic: another process never reads half an index
        except OSError as e:
            logging.log_first_n(logging.WARNING, "cannot cache tar indexes in %s (%s)", 1, cache_dir, e)
    return index


class WebDatasetSource:
    """Random access to {"image": encoded bytes, "caption": str | None} of webdataset tar shards."""

    def __init__(self, spec: str, index_cache_dir: str = ""):
        self.spec, self.shards = spec, expand_shards(spec)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:  # scanning waits on reads: overlap them
            indexes = list(pool.map(lambda shard: shard_index(shard, index_cache_dir), self.shards))
        self.shard_of = np.concatenate([np.full(len(ix["keys"]), i, np.int32) for i, ix in enumerate(indexes)])
        self.keys = np.concatenate([ix["keys"] for ix in indexes])
        self.image, self.text, self.json = (np.concatenate([ix[column] for ix in indexes])
                                            for column in ("image", "text", "json"))
        if not len(self.keys):
            raise DataError(f"the shards of data.path={spec!r} ({len(self.shards)} files) hold no records.")
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.keys)

    def _read(self, index: int, location: np.ndarray) -> bytes | None:
        offset, size = (int(v) for v in location)
        if offset < 0:
            return None
        shard = int(self.shard_of[index])
        with self._lock:
            if shard not in self._files:
                self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], size, offset)
        if len(data) != size:
            raise BadRecord(f"truncated: {len(data)} of {size} bytes")
        return data

    def __getitem__(self, index: int) -> dict:
        image = self._read(index, self.image[index])
        if image is None:
            raise BadRecord("no image member")
        text = self._read(index, self.text[index])
        caption = text.decode("utf-8") if text is not None else None
        if caption is None:
            metadata = self._read(index, self.json[index])
            fields = json.loads(metadata) if metadata is not None else None
            caption = fields.get("caption") if isinstance(fields, dict) else None
        return {"image": image, "caption": caption}

    def describe(self, index: int) -> str:
        return f"{self.shards[int(self.shard_of[index])]}:{self.keys[index]}"

    def __getstate__(self):  # open files and locks stay with each process (grain's workers get a copy)
        return {k: v for k, v in self.__dict__.items() if k not in ("_files", "_lock")}

    def __setstate__(self, state):
        self.__dict__.update(state, _files={}, _lock=threading.Lock())

    def __repr__(self) -> str:
        return f"WebDatasetSource({self.spec!r}, {len(self.shards)} shards)"
