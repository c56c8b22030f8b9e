"""The app side of the double-backup upload: one FTP session that STORs the image on the device.

The device's FTP server is lwIP's small ftpd (some builds: "Stupid-FTPd"), with sharp edges
(``docs/protocol.md``, "Double backup: the FTP upload"). This module meets them by construction:

- **One command per write, each after the previous reply.** :class:`FtpControlProtocol` holds one
  command at a time: :meth:`~FtpControlProtocol.send` raises :class:`CommandInFlightError` while the
  final reply to the previous command (or the greeting) is outstanding, and writes each command
  line with a single ``write`` (``TCP_NODELAY`` set, so the kernel sends it at once, alone).
- **Never ABOR, never EPSV; a fresh PASV before the transfer.** ``send`` refuses ABOR and EPSV, and
  refuses a STOR unless a PASV was sent after the previous transfer.
- **The data connection through our own endpoint.** It is made with the same
  :class:`~netota_daemon.protocols.endpoints.DeviceConnector` as the control connection (the
  device's interface and source address), to the connector's host and the port of the 227 reply;
  the IP in the reply is the device's own idea of itself and is not used.
- **Connect, STOR, wait for 150, then stream.** The device writes what arrives on the data
  connection to the file STOR opened; before that there is none (inferred from lwIP's ``ftpd.c``).
- **Backpressure.** The image is streamed from the shared in-memory
  :class:`~netota_daemon.firmware.FirmwareImage` by a pull producer registered on the data
  transport: a chunk (:data:`CHUNK_SIZE`) is written only when the transport has handed the previous
  one to the kernel, and the socket's send buffer is capped (:data:`DATA_SEND_BUFFER`), so a device
  throttled by its flash writes throttles us and memory stays bounded.
- **A clean close, then the 226.** After the last byte the data connection is closed with a FIN
  (the device then closes its file and attempts the burn, up to about 5 s) and the 226 is awaited
  for ``final_reply_timeout``; then ``QUIT``.
- **Ending any other way resets the data connection** (``abortConnection``: an RST burns nothing),
  and only once it is gone is the control connection closed.

Why not ``twisted.protocols.ftp.FTPClient``: it sends STOR as soon as the 227 arrives, while its data
connection is still being made; it swallows the 150 (1xx replies are dropped), so there is nothing
to start the stream on; it makes the data connection with the global reactor's ``connectTCP`` (a
class attribute), not through an endpoint; it keeps sending its queued commands after a refused
login; it has no timeouts and no bound on a multi-line reply. Working around each of those would
leave little of it, so this is a small client of its own: a plain ``Protocol`` over the sans-IO
parser in :mod:`netota_daemon.wire.ftp` (``LineReceiver``'s line framing would duplicate it).

:func:`upload_image` runs a session and fires with an :class:`UploadResult` for every outcome;
cancelling its Deferred resets the data connection, closes the control connection, and then fails
with :class:`UploadCancelled` (a ``CancelledError``).
"""

from __future__ import annotations

import enum
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast
from typing import Protocol as TypingProtocol

from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol
from twisted.internet.interfaces import IPullProducer, IReactorTime, ISystemHandle, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.endpoints import DeviceConnector, EndpointError, bounded, connection_error_message
from netota_daemon.wire.ftp import (
    OTA_NAME_MARKER,
    FtpProtocolError,
    FtpReply,
    FtpReplyParser,
    ServerKind,
    check_argument,
    encode_command,
    identify_server,
    parse_pasv_reply,
)

log = Logger()

#: Bytes handed to the data transport per pull: at most this much of the image is copied at a time.
CHUNK_SIZE = 16 * 1024
#: SO_SNDBUF asked for on the data socket (Linux doubles it): bytes the kernel may hold that the
#: device has not received yet. Keeps ``bytes_sent`` close to the truth and the wait for the 226
#: after the close from including a long drain to a slow device.
DATA_SEND_BUFFER = 64 * 1024
#: How long a closing connection may take before it is aborted.
CLOSE_GRACE = 2.0
#: Reply lines kept for :attr:`UploadResult.replies`.
REPLY_HISTORY = 12
#: Replies that may wait unread (one command is in flight, so more is a misbehaving server).
MAX_BUFFERED_REPLIES = 4
#: The greeting is kept up to this many characters.
MAX_GREETING = 200
#: Progress is reported at most this often while streaming (and on every state change).
PROGRESS_INTERVAL = 0.1
#: The rate is averaged over this many seconds.
RATE_WINDOW = 3.0
#: Commands never sent to the device, and why.
NEVER_SENT = {
    "ABOR": "ABOR crashes the device's ftpd (it aborts the control connection, then uses freed memory)",
    "EPSV": "the device's ftpd has no EPSV (PASV only)",
}
#: Commands that open a data transfer: each needs a PASV of its own just before it.
TRANSFER_VERBS = frozenset({"STOR", "RETR", "LIST", "NLST", "APPE"})

ProgressState = Literal["login", "transferring", "device_working"]


class UploadEnd(str, enum.Enum):
    COMPLETE = "complete"  # 226 after the clean close (the same 226 as on failure: the reboot tells)
    REFUSED = "refused"  # a 4xx/5xx: 550 busy on STOR, 503 on a wrong login, any other
    DROPPED = "dropped"  # the device closed the control or the data connection
    TIMEOUT = "timeout"  # no reply in time, the data connection stalled, or no 226 after the close
    PROTOCOL_ERROR = "protocol_error"  # not FTP, an unexpected reply, a 227 without an address
    UNREACHABLE = "unreachable"  # the control or data connection could not be made
    ABORTED = "aborted"  # for the engine's record of a cancelled upload; upload_image raises CancelledError


@dataclass(frozen=True)
class FtpUploadSettings:
    """The login, the name on the device, and the waits of one upload, in seconds."""

    user: str = "FTPX"
    password: str = "12345678"
    remote_name: str = "update-ota.ufw"
    reply_timeout: float = 10.0  # each control reply (greeting, USER, PASS, TYPE, PASV, 150) and each connect
    stall_timeout: float = 30.0  # the data connection accepts no bytes for this long: give up
    final_reply_timeout: float = 15.0  # after the clean close, the 226
    quit_timeout: float = 2.0  # the 221 after QUIT (the upload is done by then; the device reboots soon)

    def __post_init__(self) -> None:
        check_argument(self.user, "the FTP user")
        check_argument(self.password, "the FTP password")
        check_argument(self.remote_name, "the name to STOR")
        if OTA_NAME_MARKER not in self.remote_name:
            raise ValueError(
                f"the name to STOR must contain {OTA_NAME_MARKER!r}: the device writes only such names to its "
                f"update bank (any other goes to its SD card), got {self.remote_name!r}"
            )
        for name in ("reply_timeout", "stall_timeout", "final_reply_timeout", "quit_timeout"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class UploadResult:
    end: UploadEnd
    message: str
    bytes_sent: int = 0  # bytes the data transport accepted (see UploadProgress)
    replies: tuple[str, ...] = ()  # the last reply lines (at most REPLY_HISTORY)
    greeting: str = ""
    server: ServerKind = "unknown"
    code: int | None = None  # the reply code that decided the end, if a reply did
    clean_close: bool = False  # the whole image went out and the data connection was closed with a FIN
    finished_at: float | None = None  # clock time of the 226 (COMPLETE only): the reboot follows about 2 s later


@dataclass(frozen=True)
class UploadProgress:
    """``bytes_sent`` counts what the data transport accepted: at most one chunk plus the socket's
    send buffer (about 150 KiB together) ahead of what reached the device."""

    bytes_sent: int
    total_bytes: int
    rate: float  # bytes per second, over the last few seconds
    state: ProgressState


class CommandInFlightError(RuntimeError):
    """A command was about to be sent before the final reply to the previous one: the device would
    parse the two as one segment, or lose one. A programming error, never a device's."""


class UploadCancelled(defer.CancelledError):
    """What a cancelled upload fails with, once its connections are closed: a ``CancelledError``
    that says how far it got. ``clean_close`` False: the data connection was reset (or never
    carried data), so the device burned nothing and its old firmware is intact. True: the whole
    image had gone out with a FIN before the cancel, and the device may still accept it."""

    def __init__(self, bytes_sent: int, total_bytes: int, clean_close: bool) -> None:
        if clean_close:
            how = "after the whole image was sent and closed cleanly: the device may still accept it"
        elif bytes_sent:
            how = f"after {bytes_sent} of {total_bytes} bytes; the data connection was reset, so nothing was burned"
        else:
            how = "before any of the image was sent; nothing was burned"
        super().__init__(f"cancelled {how}")
        self.bytes_sent = bytes_sent
        self.total_bytes = total_bytes
        self.clean_close = clean_close


class ControlConnectionLost(Exception):
    """The control connection closed while a reply was awaited."""


# What this module uses of Twisted's interfaces, as typing protocols: mypy reads a zope interface's
# methods as functions without ``self``.
class _Transport(TypingProtocol):
    """A connection's transport (a TCP transport in production)."""

    def write(self, data: bytes) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class _TcpTransport(TypingProtocol):
    def setTcpNoDelay(self, enabled: bool) -> None: ...


class _SystemHandle(TypingProtocol):
    def getHandle(self) -> Any: ...


class _DelayedCall(TypingProtocol):
    def active(self) -> bool: ...
    def cancel(self) -> None: ...
    def reset(self, secondsFromNow: float) -> None: ...


class _Clock(TypingProtocol):
    def seconds(self) -> float: ...
    def callLater(self, delay: float, callable: Callable[..., object], *args: object, **kw: object) -> _DelayedCall: ...


class _Closable:
    """Something whose end can be awaited: :meth:`when_closed` fires once the connection is gone."""

    lost = False

    def __init__(self) -> None:
        self._closed_waiters: list[defer.Deferred[None]] = []

    def when_closed(self) -> defer.Deferred[None]:
        if self.lost:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._forget_closed_waiter)
        self._closed_waiters.append(d)
        return d

    def _forget_closed_waiter(self, d: defer.Deferred[None]) -> None:
        if d in self._closed_waiters:
            self._closed_waiters.remove(d)

    def _fire_closed(self) -> None:
        waiters, self._closed_waiters = self._closed_waiters, []
        for d in waiters:
            d.callback(None)


class FtpControlProtocol(Protocol, _Closable):
    """The control connection: commands out one at a time, replies parsed and handed over in order.

    The greeting counts as the reply to connecting, so nothing can be sent before it.
    """

    def __init__(self, log_context: dict[str, Any] | None = None) -> None:
        _Closable.__init__(self)
        self.log_context = dict(log_context or {})
        self.history: deque[str] = deque(maxlen=REPLY_HISTORY)
        self._parser = FtpReplyParser()
        self._final_pending = True  # the greeting
        self._fresh_pasv = False
        self._replies: deque[FtpReply] = deque()
        self._waiter: defer.Deferred[FtpReply] | None = None
        self._error: Exception | None = None

    @property
    def _transport(self) -> _Transport:
        assert self.transport is not None
        return cast(_Transport, self.transport)

    # -- transport side -------------------------------------------------------------------------
    def connectionMade(self) -> None:
        if ITCPTransport.providedBy(self.transport):
            cast(_TcpTransport, self.transport).setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return  # the session is ending; the upload closes the connection in its order
        try:
            replies = self._parser.feed(data)
        except FtpProtocolError as e:
            log.warn("FTP protocol error: {error}", error=str(e), **self.log_context)
            self._fail(e)
            return
        # Every reply of the segment is accounted for before any is handed over: a reply that
        # arrived before the next command was written can't pass for that command's reply.
        for reply in replies:
            self._reply_received(reply)
        if self._waiter is not None and self._replies:
            waiter, self._waiter = self._waiter, None
            waiter.callback(self._replies.popleft())

    def _reply_received(self, reply: FtpReply) -> None:
        self.history.extend(reply.lines)
        log.debug("FTP <- {reply}", reply=reply.summary, **self.log_context)
        if self._error is not None:
            return
        if not self._final_pending:
            self._fail(FtpProtocolError(f"the device sent a reply with no command outstanding: {reply.summary}"))
        elif len(self._replies) >= MAX_BUFFERED_REPLIES:
            self._fail(FtpProtocolError(f"the device sent more than {MAX_BUFFERED_REPLIES} replies to one command"))
        else:
            if reply.is_final:
                self._final_pending = False
            self._replies.append(reply)

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._replies:
            waiter, self._waiter = self._waiter, None
            waiter.errback(error)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        message = reason.getErrorMessage() if reason is not None else "closed"
        self._fail(ControlConnectionLost(f"the FTP control connection closed: {message}"))
        self._fire_closed()

    # -- the session side ----------------------------------------------------------------------
    @property
    def awaiting_reply(self) -> bool:
        """Whether the final reply to the last command (or the greeting) is still outstanding."""
        return self._final_pending

    def send(self, verb: str, argument: str | None = None, shown: str | None = None) -> None:
        """Write one command, in one write. ``shown`` replaces the command in the log (PASS).

        Raises :class:`CommandInFlightError` while a reply is outstanding, and ``ValueError`` for a
        command the device must never get (ABOR, EPSV, a transfer without a fresh PASV) or one that
        can't be encoded; nothing is written then."""
        if verb in NEVER_SENT:
            raise ValueError(f"never sent to the device: {NEVER_SENT[verb]}")
        if verb in TRANSFER_VERBS and not self._fresh_pasv:
            raise ValueError(f"{verb} needs a PASV just before it: the device's ftpd crashes on a transfer without one")
        if self._final_pending:
            raise CommandInFlightError(f"{verb} while the reply to the previous command is outstanding")
        line = encode_command(verb, argument)
        if self._error is not None or self.lost:
            return  # the connection is gone or unusable: the next reply reports it
        self._final_pending = True
        if verb == "PASV":
            self._fresh_pasv = True
        elif verb in TRANSFER_VERBS:
            self._fresh_pasv = False
        log.debug("FTP -> {command}", command=shown or line.decode("ascii").rstrip(), **self.log_context)
        self._transport.write(line)

    def next_reply(self) -> defer.Deferred[FtpReply]:
        """The next reply (preliminary or final); fails with :class:`ControlConnectionLost` or
        :class:`~netota_daemon.wire.ftp.FtpProtocolError` once none can come. Cancelling it only
        stops waiting: a reply that arrives later is kept for the next call."""
        if self._waiter is not None:
            raise RuntimeError("already waiting for a reply")
        if self._replies:
            return defer.succeed(self._replies.popleft())
        if self._error is not None:
            return defer.fail(self._error)
        d: defer.Deferred[FtpReply] = defer.Deferred(self._forget_waiter)
        self._waiter = d
        return d

    def _forget_waiter(self, d: defer.Deferred[FtpReply]) -> None:
        if self._waiter is d:
            self._waiter = None

    def close(self) -> None:
        """A clean close (FIN)."""
        if self.transport is not None and not self.lost:
            self._transport.loseConnection()

    def abort(self) -> None:
        """A reset (RST)."""
        if self.transport is not None and not self.lost:
            self._transport.abortConnection()


@implementer(IPullProducer)
class FtpDataSender(Protocol, _Closable):
    """The passive data connection of a STOR: streams the image, pulled by the transport.

    :meth:`start` registers it as the transport's pull producer: each ``resumeProducing`` (the
    transport has handed everything before to the kernel) writes the next chunk; the one after the
    last chunk unregisters and closes the connection cleanly (FIN). :meth:`abort` resets it instead.
    """

    def __init__(
        self,
        image: FirmwareImage,
        on_accepted: Callable[[int], None] | None = None,
        on_lost: Callable[[Failure | None], None] | None = None,
        log_context: dict[str, Any] | None = None,
    ) -> None:
        _Closable.__init__(self)
        self.image = image
        self.on_accepted = on_accepted
        self.on_lost = on_lost
        self.log_context = dict(log_context or {})
        self.offset = 0  # bytes written to the transport
        self.closing_cleanly = False  # the whole image was written and the FIN requested
        self.unexpected_bytes = 0
        self._producing = False
        self._registered = False

    @property
    def _transport(self) -> _Transport:
        assert self.transport is not None
        return cast(_Transport, self.transport)

    def connectionMade(self) -> None:
        if ISystemHandle.providedBy(self.transport):
            handle = cast(_SystemHandle, self.transport).getHandle()
            if hasattr(handle, "setsockopt"):
                try:
                    handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, DATA_SEND_BUFFER)
                except OSError as e:
                    log.debug("SO_SNDBUF not set on the data connection: {error}", error=e, **self.log_context)

    def start(self) -> None:
        """Begin streaming (after the device's 150)."""
        if self.lost or self._producing:
            return
        self._producing = True
        self._registered = True
        self._transport.registerProducer(self, False)

    # IPullProducer
    def resumeProducing(self) -> None:
        if not self._producing or self.lost:
            return
        if self.offset >= self.image.size:
            self._producing = False
            self._unregister()
            self.closing_cleanly = True
            self._transport.loseConnection()  # FIN after the last byte: the device attempts the burn
            return
        chunk = self.image.read(self.offset, CHUNK_SIZE)
        self.offset += len(chunk)
        self._transport.write(bytes(chunk))  # transports take bytes: one chunk's copy
        if self.on_accepted is not None:
            self.on_accepted(self.offset)

    def stopProducing(self) -> None:
        self._producing = False

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._transport.unregisterProducer()

    def abort(self) -> None:
        """Reset the connection (RST): the device frees its transfer and burns nothing."""
        if self.transport is None or self.lost:
            return
        self._producing = False
        self._unregister()
        self._transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self.unexpected_bytes:
            log.warn("the device sent data on the STOR data connection; ignored", **self.log_context)
        self.unexpected_bytes += len(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True
        self._producing = False
        self._registered = False
        if self.on_lost is not None:
            self.on_lost(reason)
        self._fire_closed()


class _Ended(Exception):
    """How the session ended, before anything is closed."""

    def __init__(self, end: UploadEnd, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.end = end
        self.message = message
        self.code = code


class _RateMeter:
    def __init__(self, clock: _Clock) -> None:
        self._clock = clock
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self, total: int) -> float:
        now = self._clock.seconds()
        samples = self._samples
        if not samples or now - samples[-1][0] >= PROGRESS_INTERVAL:
            samples.append((now, total))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        elapsed = now - samples[0][0]
        return (total - samples[0][1]) / elapsed if elapsed > 0 else 0.0


class _Upload:
    """One upload session: the flow (:meth:`run`), the events of the transfer, and the closing."""

    def __init__(
        self,
        connector: DeviceConnector,
        port: int,
        image: FirmwareImage,
        settings: FtpUploadSettings,
        clock: IReactorTime,
        on_progress: Callable[[UploadProgress], None] | None,
        log_context: dict[str, Any] | None,
    ) -> None:
        self.connector = connector
        self.port = port
        self.image = image
        self.settings = settings
        self.clock = clock
        self._clock = cast(_Clock, clock)
        self.on_progress = on_progress
        self.log_context = dict(log_context or {})
        self.control: FtpControlProtocol | None = None
        self.data: FtpDataSender | None = None
        self.state: ProgressState = "login"
        self.greeting = ""
        self.server: ServerKind = "unknown"
        self.clean_close = False
        self.finished_at: float | None = None
        self._rate = _RateMeter(self._clock)
        self._last_progress: tuple[float, ProgressState] | None = None
        self._transfer: defer.Deferred[None] | None = None
        self._transfer_reply: defer.Deferred[FtpReply] | None = None
        self._reply_after_close: FtpReply | None = None
        self._stall_timer: _DelayedCall | None = None

    @property
    def bytes_sent(self) -> int:
        return self.data.offset if self.data is not None else 0

    # -- the flow ------------------------------------------------------------------------------
    async def run(self) -> UploadResult:
        log.info(
            "FTP upload of {size} bytes to {where} port {port}",
            size=self.image.size,
            where=self.connector.describe(),
            port=self.port,
            **self.log_context,
        )
        result: UploadResult | None = None
        try:
            result = await self._flow()
        except _Ended as e:
            result = self._result(e.end, e.message, e.code)
        except defer.CancelledError:
            pass  # closed below, then raised as UploadCancelled
        except Exception:
            log.failure("FTP upload: unexpected error", **self.log_context)
            result = self._result(UploadEnd.PROTOCOL_ERROR, "unexpected error in the FTP client (see the log)")
        await self._close_all()
        if result is None:
            cancelled = UploadCancelled(self.bytes_sent, self.image.size, self.clean_close)
            log.info("FTP upload {message}", message=str(cancelled), **self.log_context)
            raise cancelled
        if result.end is UploadEnd.COMPLETE:
            log.info("FTP upload complete: {message}", message=result.message, **self.log_context)
        else:
            log.warn(
                "FTP upload failed ({end}): {message}", end=result.end.value, message=result.message, **self.log_context
            )
        return result

    async def _flow(self) -> UploadResult:
        s = self.settings
        self._progress(force=True)
        self.control = control = FtpControlProtocol(self.log_context)
        await self._connect(self.port, control, "the FTP control connection")

        greeting = await self._final_reply("greeting", s.reply_timeout)
        self.greeting = greeting.summary[:MAX_GREETING]
        self.server = identify_server(greeting)
        self._expect(greeting, {220}, "the connection (greeting)")

        control.send("USER", s.user)
        reply = await self._final_reply("reply to USER", s.reply_timeout)
        if reply.code == 331:
            control.send("PASS", s.password, shown="PASS ****")
            reply = await self._final_reply("reply to PASS", s.reply_timeout)
        if reply.code not in (230, 202):
            if reply.is_negative:
                raise _Ended(
                    UploadEnd.REFUSED,
                    f"the device refused the login as {s.user!r} ({reply.summary}): check the FTP user and password",
                    reply.code,
                )
            raise _Ended(UploadEnd.PROTOCOL_ERROR, f"unexpected reply to the login: {reply.summary}", reply.code)

        control.send("TYPE", "I")
        self._expect(await self._final_reply("reply to TYPE I", s.reply_timeout), {200}, "TYPE I")

        control.send("PASV")
        reply = await self._final_reply("reply to PASV", s.reply_timeout)
        self._expect(reply, {227}, "PASV")
        try:
            address = parse_pasv_reply(reply)
        except FtpProtocolError as e:
            raise _Ended(UploadEnd.PROTOCOL_ERROR, str(e), reply.code) from None

        self.data = data = FtpDataSender(self.image, self._accepted, self._data_lost, self.log_context)
        await self._connect(address.port, data, f"the FTP data connection (port {address.port} from PASV)")

        control.send("STOR", s.remote_name)
        reply = await self._reply(f"reply to STOR {s.remote_name}", s.reply_timeout)
        if reply.code not in (125, 150):
            if reply.code == 550:
                raise _Ended(
                    UploadEnd.REFUSED,
                    f"the device refused STOR {s.remote_name} ({reply.summary}): an earlier upgrade may still be "
                    "running or timing out; try again later",
                    reply.code,
                )
            self._expect(reply, set(), f"STOR {s.remote_name}")

        await self._send_image()

        self.state = "device_working"
        self._progress(force=True)
        reply = self._reply_after_close or await self._reply_after_clean_close()
        if reply.code not in (226, 250):
            self._expect(reply, set(), "the end of the transfer")
        self.finished_at = self._clock.seconds()
        await self._quit()
        return self._result(
            UploadEnd.COMPLETE,
            f"{self.bytes_sent} bytes uploaded as {s.remote_name}; the device answered {reply.summary} "
            "(the same on success and failure: its reboot tells)",
            reply.code,
        )

    async def _quit(self) -> None:
        """QUIT, and a short wait for the 221: nothing depends on it any more."""
        control = self.control
        assert control is not None
        if control.lost or control.awaiting_reply:
            return
        try:
            control.send("QUIT")
            await self._final_reply("reply to QUIT", self.settings.quit_timeout)
        except _Ended as e:
            log.debug("QUIT: {message}", message=e.message, **self.log_context)

    # -- waiting -------------------------------------------------------------------------------
    async def _connect(self, port: int, protocol: Protocol, what: str) -> None:
        timeout = self.settings.reply_timeout
        where = f"port {port} of {self.connector.describe()}"
        try:
            endpoint = self.connector.endpoint(port, timeout)
        except EndpointError as e:
            raise _Ended(UploadEnd.UNREACHABLE, str(e)) from None
        try:
            await bounded(self.clock, connectProtocol(endpoint, protocol), timeout, what)  # type: ignore[no-untyped-call]
        except defer.CancelledError:
            raise
        except defer.TimeoutError:
            raise _Ended(UploadEnd.UNREACHABLE, f"{what} to {where} was not made within {timeout:g} s") from None
        except Exception as e:
            raise _Ended(UploadEnd.UNREACHABLE, f"{what} to {where} failed: {connection_error_message(e)}") from None

    async def _reply(self, what: str, timeout: float) -> FtpReply:
        """The next reply, within ``timeout``; every way of not getting one is an :class:`_Ended`.
        ``what`` names it in messages ("no {what} within 10 s")."""
        assert self.control is not None
        try:
            return await bounded(self.clock, self.control.next_reply(), timeout, what)
        except defer.TimeoutError:
            raise _Ended(UploadEnd.TIMEOUT, f"no {what} within {timeout:g} s") from None
        except ControlConnectionLost:
            raise _Ended(
                UploadEnd.DROPPED, f"the device closed the control connection while netota waited for the {what}"
            ) from None
        except FtpProtocolError as e:
            raise _Ended(UploadEnd.PROTOCOL_ERROR, f"{e} (while waiting for the {what})") from None

    async def _reply_after_clean_close(self) -> FtpReply:
        """The 226 (or whatever ends the transfer), which the device sends after closing its file."""
        try:
            return await self._final_reply("226 after the clean close", self.settings.final_reply_timeout)
        except _Ended as e:
            if e.end in (UploadEnd.TIMEOUT, UploadEnd.DROPPED):
                e.message += "; the whole image went out and was closed cleanly, so the device may still accept it"
            raise

    async def _final_reply(self, what: str, timeout: float) -> FtpReply:
        """The final reply, skipping preliminary ones, all within ``timeout``."""
        deadline = self._clock.seconds() + timeout
        while True:
            reply = await self._reply(what, max(deadline - self._clock.seconds(), 0.0))
            if reply.is_final:
                return reply

    @staticmethod
    def _expect(reply: FtpReply, codes: set[int], what: str) -> None:
        if reply.code in codes:
            return
        if reply.is_negative:
            raise _Ended(UploadEnd.REFUSED, f"the device refused {what}: {reply.summary}", reply.code)
        raise _Ended(UploadEnd.PROTOCOL_ERROR, f"unexpected reply to {what}: {reply.summary}", reply.code)

    # -- the transfer --------------------------------------------------------------------------
    async def _send_image(self) -> None:
        """Stream the image and close cleanly; returns once the data connection is closed after
        the last byte, or raises :class:`_Ended` for the first thing that went wrong (a drop, a
        stall, a reply that ends the transfer, the control connection closing)."""
        assert self.data is not None
        if self.data.lost:
            raise _Ended(UploadEnd.DROPPED, "the data connection closed before the transfer began")
        self.state = "transferring"
        self._progress(force=True)
        done: defer.Deferred[None] = defer.Deferred()
        self._transfer = done
        self._watch_control()
        self._stall_timer = self._clock.callLater(self.settings.stall_timeout, self._stalled)
        self.data.start()
        try:
            await done
        finally:
            self._transfer = None
            self._cancel_stall_timer()
            watcher, self._transfer_reply = self._transfer_reply, None
            if watcher is not None and not watcher.called:
                watcher.cancel()  # stops waiting only: a later reply stays queued for the flow

    def _settle(self, ended: _Ended | None) -> None:
        done = self._transfer
        if done is None or done.called:
            return
        if ended is None:
            done.callback(None)
        else:
            done.errback(ended)

    def _watch_control(self) -> None:
        assert self.control is not None
        watcher = self._transfer_reply = self.control.next_reply()
        watcher.addCallbacks(self._reply_during_transfer, self._control_failed_during_transfer)

    def _accepted(self, offset: int) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.reset(self.settings.stall_timeout)
        self._progress(force=offset >= self.image.size)

    def _stalled(self) -> None:
        self._stall_timer = None
        self._settle(
            _Ended(
                UploadEnd.TIMEOUT,
                f"the data connection accepted nothing for {self.settings.stall_timeout:g} s "
                f"({self.bytes_sent} of {self.image.size} bytes sent)",
            )
        )

    def _cancel_stall_timer(self) -> None:
        if self._stall_timer is not None and self._stall_timer.active():
            self._stall_timer.cancel()
        self._stall_timer = None

    def _data_lost(self, reason: Failure | None) -> None:
        assert self.data is not None
        if self.data.closing_cleanly:
            self.clean_close = True
            self._settle(None)
            return
        why = "closed" if reason is None or reason.value is None else connection_error_message(reason.value)
        self._settle(
            _Ended(
                UploadEnd.DROPPED,
                f"the data connection closed after {self.bytes_sent} of {self.image.size} bytes ({why})",
            )
        )

    def _reply_during_transfer(self, reply: FtpReply) -> None:
        self._transfer_reply = None
        if self._transfer is None:
            return
        assert self.data is not None
        if reply.is_preliminary:
            self._watch_control()
        elif self.data.closing_cleanly:
            self._reply_after_close = reply  # the 226, before our side reported the close
        elif reply.is_negative:
            self._settle(
                _Ended(
                    UploadEnd.REFUSED,
                    f"the device ended the transfer after {self.bytes_sent} of {self.image.size} bytes: {reply.summary}",
                    reply.code,
                )
            )
        else:
            self._settle(
                _Ended(
                    UploadEnd.PROTOCOL_ERROR,
                    f"the device answered {reply.summary} before the whole image was sent "
                    f"({self.bytes_sent} of {self.image.size} bytes)",
                    reply.code,
                )
            )

    def _control_failed_during_transfer(self, failure: Failure) -> None:
        self._transfer_reply = None
        if self._transfer is None or isinstance(failure.value, defer.CancelledError):
            return
        if isinstance(failure.value, ControlConnectionLost):
            self._settle(
                _Ended(
                    UploadEnd.DROPPED,
                    f"the device closed the control connection during the transfer "
                    f"({self.bytes_sent} of {self.image.size} bytes sent)",
                )
            )
        else:
            self._settle(_Ended(UploadEnd.PROTOCOL_ERROR, f"{failure.getErrorMessage()} (during the transfer)"))

    # -- progress ------------------------------------------------------------------------------
    def _progress(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = self._clock.seconds()
        last = self._last_progress
        if not force and last is not None and last[1] == self.state and now - last[0] < PROGRESS_INTERVAL:
            return
        self._last_progress = (now, self.state)
        progress = UploadProgress(self.bytes_sent, self.image.size, self._rate.rate(self.bytes_sent), self.state)
        try:
            self.on_progress(progress)
        except Exception:
            log.failure("FTP upload: the progress observer failed", **self.log_context)

    # -- ending --------------------------------------------------------------------------------
    def _result(self, end: UploadEnd, message: str, code: int | None = None) -> UploadResult:
        return UploadResult(
            end=end,
            message=message,
            bytes_sent=self.bytes_sent,
            replies=tuple(self.control.history) if self.control is not None else (),
            greeting=self.greeting,
            server=self.server,
            code=code,
            clean_close=self.clean_close,
            finished_at=self.finished_at,
        )

    async def _close_all(self) -> None:
        """Close what is open, data connection first: reset unless it was closed cleanly (an RST burns
        nothing), and only once it is gone the control connection (FIN). Bounded; afterwards
        nothing of the session is open or scheduled."""
        self._cancel_stall_timer()
        data, control = self.data, self.control
        if data is not None and data.transport is not None and not data.lost:
            if not data.closing_cleanly:
                data.abort()
            await self._wait_closed(data, "the FTP data connection")
        if control is not None and control.transport is not None and not control.lost:
            control.close()
            await self._wait_closed(control, "the FTP control connection")

    async def _wait_closed(self, connection: FtpControlProtocol | FtpDataSender, what: str) -> None:
        """Wait for ``connection`` to end: a grace period, then an abort and another (an abort is
        reported on the reactor's next turn). Cancelling this wait aborts at once."""
        for _ in range(2):
            if connection.lost:
                return
            try:
                await bounded(self.clock, connection.when_closed(), CLOSE_GRACE, f"closing {what}")
                return
            except (defer.TimeoutError, defer.CancelledError):
                connection.abort()
        if not connection.lost:
            log.warn("{what} did not report its end after an abort", what=what, **self.log_context)


def upload_image(
    connector: DeviceConnector,
    port: int,
    image: FirmwareImage,
    settings: FtpUploadSettings,
    clock: IReactorTime,
    on_progress: Callable[[UploadProgress], None] | None = None,
    log_context: dict[str, Any] | None = None,
) -> defer.Deferred[UploadResult]:
    """Upload ``image`` to the device's FTP server on ``port`` (21 on a device) as
    ``settings.remote_name``.

    Fires with an :class:`UploadResult` for every outcome, once both connections are closed.
    Cancelling the Deferred resets the data connection (nothing is burned), never sends ABOR,
    closes the control connection, and then fails it with :class:`UploadCancelled` (a
    ``CancelledError``). A cancel after the clean close can no longer stop the device's burn:
    ``UploadCancelled.clean_close`` says so.
    """
    upload = _Upload(connector, port, image, settings, clock, on_progress, log_context)
    return defer.Deferred.fromCoroutine(upload.run())
