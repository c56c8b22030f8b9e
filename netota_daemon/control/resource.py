"""``ControlResource``: the daemon's HTTP+JSON API, version 1 (see docs/control-api.md).

It translates requests into :class:`JobQueue` calls and queue errors into JSON error bodies with
4xx codes; ``.../events`` answers are server-sent event streams fed by the queue's fan-out.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import ensureDeferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from netota_daemon import __version__
from netota_daemon.daemon.jobs import JobError, JobQueue, QueueEvent
from netota_daemon.daemon.probe import DeviceProber, ProbeResult
from netota_daemon.daemon.registry import DeviceRegistry

log = Logger()

API_PREFIX = "v1"
START_FIELDS = {"device", "firmware", "options"}
CANCEL_FIELDS = {"reason"}
PROBE_FIELDS = {"devices"}
MAX_BODY = 64 * 1024
KEEPALIVE_SECONDS = 15.0
MAX_LIMIT = 1_000_000  # jobs in one listing (SQLite's LIMIT takes a 64-bit integer)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True) + "\n").encode("utf-8")


@implementer(IPushProducer)
class EventStream:
    """One open server-sent event stream; ``accept`` decides which queue events it carries and
    ``last`` whether an event ends the stream.

    It is the response's push producer: while the client does not read (a ``netota watch`` left in
    the background), only the latest progress event of each job is held, so a stalled reader costs
    a bounded amount of memory; phase, state and outcome events are always written.
    """

    def __init__(
        self,
        request: Request,
        accept: Callable[[QueueEvent], bool],
        last: Callable[[QueueEvent], bool],
        clock: IReactorTime,
    ) -> None:
        self.request = request
        self._accept = accept
        self._last = last
        self._closed = False
        self._paused = False
        self._held: dict[str, QueueEvent] = {}  # job -> its latest progress while paused
        self._unsubscribe: Callable[[], None] | None = None
        self._keepalive = LoopingCall(self._ping)
        self._keepalive.clock = clock
        self.on_close: Callable[[EventStream], None] | None = None

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
        self.request.write(f"event: {event_type}\ndata: {payload}\n\n".encode())

    def deliver(self, event: QueueEvent) -> None:
        if self._closed or not self._accept(event):
            return
        if self._paused and event["type"] == "progress":
            self._held[event["job"]] = event
            return
        self._held.pop(event.get("job", ""), None)  # a phase, state or outcome makes it stale
        self.send(event["type"], event)
        if self._last(event):
            self.close()

    # IPushProducer: the transport's buffer is full / drained / the connection is gone.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
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


class ControlResource(Resource):
    """The whole ``/v1`` tree in one leaf resource, routed on the path segments."""

    isLeaf = True

    def __init__(
        self,
        queue: JobQueue,
        registry: DeviceRegistry,
        clock: IReactorTime,
        token: str | None = None,
        prober: DeviceProber | None = None,
    ) -> None:
        super().__init__()
        self.queue = queue
        self.registry = registry
        self.clock = clock
        self.token = token
        self.prober = prober or DeviceProber(registry, clock)
        self.streams: set[EventStream] = set()
        # Set once the daemon has stopped (journal closed): a request on a connection accepted
        # before the listener closed gets 503, not an internal error.
        self.stopped = False

    # ----- plumbing

    def render(self, request: Request) -> bytes | int:
        try:
            if self.stopped:
                raise ApiError(503, "shutting_down", "the daemon has stopped")
            self._authorize(request)
            return self._route(request)
        except ApiError as e:
            return self._error(request, e)
        except JobError as e:
            return self._error(request, ApiError(e.status, e.code, e.message))
        except Exception as e:
            log.failure("control API: {method} {path} failed", method=request.method, path=request.path)
            return self._error(request, ApiError(500, "internal_error", f"internal error: {e}"))

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer TOKEN)",
                {"www-authenticate": 'Bearer realm="netota"'},
            )

    def _error(self, request: Request, error: ApiError) -> bytes:
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"content-type", b"application/json")
        return _json_bytes({"error": {"code": error.code, "message": error.message, "status": error.status}})

    def _ok(self, request: Request, data: Any, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        return _json_bytes(data)

    def _body(self, request: Request, allowed: set[str], required: set[str]) -> dict[str, Any]:
        raw = request.content.read(MAX_BODY + 1) if request.content is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, "too_large", f"the request body is larger than {MAX_BODY} bytes")
        if not raw.strip():
            if required:
                raise ApiError(
                    400, "bad_json", f"a JSON object body is required (fields: {', '.join(sorted(allowed))})"
                )
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "bad_json", f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise ApiError(
                400, "unknown_field", f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
            )
        missing = sorted(required - set(body))
        if missing:
            raise ApiError(400, "missing_field", f"missing field(s) {', '.join(missing)}")
        return body

    @staticmethod
    def _method(request: Request, allowed: tuple[str, ...]) -> str:
        method = request.method.decode("ascii", "replace").upper()
        if method == "HEAD" and "GET" in allowed:
            method = "GET"
        if method not in allowed:
            raise ApiError(
                405,
                "method_not_allowed",
                f"{method} is not allowed here (allowed: {', '.join(allowed)})",
                {"allow": ", ".join(allowed)},
            )
        return method

    def _route(self, request: Request) -> bytes | int:
        parts = [p.decode("utf-8", "replace") for p in request.postpath]
        while parts and parts[-1] == "":
            parts.pop()
        if not parts or parts[0] != API_PREFIX:
            raise ApiError(
                404, "not_found", f"no such resource {request.path.decode('utf-8', 'replace')} (the API is under /v1/)"
            )
        rest = parts[1:]
        if rest in ([], ["status"]):
            self._method(request, ("GET",))
            return self._ok(request, self._status())
        if rest == ["devices"]:
            self._method(request, ("GET",))
            return self._ok(request, {"devices": self.registry.to_json()})
        if rest == ["devices", "probe"]:
            self._method(request, ("POST",))
            return self._probe(request)
        if rest == ["jobs"]:
            method = self._method(request, ("GET", "POST"))
            if method == "POST":
                return self._start(request)
            return self._ok(request, {"jobs": self.queue.jobs(**self._list_args(request))})
        if rest == ["events"]:
            self._method(request, ("GET",))
            return self._all_events(request)
        if len(rest) >= 2 and rest[0] == "jobs":
            job_id = rest[1]
            if len(rest) == 2:
                self._method(request, ("GET",))
                return self._ok(request, {"job": self.queue.get(job_id)})
            if rest[2:] == ["cancel"]:
                self._method(request, ("POST",))
                body = self._body(request, CANCEL_FIELDS, set())
                reason = body.get("reason", "cancelled by user")
                if not isinstance(reason, str):
                    raise ApiError(400, "bad_field", "reason must be a string")
                return self._ok(request, {"job": self.queue.cancel(job_id, reason)})
            if rest[2:] == ["resume"]:
                self._method(request, ("POST",))
                self._body(request, set(), set())
                return self._ok(request, {"job": self.queue.resume(job_id)}, status=201)
            if rest[2:] == ["events"]:
                self._method(request, ("GET",))
                return self._job_events(request, job_id)
        raise ApiError(404, "not_found", f"no such resource {request.path.decode('utf-8', 'replace')}")

    # ----- handlers

    def _status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "api": API_PREFIX,
            "max_parallel": self.queue.max_parallel,
            "running": self.queue.running_count(),
            "devices": len(self.registry.names()),
        }

    def _list_args(self, request: Request) -> dict[str, Any]:
        args: dict[str, Any] = {}
        for key, values in request.args.items():
            name = key.decode("utf-8", "replace")
            value = values[-1].decode("utf-8", "replace")
            if name == "device":
                args["device"] = value
            elif name == "limit":
                try:
                    args["limit"] = int(value)
                except ValueError:
                    raise ApiError(400, "bad_query", f"limit must be an integer, not {value!r}") from None
                if not 1 <= args["limit"] <= MAX_LIMIT:
                    raise ApiError(400, "bad_query", f"limit must be between 1 and {MAX_LIMIT}")
            else:
                raise ApiError(400, "bad_query", f"unknown query parameter {name!r} (allowed: device, limit)")
        return args

    def _start(self, request: Request) -> bytes:
        body = self._body(request, START_FIELDS, {"device", "firmware"})
        for name in ("device", "firmware"):
            if not isinstance(body[name], str):
                raise ApiError(400, "bad_field", f"{name} must be a string")
        job = self.queue.start(body["device"], body["firmware"], body.get("options"))
        request.setHeader(b"location", f"/{API_PREFIX}/jobs/{job['id']}".encode())
        return self._ok(request, {"job": job}, status=201)

    def _probe(self, request: Request) -> int:
        """Answer once every named device's probe has ended (each is bounded by its http timeout)."""
        body = self._body(request, PROBE_FIELDS, set())
        names = body.get("devices")
        if names is not None:
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ApiError(400, "bad_field", "devices must be a non-empty list of device names")
            unknown = [n for n in dict.fromkeys(names) if n not in self.registry]
            if unknown:
                raise ApiError(
                    404,
                    "unknown_device",
                    f"no such device(s) {', '.join(unknown)} (known: {', '.join(self.registry.names())})",
                )
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def answer(results: dict[str, ProbeResult]) -> None:
            if gone:
                return  # the client went away; the registry has the results
            devices = []
            for name, result in results.items():
                device = self.registry.get(name).to_json()
                device["probe"] = result.to_json()  # also a busy answer, which the registry does not keep
                devices.append(device)
            request.write(self._ok(request, {"devices": devices}))
            request.finish()

        def failed(failure: Any) -> None:
            log.failure("control API: probe failed", failure)
            if not gone:
                request.write(
                    self._error(
                        request, ApiError(500, "internal_error", f"internal error: {failure.getErrorMessage()}")
                    )
                )
                request.finish()

        ensureDeferred(self.prober.probe(names)).addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _open_stream(
        self, request: Request, accept: Callable[[QueueEvent], bool], last: Callable[[QueueEvent], bool]
    ) -> EventStream:
        stream = EventStream(request, accept, last, self.clock)
        self.streams.add(stream)
        stream.on_close = self.streams.discard
        stream.open(self.queue.subscribe)
        return stream

    def _job_events(self, request: Request, job_id: str) -> int:
        snapshot = self.queue.get(job_id)  # 404 before the stream opens
        stream = self._open_stream(
            request,
            accept=lambda e: e.get("job") == job_id,
            last=lambda e: e.get("type") == "outcome",
        )
        stream.send("job", {"type": "job", "job": job_id, "device": snapshot["device"], "snapshot": snapshot})
        if not self.queue.is_active(job_id):
            stream.close()
        return NOT_DONE_YET

    def _all_events(self, request: Request) -> int:
        stream = self._open_stream(request, accept=lambda e: True, last=lambda e: False)
        stream.send(
            "snapshot", {"type": "snapshot", "jobs": self.queue.active_jobs(), "devices": self.registry.to_json()}
        )
        return NOT_DONE_YET

    def close_streams(self, reason: str) -> None:
        """Tell every open event stream the daemon is going away, then end it."""
        for stream in list(self.streams):
            stream.send("shutdown", {"type": "shutdown", "message": reason})
            stream.close()
