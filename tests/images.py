"""Test images of both kinds in memory, as ``netota sim make-image`` writes them, and damaged ones."""

from __future__ import annotations

from netota_daemon.sim.image import TRAILER_SIZE, build_image
from tests.engine_fakes import IMAGE_SIZE


def image_bytes_of(kind: str, version: str = "2.0.0", size: int = IMAGE_SIZE, damaged: bool = False) -> bytes:
    """A simulator test image of ``kind`` ("single" or "double"); ``damaged``: one byte before its
    trailer flipped, so its SHA-256 no longer matches."""
    data = build_image(version, size, kind)
    if damaged:
        at = len(data) - TRAILER_SIZE - 1
        data = data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]
    return data
