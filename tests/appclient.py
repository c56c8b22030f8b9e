"""A small app-side test client for the simulator's end-to-end tests.

It speaks what an app speaks (CTP handshake, HTTP GET, a whole OTA session served from bytes) using
only :mod:`netota_daemon.wire`, so the simulator is tested against the protocol, not against the
daemon's own code. It also has knobs to misbehave (corrupt a reply, answer the all_size notice,
send STOP) and a client shaped like the vendor's blocking C reference client.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from netota_daemon.wire.ctp import CtpDecoder, CtpFrame, request
from netota_daemon.wire.ota import (
    HEADER_SIZE,
    MAX_READ_SIZE,
    STOP_BYTES,
    OtaHeader,
    OtaHeaderReader,
    Status,
    byte_sum,
    encode_reply,
    notice_echo,
    reply_header,
)

TIMEOUT = 10.0


def _endpoint(reactor: Any, host: str, port: int, bind: str | None = None) -> TCP4ClientEndpoint:
    return TCP4ClientEndpoint(reactor, host, port, timeout=5, bindAddress=(bind, 0) if bind else None)


# -- CTP ----------------------------------------------------------------------------------------
class CtpTestClient(Protocol):
    """Collects every frame; :meth:`next_frame` waits for one matching a topic."""

    def __init__(self) -> None:
        self.decoder = CtpDecoder()
        self.frames: list[CtpFrame] = []
        self.raw = b""
        self._waiters: list[tuple[Callable[[CtpFrame], bool], Deferred]] = []
        self.closed: Deferred = Deferred()
        self._read_index = 0

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        for frame in self.decoder.feed(data):
            self.frames.append(frame)
            for waiter in list(self._waiters):
                if waiter[0](frame):
                    self._waiters.remove(waiter)
                    waiter[1].callback(frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def wait_for(self, topic: str, reactor: Any, after: int = 0, timeout: float = TIMEOUT) -> Deferred:
        """The first frame with ``topic`` among frames from index ``after`` on (past ones included)."""
        for frame in self.frames[after:]:
            if frame.topic == topic:
                return defer.succeed(frame)
        d: Deferred = Deferred()
        self._waiters.append((lambda f: f.topic == topic, d))
        d.addTimeout(timeout, reactor)
        return d

    def close(self) -> Deferred:
        self.transport.loseConnection()
        return self.closed


async def ctp_connect(reactor: Any, host: str, port: int, bind: str | None = None) -> CtpTestClient:
    client = CtpTestClient()
    await connectProtocol(_endpoint(reactor, host, port, bind), client)
    return client


async def ctp_handshake(
    reactor: Any, host: str, port: int, ver: str = "20906", bind: str | None = None
) -> CtpTestClient:
    """Connect and send APP_ACCESS; returns once the APP_ACCESS reply arrived."""
    client = await ctp_connect(reactor, host, port, bind)
    client.send(request("APP_ACCESS", "PUT", type="0", ver=ver))
    await client.wait_for("APP_ACCESS", reactor)
    return client


# -- HTTP ---------------------------------------------------------------------------------------
class RawHttpClient(Protocol):
    """Sends one request and collects the answer until the body is complete or the peer closes."""

    def __init__(self, request_bytes: bytes) -> None:
        self.request_bytes = request_bytes
        self.data = b""
        self.done: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request_bytes)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        head, sep, body = self.data.partition(b"\r\n\r\n")
        if not sep:
            return
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and len(body) >= int(value.strip()):
                self._finish()
                self.transport.loseConnection()

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(self.data)

    def connectionLost(self, reason: Any = None) -> None:
        self._finish()


async def http_get(reactor: Any, host: str, port: int, path: str, method: str = "GET") -> bytes:
    """The raw bytes of the answer to one request."""
    raw = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    client = RawHttpClient(raw)
    await connectProtocol(_endpoint(reactor, host, port), client)
    client.done.addTimeout(TIMEOUT, reactor)
    return await client.done


def split_http(response: bytes) -> tuple[bytes, bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    return head, body


# -- OTA ----------------------------------------------------------------------------------------
@dataclass
class OtaClientResult:
    """What an OTA session looked like from the app side."""

    final_status: int | None = None  # OK/ERR/SAME, or None when the connection closed first
    headers: list[OtaHeader] = field(default_factory=list)  # every header received, in order
    skipped: int = 0  # headers with a bad checksum
    served: int = 0  # bytes sent in replies
    all_size: int = 0
    closed: bool = False

    @property
    def reads(self) -> list[OtaHeader]:
        return [h for h in self.headers if h.status == Status.READ and h.is_valid()]


class OtaTestClient(Protocol):
    """Serves a whole image from bytes, the way the protocol says an app must.

    Knobs: ``corrupt_reply`` (index of the reply sent with a wrong sum), ``stop_after_reads``
    (send STOP instead of the Nth reply), ``reply_to_all_size`` (answer the all_size notice: a bug),
    ``echo_final_notice`` (end the device's 5 s wait after the 100 % notice early),
    ``longer_reply`` (index of a reply padded past what was asked), ``close_after_reads``.
    """

    def __init__(
        self,
        image: bytes,
        corrupt_reply: int | None = None,
        stop_after_reads: int | None = None,
        reply_to_all_size: bool = False,
        echo_final_notice: bool = True,
        longer_reply: int | None = None,
        close_after_reads: int | None = None,
    ) -> None:
        self.image = image
        self.corrupt_reply = corrupt_reply
        self.stop_after_reads = stop_after_reads
        self.reply_to_all_size = reply_to_all_size
        self.echo_final_notice = echo_final_notice
        self.longer_reply = longer_reply
        self.close_after_reads = close_after_reads
        self.reader = OtaHeaderReader()
        self.result = OtaClientResult()
        self.done: Deferred = Deferred()
        self._replies = 0

    def dataReceived(self, data: bytes) -> None:
        for header in self.reader.feed(data):
            self.result.headers.append(header)
            if not header.is_valid():
                self.result.skipped += 1
                continue
            self._handle(header)

    def _handle(self, header: OtaHeader) -> None:
        status = header.status
        if status in (Status.OK, Status.ERR, Status.SAME):
            self.result.final_status = status
            return
        if status != Status.READ:
            if header.all_size:
                self.result.all_size = header.all_size
                if self.reply_to_all_size:
                    self.transport.write(notice_echo(header))
            elif header.percent == 100 and self.echo_final_notice:
                self.transport.write(notice_echo(header))
            return
        index = self._replies
        self._replies += 1
        if self.stop_after_reads is not None and index >= self.stop_after_reads:
            self.transport.write(STOP_BYTES)
            return
        if self.close_after_reads is not None and index >= self.close_after_reads:
            self.transport.loseConnection()
            return
        if header.read_size == 0 or header.read_size > MAX_READ_SIZE or header.seek_addr >= len(self.image):
            self.transport.write(STOP_BYTES)
            return
        payload = self.image[header.seek_addr : header.seek_addr + header.read_size]
        if self.longer_reply == index:
            payload = self.image[header.seek_addr : header.seek_addr + header.read_size] + b"\x00" * 16
        reply = reply_header(header, len(payload), byte_sum(payload))
        if self.corrupt_reply == index:
            reply = ((int.from_bytes(reply[:4], "little") + 1) & 0xFFFFFFFF).to_bytes(4, "little") + reply[4:]
        self.result.served += len(payload)
        self.transport.write(reply + payload)

    def connectionLost(self, reason: Any = None) -> None:
        self.result.closed = True
        if not self.done.called:
            self.done.callback(self.result)


async def run_ota_session(
    reactor: Any, host: str, port: int, image: bytes, timeout: float = TIMEOUT, **knobs: Any
) -> OtaClientResult:
    """Connect to 3335 and serve ``image`` until the device closes the connection."""
    client = OtaTestClient(image, **knobs)
    await connectProtocol(_endpoint(reactor, host, port), client)
    client.done.addTimeout(timeout, reactor)
    return await client.done


# -- the vendor's reference client, rebuilt --------------------------------------------------------
@dataclass
class VendorClientResult:
    outcome: str  # "ok", "err", "same", "timeout", "disconnected", "reset", "read_size_err"
    requests: int
    all_size: int
    log: list[str]


def vendor_style_ota_client(host: str, port: int, image: bytes, receive_timeout: float = 5.0) -> VendorClientResult:
    """A blocking client that behaves like the vendor's C test client (no CTP; our own code).

    Its habits, kept on purpose: 20-byte ``recv`` for each header; skip a header whose sum is wrong;
    more than 10 receive timeouts in a row is failure; non-READ headers get no reply; with
    ``seek_addr`` 0 it reads from its *current* file position; STOP on its own failure.
    """
    lines: list[str] = []
    position = 0
    timeouts = 0
    requests = 0
    all_size = 0
    outcome = "err"
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.settimeout(receive_timeout)
        while True:
            try:
                data = sock.recv(HEADER_SIZE)
            except TimeoutError:
                timeouts += 1
                if timeouts > 10:
                    outcome = "timeout"
                    break
                continue
            except ConnectionResetError:
                outcome = "reset"
                lines.append("connection reset by the device")
                break
            if not data:
                outcome = "disconnected"
                lines.append("server disconnected")
                break
            timeouts = 0
            if len(data) != HEADER_SIZE:
                lines.append(f"short header ({len(data)} bytes), skipped")
                continue
            header = OtaHeader.decode(data)
            if not header.is_valid():
                lines.append("bad header sum, skipped")
                continue
            if header.status == Status.OK:
                outcome = "ok"
                break
            if header.status == Status.ERR:
                outcome = "err"
                break
            if header.status == Status.SAME:
                outcome = "same"
                break
            if header.status != Status.READ:
                if header.all_size:
                    all_size = header.all_size
                continue
            if not header.read_size:
                outcome = "read_size_err"
                break
            requests += 1
            if header.seek_addr:
                position = header.seek_addr
            size = min(header.read_size, len(image) - position)
            payload = image[position : position + size]
            position += size
            request_echo = OtaHeader(header.seek_addr, size, 0, header.status, header.percent)
            sock.sendall(encode_reply(request_echo, payload))
            lines.append(f"served {header.seek_addr}+{size} at {header.percent}%")
        if outcome not in ("ok", "same", "reset"):
            try:
                sock.sendall(STOP_BYTES)
            except OSError:
                pass
    return VendorClientResult(outcome, requests, all_size, lines)


# -- FTP (double backup): a plain client that obeys the device's rules -----------------------------
@dataclass
class FtpUploadResult:
    replies: list[str]  # every reply line, in order
    final: str | None  # the reply after the data connection closed (226), None when none came
    sent: int  # bytes written to the data connection


def _ftp_reply(reader: Any) -> str:
    line = reader.readline()
    if not line:
        raise ConnectionError("the FTP server closed the control connection")
    return line.decode("latin-1").rstrip("\r\n")


def ftp_upload(
    host: str,
    port: int,
    image: bytes,
    name: str = "update-ota.ufw",
    user: str = "FTPX",
    password: str = "12345678",
    timeout: float = 10.0,
) -> FtpUploadResult:
    """Upload ``image`` the way the device needs it (blocking; run it in a thread): one command per
    write, each after the previous reply; a fresh PASV; STOR; the file; a clean close (FIN); wait
    for 226; QUIT. A data connection the device resets ends the upload without a 226."""
    replies: list[str] = []
    sent = 0
    final: str | None = None
    with socket.create_connection((host, port), timeout=timeout) as control:
        reader = control.makefile("rb")

        def ask(line: str) -> str:
            control.sendall(line.encode("latin-1") + b"\r\n")
            replies.append(_ftp_reply(reader))
            return replies[-1]

        replies.append(_ftp_reply(reader))  # the greeting
        ask(f"USER {user}")
        if not ask(f"PASS {password}").startswith("230"):
            return FtpUploadResult(replies, None, 0)
        ask("TYPE I")
        pasv = ask("PASV")
        numbers = [int(n) for n in pasv[pasv.index("(") + 1 : pasv.index(")")].split(",")]
        data_host, data_port = ".".join(map(str, numbers[:4])), numbers[4] * 256 + numbers[5]
        with socket.create_connection((data_host, data_port), timeout=timeout) as data:
            if not ask(f"STOR {name}").startswith("150"):
                return FtpUploadResult(replies, None, 0)
            try:
                for i in range(0, len(image), 16384):
                    data.sendall(image[i : i + 16384])
                    sent += len(image[i : i + 16384])
                data.shutdown(socket.SHUT_WR)  # the FIN: a clean end of the upload
                while data.recv(4096):
                    pass
            except OSError:  # reset by the device
                return FtpUploadResult(replies, None, sent)
        final = _ftp_reply(reader)
        replies.append(final)
        ask("QUIT")
    return FtpUploadResult(replies, final, sent)
