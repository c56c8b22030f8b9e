"""Test images the simulator can verify: a head that gives the length, a body, and a trailer.

The simulator can't parse a real ``.ufw``, so it treats any file as opaque bytes. An image made by
:func:`make_image` is recognisable, in the way a UFW header is::

    off 0        16-byte head    b"NOTASIM\\x01" | u32 total length | u32 0   (all little-endian)
    off 16       body            deterministic pseudo-random bytes
    off L-72     72-byte trailer b"NOTATRL\\x01" | version (32 bytes, NUL-padded ASCII)
                                 | SHA-256 of bytes 0 .. L-72

The device reads the head in its first small reads (so it knows the length, as the real loader
learns it from the UFW header) and checks the trailer at the end of phase 2: a corrupt transfer
ends in ERR, a good one makes the trailer's version the running firmware after the reboot.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy

HEAD_MAGIC = b"NOTASIM\x01"
TRAILER_MAGIC = b"NOTATRL\x01"
_HEAD = struct.Struct("<8sII")
_TRAILER = struct.Struct("<8s32s32s")
HEAD_SIZE = _HEAD.size  # 16
TRAILER_SIZE = _TRAILER.size  # 72
MIN_IMAGE_SIZE = HEAD_SIZE + TRAILER_SIZE
VERSION_BYTES = 32


class ImageError(ValueError):
    """A test image can't be made or read as asked."""


@dataclass(frozen=True)
class ImageTrailer:
    """What a test image says about itself."""

    version: str
    sha256: str  # of every byte before the trailer
    size: int  # total length, from the head


def image_length_from_head(head: bytes) -> int | None:
    """The total length recorded in a test image's head, or None when ``head`` is not one."""
    if len(head) < HEAD_SIZE:
        return None
    magic, length, _ = _HEAD.unpack_from(head, 0)
    if magic != HEAD_MAGIC or length < MIN_IMAGE_SIZE:
        return None
    return length


def build_image(version: str, size: int) -> bytes:
    """The bytes of a test image of exactly ``size`` bytes carrying ``version``."""
    try:
        encoded = version.encode("ascii")
    except UnicodeEncodeError:
        encoded = b""  # refused below, with the same message
    if not encoded or len(encoded) > VERSION_BYTES or b"\x00" in encoded:
        raise ImageError(f"the version must be 1..{VERSION_BYTES} ASCII characters, got {version!r}")
    if size < MIN_IMAGE_SIZE:
        raise ImageError(f"a test image is at least {MIN_IMAGE_SIZE} bytes (head and trailer), got {size}")
    if size > 0xFFFFFFFF:
        raise ImageError(f"the OTA protocol addresses at most {0xFFFFFFFF} bytes, got {size}")
    seed = int.from_bytes(hashlib.sha256(f"netota-sim/{version}/{size}".encode()).digest()[:8], "little")
    body = numpy.random.default_rng(seed).bytes(size - MIN_IMAGE_SIZE)
    covered = _HEAD.pack(HEAD_MAGIC, size, 0) + body
    digest = hashlib.sha256(covered).digest()
    return covered + _TRAILER.pack(TRAILER_MAGIC, encoded.ljust(VERSION_BYTES, b"\x00"), digest)


def make_image(path: str | os.PathLike[str], version: str, size: int) -> Path:
    """Write a test image to ``path`` (replacing it) and return the path."""
    data = build_image(version, size)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def parse_trailer(data: bytes | bytearray | memoryview) -> ImageTrailer | None:
    """The trailer of a whole image held in memory, or None when it is not a test image."""
    length = image_length_from_head(bytes(data[:HEAD_SIZE]))
    if length is None or length != len(data):
        return None
    magic, version, digest = _TRAILER.unpack_from(data, len(data) - TRAILER_SIZE)
    if magic != TRAILER_MAGIC:
        return None
    return ImageTrailer(version.rstrip(b"\x00").decode("ascii", "replace"), digest.hex(), length)


def verify_image(data: bytes | bytearray | memoryview) -> tuple[bool, str]:
    """Whether ``data`` is an intact test image, and why not."""
    trailer = parse_trailer(data)
    if trailer is None:
        return False, "no simulator head/trailer (length or magic wrong)"
    actual = hashlib.sha256(memoryview(data)[: len(data) - TRAILER_SIZE]).hexdigest()
    if actual != trailer.sha256:
        return False, f"SHA-256 mismatch: trailer says {trailer.sha256[:16]}..., received {actual[:16]}..."
    return True, "ok"


def read_trailer(path: str | os.PathLike[str]) -> ImageTrailer | None:
    """The trailer of the test image at ``path``, or None for any other file."""
    return parse_trailer(Path(path).read_bytes())
