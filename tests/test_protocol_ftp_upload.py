"""The FTP upload (double backup), byte for byte.

Most tests run without sockets: the real :class:`DeviceConnector` on a ``MemoryReactorClock`` (so
every connection attempt, its host, port and source address are visible in ``reactor.tcpClients``),
with each connection completed onto a :class:`FakeTcpTransport` and the device played by the test.
A few run over loopback against :class:`LwipLikeFtpd`, a small server in this module that behaves
as the research says the device's lwIP ftpd does (each received segment one command, PASV only,
226 only after the data connection closed cleanly, nothing for a reset one).
"""

from __future__ import annotations

import os
import socket

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISystemHandle, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.endpoints import DeviceConnector
from netota_daemon.protocols.ftp_upload import (
    CHUNK_SIZE,
    DATA_SEND_BUFFER,
    MAX_GREETING,
    REPLY_HISTORY,
    CommandInFlightError,
    FtpControlProtocol,
    FtpUploadSettings,
    UploadCancelled,
    UploadEnd,
    upload_image,
)
from tests.waiting import Changes

HOST = "127.0.0.1"
SOURCE = "127.0.0.1"
FTP_PORT = 2121
IMAGE_SIZE = 5 * CHUNK_SIZE + 1234  # five whole chunks and a short one

GREETING = b"220 lwIP FTP Server ready.\r\n"
USER_OK = b"331 User name okay, need password.\r\n"
PASS_OK = b"230 User logged in, proceed.\r\n"
TYPE_OK = b"200 Command okay.\r\n"
# The device puts its own address in the 227 (TEST-NET-2 here): netota must not use it.
PASV_OK = b"227 Entering Passive Mode (198,51,100,7,16,1).\r\n"
PASV_PORT = 4097
STOR_OK = b"150 Opening BINARY mode data connection for update-ota.ufw.\r\n"
DONE = b"226 Closing data connection.\r\n"
BYE = b"221 Goodbye.\r\n"


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "db_update_files_data.bin"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return FirmwareImage(path)


class FakeSocket:
    def __init__(self) -> None:
        self.options: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))


@implementer(ITCPTransport, ISystemHandle)
class FakeTcpTransport(StringTransport):
    """A StringTransport that keeps each write apart and ends the way a reactor's TCP transport
    does: ``loseConnection`` (FIN) and ``abortConnection`` (RST) report ``connectionLost`` on the
    clock's next turn. As a consumer it asks its pull producer for more only when the test says
    the kernel took everything (:meth:`drain`)."""

    def __init__(self, clock, events, name, peer) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", *peer))
        self.clock = clock
        self.events = events
        self.name = name
        self.writes: list[bytes] = []
        self.nodelay: bool | None = None
        self.socket = FakeSocket()
        self.ended: str | None = None
        self.protocol = None

    def write(self, data):
        super().write(data)
        self.writes.append(data)

    def loseConnection(self):
        if self.ended is None:
            # Twisted's transport would wait for a registered pull producer for ever.
            assert self.producer is None, "loseConnection with a producer still registered"
            self._end("FIN", error.ConnectionDone())

    def abortConnection(self):
        if self.ended is None:
            self._end("RST", error.ConnectionAborted())

    def _end(self, how, reason):
        self.ended = how
        self.disconnecting = True
        self.events.append((self.name, how))
        self.clock.callLater(0, self._report, reason)

    def _report(self, reason):
        if self.connected:
            self.connected = False
            self.protocol.connectionLost(Failure(reason))

    def peer_closes(self, reason=None):
        """The device ends the connection."""
        self.events.append((self.name, "closed by the device"))
        self.ended = self.ended or "peer"
        self.connected = False
        self.protocol.connectionLost(Failure(reason or error.ConnectionDone()))

    def drain(self) -> None:
        """The kernel took everything written: the transport asks its pull producer for more."""
        assert self.producer is not None and not self.streaming
        self.producer.resumeProducing()

    def setTcpNoDelay(self, enabled):
        self.nodelay = enabled

    def getHandle(self):
        return self.socket


class Rig:
    """An upload on a MemoryReactorClock, the device played by the test."""

    def __init__(self, image: FirmwareImage, on_progress=None, **settings) -> None:
        self.image = image
        self.reactor = MemoryReactorClock()
        self.connector = DeviceConnector(self.reactor, HOST, source_address=SOURCE)
        self.events: list[tuple] = []
        self.progress = []
        self.results = []
        self.settings = FtpUploadSettings(**settings)
        self.d = upload_image(
            self.connector, FTP_PORT, image, self.settings, self.reactor, on_progress or self.progress.append
        )
        self.d.addBoth(self.results.append)
        self.control: FakeTcpTransport | None = None
        self.data: FakeTcpTransport | None = None

    def accept(self, name: str) -> FakeTcpTransport:
        """Complete the oldest connection attempt."""
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        self.reactor.connectors.pop(0)
        self.events.append((name, "connect", host, port, bind))
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = FakeTcpTransport(self.reactor, self.events, name, (host, port))
        transport.protocol = protocol
        protocol.makeConnection(transport)
        setattr(self, name, transport)
        return transport

    def say(self, data: bytes) -> None:
        """The device writes on the control connection."""
        assert self.control is not None
        self.control.protocol.dataReceived(data)

    def take(self, transport: FakeTcpTransport) -> list[bytes]:
        writes, transport.writes = transport.writes, []
        return writes

    def settle(self) -> None:
        """Let the reactor's zero-delay calls run (reported connection ends)."""
        for _ in range(5):
            self.reactor.advance(0)

    def log_in(self) -> None:
        self.accept("control")
        for reply in (GREETING, USER_OK, PASS_OK, TYPE_OK):
            self.say(reply)

    def to_stor(self) -> None:
        """Logged in, PASV answered, data connection made, STOR sent."""
        self.log_in()
        self.say(PASV_OK)
        self.accept("data")
        self.take(self.control)

    def to_transfer(self) -> None:
        self.to_stor()
        self.say(STOR_OK)

    def stream_all(self) -> bytes:
        """Let the device take everything until the data connection is closed."""
        assert self.data is not None
        while self.data.producer is not None:
            self.data.drain()
        return b"".join(self.take(self.data))

    def result(self):
        (result,) = self.results
        return result

    def assert_nothing_left(self) -> None:
        assert self.results, "the upload has not ended"
        assert self.reactor.getDelayedCalls() == []
        assert self.reactor.tcpClients == []
        for transport in (self.control, self.data):
            if transport is not None:
                assert not transport.connected, f"{transport.name} left open"
        if self.control is not None:
            assert b"ABOR" not in self.control.io.getvalue()


# -- the sequence on the wire ------------------------------------------------------------------
def test_the_whole_upload_byte_for_byte(image):
    rig = Rig(image)
    control = rig.accept("control")
    assert rig.events[0] == ("control", "connect", HOST, FTP_PORT, (SOURCE, 0))
    assert control.nodelay is True
    assert rig.take(control) == []  # nothing before the greeting

    expected = [
        (GREETING, [b"USER FTPX\r\n"]),
        (USER_OK, [b"PASS 12345678\r\n"]),
        (PASS_OK, [b"TYPE I\r\n"]),
        (TYPE_OK, [b"PASV\r\n"]),
        (PASV_OK, []),  # the data connection comes first
    ]
    for reply, writes in expected:
        rig.reactor.advance(9.0)  # less than reply_timeout: nothing more is sent while a reply is awaited
        assert rig.take(control) == []
        rig.say(reply)
        assert rig.take(control) == writes

    data = rig.accept("data")
    # to the connector's host (not the 227's 198.51.100.7), the 227's port, from the source address
    assert rig.events[-1] == ("data", "connect", HOST, PASV_PORT, (SOURCE, 0))
    assert data.socket.options == [(socket.SOL_SOCKET, socket.SO_SNDBUF, DATA_SEND_BUFFER)]
    assert rig.take(control) == [b"STOR update-ota.ufw\r\n"]
    assert data.producer is None and data.writes == []  # nothing before the 150

    rig.say(STOR_OK)
    assert data.producer is not None and data.streaming is False  # a pull producer
    data.drain()
    assert data.writes == [image.read(0, CHUNK_SIZE).tobytes()]
    sent = b"".join(rig.take(data)) + rig.stream_all()
    assert sent == image.read(0, IMAGE_SIZE).tobytes()
    assert data.ended == "FIN"  # the clean close, right after the last byte
    assert rig.take(control) == []

    rig.settle()
    assert rig.progress[-1].state == "device_working"
    assert rig.progress[-1].bytes_sent == IMAGE_SIZE
    rig.reactor.advance(5.0)  # the device burns
    assert rig.results == []
    rig.say(DONE)
    assert rig.take(control) == [b"QUIT\r\n"]
    rig.say(BYE)
    assert control.ended == "FIN"
    assert rig.results == []  # the result comes once the control connection is closed
    rig.settle()

    result = rig.result()
    assert result.end is UploadEnd.COMPLETE
    assert result.code == 226
    assert result.bytes_sent == IMAGE_SIZE
    assert result.clean_close is True
    assert result.server == "lwip"
    assert result.greeting == "220 lwIP FTP Server ready."
    assert result.replies[-2:] == ("226 Closing data connection.", "221 Goodbye.")
    assert result.finished_at == 5.0 + 5 * 9.0
    assert "226 Closing data connection." in result.message
    states = [p.state for p in rig.progress]
    assert states[0] == "login" and states[-1] == "device_working" and "transferring" in states
    sent_counts = [p.bytes_sent for p in rig.progress]
    assert sent_counts == sorted(sent_counts) and all(p.total_bytes == IMAGE_SIZE for p in rig.progress)
    assert [e[:2] for e in rig.events] == [
        ("control", "connect"),
        ("data", "connect"),
        ("data", "FIN"),
        ("control", "FIN"),
    ]
    rig.assert_nothing_left()


def test_each_write_is_one_whole_command_and_one_command_is_in_flight():
    clock = MemoryReactorClock()
    control = FtpControlProtocol()
    transport = FakeTcpTransport(clock, [], "control", (HOST, FTP_PORT))
    control.makeConnection(transport)
    with pytest.raises(CommandInFlightError):
        control.send("USER", "FTPX")  # before the greeting
    control.dataReceived(GREETING)
    control.send("USER", "FTPX")
    with pytest.raises(CommandInFlightError):
        control.send("PASS", "12345678")  # before the 331
    control.dataReceived(b"331 User name okay")  # not a whole reply yet
    with pytest.raises(CommandInFlightError):
        control.send("PASS", "12345678")
    control.dataReceived(b", need password.\r\n")
    control.send("PASS", "12345678")
    assert transport.writes == [b"USER FTPX\r\n", b"PASS 12345678\r\n"]


def test_abor_epsv_and_a_transfer_without_a_fresh_pasv_are_never_sent():
    clock = MemoryReactorClock()
    control = FtpControlProtocol()
    transport = FakeTcpTransport(clock, [], "control", (HOST, FTP_PORT))
    control.makeConnection(transport)
    control.dataReceived(GREETING)
    for verb in ("ABOR", "EPSV", "STOR"):
        with pytest.raises(ValueError):
            control.send(verb, "update-ota.ufw" if verb == "STOR" else None)
    control.send("PASV")
    control.dataReceived(PASV_OK)
    control.send("STOR", "update-ota.ufw")
    control.dataReceived(STOR_OK + DONE)
    with pytest.raises(ValueError, match="PASV just before"):
        control.send("STOR", "update-ota.ufw")  # a second transfer needs a PASV of its own
    assert transport.writes == [b"PASV\r\n", b"STOR update-ota.ufw\r\n"]


def test_multi_line_greeting_split_across_segments(image):
    rig = Rig(image)
    control = rig.accept("control")
    rig.say(b"220-Welcome to Stupid-")
    rig.say(b"FTPd server.\r\n220-second line\r\n")
    assert rig.take(control) == []  # the reply is not complete: nothing is sent
    rig.say(b"220 ready\r\n")
    assert rig.take(control) == [b"USER FTPX\r\n"]
    rig.say(USER_OK)
    assert rig.take(control) == [b"PASS 12345678\r\n"]
    rig.d.cancel()
    rig.settle()
    assert rig.result().check(defer.CancelledError)


def test_a_reply_that_came_before_its_command_is_a_protocol_error(image):
    rig = Rig(image)
    control = rig.accept("control")
    rig.say(GREETING)
    rig.say(USER_OK + PASS_OK)  # the 230 was sent before the client could send PASS
    # the connection is not trusted any more: PASS is not sent
    assert rig.take(control) == [b"USER FTPX\r\n"]
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.PROTOCOL_ERROR
    assert "no command outstanding: 230 User logged in, proceed." in result.message
    rig.assert_nothing_left()


def test_a_preliminary_greeting_is_waited_through(image):
    rig = Rig(image)
    control = rig.accept("control")
    rig.say(b"120 Service ready in 1 minute.\r\n")
    assert rig.take(control) == []
    rig.say(GREETING)
    assert rig.take(control) == [b"USER FTPX\r\n"]
    rig.d.cancel()
    rig.settle()


# -- refusals ----------------------------------------------------------------------------------
def test_wrong_login_503_is_refused_and_nothing_more_is_sent(image):
    rig = Rig(image, password="wrong")
    control = rig.accept("control")
    rig.say(GREETING)
    rig.say(USER_OK)
    rig.say(b"503 Login incorrect. Login failed.\r\n")
    control.peer_closes()  # the device closes after a failed login
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.REFUSED
    assert result.code == 503
    assert "refused the login as 'FTPX'" in result.message and "user and password" in result.message
    assert b"".join(control.writes) == b"USER FTPX\r\nPASS wrong\r\n"
    rig.assert_nothing_left()


def test_550_busy_on_stor_is_refused_and_the_data_connection_reset(image):
    rig = Rig(image)
    rig.to_stor()
    rig.say(b"550 Requested action not taken.\r\n")
    assert rig.data.ended == "RST" and rig.control.ended is None  # the data connection goes first
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.REFUSED
    assert result.code == 550
    assert "earlier upgrade" in result.message
    assert rig.data.writes == [] and result.bytes_sent == 0
    assert [e[:2] for e in rig.events[-2:]] == [("data", "RST"), ("control", "FIN")]
    rig.assert_nothing_left()


def test_a_refusal_in_the_middle_of_the_transfer(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.data.drain()
    rig.say(b"451 Requested action aborted: local error in processing.\r\n")
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.REFUSED and result.code == 451
    assert result.bytes_sent == CHUNK_SIZE
    assert rig.data.ended == "RST"
    rig.assert_nothing_left()


# -- a data connection that drops or stalls ------------------------------------------------------
def test_data_connection_dropped_by_the_device(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.data.drain()
    rig.data.drain()
    rig.data.peer_closes(error.ConnectionLost("Connection to the other side was lost"))
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.DROPPED
    assert result.bytes_sent == 2 * CHUNK_SIZE
    assert f"after {2 * CHUNK_SIZE} of {IMAGE_SIZE} bytes" in result.message
    assert result.clean_close is False
    assert rig.control.ended == "FIN"
    assert b"QUIT" not in rig.control.io.getvalue()
    rig.assert_nothing_left()


def test_a_peer_that_does_not_read_holds_one_chunk_then_the_stall_ends_it(image):
    rig = Rig(image, stall_timeout=30.0)
    rig.to_transfer()
    rig.data.drain()
    rig.data.drain()
    for _ in range(29):  # the device stops reading: the transport's buffer stays full
        rig.reactor.advance(1.0)
        assert rig.data.writes == [image.read(0, CHUNK_SIZE).tobytes(), image.read(CHUNK_SIZE, CHUNK_SIZE).tobytes()]
    assert rig.results == []
    rig.reactor.advance(1.0)
    assert rig.data.ended == "RST"  # a reset: the device burns nothing
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.TIMEOUT
    assert "accepted nothing for 30 s" in result.message
    assert result.bytes_sent == 2 * CHUNK_SIZE
    assert [e[:2] for e in rig.events[-2:]] == [("data", "RST"), ("control", "FIN")]
    rig.assert_nothing_left()


def test_a_slow_peer_is_not_a_stall(image):
    rig = Rig(image, stall_timeout=30.0)
    rig.to_transfer()
    while rig.data.producer is not None:
        rig.reactor.advance(20.0)  # one chunk every 20 s: slow, but never 30 s without progress
        rig.data.drain()
    rig.settle()
    rig.say(DONE)
    rig.say(BYE)
    rig.settle()
    assert rig.result().end is UploadEnd.COMPLETE


def test_control_connection_lost_during_the_transfer(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.data.drain()
    rig.control.peer_closes(error.ConnectionLost())
    assert rig.data.ended == "RST"
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.DROPPED
    assert "control connection during the transfer" in result.message
    rig.assert_nothing_left()


def test_data_connection_lost_before_the_150(image):
    rig = Rig(image)
    rig.to_stor()
    rig.data.peer_closes()
    rig.say(STOR_OK)
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.DROPPED and "before the transfer began" in result.message
    assert rig.data.writes == []
    rig.assert_nothing_left()


# -- the 226 -----------------------------------------------------------------------------------
def test_no_226_after_the_clean_close_times_out(image):
    rig = Rig(image, final_reply_timeout=15.0)
    rig.to_transfer()
    rig.stream_all()
    rig.settle()
    rig.reactor.advance(14.9)
    assert rig.results == []
    rig.reactor.advance(0.1)
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.TIMEOUT
    assert result.clean_close is True  # the device got the whole image and a FIN: it may still accept it
    assert "226" in result.message and "15 s" in result.message
    assert b"QUIT" not in rig.control.io.getvalue()
    rig.assert_nothing_left()


def test_226_arriving_before_our_side_reports_the_close(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.stream_all()
    rig.say(DONE)  # the reactor has not yet reported the data connection's end
    rig.settle()
    assert rig.take(rig.control) == [b"QUIT\r\n"]
    rig.say(BYE)
    rig.settle()
    assert rig.result().end is UploadEnd.COMPLETE


def test_226_before_the_whole_image_is_a_protocol_error(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.data.drain()
    rig.say(DONE)
    assert rig.data.ended == "RST"
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.PROTOCOL_ERROR and result.code == 226
    rig.assert_nothing_left()


def test_quit_unanswered_still_completes(image):
    rig = Rig(image, quit_timeout=2.0)
    rig.to_transfer()
    rig.stream_all()
    rig.settle()
    rig.say(DONE)
    rig.reactor.advance(2.0)
    rig.settle()
    assert rig.result().end is UploadEnd.COMPLETE
    rig.assert_nothing_left()


# -- connections, timeouts, garbage --------------------------------------------------------------
def test_control_connection_refused_is_unreachable(image):
    rig = Rig(image)
    host, port, factory, timeout, bind = rig.reactor.tcpClients.pop(0)
    factory.clientConnectionFailed(rig.reactor.connectors.pop(0), Failure(error.ConnectionRefusedError()))
    result = rig.result()
    assert result.end is UploadEnd.UNREACHABLE
    assert "connection refused" in result.message and f"port {FTP_PORT}" in result.message
    rig.assert_nothing_left()


def test_an_interface_that_cannot_be_used_is_unreachable_before_any_packet(image):
    reactor = MemoryReactorClock()
    connector = DeviceConnector(reactor, HOST, interface="netota-none0")
    results = []
    upload_image(connector, FTP_PORT, image, FtpUploadSettings(), reactor).addBoth(results.append)
    (result,) = results
    assert result.end is UploadEnd.UNREACHABLE
    assert "'netota-none0' does not exist" in result.message
    assert reactor.tcpClients == []


def test_control_connect_timeout_stops_the_attempt(image):
    rig = Rig(image, reply_timeout=10.0)
    attempt = rig.reactor.connectors[0]
    rig.reactor.advance(10.0)
    assert attempt.stoppedConnecting
    result = rig.result()
    assert result.end is UploadEnd.UNREACHABLE and "within 10 s" in result.message
    rig.reactor.tcpClients.clear()  # the memory reactor keeps the record of the stopped attempt
    rig.assert_nothing_left()


def test_no_greeting_times_out(image):
    rig = Rig(image, reply_timeout=10.0)
    rig.accept("control")
    rig.reactor.advance(10.0)
    assert rig.control.ended == "FIN"
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.TIMEOUT and "greeting" in result.message
    rig.assert_nothing_left()


@pytest.mark.parametrize(
    "greeting, end",
    [
        (b"HTTP/1.1 400 Bad Request\r\n", UploadEnd.PROTOCOL_ERROR),
        (b"421 Too many users.\r\n", UploadEnd.REFUSED),
        (b"230 Logged in already\r\n", UploadEnd.PROTOCOL_ERROR),
    ],
)
def test_a_bad_greeting(image, greeting, end):
    rig = Rig(image)
    rig.accept("control")
    rig.say(greeting)
    rig.settle()
    assert rig.result().end is end
    assert rig.control.writes == []
    rig.assert_nothing_left()


def test_a_227_without_an_address_is_a_protocol_error(image):
    rig = Rig(image)
    rig.log_in()
    rig.say(b"227 Entering Passive Mode.\r\n")
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.PROTOCOL_ERROR and "no address" in result.message
    rig.assert_nothing_left()


def test_a_reply_with_no_command_outstanding_is_a_protocol_error(image):
    rig = Rig(image)
    rig.to_transfer()
    rig.say(DONE + DONE)  # a second final reply to one STOR
    rig.settle()
    assert rig.result().end is UploadEnd.PROTOCOL_ERROR
    rig.assert_nothing_left()


def test_replies_kept_are_bounded(image):
    rig = Rig(image)
    rig.accept("control")
    rig.say(b"220-" + b"\r\n".join(b"line %d" % i for i in range(40)) + b"\r\n220 ready\r\n")
    rig.say(b"530 Not logged in.\r\n")
    rig.settle()
    result = rig.result()
    assert result.end is UploadEnd.REFUSED and result.code == 530
    assert len(result.replies) == REPLY_HISTORY
    assert result.replies[-3:] == ("line 39", "220 ready", "530 Not logged in.")
    assert len(result.greeting) <= MAX_GREETING


# -- cancelling --------------------------------------------------------------------------------
def _play_to(rig: Rig, stage: str) -> None:
    steps = {
        "connecting": [],
        "greeting": [("accept", "control")],
        "USER": [("accept", "control"), GREETING],
        "PASS": [("accept", "control"), GREETING, USER_OK],
        "TYPE": [("accept", "control"), GREETING, USER_OK, PASS_OK],
        "PASV": [("accept", "control"), GREETING, USER_OK, PASS_OK, TYPE_OK],
        "data connecting": [("accept", "control"), GREETING, USER_OK, PASS_OK, TYPE_OK, PASV_OK],
        "150": [("accept", "control"), GREETING, USER_OK, PASS_OK, TYPE_OK, PASV_OK, ("accept", "data")],
        "transferring": [
            ("accept", "control"),
            GREETING,
            USER_OK,
            PASS_OK,
            TYPE_OK,
            PASV_OK,
            ("accept", "data"),
            STOR_OK,
            ("drain",),
        ],
    }
    if stage in ("device working", "QUIT"):
        rig.to_transfer()
        rig.stream_all()
        rig.settle()
        if stage == "QUIT":
            rig.say(DONE)
        return
    for step in steps[stage]:
        if isinstance(step, bytes):
            rig.say(step)
        elif step[0] == "accept":
            rig.accept(step[1])
        else:
            rig.data.drain()


STAGES = ["connecting", "greeting", "USER", "PASS", "TYPE", "PASV", "data connecting", "150", "transferring"]


@pytest.mark.parametrize("stage", [*STAGES, "device working", "QUIT"])
def test_cancel_at_each_stage(image, stage):
    rig = Rig(image)
    _play_to(rig, stage)
    pending = list(rig.reactor.connectors)
    rig.d.cancel()
    for attempt in pending:
        assert attempt.stoppedConnecting
    if rig.control is not None:
        assert rig.results == []  # only once everything is closed does it fail
    rig.settle()
    (failure,) = rig.results
    assert failure.check(UploadCancelled)
    assert failure.check(defer.CancelledError)  # what a cancelled Deferred's caller expects
    after_close = stage in ("device working", "QUIT")
    assert failure.value.clean_close is after_close
    assert ("may still accept it" if after_close else "nothing was burned") in str(failure.value)
    if rig.data is not None:
        assert rig.data.ended == ("FIN" if stage in ("device working", "QUIT") else "RST")
        # the data connection ends before the control connection is closed
        assert [e[:2] for e in rig.events][-2:] == [("data", rig.data.ended), ("control", "FIN")]
    if rig.control is not None:
        assert rig.control.ended == "FIN"
        assert b"ABOR" not in rig.control.io.getvalue()
    rig.reactor.tcpClients.clear()  # the memory reactor keeps the record of a stopped attempt
    rig.assert_nothing_left()


def test_cancel_while_closing_aborts_at_once(image):
    rig = Rig(image)
    _play_to(rig, "transferring")
    rig.d.cancel()
    rig.d.cancel()  # again, while the data connection's reset is being reported
    rig.settle()
    (failure,) = rig.results
    assert failure.check(defer.CancelledError)
    rig.assert_nothing_left()


def test_commands_and_replies_are_logged_without_the_password(image):
    with capturedLogs() as events:
        rig = Rig(image, password="s3cret-pw")
        rig.to_transfer()
        rig.stream_all()
        rig.settle()
        rig.say(DONE + BYE)
        rig.settle()
    assert rig.result().end is UploadEnd.COMPLETE
    text = [formatEvent(e) for e in events]
    assert "FTP -> PASS ****" in text and "FTP -> STOR update-ota.ufw" in text
    assert "FTP <- 226 Closing data connection." in text
    assert not any("s3cret-pw" in line for line in text)


# -- settings --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, error",
    [
        ({"remote_name": "update.ufw"}, "must contain 'update-ota.ufw'"),
        ({"password": "12345678\r\nDELE x"}, "printable ASCII"),
        ({"user": ""}, "empty"),
        ({"reply_timeout": 0}, "positive"),
        ({"stall_timeout": float("nan")}, "positive"),
        ({"final_reply_timeout": float("inf")}, "positive"),
    ],
)
def test_bad_settings_are_refused(settings, error):
    with pytest.raises(ValueError, match=error):
        FtpUploadSettings(**settings)


def test_a_failing_progress_observer_does_not_stop_the_upload(image):
    def observer(progress):
        raise RuntimeError("an observer's bug")

    rig = Rig(image, on_progress=observer)
    rig.to_transfer()
    rig.stream_all()
    rig.settle()
    rig.say(DONE + BYE)
    rig.settle()
    assert rig.result().end is UploadEnd.COMPLETE
    rig.assert_nothing_left()


# -- over loopback, against a small lwIP-like server -----------------------------------------------
class LwipLikeFtpd:
    """A few behaviours of the device's lwIP ftpd, for loopback tests: every received segment is
    parsed as one command (a segment with two commands, or one without its line end, is recorded as
    the error it would be on a device), PASV only, ABOR and a transfer without a fresh PASV recorded
    as the crashes they are, 150 on STOR, and after the data connection ends: a clean close takes
    ``burn_time`` and sends 226, a reset sends nothing."""

    def __init__(self, reactor, changes: Changes, burn_time: float = 0.05, drop_after: int | None = None) -> None:
        self.reactor = reactor
        self.changes = changes
        self.burn_time = burn_time
        self.drop_after = drop_after
        self.segments: list[bytes] = []
        self.errors: list[str] = []
        self.received = bytearray()
        self.data_end: str | None = None  # "fin" or "reset"
        self.sent_226 = False
        self.control_closed = False
        self.data_listeners: list = []
        self.fresh_pasv = False
        self.storing = False
        self.control = None
        factory = Factory.forProtocol(_LwipControl)
        factory.server = self
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    def open_data_port(self) -> int:
        factory = Factory.forProtocol(_LwipData)
        factory.server = self
        listener = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        # a small receive window, as on the device: the client's bytes wait in its own buffers
        listener.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.data_listeners.append(listener)
        return listener.getHost().port

    def stop(self) -> None:
        self.port.stopListening()
        for listener in self.data_listeners:
            listener.stopListening()


class _LwipControl(Protocol):
    def connectionMade(self):
        self.server = self.factory.server
        self.server.control = self
        self.transport.write(GREETING)

    def reply(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def dataReceived(self, data):
        server = self.server
        server.segments.append(data)
        text = data.decode("latin-1")
        command = text.rstrip("\r\n")
        if not text.endswith("\n"):
            server.errors.append(f"split command {data!r}")
        if "\r" in command or "\n" in command:
            server.errors.append(f"coalesced commands {data!r}")
        verb, _, argument = command.partition(" ")
        verb = verb.upper()
        if verb == "USER":
            self.reply(b"331 User name okay, need password.")
        elif verb == "PASS":
            if argument == "12345678":
                self.reply(b"230 User logged in, proceed.")
            else:
                self.reply(b"503 Login incorrect. Login failed.")
                self.transport.loseConnection()
        elif verb == "TYPE":
            self.reply(b"200 Command okay.")
        elif verb == "PASV":
            port = server.open_data_port()
            server.fresh_pasv = True
            # the device's own idea of its address, which the client must not use
            self.reply(b"227 Entering Passive Mode (127,0,0,9,%d,%d)." % (port >> 8, port & 0xFF))
        elif verb == "STOR":
            if not server.fresh_pasv:
                server.errors.append("transfer without a fresh PASV (a crash on the device)")
            server.fresh_pasv = False
            server.storing = True
            self.reply(b"150 Opening BINARY mode data connection for %s." % argument.encode())
        elif verb == "QUIT":
            self.reply(b"221 Goodbye.")
            self.transport.loseConnection()
        elif verb == "ABOR":
            server.errors.append("ABOR (a crash on the device)")
            self.transport.abortConnection()
        else:
            self.reply(b"502 Command not implemented.")
        server.changes.poke()

    def connectionLost(self, reason):
        self.server.control_closed = True
        self.server.changes.poke()


class _LwipData(Protocol):
    def connectionMade(self):
        self.server = self.factory.server

    def dataReceived(self, data):
        server = self.server
        if not server.storing:
            server.errors.append("data before the 150 (written through a null file on the device)")
        server.received += data
        if server.drop_after is not None and len(server.received) >= server.drop_after:
            server.drop_after = None
            self.transport.abortConnection()
        server.changes.poke()

    def connectionLost(self, reason):
        server = self.server
        server.storing = False
        if reason.check(error.ConnectionDone):
            server.data_end = "fin"
            self.server.reactor.callLater(server.burn_time, self._burned)
        else:
            server.data_end = "reset"  # the transfer is freed, nothing burned, no 226
        server.changes.poke()

    def _burned(self):
        server = self.server
        if server.control is not None and server.control.transport.connected:
            server.control.reply(b"226 Closing data connection.")
            server.sent_226 = True
        server.changes.poke()


@pytest.fixture
def lwip(reactor):
    changes = Changes(reactor)
    servers = []

    def make(**kwargs) -> LwipLikeFtpd:
        server = LwipLikeFtpd(reactor, changes, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


def loopback_image(tmp_path, size: int) -> FirmwareImage:
    path = tmp_path / "update-ota.ufw"
    path.write_bytes(os.urandom(size))
    return FirmwareImage(path)


@pytest_twisted.ensureDeferred
async def test_loopback_upload(reactor, lwip, tmp_path):
    server = lwip()
    image = loopback_image(tmp_path, 1024 * 1024 + 17)
    result = await upload_image(
        DeviceConnector(reactor, "127.0.0.1"), server.port_number, image, FtpUploadSettings(), reactor
    ).addTimeout(60, reactor)
    assert result.end is UploadEnd.COMPLETE, result.message
    assert bytes(server.received) == image.read(0, image.size).tobytes()
    assert server.segments == [
        b"USER FTPX\r\n",
        b"PASS 12345678\r\n",
        b"TYPE I\r\n",
        b"PASV\r\n",
        b"STOR update-ota.ufw\r\n",
        b"QUIT\r\n",
    ]
    assert server.errors == []
    assert server.data_end == "fin" and server.sent_226
    assert result.server == "lwip" and result.bytes_sent == image.size
    await server.changes.until(lambda: server.control_closed, "the control connection to close")


@pytest_twisted.ensureDeferred
async def test_loopback_cancel_mid_upload_resets_the_data_connection(reactor, lwip, tmp_path):
    server = lwip()
    image = loopback_image(tmp_path, 4 * 1024 * 1024)
    d = upload_image(DeviceConnector(reactor, "127.0.0.1"), server.port_number, image, FtpUploadSettings(), reactor)
    outcome = []
    d.addBoth(lambda result: (outcome.append(result), server.changes.poke()))
    await server.changes.until(lambda: len(server.received) >= 64 * 1024, "the first 64 KiB")
    d.cancel()
    await server.changes.until(lambda: server.data_end and server.control_closed, "both connections to end")
    assert server.data_end == "reset"  # nothing burned, no 226
    assert not server.sent_226
    assert len(server.received) < image.size
    assert server.errors == []
    assert b"ABOR\r\n" not in server.segments
    await server.changes.until(lambda: outcome, "the upload's end")
    assert outcome[0].check(UploadCancelled) and not outcome[0].value.clean_close


@pytest_twisted.ensureDeferred
async def test_loopback_dropped_data_connection(reactor, lwip, tmp_path):
    server = lwip(drop_after=100_000)
    image = loopback_image(tmp_path, 4 * 1024 * 1024)
    result = await upload_image(
        DeviceConnector(reactor, "127.0.0.1"), server.port_number, image, FtpUploadSettings(), reactor
    ).addTimeout(60, reactor)
    assert result.end is UploadEnd.DROPPED, result.message
    assert 100_000 <= result.bytes_sent < image.size
    assert not server.sent_226
    assert server.errors == []
    await server.changes.until(lambda: server.control_closed, "the control connection to close")
