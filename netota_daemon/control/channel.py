"""The control endpoint's connections: what a peer can send before the API sees a request, and how
many it can hold open.

:class:`ControlChannel` is Twisted's ``HTTPChannel`` with bounds: input that is not HTTP (a TLS
hello, a CTP frame) is answered with a JSON 400 and closed on its first bytes; a request line or
header over :data:`MAX_LINE` bytes, more than :data:`MAX_HEADERS` headers, a malformed request or
a body over the API's limit get a JSON 400 or 413 and the connection closes; a request that does not
arrive whole within the idle timeout gets a JSON 408 (a half-open or trickling peer), and a
connection idle that long between requests is closed. Responses that stream (event streams) are
not timed out: their own keep-alives and reader bounds apply.

:class:`ControlSite` keeps at most ``max_connections`` connections: when a new one would pass the
limit, the connection idle the longest (no request in progress) is closed to make room, so a
client always gets in while connections are only held open; when every connection is busy, the
new one is answered 503 and closed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from netota_daemon.control.errors import ApiError, raw_response
from netota_daemon.control.json_body import MAX_BODY

log = Logger()

#: The longest request line or header line, in bytes.
MAX_LINE = 8192
#: Request line and headers together.
MAX_HEAD = 16384
MAX_HEADERS = 64
#: Connections an event stream may not take: kept for ordinary requests (the CLI's).
STREAM_RESERVE = 8

_METHOD = re.compile(rb"[A-Z]{1,16}")


class ControlRequest(Request):
    """A request whose body is bounded while it arrives (a chunked body has no length up front).
    ``body_limit`` is the API's :data:`MAX_BODY`, or the upload limit for a firmware upload."""

    _received = 0
    body_limit = MAX_BODY

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.body_limit:
            channel = self.channel
            if isinstance(channel, ControlChannel):
                channel.refuse(too_large(self.body_limit))
            return
        super().handleContentChunk(data)  # type: ignore[no-untyped-call]


def too_large(limit: int) -> ApiError:
    return ApiError(413, "too_large", f"the request body is larger than {limit} bytes")


class ControlChannel(HTTPChannel):
    MAX_LENGTH = MAX_LINE
    totalHeadersSize = MAX_HEAD
    maxHeaders = MAX_HEADERS

    site: ControlSite

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._screening = True  # the next bytes start a request: check they look like one
        self._prefix = b""
        self._request_deadline: IDelayedCall | None = None
        self._busy = False  # a request is being answered
        self._refused = False
        self._abort: IDelayedCall | None = None
        self.last_activity = 0.0

    # ----- life

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.last_activity = self.site.clock.seconds()
        self.site.channel_opened(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self._abort is not None and self._abort.active():
            self._abort.cancel()
        self.site.channel_closed(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]

    @property
    def idle(self) -> bool:
        """No request being answered (an incomplete one counts as idle: nothing waits on it)."""
        return not self._busy

    def evict(self) -> None:
        """Close to make room for a new connection."""
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.loseConnection()

    # ----- input

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        self.last_activity = self.site.clock.seconds()
        if not self._busy and self._request_deadline is None:
            # A request begins: it must arrive whole in time (more bytes don't buy more time).
            self.setTimeout(None)  # type: ignore[no-untyped-call]
            self._request_deadline = self.callLater(self.site.idle_timeout, self._too_slow)  # type: ignore[no-untyped-call]
        if self._screening and not self._screen(data):
            return
        super().dataReceived(data)  # type: ignore[no-untyped-call]

    def _screen(self, data: bytes) -> bool:
        """False (and refused) if the first bytes of a request can't be an HTTP request line."""
        self._prefix = (self._prefix + data[:32]).lstrip(b"\r\n")
        match = _METHOD.match(self._prefix)
        token = match.group() if match else b""
        rest = self._prefix[len(token) :]
        if rest:
            if token and rest[:1] == b" ":
                self._screening, self._prefix = False, b""
                return True
            self.refuse(ApiError(400, "not_http", "this is netota's HTTP control API; that is not an HTTP request"))
            return False
        if len(self._prefix) > 16:
            self.refuse(ApiError(400, "not_http", "this is netota's HTTP control API; that is not an HTTP request"))
            return False
        return True

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(ApiError(400, "bad_request", f"a request line or header is longer than {MAX_LINE} bytes"))

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's one place for a request it can't parse (bad request line, bad or too many
        # headers, a bad length): a JSON answer like every other refusal, not a bare status line.
        self.refuse(ApiError(400, "bad_request", "a malformed HTTP request (request line, headers or length)"))

    def allHeadersReceived(self) -> None:
        request = self.requests[-1] if self.requests else None
        limit = self.site.body_limit(self._command, self._path)  # this request's line, as HTTPChannel parsed it
        if isinstance(request, ControlRequest):
            request.body_limit = limit
        super().allHeadersReceived()  # type: ignore[no-untyped-call]
        if self.length is not None and self.length > limit:
            self.refuse(too_large(limit))

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        self._busy = True
        super().allContentReceived()  # type: ignore[no-untyped-call]

    def requestDone(self, request: Request) -> None:
        self._busy = False
        self._screening, self._prefix = True, b""
        self.last_activity = self.site.clock.seconds()
        super().requestDone(request)  # type: ignore[no-untyped-call]
        if not self._closing():
            self.setTimeout(self.site.idle_timeout)  # type: ignore[no-untyped-call]  # idle until the next request

    def _too_slow(self) -> None:
        self._request_deadline = None
        self.refuse(
            ApiError(408, "request_timeout", f"the request did not arrive whole within {self.site.idle_timeout:g} s")
        )

    def _cancel_deadline(self) -> None:
        if self._request_deadline is not None and self._request_deadline.active():
            self._request_deadline.cancel()
        self._request_deadline = None

    def refuse(self, error: ApiError) -> None:
        """Answer ``error`` as a whole JSON response and close (the request can't be served)."""
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        transport: Any = self.transport  # a TCP or UNIX transport: it can abort
        if self._closing():
            return
        transport.write(raw_response(error))
        self.loseConnection()  # type: ignore[no-untyped-call]
        # A peer that does not read the answer does not keep the connection either.
        self._abort = self.callLater(self.abortTimeout, transport.abortConnection)  # type: ignore[no-untyped-call]

    def _closing(self) -> bool:
        return self.transport is None or bool(getattr(self.transport, "disconnecting", False))


class _Refuser(Protocol):
    """Answers 503 at once and closes: every connection is busy."""

    def __init__(self, error: ApiError) -> None:
        self.error = error

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(raw_response(self.error))
        self.transport.loseConnection()


class ControlSite(Site):
    """The control API's HTTP site, with its connection bounds."""

    protocol = ControlChannel  # type: ignore[assignment]
    requestFactory = ControlRequest
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        idle_timeout: float,
        max_connections: int,
        upload_limit: Callable[[bytes, bytes], int | None] = lambda method, path: None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=clock)  # type: ignore[no-untyped-call]
        self._upload_limit = upload_limit
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.channels: set[ControlChannel] = set()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= self.max_connections:
            idle = [c for c in self.channels if c.idle]
            if not idle:
                log.warn("control: {count} connections, all busy: refusing one", count=len(self.channels))
                return _Refuser(
                    ApiError(503, "too_many_connections", f"{len(self.channels)} connections are open and busy")
                )
            victim = min(idle, key=lambda c: c.last_activity)
            self.channels.discard(victim)
            victim.evict()
        return super().buildProtocol(addr)  # type: ignore[no-untyped-call]

    def body_limit(self, method: bytes, path: bytes) -> int:
        """The largest body a request with this method and path may carry: :data:`MAX_BODY`, or
        what ``upload_limit`` allows for an upload."""
        limit = self._upload_limit(method, path)
        return MAX_BODY if limit is None else limit

    def channel_opened(self, channel: ControlChannel) -> None:
        self.channels.add(channel)

    def channel_closed(self, channel: ControlChannel) -> None:
        self.channels.discard(channel)
