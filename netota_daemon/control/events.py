"""The event streams: ``GET /v1/events`` (every job) and ``GET /v1/jobs/ID/events`` (one job), as
server-sent events fed by the job queue's fan-out.

Each open stream is an :class:`EventStream`, the response's push producer, with bounded memory for a
reader that stops reading. :class:`EventStreams` opens them, keeps count (a limit leaves connections
free for ordinary requests), and ends them all on shutdown: every stream sees each running job's
final ``outcome`` event, then ``shutdown``, then its end.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import STREAMING, ApiRequest, HttpRequest, Route, Streaming
from netota_daemon.daemon.jobs import JobQueue, QueueEvent
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.engine.events import EventPublisher

log = Logger()

KEEPALIVE_SECONDS = 15.0
#: Bytes of events that must be sent (phase, state, outcome) a stream may write while its reader
#: does not read; past it the reader is cut off, so a stalled reader never grows the daemon.
MAX_UNREAD_BYTES = 1024 * 1024
#: Event types of which a stalled reader gets only the latest of each job.
_LATEST_ONLY = ("progress", "waiting")


@implementer(IPushProducer)
class EventStream:
    """One open server-sent event stream; ``accept`` decides which queue events it carries and
    ``last`` whether an event ends the stream.

    It is the response's push producer: while the client does not read (a ``netota watch`` left in
    the background), only the latest progress and waiting events of each job are held, so a stalled
    reader costs a bounded amount of memory; phase, state and outcome events are always written, up
    to MAX_UNREAD_BYTES, after which the connection is dropped.
    """

    def __init__(
        self,
        request: HttpRequest,
        accept: Callable[[QueueEvent], bool],
        last: Callable[[QueueEvent], bool],
        clock: IReactorTime,
    ) -> None:
        self.request = request
        self._accept = accept
        self._last = last
        self._closed = False
        self._paused = False
        self._unread = 0  # bytes written while paused
        self._held: dict[tuple[str, str], QueueEvent] = {}  # (job, type) -> its latest while paused
        self._unsubscribe: Callable[[], None] | None = None
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self.on_close: Callable[[EventStream], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def open(self, subscribe: Callable[[Callable[[QueueEvent], None]], Callable[[], None]]) -> None:
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        self.request.setHeader(b"cache-control", b"no-cache")
        self.request.registerProducer(self, True)
        self._unsubscribe = subscribe(self.deliver)
        self.request.notifyFinish().addBoth(lambda _: self._cleanup())
        self._keepalive.start(KEEPALIVE_SECONDS, now=False)

    def send(self, event_type: str, data: Any) -> None:
        if self._closed:
            return
        payload = json.dumps(data, sort_keys=True)
        chunk = f"event: {event_type}\ndata: {payload}\n\n".encode()
        if self._paused:
            self._unread += len(chunk)
            if self._unread > MAX_UNREAD_BYTES:
                log.warn("event stream: the reader has not read {count} bytes: closing it", count=self._unread)
                self.abort()
                return
        self.request.write(chunk)

    def deliver(self, event: QueueEvent) -> None:
        if self._closed or not self._accept(event):
            return
        job = str(event.get("job", ""))
        if self._paused and event["type"] in _LATEST_ONLY:
            self._held[(job, event["type"])] = event
            return
        for kind in _LATEST_ONLY:  # a phase, state or outcome makes them stale
            self._held.pop((job, kind), None)
        self.send(event["type"], event)
        if self._last(event):
            self.close()

    # IPushProducer: the transport's buffer is full / drained / the connection is gone.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._unread = 0
        held, self._held = self._held, {}
        for event in held.values():
            self.send(event["type"], event)

    def stopProducing(self) -> None:
        self._cleanup()

    def _ping(self) -> None:
        if not self._closed and not self._paused:
            self.request.write(b": keep-alive\n\n")

    def close(self) -> None:
        """End the stream cleanly (the client sees a complete response)."""
        if self._closed:
            return
        self._cleanup()
        self.request.unregisterProducer()
        self.request.finish()

    def abort(self) -> None:
        """Drop the connection (a reader that does not read)."""
        self._cleanup()
        transport = getattr(self.request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def _cleanup(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._held.clear()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._keepalive.running:
            self._keepalive.stop()
        if self.on_close is not None:
            self.on_close(self)


class EventStreams:
    """The event-stream endpoints and every open stream; at most ``max_streams`` at once."""

    def __init__(self, queue: JobQueue, registry: DeviceRegistry, clock: IReactorTime, max_streams: int) -> None:
        self.queue = queue
        self.registry = registry
        self.clock = clock
        self.max_streams = max_streams
        self.open_streams: set[EventStream] = set()
        #: Told of each stream once it is open (tests wait on it for a client to follow).
        self.opened: EventPublisher[EventStream] = EventPublisher()

    def routes(self) -> list[Route]:
        return [
            Route(("events",), {"GET": self.all_events}),
            Route(("jobs", "{job}", "events"), {"GET": self.job_events}),
        ]

    def __len__(self) -> int:
        return len(self.open_streams)

    def _open(
        self,
        request: HttpRequest,
        accept: Callable[[QueueEvent], bool],
        last: Callable[[QueueEvent], bool],
        subscribe: Callable[[Callable[[QueueEvent], None]], Callable[[], None]] | None = None,
    ) -> EventStream:
        stream = EventStream(request, accept, last, self.clock)
        self.open_streams.add(stream)
        stream.on_close = self.open_streams.discard
        stream.open(subscribe or self.queue.subscribe)
        return stream

    def open_stream(
        self,
        request: HttpRequest,
        accept: Callable[[QueueEvent], bool],
        last: Callable[[QueueEvent], bool],
        subscribe: Callable[[Callable[[QueueEvent], None]], Callable[[], None]] | None = None,
    ) -> EventStream:
        """A stream for another endpoint group (a batch's), fed by ``subscribe`` (default: the job
        queue's events), counted against the limit and ended on shutdown with the others."""
        self._check_room()
        stream = self._open(request, accept, last, subscribe)
        self.opened.publish(stream)
        return stream

    def _check_room(self) -> None:
        if len(self.open_streams) >= self.max_streams:
            raise ApiError(
                503,
                "too_many_streams",
                f"{len(self.open_streams)} event streams are open, the most this daemon serves at once",
            )

    def _ends_stream(self, event: QueueEvent) -> bool:
        # While the daemon shuts down, a job's stream stays open past its outcome for the shutdown event.
        return event.get("type") == "outcome" and not self.queue.stopping

    async def job_events(self, request: ApiRequest) -> Streaming:
        request.query(())
        job_id = request.params["job"]
        snapshot = await self.queue.get(job_id)  # 404 before the stream opens
        # The snapshot is made from memory as its Deferred fires, and this continues in the same
        # call: no event can fall between the snapshot and the stream's subscription.
        self._check_room()
        stream = self._open(
            request.request,
            accept=lambda e: e.get("job") == job_id,
            last=self._ends_stream,
        )
        stream.send("job", {"type": "job", "job": job_id, "device": snapshot["device"], "snapshot": snapshot})
        if not self.queue.is_active(job_id):
            stream.close()
        self.opened.publish(stream)
        return STREAMING

    def all_events(self, request: ApiRequest) -> Streaming:
        request.query(())
        self._check_room()
        stream = self._open(request.request, accept=lambda e: True, last=lambda e: False)
        stream.send(
            "snapshot", {"type": "snapshot", "jobs": self.queue.active_jobs(), "devices": self.registry.to_json()}
        )
        self.opened.publish(stream)
        return STREAMING

    def close_all(self, reason: str) -> None:
        """Tell every open event stream the daemon is going away, then end it."""
        for stream in list(self.open_streams):
            stream.send("shutdown", {"type": "shutdown", "message": reason})
            stream.close()
