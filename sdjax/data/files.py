"""Files for the data readers, on local disk or in a bucket (`gs://...`, any fsspec URL): the few operations
sources need (exists, list, glob, whole and ranged reads, size), with one behaviour for both.

Local paths go through `os` (a ranged read is one `pread`); a URL goes through fsspec (gcsfs for `gs://`,
which etils.epath and orbax use too), where a ranged read is one HTTP request. Listings are not cached
(`use_listings_cache=False`): a reader lists once at startup, and a cached listing would hide files that
another process has just written (a shard index, a latent cache shard).

Paths in and out are strings; a URL keeps its protocol (`gs://b/x`, never gcsfs' bare `b/x`).
"""

from __future__ import annotations

import glob as glob_lib
import os
import posixpath

import fsspec


def is_remote(path: str) -> bool:
    """Whether `path` is a URL read through fsspec (gs://, s3://, memory://, ...) rather than a local path."""
    return "://" in str(path)


def _fs(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(file system, its path without protocol). fsspec keeps one instance per set of options and per
    process (a forked grain worker gets its own), so looking it up on every call is cheap and fork-safe."""
    protocol, bare = fsspec.core.split_protocol(str(path))
    return fsspec.filesystem(protocol, use_listings_cache=False), bare


def _url(fs: fsspec.AbstractFileSystem, bare: str) -> str:
    return fs.unstrip_protocol(bare)


def join(path: str, *parts: str) -> str:
    """`os.path.join` for local paths, `/`-joined for URLs."""
    return posixpath.join(str(path), *parts) if is_remote(path) else os.path.join(path, *parts)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, bare = _fs(path)
    return fs.exists(bare)


def isdir(path: str) -> bool:
    """A local folder, or a URL prefix with objects below it (buckets have no real folders)."""
    if not is_remote(path):
        return os.path.isdir(path)
    fs, bare = _fs(path)
    return fs.isdir(bare.rstrip("/"))


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, bare = _fs(path)
    return fs.isfile(bare)


def has_magic(pattern: str) -> bool:
    """Whether `pattern` holds glob characters (`*`, `?`, `[`)."""
    return glob_lib.has_magic(pattern)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (`*`, `?`, `[...]`); [] when nothing matches, a missing bucket included."""
    if not is_remote(pattern):
        return sorted(glob_lib.glob(pattern))
    fs, bare = _fs(pattern)
    try:
        return sorted(_url(fs, p) for p in fs.glob(bare))
    except FileNotFoundError:
        return []


def listdir(path: str) -> list[str]:
    """Sorted names (not paths) of the files and folders directly in folder `path`."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    fs, bare = _fs(path)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(bare.rstrip("/"), detail=False))


def _walk_order(relative: str) -> tuple:
    """os.walk's top-down order with sorted names: a folder's files before its subfolders."""
    parts = relative.split("/")
    return tuple((1, part) for part in parts[:-1]) + ((0, parts[-1]),)


def walk_files(root: str) -> list[str]:
    """Every file below folder `root`, recursively, in the same order for a local folder and a bucket."""
    if is_remote(root):
        fs, bare = _fs(root)
        bare = bare.rstrip("/")
        relative = [posixpath.relpath(p, bare) for p in fs.find(bare)]
        return [join(root.rstrip("/"), r) for r in sorted(relative, key=_walk_order)]
    relative = []
    for folder, _, files in os.walk(root):
        relative += [os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files]
    return [os.path.join(root, *r.split("/")) for r in sorted(relative, key=_walk_order)]


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, bare = _fs(path)
    return fs.cat_file(bare)


def read_text(path: str) -> str:
    """UTF-8 text with newlines translated to "\\n", as `open(path, encoding="utf-8").read()` gives it."""
    return read_bytes(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def read_range(path: str, offset: int, size: int) -> bytes:
    """`size` bytes from `offset` (fewer if the file ends first): one pread, or one ranged HTTP request."""
    if not is_remote(path):
        with open(path, "rb") as f:
            return os.pread(f.fileno(), size, offset)
    fs, bare = _fs(path)
    return fs.cat_file(bare, start=offset, end=offset + size)


def size(path: str) -> int:
    if not is_remote(path):
        return os.path.getsize(path)
    fs, bare = _fs(path)
    return int(fs.size(bare))


def version(path: str) -> str:
    """What changes when the file is rewritten: `size-mtime` locally, `size-generation` in GCS (the object's
    generation number; its etag or update time where a store has no generations). For cache keys."""
    if not is_remote(path):
        stat = os.stat(path)
        return f"{stat.st_size}-{stat.st_mtime_ns}"
    fs, bare = _fs(path)
    info = fs.info(bare)
    stamp = info.get("generation") or info.get("etag") or info.get("updated") or info.get("mtime") or ""
    return f"{info['size']}-{stamp}".replace("/", "_").replace(":", "_")


def open_sequential(path: str, block_size: int = 16 << 20):
    """A binary file object for reading `path` front to back, seeks included: a URL is fetched in
    `block_size` blocks (one request per block, read ahead), so scanning many small headers costs a few
    large requests, not one per header."""
    if not is_remote(path):
        return open(path, "rb")
    fs, bare = _fs(path)
    return fs.open(bare, "rb", block_size=block_size, cache_type="readahead")


def write_bytes(path: str, data: bytes) -> None:
    """Writes a whole file so that a reader sees all of it or none: a local file is written beside and
    renamed; a bucket object appears only once its upload completes."""
    if is_remote(path):
        fs, bare = _fs(path)
        fs.pipe_file(bare, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def move_into(local_path: str, path: str) -> None:
    """Moves a finished local file to `path`, local or in a bucket (an upload, streamed from disk), where it
    appears whole or not at all."""
    if is_remote(path):
        fs, bare = _fs(path)
        fs.put_file(local_path, bare)  # the object exists only once its upload is complete
        os.remove(local_path)
    else:
        os.replace(local_path, path)


def remove(path: str) -> None:
    """Deletes file `path` if it exists."""
    if not exists(path):
        return
    if is_remote(path):
        fs, bare = _fs(path)
        fs.rm_file(bare)
    else:
        os.remove(path)
