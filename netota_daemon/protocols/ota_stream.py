"""The app side of the OTA data stream (TCP 3335): the device asks, the app answers.

The device sends only 20-byte ``net_ota`` headers. This protocol:

- answers each valid READ exactly once with the echoed header (``read_size`` = bytes sent,
  ``all_size`` 0, checksum over header and payload) and the bytes, in one ``write``. The bytes come
  from the shared, in-memory :class:`~netota_daemon.firmware.FirmwareImage` (read once when the job
  opened it): no file read per request and no copy of the image; the one copy per reply is the
  concatenation of header and window (at most 42 KiB) that Twisted's transports need, as they accept
  ``bytes`` only;
- skips headers whose checksum is wrong;
- ends the session with a protocol error (STOP, then close) on a READ of 0 bytes, of more than
  42 KiB, or starting at or past the end of the image; a READ running past the end is clamped;
- records the all_size notice (the point of no return in phase 2) and never answers it; optionally
  answers the final 100 % notice with a 20-byte echo (PROTOCOL.md decision, off by default);
- counts receive timeouts: the timer restarts on every header, and more than ``max_receive_timeouts``
  consecutive timeouts end the session (STOP, then close);
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
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.firmware import FirmwareImage
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


class StreamEnd(str, enum.Enum):
    OK = "ok"  # the device reported success
    ERR = "err"  # the device reported failure
    SAME = "same"  # the device already runs this image (older firmware's answer)
    DROPPED = "dropped"  # the connection closed before any result
    TIMEOUT = "timeout"  # no header for too long
    PROTOCOL_ERROR = "protocol_error"  # a request the app can't serve, or garbage
    ABORTED = "aborted"  # the app stopped it (cancel / abort)


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


@dataclass(frozen=True)
class StreamProgress:
    bytes_served: int
    total_bytes: int
    percent: float
    device_percent: int
    rate: float
    all_size: int


@dataclass(frozen=True)
class StreamSettings:
    """The waits of one session, in seconds."""

    first_header_timeout: float = 30.0
    receive_timeout: float = 5.0
    max_receive_timeouts: int = 10
    echo_final_notice: bool = False


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
        self._close_timer: IDelayedCall | None = None
        self._timeouts = 0
        self._headers_seen = 0
        self.connected = False
        self.bytes_served = 0
        self.requests = 0
        self.bad_headers = 0
        self.all_size = 0
        self.device_percent = 0
        self.stop_sent = False
        self._served_after_all_size = 0
        self._rate_samples: deque[tuple[float, int]] = deque()

    # -- connection ----------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        self._arm_timer(self.settings.first_header_timeout)
        log.debug("OTA stream open", **self.log_context)

    def dataReceived(self, data: bytes) -> None:
        if self._result is not None:
            return  # closing: the session is over
        for header in self._reader.feed(data):
            if self._result is not None:
                return
            self._timeouts = 0
            self._arm_timer(self.settings.receive_timeout)
            self._header_received(header)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.connected = False
        self._cancel_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        self._close_timer = None
        if self._result is None:
            message = reason.getErrorMessage() if reason is not None else "closed"
            self._result = self._make_result(StreamEnd.DROPPED, f"the device closed the OTA connection ({message})")
        if not self.closed.called:
            self.closed.callback(None)
        if not self.done.called:
            self.done.callback(self._result)

    # -- headers -------------------------------------------------------------------------------
    def _header_received(self, header: OtaHeader) -> None:
        if not header.is_valid():
            self.bad_headers += 1
            log.warn(
                "OTA header with a bad checksum skipped (sum {got:#x}, expected {expected:#x})",
                got=header.sum_check,
                expected=header.computed_sum(),
                **self.log_context,
            )
            return
        self._headers_seen += 1
        status = header.status
        if status == Status.READ:
            self.device_percent = header.percent
            self._serve(header)
        elif status == Status.OK:
            self.device_percent = header.percent
            self._finish(StreamEnd.OK, "the device reported success (OK)")
        elif status == Status.ERR:
            self._finish(StreamEnd.ERR, "the device reported failure (ERR)")
        elif status == Status.SAME:
            self._finish(StreamEnd.SAME, "the device already runs this firmware (SAME)")
        elif status == Status.DOING:
            self._notice(header)
        else:
            log.warn(
                "OTA header with unexpected status {status} ignored", status=header.status_name(), **self.log_context
            )

    def _notice(self, header: OtaHeader) -> None:
        self.device_percent = header.percent
        if header.all_size:
            # The point of no return in phase 2. Never answer it (PROTOCOL.md): the device would
            # write the reply past the end of its receive buffer.
            first = not self.all_size
            self.all_size = header.all_size
            self._served_after_all_size = 0
            log.info("OTA all_size notice: {all_size} bytes", all_size=header.all_size, **self.log_context)
            if first and self.on_all_size is not None:
                self.on_all_size(header.all_size)
            self._report_progress()
        elif header.percent >= 100:
            log.debug("OTA final 100 % notice", **self.log_context)
            if self.settings.echo_final_notice:
                self.transport.write(notice_echo(header))
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
        self.transport.write(header + payload)  # one write; bytes + memoryview -> bytes
        self.requests += 1
        self.bytes_served += len(payload)
        if self.all_size:
            self._served_after_all_size += len(payload)
        self._report_progress()

    # -- progress ------------------------------------------------------------------------------
    def progress(self) -> StreamProgress:
        now = self.clock.seconds()
        samples = self._rate_samples
        if not samples or now - samples[-1][0] >= RATE_SAMPLE_INTERVAL:
            samples.append((now, self.bytes_served))
        while len(samples) > 2 and now - samples[0][0] > RATE_WINDOW:
            samples.popleft()
        elapsed = now - samples[0][0]
        rate = (self.bytes_served - samples[0][1]) / elapsed if elapsed > 0 else 0.0
        if self.all_size:
            total, counted = self.all_size, self._served_after_all_size
        else:
            total, counted = self.image.size, self.bytes_served
        percent = min(100.0, 100.0 * counted / total) if total else 0.0
        return StreamProgress(self.bytes_served, total, percent, self.device_percent, rate, self.all_size)

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
        log.info(
            "OTA receive timeout {count}/{limit}",
            count=self._timeouts,
            limit=self.settings.max_receive_timeouts,
            **self.log_context,
        )
        if self._timeouts > self.settings.max_receive_timeouts:
            self.abort(
                StreamEnd.TIMEOUT,
                f"the device went silent: {self._timeouts} receive timeouts of "
                f"{self.settings.receive_timeout:g} s in a row",
            )
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
            self.transport.write(STOP_BYTES)
            self.stop_sent = True
        log.warn("OTA stream stopped: {message}", message=message, **self.log_context)
        self._result = self._make_result(end, message)
        self._close()

    def _close(self) -> None:
        self._cancel_timer()
        if not self.connected:
            return
        self.transport.loseConnection()
        if self._close_timer is None:
            # A peer that stopped reading would keep the STOP in our buffer for ever.
            self._close_timer = self.clock.callLater(CLOSE_GRACE, self._force_close)

    def _force_close(self) -> None:
        self._close_timer = None
        if self.connected:
            self.transport.abortConnection()

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
