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
    image_kind,
    image_length_from_head,
    make_image,
    read_trailer,
    verify_image,
)
from netota_daemon.wire.firmware_kind import FirmwareKind, crc16, identify, identify_file_bytes, parse_jl_file_head


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


def test_single_backup_images_are_unchanged_by_kinds():
    # the digest of an image made before images carried a kind: old images stay valid
    digest = hashlib.sha256(build_image("2.0.0", 150_000)).hexdigest()
    assert digest == "82cf9298e72da3d4c22fac20453f160fa37b511e9c937726d7121ab391e70871"
    assert build_image("2.0.0", 150_000, "single") == build_image("2.0.0", 150_000)


def test_double_backup_image_starts_with_a_real_shaped_update_data_head(tmp_path):
    path = make_image(tmp_path / "update-ota.ufw", "3.0.0", 50_000, kind="double")
    data = path.read_bytes()
    assert len(data) == 50_000
    head = parse_jl_file_head(data)
    assert head is not None and (head.name, head.size, head.offset) == ("update_data", 50_000, 32)
    assert head.data_crc == crc16(data[32:-TRAILER_SIZE])
    assert identify(data[:64]).kind is FirmwareKind.DOUBLE_BACKUP
    info = identify_file_bytes(data)
    assert (info.kind, info.test_image, info.version, info.intact) == (FirmwareKind.DOUBLE_BACKUP, True, "3.0.0", True)
    trailer = read_trailer(path)
    assert (trailer.version, trailer.size, trailer.kind) == ("3.0.0", 50_000, FirmwareKind.DOUBLE_BACKUP)
    assert trailer.sha256 == hashlib.sha256(data[:-TRAILER_SIZE]).hexdigest()
    assert verify_image(data) == (True, "ok")
    assert image_kind(data[:64]) is FirmwareKind.DOUBLE_BACKUP and image_kind(bytes(64)) is None
    assert image_length_from_head(data[:16]) is None  # not the single-backup head


def test_double_backup_image_damage_is_found():
    data = build_image("3.0.0", 5000, "double")
    body_flip = bytearray(data)
    body_flip[1000] ^= 0x01
    ok, why = verify_image(bytes(body_flip))
    assert not ok and "CRC" in why
    assert verify_image(data[:-1])[0] is False
    assert build_image("3.0.0", 5000, "double")[32:200] != build_image("3.0.0", 5000)[16:184]


@pytest.mark.parametrize("kind, smallest", [("single", 88), ("double", 104)])
def test_smallest_image_of_each_kind(kind, smallest):
    assert verify_image(build_image("1", smallest, kind)) == (True, "ok")
    with pytest.raises(ImageError, match=f"at least {smallest} bytes"):
        build_image("1", smallest - 1, kind)


def test_unknown_kind_is_refused():
    with pytest.raises(ImageError, match="single or double"):
        build_image("1.0", 1000, "triple")
