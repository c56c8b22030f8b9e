"""Test images of both kinds, built in memory (as ``netota sim make-image`` builds them on disk)."""

from __future__ import annotations

import hashlib

from netota_daemon.wire.firmware_kind import (
    DOUBLE_BACKUP_HEAD_NAME,
    JL_FILE_HEAD_SIZE,
    TEST_HEAD,
    TEST_HEAD_MAGIC,
    TEST_TRAILER,
    TEST_TRAILER_MAGIC,
    build_jl_file_head,
    crc16,
)
from tests.engine_fakes import IMAGE_SIZE


def image_bytes_of(kind: str, version: str = "2.0.0", size: int = IMAGE_SIZE, damaged: bool = False) -> bytes:
    """A simulator-style test image of ``kind`` (single: NOTASIM head; double: an update_data JL head)."""
    body_size = size - TEST_TRAILER.size - (JL_FILE_HEAD_SIZE if kind == "double" else TEST_HEAD.size)
    body = bytes((i * 7) & 0xFF for i in range(body_size))
    if kind == "double":
        head = build_jl_file_head(DOUBLE_BACKUP_HEAD_NAME, size, crc16(body))
    else:
        head = TEST_HEAD.pack(TEST_HEAD_MAGIC, size, 0)
    covered = head + body
    digest = hashlib.sha256(covered).digest()
    if damaged:
        covered = covered[:-1] + bytes([covered[-1] ^ 1])
    return covered + TEST_TRAILER.pack(TEST_TRAILER_MAGIC, version.encode().ljust(32, b"\0"), digest)
