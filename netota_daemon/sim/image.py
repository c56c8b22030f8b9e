"""Test images the simulator can verify, of either kind: a head, a body, and a trailer.

The simulator can't parse a real image, so it treats any other file as opaque bytes. An image made
by :func:`make_image` is recognisable (by :mod:`netota_daemon.wire.firmware_kind` too), in the way a
real image's header is, and carries its kind::

    single backup (kind "single", the default; served on 3335)
    off 0        16-byte head    b"NOTASIM\\x01" | u32 total length | u32 0   (all little-endian)
    off 16       body            deterministic pseudo-random bytes
    off L-72     72-byte trailer b"NOTATRL\\x01" | version (32 bytes, NUL-padded ASCII)
                                 | SHA-256 of bytes 0 .. L-72

    double backup (kind "double"; uploaded over FTP)
    off 0        32-byte JL file head, name "update_data", size L, offset 32, attr/index 0,
                                 data CRC16 over the body, head CRC16 over its bytes 2..31
    off 32       body            deterministic pseudo-random bytes
    off L-72     the same 72-byte trailer (its SHA-256 covers the JL file head and the body)

The single-backup device reads the head in its first small reads (so it knows the length, as the
real loader learns it from the UFW header) and checks the trailer at the end of phase 2: a corrupt
transfer ends in ERR, a good one makes the trailer's version the running firmware after the reboot.
The double-backup device's writer checks the JL file head on the first bytes, as the real one does,
and the length and trailer when the upload ends.
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy

from netota_daemon.wire.firmware_kind import (
    DOUBLE_BACKUP_HEAD_NAME,
    JL_FILE_HEAD_SIZE,
    TEST_HEAD,
    TEST_HEAD_MAGIC,
    TEST_TRAILER,
    TEST_TRAILER_MAGIC,
    TEST_VERSION_BYTES,
    FirmwareKind,
    build_jl_file_head,
    crc16,
    identify,
    identify_file_bytes,
    parse_jl_file_head,
    parse_test_trailer,
)

HEAD_MAGIC = TEST_HEAD_MAGIC
TRAILER_MAGIC = TEST_TRAILER_MAGIC
HEAD_SIZE = TEST_HEAD.size  # 16
TRAILER_SIZE = TEST_TRAILER.size  # 72
MIN_IMAGE_SIZE = HEAD_SIZE + TRAILER_SIZE  # 88, a single-backup test image
MIN_DOUBLE_IMAGE_SIZE = JL_FILE_HEAD_SIZE + TRAILER_SIZE  # 104
VERSION_BYTES = TEST_VERSION_BYTES


class ImageKind(str, enum.Enum):
    """What ``netota sim make-image --kind`` makes."""

    SINGLE = "single"
    DOUBLE = "double"

    @property
    def firmware_kind(self) -> FirmwareKind:
        return FirmwareKind.SINGLE_BACKUP if self is ImageKind.SINGLE else FirmwareKind.DOUBLE_BACKUP

    @property
    def min_size(self) -> int:
        return MIN_IMAGE_SIZE if self is ImageKind.SINGLE else MIN_DOUBLE_IMAGE_SIZE


class ImageError(ValueError):
    """A test image can't be made or read as asked."""


@dataclass(frozen=True)
class ImageTrailer:
    """What a test image says about itself."""

    version: str
    sha256: str  # of every byte before the trailer
    size: int  # total length, from the head
    kind: FirmwareKind = FirmwareKind.SINGLE_BACKUP


def image_length_from_head(head: bytes) -> int | None:
    """The total length a single-backup test image's head records, or None when ``head`` is not one."""
    if len(head) < HEAD_SIZE:
        return None
    magic, length, _ = TEST_HEAD.unpack_from(head, 0)
    if magic != HEAD_MAGIC or length < MIN_IMAGE_SIZE:
        return None
    return int(length)


def build_image(version: str, size: int, kind: ImageKind | str = ImageKind.SINGLE) -> bytes:
    """The bytes of a test image of exactly ``size`` bytes carrying ``version``."""
    try:
        kind = ImageKind(kind)
    except ValueError:
        raise ImageError(f"the kind must be single or double, got {kind!r}") from None
    try:
        encoded = version.encode("ascii")
    except UnicodeEncodeError:
        encoded = b""  # refused below, with the same message
    if not encoded or len(encoded) > VERSION_BYTES or b"\x00" in encoded:
        raise ImageError(f"the version must be 1..{VERSION_BYTES} ASCII characters, got {version!r}")
    if size < kind.min_size:
        raise ImageError(
            f"a {kind.value}-backup test image is at least {kind.min_size} bytes (head and trailer), got {size}"
        )
    if size > 0xFFFFFFFF:
        raise ImageError(f"a test image has at most {0xFFFFFFFF} bytes, got {size}")
    if kind is ImageKind.SINGLE:
        # The seed of single-backup images is unchanged, so images made before kinds existed stay the same.
        seed_text = f"netota-sim/{version}/{size}"
        head_size = HEAD_SIZE
    else:
        seed_text = f"netota-sim/double/{version}/{size}"
        head_size = JL_FILE_HEAD_SIZE
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "little")
    body = numpy.random.default_rng(seed).bytes(size - head_size - TRAILER_SIZE)
    if kind is ImageKind.SINGLE:
        head = TEST_HEAD.pack(HEAD_MAGIC, size, 0)
    else:
        head = build_jl_file_head(DOUBLE_BACKUP_HEAD_NAME, size, crc16(body), offset=JL_FILE_HEAD_SIZE)
    covered = head + body
    digest = hashlib.sha256(covered).digest()
    return covered + TEST_TRAILER.pack(TRAILER_MAGIC, encoded.ljust(VERSION_BYTES, b"\x00"), digest)


def make_image(path: str | os.PathLike[str], version: str, size: int, kind: ImageKind | str = ImageKind.SINGLE) -> Path:
    """Write a test image to ``path`` (replacing it) and return the path."""
    data = build_image(version, size, kind)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)
    return out


def image_kind(head: bytes | bytearray | memoryview) -> FirmwareKind | None:
    """The kind of the test image that ``head`` starts, as far as its head tells (a double-backup
    head is the real format's: any ``update_data`` head says double backup); None otherwise."""
    info = identify(head)
    if info.test_image or info.kind is FirmwareKind.DOUBLE_BACKUP:
        return info.kind
    return None


def parse_trailer(data: bytes | bytearray | memoryview) -> ImageTrailer | None:
    """The trailer of a whole test image held in memory (either kind), or None when ``data`` is not
    one whose head matches its length. The SHA-256 is not checked here: see :func:`verify_image`."""
    trailer = parse_test_trailer(data)
    if trailer is None:
        return None
    length = image_length_from_head(bytes(data[:HEAD_SIZE]))
    kind = FirmwareKind.SINGLE_BACKUP
    if length is None:
        head = parse_jl_file_head(data)
        if head is None or head.name != DOUBLE_BACKUP_HEAD_NAME:
            return None
        length, kind = head.size, FirmwareKind.DOUBLE_BACKUP
    if length != len(data):
        return None
    return ImageTrailer(trailer.version, trailer.sha256, length, kind)


def verify_image(data: bytes | bytearray | memoryview) -> tuple[bool, str]:
    """Whether ``data`` is an intact test image (either kind), and why not."""
    info = identify_file_bytes(data)
    if not info.test_image:
        return False, "no simulator head/trailer (length or magic wrong)"
    if not info.intact:
        return False, info.description
    return True, "ok"


def read_trailer(path: str | os.PathLike[str]) -> ImageTrailer | None:
    """The trailer of the test image at ``path``, or None for any other file."""
    return parse_trailer(Path(path).read_bytes())
