"""Webdataset `.tar` shards as img2dataset writes them for LAION-style sets: `{key}.jpg` + `{key}.txt`
(or a `{key}.json` with a "caption"), read at random.

A tar is sequential, but an uncompressed one stores each member's bytes at a fixed offset. At startup every
shard is scanned once for its members (headers only) and the index is cached under `data.index_cache_dir`,
keyed by the shard's path, size and mtime (GCS: generation); records are then read with one `pread` each
(GCS: one ranged GET). This keeps the pipeline random access (a batch is a function of (seed, step), resume
needs no iterator state) without the `webdataset` package, whose readers only stream.

`data.path` is a shard pattern with braces (`/data/{00000..00099}.tar`), a glob, a folder of shards, or
several of these joined by `::` (webdataset's separator); each may be a `gs://` URL (files.py).

What startup costs on a pod: every host builds the index of all shards (the records are shuffled over the
whole set, and each host takes its slice of every global batch), so without a cache each host reads the
headers of every shard. Locally that is a seek per member; in a bucket a shard is fetched in 16 MB blocks
(open_sequential), and since img2dataset's members (~50-500 KB images) sit back to back, that reads about
the whole shard: H hosts x the data set's size at each cold start, 16 shards at a time per host. An index
is ~100 bytes per record, so set `data.index_cache_dir` to a bucket folder all hosts share
(`gs://bucket/tar-index`): a shard is scanned once by whichever host gets to it first (hosts start at
different shards for that reason) and every later start, on any host, reads its ~MB of index instead.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import re
import socket
import tarfile
import threading

import numpy as np
from absl import logging

import sdjax.data.files as files
from sdjax.data.records import BadRecord, DataError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_INDEX_VERSION = 1
# In a bucket, a record's members are read in one GET when at most this many bytes lie between them.
_MAX_GAP = 64 << 10


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


def expand_shards(spec: str, key: str = "data.path") -> list[str]:
    """Shard files named by `spec` (local or gs://); DataError naming the part that matches nothing (a
    missing bucket included). `key` is the config key the message names (data.path or data.eval_path)."""
    shards = []
    for part in spec.split("::"):
        for path in expand_braces(part.strip()):
            if files.isdir(path):
                found = files.glob(files.join(path.rstrip("/"), "*.tar"))
            elif files.has_magic(path):
                found = files.glob(path)
            else:
                found = [path] if files.isfile(path) else []
            if not found:
                raise DataError(f"{key}={spec!r}: {path!r} matches no shard file (data.source=webdataset expects "
                                ".tar shards as a brace pattern like /data/{00000..00099}.tar or "
                                "gs://bucket/{00000..00099}.tar, a glob, or a folder).")
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
        with files.open_sequential(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
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
    """Where the index of `shard` is cached: named by its path and version (size and mtime, or GCS's size
    and generation), so a rewritten shard is scanned again. `cache_dir` may be local or gs://."""
    location = shard if files.is_remote(shard) else os.path.realpath(shard)
    digest = hashlib.sha1(f"{_INDEX_VERSION}:{location}".encode()).hexdigest()[:20]
    cache_dir = cache_dir if files.is_remote(cache_dir) else os.path.expanduser(cache_dir)
    return files.join(cache_dir, f"{digest}-{files.version(shard)}.npz")


def shard_index(shard: str, cache_dir: str) -> dict:
    """scan_shard, cached: a shard that has not changed (same size and mtime/generation) is not scanned again."""
    cache_path = _index_cache_path(cache_dir, shard) if cache_dir else None
    if cache_path and files.isfile(cache_path):
        try:
            with np.load(io.BytesIO(files.read_bytes(cache_path))) as cached:
                return dict(cached)
        except (OSError, ValueError) as e:  # a damaged cache file: scan again
            logging.warning("ignoring the damaged tar index %s (%s)", cache_path, e)
    index = scan_shard(shard)
    if cache_path:
        try:
            buffer = io.BytesIO()
            np.savez(buffer, **index)
            files.write_bytes(cache_path, buffer.getvalue())  # whole or absent: no process reads half an index
        except OSError as e:
            logging.log_first_n(logging.WARNING, "cannot cache tar indexes in %s (%s)", 1, cache_dir, e)
    return index


def _scan_order(num_shards: int) -> list[int]:
    """The order this host scans shards in: all of them, starting at a place of its own (from its host
    name), so that hosts sharing a gs:// index cache mostly scan different shards and read the rest."""
    start = int(hashlib.sha1(socket.gethostname().encode()).hexdigest(), 16) % max(num_shards, 1)
    return [(start + i) % num_shards for i in range(num_shards)]


def all_shard_indexes(shards: list[str], cache_dir: str) -> list[dict]:
    """shard_index of every shard, in the order of `shards`, read 16 at a time (scanning waits on reads)."""
    indexes: list[dict | None] = [None] * len(shards)

    def index_of(i: int) -> None:
        indexes[i] = shard_index(shards[i], cache_dir)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(index_of, _scan_order(len(shards))))
    return indexes


class WebDatasetSource:
    """Random access to {"image": encoded bytes, "caption": str | None} of webdataset tar shards."""

    def __init__(self, spec: str, index_cache_dir: str = "", key: str = "data.path"):
        self.spec, self.shards = spec, expand_shards(spec, key)
        indexes = all_shard_indexes(self.shards, index_cache_dir)
        self.shard_of = np.concatenate([np.full(len(ix["keys"]), i, np.int32) for i, ix in enumerate(indexes)])
        self.keys = np.concatenate([ix["keys"] for ix in indexes])
        self.image, self.text, self.json = (np.concatenate([ix[column] for ix in indexes])
                                            for column in ("image", "text", "json"))
        if not len(self.keys):
            raise DataError(f"the shards of {key}={spec!r} ({len(self.shards)} files) hold no records.")
        self._files: dict[int, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.keys)

    def _read_local(self, shard: int, offset: int, size: int) -> bytes:
        with self._lock:
            if shard not in self._files:
                self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        return os.pread(self._files[shard], size, offset)

    def _read_members(self, index: int, locations: list[np.ndarray]) -> list[bytes | None]:
        """The bytes of record `index`'s members at `locations` ((offset, size); offset -1: absent). Locally a
        pread each; in a bucket one ranged GET over all of them, since a record's members lie side by side
        in the tar (a 512-byte header apart): a GET costs far more than the few header bytes it also reads."""
        shard, path = int(self.shard_of[index]), self.shards[int(self.shard_of[index])]
        wanted = [(int(offset), int(size)) for offset, size in locations]
        present = [(offset, size) for offset, size in wanted if offset >= 0]
        span, start = b"", 0
        if present and files.is_remote(path):
            start, end = min(o for o, _ in present), max(o + n for o, n in present)
            if end - start <= sum(n for _, n in present) + _MAX_GAP:
                span = files.read_range(path, start, end - start)
        members = []
        for offset, size in wanted:
            if offset < 0:
                data = None
            elif span:
                data = span[offset - start:offset - start + size]
            else:
                data = files.read_range(path, offset, size) if files.is_remote(path) else \
                    self._read_local(shard, offset, size)
            if data is not None and len(data) != size:
                raise BadRecord(f"truncated: {len(data)} of {size} bytes")
            members.append(data)
        return members

    def __getitem__(self, index: int) -> dict:
        has_text = self.text[index][0] >= 0
        image, caption_member = self._read_members(index, [self.image[index],
                                                           self.text[index] if has_text else self.json[index]])
        if image is None:
            raise BadRecord("no image member")
        if has_text:
            caption = caption_member.decode("utf-8")
        else:
            fields = json.loads(caption_member) if caption_member is not None else None
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
