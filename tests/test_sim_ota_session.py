"""The device side of one 3335 session, byte for byte, on a StringTransport and a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.host import FaultState
from netota_daemon.sim.image import build_image
from netota_daemon.sim.ota_session import OtaDeviceSession, SessionOutcome, SessionState
from netota_daemon.wire.ota import STOP_BYTES, OtaHeader, Status, encode_reply, notice_echo


class FakeHost:
    """The device, as far as a session sees it (real time: time_scale 1)."""

    def __init__(self, **config: Any) -> None:
        self.config = SimConfig(**config)
        self.reactor = Clock()
        self.faults = FaultState()
        self.events: list[dict[str, Any]] = []
        self.ended: list[OtaDeviceSession] = []
        self.progress = 0

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        entry = {"event": event, **fields}
        self.events.append(entry)
        return entry

    def ota_session_started(self, session: OtaDeviceSession) -> None:
        pass

    def ota_progress(self, session: OtaDeviceSession) -> None:
        self.progress += 1

    def ota_session_ended(self, session: OtaDeviceSession) -> None:
        self.ended.append(session)

    def names(self) -> list[str]:
        return [e["event"] for e in self.events]


def connect(host: FakeHost, phase: int = 1) -> tuple[OtaDeviceSession, StringTransport]:
    session = OtaDeviceSession(host, phase)
    transport = StringTransport()
    session.makeConnection(transport)
    return session, transport


def sent(transport: StringTransport) -> bytes:
    data = transport.value()
    transport.clear()
    return data


def headers(data: bytes) -> list[OtaHeader]:
    assert len(data) % 20 == 0
    return [OtaHeader.decode(data[i : i + 20]) for i in range(0, len(data), 20)]


def reply_to(header: OtaHeader, image: bytes) -> bytes:
    return encode_reply(header, image[header.seek_addr : header.seek_addr + header.read_size])


def lose(session: OtaDeviceSession, transport: StringTransport) -> None:
    assert transport.disconnecting
    session.connectionLost(Failure(ConnectionDone()))


ERR_BYTES = bytes.fromhex("0200000000000000000000000000000002000000")
OK_BYTES = bytes.fromhex("6500000000000000000000000000000001640000")
FINAL_NOTICE = bytes.fromhex("6400000000000000000000000000000000640000")


def test_device_speaks_first_after_100_ms_with_a_phase1_window():
    host = FakeHost(image_size=50_000)
    session, transport = connect(host)
    host.reactor.advance(0.099)
    assert transport.value() == b""
    host.reactor.advance(0.001)
    # READ seek 0, read_size 20436 (0x4fd4), percent 1; sum 0xd4+0x4f+4+1 = 0x128
    assert sent(transport) == bytes.fromhex("2801000000000000d44f00000000000004010000")
    assert host.names() == ["session_start"]


def test_phase2_first_read_and_all_size_notice_match_the_research_examples():
    host = FakeHost(image_size=1_000_000)
    image = bytes(1_000_000)
    session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    first = sent(transport)
    assert first == bytes.fromhex("7801000000000000d49f00000000000004010000")
    session.dataReceived(reply_to(headers(first)[0], image))
    assert sent(transport) == bytes.fromhex("92000000000000000000000040420f0000010000")
    assert host.names()[-1] == "all_size_sent"


def serve(
    host: FakeHost, session: OtaDeviceSession, transport: StringTransport, image: bytes, echo: bool
) -> list[OtaHeader]:
    """Answer READs until the final notice; returns every header seen."""
    seen: list[OtaHeader] = []
    for _ in range(1000):
        host.reactor.advance(0.1)
        data = sent(transport)
        for header in headers(data):
            seen.append(header)
            if header.status == Status.READ:
                session.dataReceived(reply_to(header, image))
            elif header.status == Status.DOING and header.percent == 100:
                if echo:
                    session.dataReceived(notice_echo(header))
                return seen
            elif header.status != Status.DOING:
                return seen
        if header_all_size(seen):
            host.reactor.advance(5)
    raise AssertionError("the session never finished")


def header_all_size(seen: list[OtaHeader]) -> bool:
    return bool(seen) and seen[-1].all_size != 0


def test_phase2_end_echo_ends_the_wait_then_ok_then_rst():
    image = build_image("2.0.0", 90_000)
    host = FakeHost()
    session, transport = connect(host, phase=2)
    seen = serve(host, session, transport, image, echo=True)
    assert seen[-1].encode() == FINAL_NOTICE
    assert "notice_echo" in host.names()
    host.reactor.advance(0.49)
    assert transport.value() == b""
    host.reactor.advance(0.01)
    assert sent(transport) == OK_BYTES
    assert not transport.disconnecting
    host.reactor.advance(0.5)
    assert transport.disconnected  # abortConnection: an RST
    lose(session, transport)
    result = host.ended[0].result
    assert (result.outcome, result.phase, result.all_size_sent, result.new_version) == ("ok", 2, True, "2.0.0")
    assert result.received == image


def test_without_echo_the_device_waits_5_s_before_ok():
    image = bytes(30_000)
    host = FakeHost(image_size=len(image))
    session, transport = connect(host)
    serve(host, session, transport, image, echo=False)
    host.reactor.advance(5.0)
    assert transport.value() == b""
    host.reactor.advance(0.5)
    assert sent(transport) == OK_BYTES


def test_bad_reply_sum_is_dropped_then_5_s_later_the_loader_sends_err_and_rst():
    image = bytes(range(256)) * 200
    host = FakeHost(image_size=len(image))
    session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    request = headers(sent(transport))[0]
    reply = bytearray(reply_to(request, image))
    reply[0] ^= 1
    session.dataReceived(bytes(reply))
    assert transport.value() == b"" and host.events[-1]["event"] == "checksum_error"
    host.reactor.advance(4.99)
    assert transport.value() == b""  # no NACK, no second READ
    host.reactor.advance(0.01)
    assert sent(transport) == ERR_BYTES
    host.reactor.advance(0.5)
    assert transport.disconnected
    lose(session, transport)
    assert (host.ended[0].result.outcome, host.ended[0].result.checksum_errors) == ("err", 1)


def test_phase1_ignores_the_reply_timeout_goes_on_and_fails_the_crc_check_at_the_end():
    image = bytes(range(256)) * 200  # 51200 bytes: three phase-1 windows
    host = FakeHost(image_size=len(image))
    session, transport = connect(host)
    host.reactor.advance(0.1)
    first = headers(sent(transport))[0]
    bad = bytearray(reply_to(first, image))
    bad[0] ^= 1
    session.dataReceived(bytes(bad))
    host.reactor.advance(4.99)
    assert transport.value() == b""  # no NACK, no re-request
    host.reactor.advance(0.01)
    # the V1.2 firmware carries on with the next window, never asking for the first one again
    second = headers(sent(transport))[0]
    assert second.status == Status.READ and second.seek_addr > first.seek_addr
    assert host.events[-1] == {"event": "reply_timeout_ignored", "phase": 1, "seek": 0, "read_size": 20436}
    session.dataReceived(reply_to(second, image))
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    assert sent(transport) == ERR_BYTES  # at the end of the file, the library's CRC check
    host.reactor.advance(0.5)
    lose(session, transport)
    result = host.ended[0].result
    assert result.outcome is SessionOutcome.ERR and "CRC check failed" in result.reason
    cut = second.seek_addr
    assert result.received[:cut] == bytes(cut) and result.received[cut:] == image[cut:]


def test_stop_at_any_time_ends_err():
    host = FakeHost(image_size=50_000)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    sent(transport)
    assert session.state is SessionState.WAITING_REPLY
    session.dataReceived(STOP_BYTES)
    assert sent(transport) == ERR_BYTES and session.state is SessionState.ENDING
    assert "stop_received" in host.names()
    host.reactor.advance(0.5)
    lose(session, transport)
    assert host.ended[0].result.stop_received is True


def test_reply_to_the_all_size_notice_is_the_memory_fault():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image))
    session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    notice = headers(sent(transport))[0]
    assert notice.all_size == 100_000
    session.dataReceived(notice_echo(notice))  # all_size 0, valid sum: still a reply to that notice
    assert sent(transport) == ERR_BYTES
    host.reactor.advance(0.5)
    lose(session, transport)
    assert "memory fault" in host.ended[0].result.reason


def test_reply_longer_than_asked_fails_at_its_header():
    host = FakeHost(image_size=100_000)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    request = headers(sent(transport))[0]
    too_long = OtaHeader(request.seek_addr, request.read_size + 1, 0, Status.READ, 1).encode()
    session.dataReceived(too_long)
    assert sent(transport) == ERR_BYTES


def test_no_reply_within_5_s_fails_in_the_loader():
    host = FakeHost(image_size=100_000)
    session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    sent(transport)
    host.reactor.advance(5)
    assert sent(transport) == ERR_BYTES


def test_phase1_with_a_silent_app_reads_to_the_end_then_fails():
    host = FakeHost(image_size=50_000)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    seeks = []
    for _ in range(10):
        data = sent(transport)
        if data == ERR_BYTES:
            break
        seeks.append(headers(data)[0].seek_addr)
        host.reactor.advance(5)
    assert seeks == [0, 16896, 33280] and data == ERR_BYTES
    assert host.names().count("reply_timeout_ignored") == 3


def test_data_before_the_device_spoke_is_unsolicited():
    host = FakeHost(image_size=100_000)
    session, transport = connect(host)
    session.dataReceived(bytes(20))
    assert sent(transport) == ERR_BYTES


def test_corrupt_header_is_never_sent_again_the_loader_fails_after_the_wait():
    host = FakeHost(image_size=100_000, corrupt_header_every=1)
    session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    bad = headers(sent(transport))[0]
    assert not bad.is_valid() and bad.status == Status.READ
    host.reactor.advance(4.99)
    assert transport.value() == b""
    host.reactor.advance(0.01)
    assert sent(transport) == ERR_BYTES
    assert host.names().count("header_corrupted") == 1


def test_corrupt_header_every_counts_per_session_and_phase1_goes_on():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), corrupt_header_every=2)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    first = headers(sent(transport))[0]
    assert first.is_valid()
    session.dataReceived(reply_to(first, image))
    second = headers(sent(transport))[0]
    assert not second.is_valid()  # the 2nd READ header of the session
    host.reactor.advance(5)
    third = headers(sent(transport))[0]
    assert third.is_valid() and third.seek_addr > second.seek_addr
    assert [e["event"] for e in host.events if e["event"] != "session_start"] == [
        "header_corrupted",
        "reply_timeout_ignored",
    ]


def test_corrupt_header_once_hits_the_nth_read_of_the_devices_life_once():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), corrupt_header_once=2)
    first_session, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    first_session.dataReceived(reply_to(headers(sent(transport))[0], image))
    assert headers(sent(transport))[0].all_size == 100_000
    host.reactor.advance(5)  # through the all_size wait
    assert not headers(sent(transport))[0].is_valid()
    host.reactor.advance(5)
    assert sent(transport) == ERR_BYTES
    host.reactor.advance(0.5)
    lose(first_session, transport)
    again, transport = connect(host, phase=2)
    host.reactor.advance(0.1)
    assert headers(sent(transport))[0].is_valid()  # once over the device's life
    assert host.faults.corrupt_header_used and host.names().count("header_corrupted") == 1


def test_drop_after_reads_aborts_once():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), drop_after_reads=2)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    assert transport.disconnected and transport.value() == b""
    lose(session, transport)
    assert host.ended[0].result.outcome == "dropped" and host.faults.drop_used


def test_faults_limited_to_the_other_phase_do_not_fire():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), drop_after_reads=1, fault_phase=2)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    assert not transport.disconnecting and len(headers(sent(transport))) == 1


def test_stall_delays_the_next_request():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), stall_after_reads="1:30")
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    host.reactor.advance(29.9)
    assert transport.value() == b""
    host.reactor.advance(0.1)
    assert headers(sent(transport))[0].status == Status.READ


@pytest.mark.parametrize("same_status, wire", [("same", "1000000000000000000000000000000010000000"), ("err", None)])
def test_same_as_installed_after_the_first_reply(same_status, wire):
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), same_as_installed=True, same_status=same_status)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    assert sent(transport) == (bytes.fromhex(wire) if wire else ERR_BYTES)
    host.reactor.advance(0.5)
    lose(session, transport)
    assert host.ended[0].result.outcome == "same"


def test_reject_image_ends_err_after_the_transfer():
    image = bytes(30_000)
    host = FakeHost(image_size=len(image), reject_image=True)
    session, transport = connect(host)
    seen = serve(host, session, transport, image, echo=True)
    assert seen[-1].encode() == ERR_BYTES


def test_app_closing_first_is_aborted_and_partial_bytes_are_kept():
    image = bytes(range(256)) * 400
    host = FakeHost(image_size=len(image))
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    session.connectionLost(Failure(ConnectionDone()))
    result = host.ended[0].result
    assert result.outcome == "aborted" and result.payload_bytes == 20436
    assert len(result.received) == len(image) and result.received[:20436] == image[:20436]
    assert result.received[20436:] == bytes(len(image) - 20436)
    assert host.reactor.getDelayedCalls() == []


def test_late_echo_while_closing_is_ignored():
    image = bytes(30_000)
    host = FakeHost(image_size=len(image))
    session, transport = connect(host)
    seen = serve(host, session, transport, image, echo=False)
    host.reactor.advance(5.0)  # the wait ended without an echo; OK comes 0.5 s later
    session.dataReceived(notice_echo(seen[-1]))
    host.reactor.advance(0.5)
    assert sent(transport) == OK_BYTES


def test_phase1_all_size_option_sends_the_notice_in_phase1():
    image = bytes(100_000)
    host = FakeHost(image_size=len(image), phase1_all_size=True)
    session, transport = connect(host)
    host.reactor.advance(0.1)
    session.dataReceived(reply_to(headers(sent(transport))[0], image))
    notice = headers(sent(transport))[0]
    assert (notice.status, notice.read_size, notice.all_size) == (Status.DOING, 0, 100_000)


def test_with_a_flash_speed_the_next_read_waits_for_the_window_to_be_written():
    image = build_image("2.0.0", 200_000)
    host = FakeHost(flash_kbps=100.0)  # 100 KiB/s: a 20436-byte window takes about 0.2 s
    session, transport = connect(host)
    host.reactor.advance(0.1)
    (first,) = headers(sent(transport))
    session.dataReceived(reply_to(first, image))
    written = first.read_size / (100.0 * 1024)
    host.reactor.advance(written * 0.99)
    assert transport.value() == b""  # still writing
    host.reactor.advance(written * 0.02)
    (second,) = headers(sent(transport))
    assert second.status == Status.READ and second.seek_addr > first.seek_addr
