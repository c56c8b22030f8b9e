"""``ControlResource``: the plumbing of the ``/v1`` API. Access (the bearer token), routing on the
path segments, the bounded reading of bodies and query strings, and turning a handler's answer or
refusal into a JSON response.

Endpoint modules hand it :class:`Route` objects: a path pattern under ``/v1`` (``("jobs", "{job}")``)
and a handler per method. A handler takes an :class:`ApiRequest` and returns (or resolves to) an
:class:`Answer`, or :data:`STREAMING` when it has taken the response over (event streams). Every
refusal is an :class:`~netota_daemon.control.errors.ApiError` or a queue
:class:`~netota_daemon.daemon.jobs.JobError`; anything else is logged and answered 500.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, cast

from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from netota_daemon.control.errors import ApiError, from_refusal, json_bytes
from netota_daemon.control.json_body import MAX_BODY, BodyError, decode_json
from netota_daemon.daemon.batches import BatchError
from netota_daemon.daemon.jobs import JobError
from netota_daemon.daemon.registry import DeviceRegistry

log = Logger()

API_PREFIX = "v1"
#: Longest query string value, and most parameters, a request may carry.
MAX_QUERY_VALUE = 1024
MAX_QUERY_PARAMETERS = 16


class HttpRequest(Protocol):
    """What the API uses of a ``twisted.web`` request (typed: Twisted's own methods are not)."""

    method: bytes
    path: bytes
    prepath: list[bytes]
    postpath: list[bytes]
    args: dict[bytes, list[bytes]] | None
    content: IO[bytes] | None

    def getHeader(self, key: bytes) -> bytes | None: ...

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


@dataclass(frozen=True)
class Answer:
    """A JSON answer."""

    data: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class Streaming:
    """The handler writes and finishes the response itself."""


STREAMING = Streaming()

Handler = Callable[["ApiRequest"], "Answer | Streaming | Awaitable[Answer | Streaming]"]


@dataclass(frozen=True)
class Route:
    """``pattern``: path segments under ``/v1`` (``{name}`` matches any one segment, given to the
    handler as ``params[name]``); ``methods``: method -> handler (HEAD is answered as GET)."""

    pattern: tuple[str, ...]
    methods: dict[str, Handler]

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.pattern):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.pattern, segments, strict=True):
            if want.startswith("{") and want.endswith("}"):
                params[want[1:-1]] = got
            elif want != got:
                return None
        return params


class ApiRequest:
    """One request as a handler sees it: path parameters, checked query and body."""

    def __init__(self, request: HttpRequest, params: dict[str, str]) -> None:
        self.request = request
        self.params = params

    def query(self, allowed: Iterable[str]) -> dict[str, str]:
        """The query parameters, each given once, all in ``allowed``, UTF-8 and bounded."""
        allowed = set(allowed)
        args = self.request.args or {}
        if len(args) > MAX_QUERY_PARAMETERS:
            raise ApiError(400, "bad_query", f"more than {MAX_QUERY_PARAMETERS} query parameters")
        out: dict[str, str] = {}
        for raw_key, values in args.items():
            values = values or []
            key = _text(raw_key, "a query parameter name")
            if key not in allowed:
                shown = ", ".join(sorted(allowed)) or "none"
                raise ApiError(400, "bad_query", f"unknown query parameter {key!r} (allowed: {shown})")
            if len(values) != 1:
                raise ApiError(400, "bad_query", f"query parameter {key} is given {len(values)} times")
            value = _text(values[0], f"query parameter {key}")
            if len(value) > MAX_QUERY_VALUE:
                raise ApiError(400, "bad_query", f"query parameter {key} is longer than {MAX_QUERY_VALUE} characters")
            out[key] = value
        return out

    def body(self, allowed: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
        """The body as a JSON object with only ``allowed`` fields and every ``required`` one; an empty
        body is ``{}`` when nothing is required. Decoded by the bounded decoder."""
        allowed, required = set(allowed), set(required)
        content = self.request.content
        raw = content.read(MAX_BODY + 1) if content is not None else b""
        if len(raw) > MAX_BODY:
            raise ApiError(413, "too_large", f"the request body is larger than {MAX_BODY} bytes")
        if not raw:  # no body; whitespace alone is not JSON (400 below)
            if required:
                raise ApiError(
                    400, "bad_json", f"a JSON object body is required (fields: {', '.join(sorted(allowed))})"
                )
            return {}
        try:
            body = decode_json(raw)
        except BodyError as e:
            raise ApiError(400, "bad_json", e.message) from None
        if not isinstance(body, dict):
            raise ApiError(400, "bad_json", "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            shown = ", ".join(sorted(allowed)) or "none"
            raise ApiError(
                400, "unknown_field", f"unknown field(s) {', '.join(repr(u) for u in unknown[:5])} (allowed: {shown})"
            )
        missing = sorted(required - set(body))
        if missing:
            raise ApiError(400, "missing_field", f"missing field(s) {', '.join(missing)}")
        return body


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_query", f"{what} is not UTF-8") from None


def field_of(body: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` if it has type ``kind`` (a bool is never a number), else 400 ``bad_field``."""
    if name not in body:
        return default
    value = body[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):  # a bool is an int
        raise ApiError(400, "bad_field", f"{name} must be {what}")
    return value


#: The longest ``reason`` a cancel may record.
MAX_REASON = 500


def digits(text: str, longest: int) -> bool:
    """ASCII digits only ("²" and "٣" are digits to str.isdigit), at most ``longest`` of them."""
    return text.isascii() and text.isdigit() and len(text) <= longest


def page_limit(query: dict[str, str], default: int, maximum: int) -> int:
    """A list's ``limit`` query parameter: 1 to ``maximum``, ``default`` when not given; else 400."""
    if "limit" not in query:
        return default
    text = query["limit"]
    if not digits(text, 8) or not 1 <= int(text) <= maximum:
        raise ApiError(400, "bad_query", f"limit must be an integer from 1 to {maximum}, not {text[:20]!r}")
    return int(text)


def reason_of(body: dict[str, Any], default: str) -> str:
    """A cancel's ``reason``: a non-empty text of at most :data:`MAX_REASON` characters; else 400."""
    reason: str = field_of(body, "reason", str, "a string", default)
    if len(reason) > MAX_REASON or not reason.strip():
        raise ApiError(400, "bad_field", f"reason must be a non-empty text of at most {MAX_REASON} characters")
    return reason


def device_names(body: dict[str, Any], registry: DeviceRegistry) -> list[str] | None:
    """The body's ``devices``: configured device names (400 ``bad_field`` for anything else, 404
    ``unknown_device`` naming the unknown ones), or None (all of them) when the field is left out.
    Given, it names devices: null is not "all of them"."""
    if "devices" not in body:
        return None
    names = body["devices"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ApiError(400, "bad_field", "devices must be a non-empty list of device names")
    unknown = [n for n in dict.fromkeys(names) if n not in registry]
    if unknown:
        raise ApiError(
            404,
            "unknown_device",
            f"no such device(s) {', '.join(repr(n) for n in unknown[:10])} (known: {', '.join(registry.names())})",
        )
    return names


class ControlResource(Resource):
    """The whole ``/v1`` tree in one leaf resource, routed on the path segments."""

    isLeaf = True

    def __init__(self, token: str | None = None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._token = token.encode("utf-8") if token is not None else None
        self._routes: list[Route] = []
        # Set once the daemon has stopped (journal closed): a request on a connection accepted
        # before the listener closed gets 503, not an internal error.
        self.stopped = False

    def add(self, routes: Iterable[Route]) -> None:
        self._routes.extend(routes)

    # ----- plumbing

    def render(self, twisted_request: Any) -> int:
        request = cast(HttpRequest, twisted_request)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = maybeDeferred(self._handle, request)
        d.addCallbacks(self._answer, self._refused, callbackArgs=(request, gone), errbackArgs=(request, gone))
        d.addErrback(lambda f: log.failure("control API: answering failed", f))
        return NOT_DONE_YET

    def _handle(self, request: HttpRequest) -> Deferred[Any] | Any:
        if self.stopped:
            raise ApiError(503, "shutting_down", "the daemon has stopped")
        self._authorize(request)
        handler, params = self._route(request)
        return ensureDeferred(_awaitable(handler(ApiRequest(request, params))))

    def _answer(self, answer: Answer | Streaming, request: HttpRequest, gone: list[bool]) -> None:
        if isinstance(answer, Streaming) or gone:
            return
        request.setResponseCode(answer.status)
        for name, value in answer.headers.items():
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"content-type", b"application/json")
        request.write(json_bytes(answer.data))
        request.finish()

    def _refused(self, failure: Failure, request: HttpRequest, gone: list[bool]) -> None:
        error = failure.value
        if isinstance(error, (JobError, BatchError)):
            error = from_refusal(error)
        elif not isinstance(error, ApiError):
            log.failure("control API: {method} {path} failed", failure, method=request.method, path=request.path)
            error = ApiError(500, "internal_error", f"internal error: {failure.getErrorMessage()}")
        if gone:
            return
        write_error(request, error)
        request.finish()

    def _authorize(self, request: HttpRequest) -> None:
        if self._token is None:
            return
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        # Bytes against bytes, in constant time: what the client sent is never decoded.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(b" \t"), self._token):
            raise ApiError(
                401,
                "unauthorized",
                "a valid bearer token is required (Authorization: Bearer TOKEN)",
                {"www-authenticate": 'Bearer realm="netota"'},
            )

    def _route(self, request: HttpRequest) -> tuple[Handler, dict[str, str]]:
        shown = request.path.decode("utf-8", "replace")[:200]
        try:
            parts = [p.decode("utf-8") for p in request.postpath]
        except UnicodeDecodeError:
            raise ApiError(404, "not_found", f"no such resource {shown} (the path is not UTF-8)") from None
        while parts and parts[-1] == "":
            parts.pop()
        if not parts or parts[0] != API_PREFIX:
            raise ApiError(404, "not_found", f"no such resource {shown} (the API is under /v1/)")
        rest = parts[1:]
        method = request.method.decode("ascii", "replace").upper()
        for route in self._routes:
            params = route.match(rest)
            if params is None:
                continue
            if method == "HEAD" and "GET" in route.methods:
                method = "GET"
            handler = route.methods.get(method)
            if handler is None:
                allowed = ", ".join(route.methods)
                raise ApiError(
                    405,
                    "method_not_allowed",
                    f"{method[:20]} is not allowed here (allowed: {allowed})",
                    {"allow": allowed},
                )
            return handler, params
        raise ApiError(404, "not_found", f"no such resource {shown}")


async def _awaitable(result: Any) -> Any:
    if isinstance(result, Awaitable):
        return await result
    return result


def write_error(request: HttpRequest, error: ApiError) -> None:
    """Write ``error`` as the response (not finished)."""
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.setHeader(name.encode(), value.encode())
    request.setHeader(b"content-type", b"application/json")
    request.write(error.body())
