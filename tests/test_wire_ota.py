"""The net_ota header codec: byte-exact examples from the research, checksums, replies, STOP."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.wire import ota
from netota_daemon.wire.ota import OtaHeader, OtaHeaderError, OtaHeaderReader, Status

u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
u8 = st.integers(min_value=0, max_value=0xFF)
u16 = st.integers(min_value=0, max_value=0xFFFF)


def test_device_read_header_matches_research_example():
    # protocol-research.md §4.1: device READ seek=0 size=40916 pct=1
    assert ota.encode_device_header(Status.READ, 0, 40916, 0, 1) == bytes.fromhex(
        "78010000 00000000 d49f0000 00000000 04010000"
    )


def test_all_size_notice_matches_research_example():
    assert ota.encode_device_header(Status.DOING, 0, 0, 1_000_000, 1) == bytes.fromhex(
        "92000000 00000000 00000000 40420f00 00010000"
    )


def test_stop_bytes_are_status_8_with_valid_sum():
    assert ota.STOP_BYTES == bytes.fromhex("08000000 00000000 00000000 00000000 08000000")
    assert OtaHeader.decode(ota.STOP_BYTES).is_valid()


def test_reply_matches_research_example():
    request = OtaHeader(seek_addr=0x1000, read_size=8, status=Status.READ, percent=37)
    reply = ota.encode_reply(request, bytes(range(8)))
    assert reply == bytes.fromhex("5d000000 00100000 08000000 00000000 04250000 0001020304050607")


def test_reply_echoes_request_but_zeroes_all_size_and_sets_sent_length():
    request = OtaHeader(seek_addr=100, read_size=50, all_size=7, status=Status.READ, percent=42)
    payload = b"\xff" * 30
    reply = ota.encode_reply(request, payload)
    header = OtaHeader.decode(reply[:20])
    assert (header.seek_addr, header.read_size, header.all_size, header.status, header.percent) == (
        100,
        30,
        0,
        Status.READ,
        42,
    )
    assert reply[20:] == payload
    assert ota.verify_reply(header, payload)
    assert not header.is_valid()  # the app rule includes the payload; the bare header sum differs
    assert not ota.verify_reply(header, b"\xfe" + payload[1:])


def test_checksum_wraps_modulo_2_32():
    request = OtaHeader(seek_addr=0, read_size=0, status=Status.READ)
    big = memoryview(b"\xff" * (17_000_000))  # 255 * 17e6 > 2**32
    header = OtaHeader.decode(ota.reply_header(request, len(big), ota.byte_sum(big)))
    assert header.sum_check == (header.computed_sum() + 255 * 17_000_000) % 2**32


def test_byte_sum_matches_plain_sum():
    data = bytes(range(256)) * 200
    assert ota.byte_sum(data) == sum(data)
    assert ota.byte_sum(memoryview(data)[5:999]) == sum(data[5:999])
    assert ota.byte_sum(b"") == 0


def test_clamp_read_shortens_at_end_of_file_and_refuses_past_it():
    assert ota.clamp_read(OtaHeader(seek_addr=0, read_size=20436), 100_000) == 20436
    assert ota.clamp_read(OtaHeader(seek_addr=90_000, read_size=20436), 100_000) == 10_000
    with pytest.raises(ValueError, match="beyond"):
        ota.clamp_read(OtaHeader(seek_addr=100_000, read_size=1), 100_000)


def test_notice_echo_has_zero_sizes_and_valid_sum():
    notice = OtaHeader(seek_addr=5, read_size=0, all_size=0, status=Status.DOING, percent=100)
    echo = OtaHeader.decode(ota.notice_echo(notice))
    assert (echo.read_size, echo.all_size, echo.percent, echo.status) == (0, 0, 100, Status.DOING)
    assert echo.is_valid()


def test_decode_refuses_wrong_length():
    with pytest.raises(OtaHeaderError, match="20 bytes"):
        OtaHeader.decode(b"\x00" * 19)


def test_unknown_status_is_kept_and_named():
    header = OtaHeader.decode(ota.encode_device_header(0x33))
    assert header.status == 0x33 and header.status_name() == "UNKNOWN(51)"


def test_corrupted_header_is_detected():
    raw = bytearray(ota.encode_device_header(Status.READ, 4096, 20436, 0, 1))
    raw[0] ^= 1
    assert not OtaHeader.decode(bytes(raw)).is_valid()


@given(u32, u32, u32, u8, u8, u16)
def test_header_round_trip(seek, size, all_size, status, percent, resv):
    header = OtaHeader(seek, size, all_size, status, percent, resv)
    decoded = OtaHeader.decode(header.encode())
    assert decoded.is_valid()
    assert (decoded.seek_addr, decoded.read_size, decoded.all_size, decoded.status, decoded.percent, decoded.resv) == (
        seek,
        size,
        all_size,
        status,
        percent,
        resv,
    )


@given(st.lists(st.tuples(u32, u32, u8), max_size=20), st.data())
def test_header_reader_split_anywhere_equals_whole(fields, data):
    stream = b"".join(ota.encode_device_header(s, a, r) for a, r, s in fields) + b"\x01\x02\x03"
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader = OtaHeaderReader()
    got = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[previous:cut])
        previous = cut
    assert [(h.seek_addr, h.read_size, h.status) for h in got] == [(a, r, s) for a, r, s in fields]
    assert reader.pending == 3


@given(st.binary(max_size=200))
def test_header_reader_never_raises_on_random_bytes(data):
    headers = OtaHeaderReader().feed(data)
    assert len(headers) == len(data) // 20
