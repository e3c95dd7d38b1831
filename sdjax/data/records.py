"""From a source's raw record to a usable one: image decoded, caption present, bad records replaced and counted.

A source is random access (`len`, `__getitem__`) and yields raw records
`{"image": encoded bytes | uint8 [H, W, 3] array, "caption": str | sequence of str | None}`; it may raise
`BadRecord` or `OSError` for a record it cannot read (a missing file, a member cut off by a truncated shard),
and may offer `describe(index)` naming where the record lives, for messages.

A bad record never stops a run and never changes batch shapes: `CheckedSource` replaces it by another record
picked deterministically from (index, attempt), and reports how many it passed over, so a batch is still a
pure function of (seed, step) and the skip counts travel with the batch (worker processes included).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from absl import logging
from PIL import Image, ImageOps

# A run that only ever sees bad records must stop, not spin: give up after this many bad candidates in a row.
# With data.max_bad_fraction <= MAX_BAD_FRACTION, a healthy source fails this way with probability
# <= 0.5**64 per example; below that bar the running fraction (check_bad_fraction) decides.
MAX_ATTEMPTS = 64
MAX_BAD_FRACTION = 0.5
# The fraction of bad records is judged only after this many reads: over fewer, one unlucky batch would do.
MIN_READS_FOR_FRACTION = 256


class BadRecord(Exception):
    """A record that cannot be trained on (missing caption, image too small, ...); the message says why."""


class DataError(ValueError):
    """A data source that cannot feed training: missing, empty, or with too many bad records."""


# What reading a bad record raises: a missing or unreadable file, undecodable caption text or metadata.
# (Decoding errors arrive as BadRecord, see decode_image.)
RECORD_ERRORS = (BadRecord, OSError, ValueError, EOFError)


def describe(source, index: int) -> str:
    describe_fn = getattr(source, "describe", None)
    return describe_fn(index) if describe_fn else f"{source!r}[{index}]"


def captions_of(record: dict) -> tuple[str, ...]:
    """The record's caption(s), stripped; BadRecord when there is none."""
    caption = record.get("caption")
    caption = caption.tolist() if isinstance(caption, np.ndarray) else caption
    captions = (caption,) if isinstance(caption, (str, bytes)) else tuple(caption or ())
    captions = tuple(c.decode("utf-8") if isinstance(c, bytes) else str(c) for c in captions if c is not None)
    captions = tuple(c.strip() for c in captions if c.strip())
    if not captions:
        raise BadRecord("no caption")
    return captions


def cover_size(width: int, height: int, target_hw: tuple[int, int]) -> tuple[int, int]:
    """(width, height) the image is scaled to so that it covers `target_hw` (shorter side fits, as in SD)."""
    target_h, target_w = target_hw
    scale = max(target_h / height, target_w / width)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def decode_image(data, target_hw: tuple[int, int], min_size: int) -> Image.Image:
    """An RGB PIL image, fully decoded (so truncation shows here), from encoded bytes or a uint8 array."""
    if isinstance(data, np.ndarray):
        image = Image.fromarray(data)
    elif isinstance(data, (bytes, bytearray, memoryview)):
        if not len(data):
            raise BadRecord("empty file")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = _decoding(Image.open, io.BytesIO(data))
    else:
        raise BadRecord(f"no image (got {type(data).__name__})")
    if min(image.size) < min_size:
        raise BadRecord(f"image {image.size[0]}x{image.size[1]} is under data.min_image_size={min_size}")
    # JPEG decodes straight to 1/2, 1/4 or 1/8 scale when that still covers the target: much less work for
    # large photos, and the resize that follows would drop that detail anyway.
    image.draft("RGB", cover_size(*image.size, target_hw))
    _decoding(image.load)
    _decoding(ImageOps.exif_transpose, image, in_place=True)  # phone photos store their rotation in EXIF
    return image if image.mode == "RGB" else _decoding(image.convert, "RGB")


def image_size(data) -> tuple[int, int]:
    """(width, height) of encoded bytes (read from the header only) or of a uint8 array."""
    if isinstance(data, np.ndarray):
        return data.shape[1], data.shape[0]
    return _decoding(Image.open, io.BytesIO(data)).size


def _decoding(fn, *args, **kwargs):
    """fn(...) with any error it raises on a malformed file as BadRecord: PIL's decoders and EXIF parser raise
    many kinds (OSError, SyntaxError, struct.error, IndexError, ...), and web data holds every kind of file."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise BadRecord(f"cannot decode the image: {e or type(e).__name__}") from e


def usable_record(source, index: int, target_hw: tuple[int, int], min_image_size: int) -> dict:
    """{"image": PIL RGB, "caption": tuple of str} of record `index`; raises one of RECORD_ERRORS if bad."""
    record = source[index]
    captions = captions_of(record)
    return {"image": decode_image(record.get("image"), target_hw, min_image_size), "caption": captions}


def log_bad_record(source, index: int, error: Exception) -> str:
    reason = f"{describe(source, index)}: {error or type(error).__name__}"
    logging.log_first_n(logging.WARNING, "skipping bad record %s", 20, reason)
    return reason


def substitute_index(index: int, attempt: int, size: int) -> int:
    """A record to try in place of bad `index`: random (a bad shard is often a contiguous run), deterministic."""
    return int(np.random.default_rng([index, attempt]).integers(size))


class CheckedSource:
    """Random access to usable records `{"image": PIL RGB, "caption": tuple of str, "skipped": int}`.

    `skipped` counts the bad records passed over to produce this one (0 for a good record).
    """

    def __init__(self, source, target_hw: tuple[int, int], min_image_size: int):
        if len(source) == 0:
            raise DataError(f"{source!r} holds no records.")
        self.source, self.target_hw, self.min_image_size = source, tuple(target_hw), min_image_size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        return self.read(int(index), self.target_hw)

    def read(self, index: int, target_hw: tuple[int, int]) -> dict:
        """Record `index`, or the first usable substitute; `target_hw` lets JPEG decode at a reduced scale."""
        for attempt in range(MAX_ATTEMPTS):
            candidate = index if attempt == 0 else substitute_index(index, attempt, len(self.source))
            try:
                return {**usable_record(self.source, candidate, target_hw, self.min_image_size), "skipped": attempt}
            except RECORD_ERRORS as e:
                reason = log_bad_record(self.source, candidate, e)
        raise DataError(f"{MAX_ATTEMPTS} records in a row of {self.source!r} could not be used, so nearly all of "
                        f"it is bad; the last: {reason}. Check data.source and data.path.")

    def __repr__(self) -> str:
        return f"CheckedSource({self.source!r})"


def check_bad_fraction(bad: int, read: int, max_fraction: float, source_name: str) -> None:
    """Raises DataError once more than `max_fraction` of the records read so far were bad."""
    if read >= MIN_READS_FOR_FRACTION and bad > max_fraction * read:
        raise DataError(f"{bad} of the {read} records read from {source_name} were bad ({bad / read:.1%}), more "
                        f"than data.max_bad_fraction={max_fraction}. The log names the first ones; fix or drop "
                        "them, or raise data.max_bad_fraction.")

