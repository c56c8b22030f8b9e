"""The app side of CTP (TCP 3333): requests matched to replies by topic, unsolicited NOTIFYs
tolerated at any time, error replies (``errno``) raised as typed errors, and a keep-alive while a
session is held.

A device may push any unsolicited frame at any time; they are counted, and the last one of each
topic is kept for at most :data:`MAX_UNSOLICITED_TOPICS` topics (a device inventing a new topic per
frame can't grow our memory), and logged at a bounded rate. The keep-alive runs at the configured
interval, or faster when the device announces a short idle timeout (``KEEP_ALIVE_INTERVAL``
``{"timeout": ms}``): a third of it, never under :data:`MIN_KEEPALIVE_INTERVAL`.

The framing lives in :mod:`netota_daemon.wire.ctp`; this module only moves frames between the
transport and the callers' Deferreds.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.protocols.log_limit import LogLimiter
from netota_daemon.protocols.transport import StreamTransport
from netota_daemon.wire import ctp
from netota_daemon.wire.ctp import CtpDecoder, CtpFrame, CtpProtocolError

log = Logger()

#: The app version sent in APP_ACCESS; the phase-2 loader answers 20906 to any framed request.
APP_VERSION = "20906"
APP_TYPE_ANDROID = "0"

#: Device error numbers (SDK ``ctp_server.h``), for messages.
ERRNO_NAMES = {
    0: "NO_ERR",
    1: "SDCARD",
    2: "SD_OFFLINE",
    3: "ACCESS_RFU (another client has access)",
    4: "REQUEST",
    5: "VER_UMATCH",
    6: "NO_TOPIC (unknown topic)",
    7: "IN_USB",
    8: "IN_VIDEO",
    9: "IN_BROWSE",
    10: "IN_PARKING",
    11: "OPEN_FILE",
    12: "SYS_EXCEP",
    13: "SET_PRARM",
    14: "NET_ERR",
    15: "PULL_OFFLINE",
    16: "PULL_NOSUPPORT",
    17: "RT_OPEN_FAIL",
}
ERRNO_ACCESS_REFUSED = 3

KEEPALIVE_TOPIC = "CTP_KEEP_ALIVE"
#: The device's announcement of its idle timeout (ms): the session is dropped after that long without a frame.
KEEPALIVE_INTERVAL_TOPIC = "KEEP_ALIVE_INTERVAL"
#: The keep-alive is never sent more often than this, whatever the device announces.
MIN_KEEPALIVE_INTERVAL = 1.0
#: Unsolicited frames: the last of each topic is kept for at most this many topics.
MAX_UNSOLICITED_TOPICS = 32


class CtpError(Exception):
    """Base of every CTP client error."""


class CtpErrorReply(CtpError):
    """The device answered a request with ``errno``."""

    def __init__(self, topic: str, errno: int, msg: str = "") -> None:
        name = ERRNO_NAMES.get(errno, "unknown error")
        detail = f" ({msg})" if msg else ""
        super().__init__(f"the device refused {topic}: errno {errno} {name}{detail}")
        self.topic = topic
        self.errno = errno
        self.msg = msg


class CtpAccessRefused(CtpErrorReply):
    """errno 3: another client holds the device's single CTP session."""


class CtpConnectionLost(CtpError):
    """The CTP connection closed while a request waited for its reply."""


class CtpReplyTimeout(CtpError):
    """A request got no reply in time."""


class CtpClientProtocol(Protocol):
    """One CTP session. Create it through :class:`CtpClientFactory` (or directly in tests)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._decoder = CtpDecoder()
        self._pending: dict[str, deque[defer.Deferred[CtpFrame]]] = defaultdict(deque)
        self._keepalive: LoopingCall | None = None
        self._keepalive_wanted: float | None = None  # the interval asked for by start_keepalive
        self.device_idle_timeout: float | None = None  # seconds, from the device's KEEP_ALIVE_INTERVAL
        self.unsolicited: dict[str, CtpFrame] = {}  # the last unsolicited frame of each (bounded) topic
        self.unsolicited_count = 0
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.connected = False
        self.log_context: dict[str, Any] = {}
        self._limiter: LogLimiter | None = None

    @property
    def _tcp(self) -> StreamTransport:
        assert self.transport is not None
        return self.transport  # type: ignore[return-value]  # a TCP transport

    # -- transport side -------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        self._limiter = LogLimiter(self.clock, log, self.log_context)

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except CtpProtocolError as e:
            log.warn("CTP protocol error: {error}", error=str(e), **self.log_context)
            self._fail_pending(e)
            self._tcp.abortConnection()
            return
        for frame in frames:
            self._frame_received(frame)

    def _frame_received(self, frame: CtpFrame) -> None:
        if frame.topic == KEEPALIVE_INTERVAL_TOPIC:
            self._device_announced_timeout(frame)
        waiting = self._pending.get(frame.topic)
        if not waiting:
            self.unsolicited_count += 1
            if frame.topic in self.unsolicited or len(self.unsolicited) < MAX_UNSOLICITED_TOPICS:
                self.unsolicited[frame.topic] = frame
            if self._limiter is not None:
                self._limiter.warn(
                    "unsolicited",
                    "unsolicited CTP frames",
                    "CTP unsolicited {topic}",
                    topic=frame.topic[:64],
                )
            return
        d = waiting.popleft()
        errno = frame.errno
        if errno:
            cls = CtpAccessRefused if errno == ERRNO_ACCESS_REFUSED else CtpErrorReply
            d.errback(cls(frame.topic, errno, str(frame.param.get("msg", ""))))
        else:
            d.callback(frame)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self._stop_keepalive()
        if self._limiter is not None:
            self._limiter.flush()
        message = reason.getErrorMessage() if reason is not None else "closed"
        self._fail_pending(CtpConnectionLost(f"the CTP connection closed: {message}"))
        if not self.closed.called:
            self.closed.callback(None)

    def _fail_pending(self, exc: Exception) -> None:
        pending = [d for queue in self._pending.values() for d in queue]
        self._pending.clear()
        for d in pending:
            if not d.called:
                d.errback(exc)

    # -- caller side ----------------------------------------------------------------------------
    def request(self, topic: str, op: str, timeout: float, **param: str) -> defer.Deferred[CtpFrame]:
        """Send ``{"op":op,"param":param}`` on ``topic``; fires with the reply frame of that topic,
        or fails with :class:`CtpErrorReply`, :class:`CtpReplyTimeout` or :class:`CtpConnectionLost`."""
        if not self.connected:
            return defer.fail(CtpConnectionLost(f"the CTP connection is closed; can't send {topic}"))
        queue = self._pending[topic]

        def forget(d: defer.Deferred[CtpFrame]) -> None:
            if d in queue:
                queue.remove(d)

        d: defer.Deferred[CtpFrame] = defer.Deferred(forget)
        queue.append(d)
        self._tcp.write(ctp.request(topic, op, **param))

        def timed_out(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):  # type: ignore[no-untyped-call]
                raise CtpReplyTimeout(f"no reply to {topic} within {timeout:g} s")
            return failure

        d.addTimeout(timeout, self.clock)
        d.addErrback(timed_out)
        return d

    def app_access(self, timeout: float, version: str = APP_VERSION) -> defer.Deferred[CtpFrame]:
        """APP_ACCESS, which must be the session's first frame; fires with the device's echo."""
        return self.request("APP_ACCESS", "PUT", timeout, type=APP_TYPE_ANDROID, ver=version)

    def net_ota_single(self, timeout: float) -> defer.Deferred[str]:
        """NET_OTA_SINGLE ``{"status":"1"}``; fires with the device's status ("1": port 3335 is open)."""

        def status(reply: CtpFrame) -> str:
            return str(reply.param.get("status", ""))

        return self.request("NET_OTA_SINGLE", "PUT", timeout, status="1").addCallback(status)

    def start_keepalive(self, interval: float) -> None:
        """Send CTP_KEEP_ALIVE every ``interval`` seconds until the session ends, or more often when
        the device announced a short idle timeout (replies, if any, are accepted as unsolicited
        frames: the loader never answers them). ``interval`` 0 turns it off."""
        self._keepalive_wanted = interval if interval > 0 else None
        self._restart_keepalive()

    @property
    def keepalive_interval(self) -> float | None:
        """The interval the keep-alive runs at (None: off)."""
        wanted = self._keepalive_wanted
        if wanted is None:
            return None
        if self.device_idle_timeout is not None:
            return min(wanted, max(MIN_KEEPALIVE_INTERVAL, self.device_idle_timeout / 3))
        return wanted

    def _device_announced_timeout(self, frame: CtpFrame) -> None:
        try:
            milliseconds = float(str(frame.param.get("timeout", "")))
        except ValueError:
            return
        if not 0 < milliseconds < float("inf"):
            return
        before = self.keepalive_interval
        self.device_idle_timeout = milliseconds / 1000.0
        if self._keepalive is not None and self.keepalive_interval != before:
            self._restart_keepalive()

    def _restart_keepalive(self) -> None:
        self._stop_keepalive()
        interval = self.keepalive_interval
        if interval is not None and self.connected:
            self._keepalive = LoopingCall(self._send_keepalive)
            self._keepalive.clock = self.clock
            self._keepalive.start(interval, now=False)

    def _send_keepalive(self) -> None:
        if self.connected:
            self._tcp.write(ctp.encode_frame(KEEPALIVE_TOPIC, {"op": "PUT", "param": {}}))

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            if self._keepalive.running:
                self._keepalive.stop()
            self._keepalive = None

    def close(self, grace: float | None = None) -> defer.Deferred[None]:
        """End the session; fires once the connection is closed. With ``grace``, a connection that
        is not closed within that many seconds is aborted."""
        self._keepalive_wanted = None
        self._stop_keepalive()
        if self.connected:
            self._tcp.loseConnection()
            if grace is not None and not self.closed.called:
                timer = self.clock.callLater(grace, self._abort_if_open)

                def stop_timer(result: None) -> None:
                    if timer.active():
                        timer.cancel()
                    return result

                self.closed.addBoth(stop_timer)
        return self.closed

    def _abort_if_open(self) -> None:
        if self.connected:
            self._tcp.abortConnection()


class CtpClientFactory(Factory):
    """Builds :class:`CtpClientProtocol` instances sharing one clock and log context."""

    noisy = False  # no "Starting factory" line per connection

    def __init__(self, clock: IReactorTime, log_context: dict[str, Any] | None = None) -> None:
        self.clock = clock
        self.log_context = dict(log_context or {})

    def buildProtocol(self, addr: Any) -> CtpClientProtocol:
        protocol = CtpClientProtocol(self.clock)
        protocol.log_context = self.log_context
        protocol.factory = self
        return protocol
