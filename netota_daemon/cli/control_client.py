"""The daemon's control API as seen from a client: HTTP+JSON requests and server-sent event streams.

:class:`ControlClient` talks to the control socket (``unix:PATH``, ``tcp:PORT`` or ``http://HOST:PORT``,
see :func:`control_endpoint`); :class:`EventStreamParser` decodes its ``text/event-stream`` bodies and
:func:`event_from_json` turns a ``phase``, ``progress`` or ``waiting`` event back into the engine's
event. Errors come as :class:`DaemonUnavailable` (not reached, or gone; its message is one plain
line) or :class:`ApiRefused` (an error answer, with the exit code a command gives for it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, BinaryIO

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from netota_daemon.cli.exit_codes import EXIT_BUSY, EXIT_UNAVAILABLE, EXIT_USAGE
from netota_daemon.endpoint_strings import split_endpoint
from netota_daemon.engine.events import JobEvent, PhaseChanged, Progress, TransferState, Waiting
from netota_daemon.engine.outcome import Phase

REQUEST_TIMEOUT = 30.0
#: An upload's file is read (and sent) this many bytes at a time.
UPLOAD_CHUNK = 64 * 1024
#: The slowest an upload may go (bytes a second) before the client gives up waiting for the answer.
UPLOAD_RATE_FLOOR = 256 * 1024


def why(error: BaseException | Failure) -> str:
    """What went wrong, in words: never a repr of Twisted's objects (a ResponseFailed holds a list
    of Failures; its str() is their reprs)."""
    if isinstance(error, Failure):
        return why(error.value) if isinstance(error.value, BaseException) else error.getErrorMessage()
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(dict.fromkeys(why(reason) for reason in reasons))
    if isinstance(error, ConnectionDone):
        return "the connection was closed"
    if isinstance(error, ConnectionLost):
        return "the connection was lost"
    text = str(error).strip()
    return text or type(error).__name__


class DaemonUnavailable(Exception):
    """The daemon could not be reached, or went away mid-request or mid-stream."""


class ApiRefused(Exception):
    """The daemon answered with an error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    @property
    def exit_code(self) -> int:
        if self.status == 409:
            return EXIT_BUSY
        if self.status >= 500:
            return EXIT_UNAVAILABLE
        return EXIT_USAGE


@implementer(IAgentEndpointFactory)
class _FixedEndpointFactory:
    """Every request goes to the daemon's endpoint, whatever the URL's host says."""

    def __init__(self, endpoint: Any) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> Any:
        return self.endpoint


def control_endpoint(reactor: Any, control: str) -> Any:
    """A client endpoint for a control address: ``unix:PATH[:...]`` (the daemon's own endpoint
    string works), ``tcp:PORT[:interface=HOST]``, ``tcp:host=HOST:port=PORT`` or ``http://HOST:PORT``."""
    if control.startswith(("http://", "https://")):
        from hyperlink import URL

        url = URL.from_text(control)
        return TCP4ClientEndpoint(reactor, url.host or "127.0.0.1", url.port or 80, timeout=10)
    kind, args, kwargs = split_endpoint(control)
    if kind == "unix":
        path = kwargs.get("address") or (args[0] if args else "")
        if not path:
            raise ValueError(f"control address {control!r} names no socket path")
        return UNIXClientEndpoint(reactor, path, timeout=10)  # type: ignore[no-untyped-call]
    if kind == "tcp":
        port = kwargs.get("port") or (args[0] if args else "")
        host = kwargs.get("host") or kwargs.get("interface") or (args[1] if len(args) > 1 else "127.0.0.1")
        try:
            return TCP4ClientEndpoint(reactor, host, int(port), timeout=10)
        except ValueError:
            raise ValueError(f"control address {control!r} has no valid port") from None
    raise ValueError(f"control address {control!r}: use unix:PATH, tcp:PORT[:interface=HOST] or http://HOST:PORT")


class ControlClient:
    """HTTP+JSON requests to the daemon, and its event streams."""

    def __init__(
        self, reactor: Any, control: str, token: str | None = None, http: Any = None, cooperator: Any = None
    ) -> None:
        """``http``: a treq ``HTTPClient`` (or ``treq.testing.StubTreq``) to use instead of one on
        the control endpoint; ``cooperator``: what schedules the reads of an upload's file (a
        ``twisted.internet.task.Cooperator``; Twisted's global one by default)."""
        import treq.client

        self.reactor = reactor
        self.control = control
        self._cooperator = cooperator if cooperator is not None else task
        if http is None:
            endpoints = _FixedEndpointFactory(control_endpoint(reactor, control))
            agent = Agent.usingEndpointFactory(reactor, endpoints)  # type: ignore[no-untyped-call]
            http = treq.client.HTTPClient(agent)
        self._http = http
        self._headers = {b"Accept": [b"application/json"]}
        if token:
            self._headers[b"Authorization"] = [f"Bearer {token}".encode()]

    def _unavailable(self, error: BaseException) -> DaemonUnavailable:
        return DaemonUnavailable(f"can't reach the netota daemon at {self.control}: {why(error)}")

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The decoded JSON answer; :class:`ApiRefused` for an error answer."""
        headers = dict(self._headers)
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        return await self._call(method, path, headers, data, REQUEST_TIMEOUT)

    async def upload(
        self, path: str, source: BinaryIO, extra_headers: dict[bytes, list[bytes]] | None = None
    ) -> dict[str, Any]:
        """``PUT`` the bytes of ``source`` (an open binary file, from its current position to its end)
        to ``path``: read in chunks of :data:`UPLOAD_CHUNK` bytes as the connection takes them (a
        ``FileBodyProducer``), never whole in memory, with its length up front (``Content-Length``).
        The decoded JSON answer, as :meth:`request` gives it."""
        headers = dict(self._headers)
        headers[b"Content-Type"] = [b"application/octet-stream"]
        headers.update(extra_headers or {})
        producer = FileBodyProducer(source, cooperator=self._cooperator, readSize=UPLOAD_CHUNK)  # type: ignore[no-untyped-call]
        # The answer comes once the daemon has the whole body and has stored it: allow for the bytes.
        timeout = REQUEST_TIMEOUT + producer.length / UPLOAD_RATE_FLOOR
        return await self._call("PUT", path, headers, producer, timeout)

    async def _call(
        self, method: str, path: str, headers: dict[bytes, list[bytes]], data: Any, timeout: float
    ) -> dict[str, Any]:
        import treq

        try:
            response = await self._http.request(
                method, f"http://netota{path}", headers=headers, data=data, timeout=timeout
            )
            raw = await treq.content(response)
        except (ConnectError, OSError) as e:
            raise self._unavailable(e) from None
        except Exception as e:  # ResponseFailed, a timeout: the daemon did not answer
            raise DaemonUnavailable(f"the netota daemon at {self.control} did not answer: {why(e)}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise DaemonUnavailable(f"the daemon at {self.control} answered {response.code} without JSON") from None
        if response.code >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            error = error if isinstance(error, dict) else {}
            raise ApiRefused(response.code, str(error.get("code", "error")), str(error.get("message", repr(answer))))
        if not isinstance(answer, dict):
            raise DaemonUnavailable(
                f"the daemon at {self.control} answered {response.code} with JSON that is not an object"
            )
        return answer

    async def stream(self, path: str, on_event: Callable[[str, dict[str, Any]], bool]) -> None:
        """Follow the server-sent events at ``path``: ``on_event(type, data)`` is called for each;
        it returns True to stop. Returns when stopped or when the daemon ends the stream; raises
        :class:`DaemonUnavailable` when the connection breaks."""
        import treq

        headers = dict(self._headers)
        headers[b"Accept"] = [b"text/event-stream"]
        try:
            response = await self._http.request("GET", f"http://netota{path}", headers=headers, unbuffered=True)
        except (ConnectError, OSError) as e:
            raise self._unavailable(e) from None
        except Exception as e:
            raise DaemonUnavailable(f"the netota daemon at {self.control} did not answer: {why(e)}") from None
        if response.code >= 400:
            raw = await treq.content(response)
            try:
                error = json.loads(raw).get("error", {})
            except (ValueError, AttributeError):
                error = {}
            raise ApiRefused(
                response.code, error.get("code", "error"), error.get("message", raw.decode("utf-8", "replace"))
            )
        parser = EventStreamParser()
        done: Deferred[list[Any]] = Deferred()
        stopped: list[bool] = []
        raised: list[BaseException] = []  # what on_event raised: the caller's, not the stream's

        def chunk(data: bytes) -> None:
            if stopped:
                return
            for event_type, payload in parser.feed(data):
                try:
                    stop = on_event(event_type, payload)
                except BaseException as e:
                    raised.append(e)
                    stop = True
                if stop:
                    stopped.append(True)
                    if not done.called:
                        done.callback([None])
                    return

        collecting = treq.collect(response, chunk)

        def ended(result: Any) -> None:
            # Wrapped: a Failure passed to callback() would turn into an errback.
            if not done.called:
                done.callback([result])

        collecting.addBoth(ended)
        (result,) = await done
        if raised:
            raise raised[0]
        if stopped:
            return
        if isinstance(result, Failure):
            raise DaemonUnavailable(
                f"the netota daemon at {self.control} went away (the event stream broke: {why(result)})"
            )


class EventStreamParser:
    """Incremental ``text/event-stream`` parser: bytes in, (event type, JSON data) out."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> list[tuple[str, dict[str, Any]]]:
        # On the whole buffer, so a CRLF split across two chunks is seen too.
        self._buffer = (self._buffer + data).replace(b"\r\n", b"\n")
        events = []
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            event_type, lines = "message", []
            for line in block.decode("utf-8", "replace").split("\n"):
                if line.startswith(":"):
                    continue
                field, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if field == "event":
                    event_type = value
                elif field == "data":
                    lines.append(value)
            if lines:
                try:
                    events.append((event_type, json.loads("\n".join(lines))))
                except ValueError:
                    continue
        return events


def progress_from_json(data: dict[str, Any]) -> Progress:
    """A progress object of the API (an event's, or a job's ``progress``) as the engine's event;
    fields a daemon does not send take their defaults. ValueError, KeyError or TypeError if bad."""
    eta = data.get("eta")
    return Progress(
        phase=Phase(data["phase"]),
        bytes_served=int(data.get("bytes_served") or 0),
        total_bytes=int(data.get("total_bytes") or 0),
        percent=float(data.get("percent") or 0.0),
        device_percent=int(data.get("device_percent") or 0),
        rate=float(data.get("rate") or 0.0),
        point_of_no_return=bool(data.get("point_of_no_return")),
        done_bytes=int(data.get("done_bytes") or 0),
        basis=str(data.get("basis") or "offset"),
        state=TransferState(data.get("state") or TransferState.TRANSFERRING.value),
        activity=str(data.get("activity") or ""),
        eta=None if eta is None else float(eta),
    )


def event_from_json(data: dict[str, Any]) -> JobEvent | None:
    """The engine event a control-API ``phase``, ``progress`` or ``waiting`` event carries (None for
    others, and for one this client can't read)."""
    try:
        if data.get("type") == "phase":
            return PhaseChanged(Phase(data["phase"]), str(data.get("message") or ""))
        if data.get("type") == "progress":
            return progress_from_json(data)
        if data.get("type") == "waiting":
            last_error = data.get("last_error")
            return Waiting(
                phase=Phase(data["phase"]),
                message=str(data.get("message") or ""),
                attempt=int(data.get("attempt") or 0),
                last_error=None if last_error is None else str(last_error),
            )
    except (KeyError, ValueError, TypeError):
        return None
    return None
