"""Test images: head, deterministic body, trailer; verification."""

from __future__ import annotations

import hashlib

import pytest

from netota_daemon.sim.image import (
    HEAD_SIZE,
    MIN_IMAGE_SIZE,
    TRAILER_SIZE,
    ImageError,
    build_image,
    image_length_from_head,
    make_image,
    read_trailer,
    verify_image,
)


def test_make_image_writes_exactly_size_bytes_with_a_verifiable_trailer(tmp_path):
    path = make_image(tmp_path / "fw.bin", "2.1.0", 100_000)
    data = path.read_bytes()
    assert len(data) == 100_000
    assert data[:HEAD_SIZE] == b"NOTASIM\x01" + (100_000).to_bytes(4, "little") + bytes(4)
    trailer = read_trailer(path)
    assert trailer is not None
    assert (trailer.version, trailer.size) == ("2.1.0", 100_000)
    assert trailer.sha256 == hashlib.sha256(data[:-TRAILER_SIZE]).hexdigest()
    assert data[-TRAILER_SIZE:][:8] == b"NOTATRL\x01"
    assert verify_image(data) == (True, "ok")
    assert not (tmp_path / "fw.bin.tmp").exists()


def test_images_are_deterministic_and_differ_by_version_and_size():
    assert build_image("1.0", 5000) == build_image("1.0", 5000)
    assert build_image("1.0", 5000)[HEAD_SIZE:200] != build_image("1.1", 5000)[HEAD_SIZE:200]
    assert build_image("1.0", 5001)[HEAD_SIZE:200] != build_image("1.0", 5000)[HEAD_SIZE:200]


def test_a_flipped_byte_fails_verification():
    data = bytearray(build_image("1.0", 5000))
    data[2000] ^= 0x40
    ok, why = verify_image(bytes(data))
    assert not ok and "SHA-256 mismatch" in why


def test_a_truncated_or_foreign_file_is_not_a_test_image(tmp_path):
    data = build_image("1.0", 5000)
    assert verify_image(data[:-1])[0] is False
    assert image_length_from_head(bytes(64)) is None
    (tmp_path / "other.bin").write_bytes(b"\x00" * 500)
    assert read_trailer(tmp_path / "other.bin") is None


@pytest.mark.parametrize(
    "version, size",
    [("", 1000), ("x" * 33, 1000), ("1.0", MIN_IMAGE_SIZE - 1), ("2.0-\u00e9t\u00e9", 1000), ("1\x002", 1000)],
)
def test_bad_requests_raise_clear_errors(version, size):
    with pytest.raises(ImageError):
        build_image(version, size)
