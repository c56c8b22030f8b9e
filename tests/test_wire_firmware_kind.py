"""Recognising an image's kind from its first bytes: the CRC, the cipher, the heads, and never raising."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.wire.firmware_kind import (
    HEAD_BYTES,
    JL_FILE_HEAD_SIZE,
    TEST_TRAILER_MAGIC,
    FirmwareKind,
    FirmwareKindInfo,
    build_jl_file_head,
    build_ufw_header,
    crc16,
    enc_cipher,
    identify,
    identify_file_bytes,
    parse_jl_file_head,
    parse_test_trailer,
    parse_ufw_header,
)


def trailer(version: str, covered: bytes) -> bytes:
    return TEST_TRAILER_MAGIC + version.encode().ljust(32, b"\x00") + hashlib.sha256(covered).digest()


def single_test_image(version: str = "2.0.0", body: bytes = b"\x5a" * 200) -> bytes:
    size = 16 + len(body) + 72
    covered = b"NOTASIM\x01" + struct.pack("<II", size, 0) + body
    return covered + trailer(version, covered)


def double_test_image(version: str = "3.1.0", body: bytes = b"\xa5" * 300) -> bytes:
    size = JL_FILE_HEAD_SIZE + len(body) + 72
    covered = build_jl_file_head("update_data", size, crc16(body), offset=32) + body
    return covered + trailer(version, covered)


# -- CRC and cipher -------------------------------------------------------------------------------
def test_crc16_is_xmodem():
    assert crc16(b"123456789") == 0x31C3
    assert crc16(b"") == 0
    assert crc16(b"6789", crc16(b"12345")) == 0x31C3


def test_enc_cipher_key_stream_from_0xffff():
    # key 0xFFFF -> low byte 0xFF; (0xFFFF << 1) ^ 0x1021 = 0xEFDF -> 0xDF; (0xEFDF << 1) ^ 0x1021 = 0xCF9F -> 0x9F ...
    assert enc_cipher(bytes(8)) == bytes.fromhex("ffdf9f1f1f3e7cf8")
    assert enc_cipher(bytes(2), key=0x0001) == bytes([0x01, 0x02])


@given(st.binary(max_size=300), st.integers(min_value=0, max_value=0xFFFF))
def test_enc_cipher_is_its_own_inverse(data, key):
    assert enc_cipher(enc_cipher(data, key), key) == data


# -- the JL file head -----------------------------------------------------------------------------
def test_jl_file_head_layout_and_crc():
    head = build_jl_file_head("update_data", 123_456, 0xBEEF, offset=32, attr=0x82, reserved=1, index=2)
    assert len(head) == 32
    assert head[2:] == struct.pack("<HIIBBH16s", 0xBEEF, 32, 123_456, 0x82, 1, 2, b"update_data")
    assert int.from_bytes(head[:2], "little") == crc16(head[2:])
    parsed = parse_jl_file_head(head)
    assert parsed is not None
    assert (parsed.name, parsed.size, parsed.data_crc, parsed.offset, parsed.attr, parsed.index) == (
        "update_data",
        123_456,
        0xBEEF,
        32,
        0x82,
        2,
    )


@pytest.mark.parametrize("index", [0, 1, 2, 17, 31])
def test_any_flipped_bit_of_the_head_breaks_its_crc(index):
    head = bytearray(build_jl_file_head("update_data", 1000, 0x1234))
    head[index] ^= 0x01
    assert parse_jl_file_head(bytes(head)) is None
    assert identify(bytes(head) + bytes(100)).kind is FirmwareKind.UNKNOWN


def test_jl_file_head_name_must_fit():
    with pytest.raises(ValueError, match="16 bytes"):
        build_jl_file_head("x" * 17, 0, 0)


@given(
    name=st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", max_size=16),
    size=st.integers(min_value=0, max_value=0xFFFFFFFF),
    data_crc=st.integers(min_value=0, max_value=0xFFFF),
)
def test_jl_file_head_round_trips(name, size, data_crc):
    parsed = parse_jl_file_head(build_jl_file_head(name, size, data_crc))
    assert parsed is not None and (parsed.name, parsed.size, parsed.data_crc) == (name, size, data_crc)


# -- identify ---------------------------------------------------------------------------------------
def test_update_data_head_is_double_backup():
    data = build_jl_file_head("update_data", 5_000_000, 0x1111) + bytes(100)
    info = identify(data)
    assert info.kind is FirmwareKind.DOUBLE_BACKUP and info.declared_size == 5_000_000
    assert "update_data" in info.description and info.version is None and not info.test_image


def test_another_jl_file_head_is_not_an_upgrade_image():
    info = identify(build_jl_file_head("app_dir_head", 100, 0) + bytes(100))
    assert info.kind is FirmwareKind.UNKNOWN and "'app_dir_head'" in info.description


def test_scrambled_ufw_header_is_single_backup():
    header = build_ufw_header(image_size=700_000, entry_count=3, chip_name="AC791N")
    assert len(header) == HEAD_BYTES
    info = identify(header + bytes(3 * 0x50))
    assert info.kind is FirmwareKind.SINGLE_BACKUP and "'AC791N'" in info.description
    parsed = parse_ufw_header(header)
    assert parsed is not None and (parsed.image_size, parsed.entry_count) == (700_000, 3)


def test_a_ufw_header_left_unscrambled_or_with_no_entries_is_unknown():
    header = build_ufw_header(1000, 1, "AC79")
    assert identify(enc_cipher(header)).kind is FirmwareKind.UNKNOWN  # the plaintext, not scrambled
    assert identify(build_ufw_header(1000, 0, "AC79")).kind is FirmwareKind.UNKNOWN
    damaged = bytearray(header)
    damaged[40] ^= 0x80
    assert identify(bytes(damaged)).kind is FirmwareKind.UNKNOWN


def test_test_image_head_is_single_backup_and_short_input_is_unknown():
    info = identify(single_test_image()[:16])
    assert (info.kind, info.test_image, info.declared_size) == (FirmwareKind.SINGLE_BACKUP, True, 288)
    short = identify(b"NOTASIM")
    assert short.kind is FirmwareKind.UNKNOWN and "too short" in short.description
    assert identify(bytes(64)).kind is FirmwareKind.UNKNOWN


# -- identify_file_bytes ----------------------------------------------------------------------------
def test_whole_test_images_give_kind_and_version():
    single = identify_file_bytes(single_test_image("2.0.0"))
    assert (single.kind, single.version, single.test_image, single.intact) == (
        FirmwareKind.SINGLE_BACKUP,
        "2.0.0",
        True,
        True,
    )
    double = identify_file_bytes(double_test_image("3.1.0"))
    assert (double.kind, double.version, double.test_image, double.intact) == (
        FirmwareKind.DOUBLE_BACKUP,
        "3.1.0",
        True,
        True,
    )
    assert (
        double.description == f"simulator test image, double backup ({len(double_test_image())} bytes), version 3.1.0"
    )


@pytest.mark.parametrize("build", [single_test_image, double_test_image])
def test_damaged_test_images_say_so(build):
    image = build()
    flipped = bytearray(image)
    flipped[100] ^= 1
    for damaged in (bytes(flipped), image[:-1], image + b"\x00"):
        info = identify_file_bytes(damaged)
        assert info.intact is False or info.test_image is False, info
        assert info.version is None
    assert "damaged" in identify_file_bytes(bytes(flipped)).description


def test_real_double_backup_file_with_another_length_is_still_double_backup():
    data = build_jl_file_head("update_data", 10_000, 0) + bytes(500)
    info = identify_file_bytes(data)
    assert (
        info.kind is FirmwareKind.DOUBLE_BACKUP and info.intact is None and "declares 10000 bytes" in info.description
    )


def test_parse_test_trailer():
    image = single_test_image("9.9")
    assert parse_test_trailer(image).version == "9.9"
    assert parse_test_trailer(image[:-1]) is None
    assert parse_test_trailer(b"short") is None


# -- never raising --------------------------------------------------------------------------------
@given(st.binary(max_size=200))
def test_random_bytes_never_raise(data):
    info = identify(data)
    assert isinstance(info, FirmwareKindInfo) and isinstance(info.kind, FirmwareKind) and info.description
    assert identify(data) == identify(data[:HEAD_BYTES])
    whole = identify_file_bytes(data)
    assert whole.kind is info.kind


@given(st.binary(min_size=0, max_size=400), st.sampled_from(["single", "double"]), st.integers(0, 500))
def test_test_images_with_random_bodies_and_cuts_never_raise(body, kind, cut):
    image = single_test_image(body=body) if kind == "single" else double_test_image(body=body)
    assert identify_file_bytes(image).version is not None
    info = identify_file_bytes(image[:cut])
    assert info.kind in FirmwareKind
