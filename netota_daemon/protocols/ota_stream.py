"""The app side of the OTA data stream (TCP 3335): the device asks, the app answers.

The device sends only 20-byte ``net_ota`` headers. This protocol:

- answers each valid READ exactly once with the echoed header (``read_size`` = bytes sent,
  ``all_size`` 0, checksum over header and payload) and the bytes, in one ``write``. The bytes come
  from the shared, in-memory :class:`~netota_daemon.firmware.FirmwareImage` (read once when the job
  opened it): no file read per request and no copy of the image; the one copy per reply is the
  concatenation of header and window (at most 42 KiB) that Twisted's transports need;
- answers only as fast as the device reads: it is its transport's push producer, and while the
  transport's buffer is full it stops reading the device's requests (so a device that asks without
  reading our replies fills its own socket, not our memory); more than
  :data:`MAX_PENDING_REQUESTS` requests waiting is a protocol error (a real device asks once and
  waits for the answer);
- skips headers whose checksum is wrong (logged at a bounded rate); more than
  :data:`MAX_BAD_HEADERS_IN_A_ROW` in a row is a protocol error (garbage, not a device);
- ends the session with a protocol error (STOP, then close) on a READ of 0 bytes, of more than
  42 KiB, or starting at or past the end of the image; a READ running past the end is clamped;
- records the all_size notice (the point of no return in phase 2) and never answers it; optionally
  answers the final 100 % notice with a 20-byte echo (PROTOCOL.md decision, off by default);
- counts receive timeouts: the timer restarts on every header, and more than ``max_receive_timeouts``
  consecutive timeouts end the session (STOP, then close);
- reports facts for progress (:class:`StreamProgress`): bytes served, the furthest byte asked for,
  the bytes asked for since all_size, the device's percent, the rate (measured afresh each time the
  device asks again after working on its own), and what the device is doing when it is not asking
  (:class:`DeviceActivity`); the engine turns them into progress events;
- maps OK / ERR / SAME / a dropped connection to a :class:`StreamResult`.

Whenever the app ends the session (abort, cancellation, its own error) it sends STOP first.
``done`` fires once the connection is closed, so nothing of the session is left when it fires;
a cancelled ``done`` fails at once with CancelledError, and ``closed`` fires when the connection is gone.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.log_limit import LogLimiter
from netota_daemon.protocols.transport import StreamTransport
from netota_daemon.wire.ota import (
    MAX_READ_SIZE,
    STOP_BYTES,
    OtaHeader,
    OtaHeaderReader,
    Status,
    clamp_read,
    notice_echo,
    reply_header,
)

log = Logger()

#: How long a closing connection may take to flush STOP before it is aborted.
CLOSE_GRACE = 2.0
#: Progress rate is averaged over this many seconds.
RATE_WINDOW = 3.0
#: At most one rate sample is kept per this many seconds (memory stays bounded per job).
RATE_SAMPLE_INTERVAL = 0.1
#: After a reply, a device that asks for nothing more for this long is busy (writing flash).
DEVICE_QUIET_AFTER = 1.0
#: Requests the device may send before it has read our replies; more is a protocol error.
MAX_PENDING_REQUESTS = 16
#: Headers with a bad checksum in a row before the stream is treated as garbage.
MAX_BAD_HEADERS_IN_A_ROW = 256


class StreamEnd(str, enum.Enum):
    OK = "ok"  # the device reported success
    ERR = "err"  # the device reported failure
    SAME = "same"  # the device already runs this image (older firmware's answer)
    DROPPED = "dropped"  # the connection closed before any result
    TIMEOUT = "timeout"  # no header for too long
    PROTOCOL_ERROR = "protocol_error"  # a request the app can't serve, or garbage
    ABORTED = "aborted"  # the app stopped it (cancel / abort)


class DeviceActivity(str, enum.Enum):
    """What the device is doing while it is not asking for bytes."""

    STARTING = "starting"  # connected; the device has not asked for anything yet
    QUIET = "quiet"  # answered, and no new request for a while: the device writes what it got
    PREPARING = "preparing"  # after the all_size notice: it waits, then erases flash for the image
    FINISHING = "finishing"  # after the final 100 % notice: it checks and writes, then says OK


@dataclass(frozen=True)
class StreamResult:
    end: StreamEnd
    message: str
    bytes_served: int = 0
    requests: int = 0
    all_size: int = 0  # 0: no all_size notice was seen
    bad_headers: int = 0
    device_percent: int = 0
    stop_sent: bool = False
    receive_timeouts: int = 0  # every receive timeout of the session (not only the last run of them)


@dataclass(frozen=True)
class StreamProgress:
    """Facts about a running stream (the engine computes percent and ETA from them)."""

    bytes_served: int  # every byte sent, re-reads included
    image_size: int
    furthest: int  # the end of the furthest range the device asked for
    all_size: int  # 0 until the all_size notice
    requested_since_all_size: int  # bytes asked for (and sent) since the all_size notice
    device_percent: int
    rate: float  # bytes per second over the last RATE_WINDOW seconds
    rate_span: float  # how many seconds ``rate`` is measured over
    activity: DeviceActivity | None  # None: the device is asking for bytes
    ok: bool = False  # the device said OK


@dataclass(frozen=True)
class StreamSettings:
    """The waits of one session, in seconds, and whether the final notice is echoed."""

    first_header_timeout: float = 30.0
    receive_timeout: float = 5.0
    max_receive_timeouts: int = 10
    echo_final_notice: bool = False


@implementer(IPushProducer)
class OtaStreamProtocol(Protocol):
    """One OTA session. ``done`` fires with a :class:`StreamResult` after the connection closed;
    cancelling ``done`` sends STOP and closes (and ``done`` then fails with CancelledError)."""

    def __init__(
        self,
        image: FirmwareImage,
        clock: IReactorTime,
        settings: StreamSettings = StreamSettings(),
        on_progress: Callable[[StreamProgress], None] | None = None,
        on_all_size: Callable[[int], None] | None = None,
        log_context: dict[str, Any] | None = None,
    ) -> None:
        self.image = image
        self.clock = clock
        self.settings = settings
        self.on_progress = on_progress
        self.on_all_size = on_all_size
        self.log_context = dict(log_context or {})
        self.done: defer.Deferred[StreamResult] = defer.Deferred(self._cancelled)
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._reader = OtaHeaderReader()
        self._result: StreamResult | None = None
        self._timer: IDelayedCall | None = None
        self._quiet_timer: IDelayedCall | None = None
        self._close_timer: IDelayedCall | None = None
        self._timeouts = 0
        self._headers_seen = 0
        self._bad_in_a_row = 0
        self._paused = False  # the transport's buffer is full: don't answer until it drains
        self._limiter = LogLimiter(clock, log, self.log_context)
        self.connected = False
        self.bytes_served = 0
        self.requests = 0
        self.bad_headers = 0
        self.all_size = 0
        self.device_percent = 0
        self.stop_sent = False
        self.receive_timeouts = 0
        self.furthest = 0
        self.activity: DeviceActivity | None = DeviceActivity.STARTING
        self._served_after_all_size = 0
        self._ok = False
        self._rate_samples: deque[tuple[float, int]] = deque()

    @property
    def _tcp(self) -> StreamTransport:
        assert self.transport is not None
        return self.transport  # type: ignore[return-value]  # a TCP transport: also a consumer and producer

    # -- connection ----------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        self._tcp.registerProducer(self, True)
        self._arm_timer(self.settings.first_header_timeout)
        log.debug("OTA stream open", **self.log_context)
        self._report_progress()

    def dataReceived(self, data: bytes) -> None:
        if self._result is not None:
            return  # closing: the session is over
        self._reader.push(data)
        self._take_headers()

    def _take_headers(self) -> None:
        while self._result is None and not self._paused:
            header = self._reader.next()
            if header is None:
                return
            self._timeouts = 0
            self._arm_timer(self.settings.receive_timeout)
            self._header_received(header)
        if self._result is None and self._reader.headers_pending > MAX_PENDING_REQUESTS:
            self.abort(
                StreamEnd.PROTOCOL_ERROR,
                f"the device sent more than {MAX_PENDING_REQUESTS} requests without reading our replies",
            )

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self._cancel_timer()
        self._cancel_quiet()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        self._limiter.flush()
        if self._result is None:
            message = reason.getErrorMessage() if reason is not None else "closed"
            self._result = self._make_result(StreamEnd.DROPPED, f"the device closed the OTA connection ({message})")
        if not self.closed.called:
            self.closed.callback(None)
        if not self.done.called:
            self.done.callback(self._result)

    # -- IPushProducer: the transport's write buffer is full / has drained ----------------------
    def pauseProducing(self) -> None:
        self._paused = True
        self._tcp.pauseProducing()  # stop reading requests: the device's own socket holds them

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._result is None and self.connected:
            self._tcp.resumeProducing()
            self._take_headers()

    def stopProducing(self) -> None:
        pass  # the connection is going away; connectionLost ends the session

    # -- headers -------------------------------------------------------------------------------
    def _header_received(self, header: OtaHeader) -> None:
        if not header.is_valid():
            self.bad_headers += 1
            self._bad_in_a_row += 1
            self._limiter.warn(
                "bad_header",
                "OTA headers with a bad checksum",
                "OTA header with a bad checksum skipped (sum {got:#x}, expected {expected:#x})",
                got=header.sum_check,
                expected=header.computed_sum(),
            )
            if self._bad_in_a_row > MAX_BAD_HEADERS_IN_A_ROW:
                self.abort(
                    StreamEnd.PROTOCOL_ERROR,
                    f"the device sent {self._bad_in_a_row} headers in a row with a bad checksum: not an OTA stream",
                )
            return
        self._bad_in_a_row = 0
        self._headers_seen += 1
        self._cancel_quiet()
        status = header.status
        if status == Status.READ:
            self.device_percent = header.percent
            if self.activity is not None:
                # The device worked (erased, wrote) and asks again: the rate is the transfer's, measured
                # from here, not diluted by the time the device spent on its own.
                self._rate_samples.clear()
            self.activity = None
            self._serve(header)
        elif status == Status.OK:
            self.device_percent = header.percent
            self._ok = True
            self.activity = None
            self._report_progress()
            self._finish(StreamEnd.OK, "the device reported success (OK)")
        elif status == Status.ERR:
            self._finish(StreamEnd.ERR, "the device reported failure (ERR)")
        elif status == Status.SAME:
            self._finish(StreamEnd.SAME, "the device already runs this firmware (SAME)")
        elif status == Status.DOING:
            self._notice(header)
        else:
            self._limiter.warn(
                "unknown_status",
                "OTA headers with an unknown status",
                "OTA header with unexpected status {status} ignored",
                status=header.status_name(),
            )

    def _notice(self, header: OtaHeader) -> None:
        self.device_percent = header.percent
        if header.all_size:
            # The point of no return in phase 2. Never answer it (PROTOCOL.md): the device would
            # write the reply past the end of its receive buffer.
            first = not self.all_size
            self.all_size = header.all_size
            self._served_after_all_size = 0
            self.activity = DeviceActivity.PREPARING
            log.info("OTA all_size notice: {all_size} bytes", all_size=header.all_size, **self.log_context)
            if first and self.on_all_size is not None:
                self.on_all_size(header.all_size)
            self._report_progress()
        elif header.percent >= 100:
            log.debug("OTA final 100 % notice", **self.log_context)
            self.activity = DeviceActivity.FINISHING
            if self.settings.echo_final_notice:
                self._tcp.write(notice_echo(header))
            self._report_progress()

    def _serve(self, request: OtaHeader) -> None:
        size = self.image.size
        if request.read_size == 0:
            self.abort(StreamEnd.PROTOCOL_ERROR, f"the device asked for 0 bytes at offset {request.seek_addr}")
            return
        if request.read_size > MAX_READ_SIZE:
            self.abort(
                StreamEnd.PROTOCOL_ERROR,
                f"the device asked for {request.read_size} bytes, more than the {MAX_READ_SIZE}-byte limit",
            )
            return
        try:
            sent = clamp_read(request, size)
        except ValueError:
            self.abort(
                StreamEnd.PROTOCOL_ERROR,
                f"the device asked for offset {request.seek_addr}, past the end of the {size}-byte image",
            )
            return
        payload = self.image.read(request.seek_addr, sent)  # a view of the image's buffer, no copy
        header = reply_header(request, sent, self.image.range_sum(request.seek_addr, sent))
        self.requests += 1
        self.bytes_served += len(payload)
        self.furthest = max(self.furthest, request.seek_addr + sent)
        if self.all_size:
            self._served_after_all_size += len(payload)
        self._quiet_timer = self.clock.callLater(DEVICE_QUIET_AFTER, self._device_quiet)
        self._report_progress()
        self._tcp.write(header + payload)  # one write; bytes + memoryview -> bytes (may pause us)

    def _device_quiet(self) -> None:
        self._quiet_timer = None
        if self._result is None and self.activity is None:
            self.activity = DeviceActivity.QUIET
            self._report_progress()

    def _cancel_quiet(self) -> None:
        if self._quiet_timer is not None and self._quiet_timer.active():
            self._quiet_timer.cancel()
        self._quiet_timer = None

    # -- progress ------------------------------------------------------------------------------
    def progress(self) -> StreamProgress:
        now = self.clock.seconds()
        samples = self._rate_samples
        if not samples or now - samples[-1][0] >= RATE_SAMPLE_INTERVAL:
            samples.append((now, self.bytes_served))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        span = now - samples[0][0]
        rate = (self.bytes_served - samples[0][1]) / span if span > 0 else 0.0
        return StreamProgress(
            bytes_served=self.bytes_served,
            image_size=self.image.size,
            furthest=self.furthest,
            all_size=self.all_size,
            requested_since_all_size=self._served_after_all_size,
            device_percent=self.device_percent,
            rate=rate,
            rate_span=span,
            activity=self.activity,
            ok=self._ok,
        )

    def _report_progress(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress())

    # -- timers --------------------------------------------------------------------------------
    def _arm_timer(self, seconds: float) -> None:
        self._cancel_timer()
        self._timer = self.clock.callLater(seconds, self._receive_timed_out)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _receive_timed_out(self) -> None:
        self._timer = None
        if self._headers_seen == 0 and self.bad_headers == 0 and self._timeouts == 0:
            self.abort(
                StreamEnd.TIMEOUT,
                f"the device sent nothing within {self.settings.first_header_timeout:g} s of connecting",
            )
            return
        self._timeouts += 1
        self.receive_timeouts += 1
        log.info(
            "OTA receive timeout {count}/{limit}",
            count=self._timeouts,
            limit=self.settings.max_receive_timeouts,
            **self.log_context,
        )
        if self._timeouts > self.settings.max_receive_timeouts:
            seconds = f"{self._timeouts} receive timeouts of {self.settings.receive_timeout:g} s in a row"
            if self._paused:
                message = f"the device stopped reading our replies: {seconds}"
            else:
                message = f"the device went silent: {seconds}"
            self.abort(StreamEnd.TIMEOUT, message)
            return
        self._arm_timer(self.settings.receive_timeout)

    # -- ending --------------------------------------------------------------------------------
    def _make_result(self, end: StreamEnd, message: str) -> StreamResult:
        return StreamResult(
            end=end,
            message=message,
            bytes_served=self.bytes_served,
            requests=self.requests,
            all_size=self.all_size,
            bad_headers=self.bad_headers,
            device_percent=self.device_percent,
            stop_sent=self.stop_sent,
            receive_timeouts=self.receive_timeouts,
        )

    def _finish(self, end: StreamEnd, message: str) -> None:
        """The device reported the end: close without STOP."""
        log.info("OTA stream ended: {message}", message=message, **self.log_context)
        self._result = self._make_result(end, message)
        self._close()

    def abort(self, end: StreamEnd = StreamEnd.ABORTED, message: str = "stopped by the app") -> None:
        """End the session from the app side: STOP on the wire, then close."""
        if self._result is not None:
            return
        if self.connected:
            self._tcp.write(STOP_BYTES)
            self.stop_sent = True
        log.warn("OTA stream stopped: {message}", message=message, **self.log_context)
        self._result = self._make_result(end, message)
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        self._cancel_quiet()
        if not self.connected:
            return
        self._tcp.unregisterProducer()
        self._tcp.loseConnection()
        if self._close_timer is None:
            # A peer that stopped reading would keep the STOP in our buffer for ever.
            self._close_timer = self.clock.callLater(CLOSE_GRACE, self._force_close)

    def _force_close(self) -> None:
        self._close_timer = None
        if self.connected:
            self._tcp.abortConnection()

    def _cancelled(self, d: defer.Deferred[StreamResult]) -> None:
        self.abort(StreamEnd.ABORTED, "cancelled")


class OtaStreamFactory(Factory):
    """Builds one :class:`OtaStreamProtocol` per connection with the given arguments."""

    noisy = False  # no "Starting factory" line per connection

    def __init__(self, **protocol_kwargs: Any) -> None:
        self.protocol_kwargs = protocol_kwargs

    def buildProtocol(self, addr: Any) -> OtaStreamProtocol:
        protocol = OtaStreamProtocol(**self.protocol_kwargs)
        protocol.factory = self
        return protocol
