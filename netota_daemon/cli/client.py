"""``netota devices|upgrade|jobs|show|watch|cancel|resume``: the daemon's command-line client.

It talks HTTP+JSON to the control API (``--control`` or ``$NETOTA_CONTROL``; a UNIX socket by
default) and follows a job's server-sent events to draw a progress bar per phase (one per
device, :class:`DeviceBoard`, when it follows several). Exit codes: the outcome's (see
``netota flash``) for a waited job; 64 for a request the daemon refused as bad (400/403/404); 75
when the device is busy or the job can't be cancelled or resumed (409); 69 when the daemon can't be
reached or goes away before the job ends; 70 for an internal error of the client.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Callable, TextIO

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from netota_daemon.cli.progress import (
    PHASE_LABELS,
    REDRAW_INTERVAL,
    ProgressRenderer,
    format_bytes,
    progress_line,
)
from netota_daemon.daemon.config import split_endpoint
from netota_daemon.engine.events import Finished, JobEvent, PhaseChanged, Progress
from netota_daemon.engine.outcome import (
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    Outcome,
    OutcomeKind,
    Phase,
    exit_code,
)

DEFAULT_CONTROL = "unix:/run/netota/control.sock"
EXIT_BUSY = 75  # EX_TEMPFAIL: the device is busy, or the job is in a state that refuses the request
EXIT_SOFTWARE = 70  # EX_SOFTWARE: an internal error of the client
EXIT_INTERRUPTED = 130  # the client was interrupted (Ctrl-C); the daemon's job is not affected
REQUEST_TIMEOUT = 30.0


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
        return UNIXClientEndpoint(reactor, path, timeout=10)
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

    def __init__(self, reactor: Any, control: str, token: str | None = None) -> None:
        import treq.client

        self.reactor = reactor
        self.control = control
        agent = Agent.usingEndpointFactory(reactor, _FixedEndpointFactory(control_endpoint(reactor, control)))
        self._http = treq.client.HTTPClient(agent)
        self._headers = {b"Accept": [b"application/json"]}
        if token:
            self._headers[b"Authorization"] = [f"Bearer {token}".encode()]

    def _unavailable(self, error: BaseException) -> DaemonUnavailable:
        return DaemonUnavailable(f"can't reach the netota daemon at {self.control}: {error}")

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The decoded JSON answer; :class:`ApiRefused` for an error answer."""
        import treq

        headers = dict(self._headers)
        data = None
        if body is not None:
            headers[b"Content-Type"] = [b"application/json"]
            data = json.dumps(body).encode()
        try:
            response = await self._http.request(
                method, f"http://netota{path}", headers=headers, data=data, timeout=REQUEST_TIMEOUT
            )
            raw = await treq.content(response)
        except (ConnectError, OSError) as e:
            raise self._unavailable(e) from None
        except Exception as e:  # ResponseFailed, a timeout: the daemon did not answer
            raise DaemonUnavailable(f"the netota daemon at {self.control} did not answer: {e!r}") from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise DaemonUnavailable(f"the daemon at {self.control} answered {response.code} without JSON") from None
        if response.code >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            error = error if isinstance(error, dict) else {}
            raise ApiRefused(response.code, str(error.get("code", "error")), str(error.get("message", repr(answer))))
        if not isinstance(answer, dict):
            raise DaemonUnavailable(f"the daemon at {self.control} answered {response.code} with JSON that is not an object")
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
            raise DaemonUnavailable(f"the netota daemon at {self.control} did not answer: {e!r}") from None
        if response.code >= 400:
            raw = await treq.content(response)
            try:
                error = json.loads(raw).get("error", {})
            except (ValueError, AttributeError):
                error = {}
            raise ApiRefused(response.code, error.get("code", "error"), error.get("message", raw.decode("utf-8", "replace")))
        parser = EventStreamParser()
        done: Deferred = Deferred()
        stopped = []

        def chunk(data: bytes) -> None:
            if stopped:
                return
            for event_type, payload in parser.feed(data):
                if on_event(event_type, payload):
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
        if stopped:
            return
        if isinstance(result, Failure):
            raise DaemonUnavailable(
                f"the netota daemon at {self.control} went away (the event stream broke: {result.getErrorMessage()})"
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


# ---------------------------------------------------------------- rendering


def event_from_json(data: dict[str, Any]) -> JobEvent | None:
    """The engine event a control-API ``phase`` or ``progress`` event carries (None for others)."""
    try:
        if data.get("type") == "phase":
            return PhaseChanged(Phase(data["phase"]), data.get("message", ""))
        if data.get("type") == "progress":
            return Progress(
                phase=Phase(data["phase"]),
                bytes_served=int(data.get("bytes_served") or 0),
                total_bytes=int(data.get("total_bytes") or 0),
                percent=float(data.get("percent") or 0.0),
                device_percent=int(data.get("device_percent") or 0),
                rate=float(data.get("rate") or 0.0),
                point_of_no_return=bool(data.get("point_of_no_return")),
            )
    except (KeyError, ValueError, TypeError):
        return None
    return None


class _PrefixedLines:
    """A text stream that starts every line with a prefix (one device's lines on a log)."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        self.out = out
        self.prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                self.out.write(self.prefix)
            self.out.write(piece)
            self._at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False


#: ANSI sequences the board uses on a terminal: to the start of the line N lines up, erase the
#: line, erase to the end of the screen.
_UP = "\x1b[{}F"
_ERASE_LINE = "\x1b[2K"
_ERASE_BELOW = "\x1b[J"


class DeviceBoard:
    """One progress bar per device, for following several jobs at once (``watch`` without a job,
    ``upgrade --wait`` with several devices).

    On a terminal it keeps a block of lines, one per device, and redraws it in place (at most every
    REDRAW_INTERVAL, at once for a phase change or an end); other text is printed above the block.
    Elsewhere (a log, a pipe) each device's lines are written as they come, prefixed with a label,
    a line per phase and per 10 % step, as ``netota flash`` does on a log.
    """

    def __init__(self, out: TextIO, interactive: bool | None = None, clock: Callable[[], float] = time.monotonic,
                 size: tuple[int, int] | None = None) -> None:
        self.out = out
        self.interactive = out.isatty() if interactive is None else interactive
        self.clock = clock
        self.size = size  # (columns, lines); the terminal's own when None
        self._lines: dict[str, str] = {}  # device -> its current line (interactive)
        self._drawn = 0  # lines of the block now on the screen
        self._last_draw = float("-inf")
        self._logs: dict[str, ProgressRenderer] = {}  # device -> its prefixed log (not interactive)

    def set(self, device: str, text: str) -> None:
        """Show ``text`` as ``device``'s line (a state, an outcome), at once."""
        if self.interactive:
            self._lines[device] = f"{device}  {text}"
            self._draw()
        else:
            self.out.write(f"{device}: {text}\n")
            self.out.flush()

    def handle(self, device: str, event: JobEvent, label: str | None = None) -> None:
        """A phase change or progress of ``device``'s job (``label`` prefixes its lines on a log)."""
        if not self.interactive:
            log = self._logs.get(device)
            if log is None:
                log = self._logs[device] = ProgressRenderer(_PrefixedLines(self.out, f"{label or device}: "),
                                                            interactive=False)
            log.handle(event)
            return
        if isinstance(event, PhaseChanged):
            text = f"{PHASE_LABELS.get(event.phase, event.phase.value)}: {event.message}".rstrip(": ")
            self._lines[device] = f"{device}  {text}"
            self._draw()
        elif isinstance(event, Progress):
            self._lines[device] = f"{device}  {progress_line(event)}"
            now = self.clock()
            if now - self._last_draw >= REDRAW_INTERVAL or event.percent >= 100.0 or event.point_of_no_return:
                self._draw()

    def end(self, device: str, text: str) -> None:
        """``device``'s job ended: its line (or its log) says how; a next job starts a new log."""
        self._logs.pop(device, None)
        self.set(device, text)

    def message(self, text: str) -> None:
        """A line of text that is not any device's: above the block on a terminal."""
        if self.interactive and self._drawn:
            self.out.write(_UP.format(self._drawn) + _ERASE_BELOW)
            self._drawn = 0
            self.out.write(text + "\n")
            self._draw()
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _draw(self) -> None:
        self._last_draw = self.clock()
        width, height = self.size or shutil.get_terminal_size()
        lines = list(self._lines.values())
        room = max(2, height - 1)  # the cursor can't go back up past the top of the screen
        if len(lines) > room:
            lines = lines[: room - 1] + [f"... and {len(lines) - room + 1} more devices (netota devices)"]
        parts = [_UP.format(self._drawn)] if self._drawn else []
        for line in lines:
            # Cut to the terminal's width: a wrapped line would throw the cursor arithmetic off.
            parts.append(_ERASE_LINE + line[: max(1, width - 1)] + "\n")
        if len(lines) < self._drawn:
            parts.append(_ERASE_BELOW)
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(lines)


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)] if rows else [len(h) for h in headers]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _outcome_line(job: dict[str, Any]) -> str:
    outcome = job.get("outcome")
    if job.get("state") == "interrupted":
        text = f"job {job['id']} on {job['device']}: interrupted in {job.get('phase')}"
    elif outcome:
        text = f"job {job['id']} on {job['device']}: {outcome['kind']}: {outcome.get('message', '')}"
        if outcome.get("firmware_version_after") and outcome["firmware_version_after"] not in text:
            text += f" (firmware {outcome['firmware_version_after']})"
    else:
        text = f"job {job['id']} on {job['device']}: {job['state']}"
        if job.get("position"):
            text += f" (position {job['position']} in the queue)"
    advice = job.get("advice") or (outcome or {}).get("advice")
    if advice and (job.get("state") == "interrupted" or (outcome and outcome.get("kind") not in ("succeeded", "already_current"))):
        text += f"\n  advice: {advice}"
    return text


def _job_exit_code(job: dict[str, Any], strict: bool = False) -> int:
    if job.get("state") == "interrupted":
        return EXIT_UNAVAILABLE
    outcome = job.get("outcome")
    if not outcome:
        return EXIT_UNAVAILABLE
    return exit_code(OutcomeKind(outcome["kind"]), strict=strict)


# ---------------------------------------------------------------- commands


async def _final_job(client: ControlClient, job_id: str, seen: dict[str, Any]) -> dict[str, Any]:
    """The ended job as the daemon has it; ``seen`` (its snapshot updated by its outcome event) when
    the daemon went away (or stopped, 503) right after that event. :class:`DaemonUnavailable` when
    the end was not seen."""
    try:
        return (await client.request("GET", f"/v1/jobs/{job_id}"))["job"]
    except (DaemonUnavailable, ApiRefused) as e:
        if isinstance(e, ApiRefused) and e.status < 500:
            raise
        if seen.get("id") != job_id or seen.get("state") in (None, "queued", "running", "cancelling"):
            raise DaemonUnavailable(
                f"the netota daemon at {client.control} went away before job {job_id} ended ({e})"
            ) from None
        return seen


async def _follow_job(client: ControlClient, job_id: str, args: argparse.Namespace) -> int:
    """Follow one job to its end, drawing its progress on stderr; the exit code of its outcome."""
    bars = ProgressRenderer(sys.stderr) if not args.json else None
    final: dict[str, Any] = {}

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if getattr(args, "events_json", False):
            print(json.dumps(data, sort_keys=True), flush=True)
        if event_type == "job":
            snapshot = data["snapshot"]
            final.update(snapshot)
            if bars and snapshot.get("state") == "queued":
                sys.stderr.write(f"queued at position {snapshot.get('position')}\n")
            return snapshot["state"] not in ("queued", "running", "cancelling")
        if event_type == "state":
            final.update(state=data["state"], position=data.get("position"))
            if bars and data["state"] == "queued":
                sys.stderr.write(f"queued at position {data.get('position')}\n")
            return False
        if event_type in ("phase", "progress") and bars:
            event = event_from_json(data)
            if event is not None:
                bars.handle(event)
        elif event_type == "outcome":
            final.update(state=data["state"], outcome=data.get("outcome"), advice=data.get("advice"))
            if bars and data.get("outcome"):
                bars.handle(Finished(Outcome.from_json(data["outcome"])))
            return True
        elif event_type == "shutdown":
            return True
        return False

    try:
        await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    finally:
        if bars is not None and bars.interactive and not final.get("outcome"):
            sys.stderr.write("\n")  # end a progress line the stream left open
    if final.get("state") in ("queued", "running", "cancelling"):
        raise DaemonUnavailable(f"the netota daemon at {client.control} went away before job {job_id} ended")
    job = await _final_job(client, job_id, final)
    if args.json:
        _print_json(job)
    else:
        print(_outcome_line(job))
    return _job_exit_code(job, strict=getattr(args, "strict", False))


async def cmd_devices(client: ControlClient, args: argparse.Namespace) -> int:
    devices = (await client.request("GET", "/v1/devices"))["devices"]
    if args.json:
        _print_json(devices)
        return 0
    rows = []
    for d in devices:
        percent = f"{d['percent']:.1f}%" if d.get("percent") is not None else "-"
        rate = f"{format_bytes(d['rate'])}/s" if d.get("rate") else "-"
        state = d["state"] + (f" #{d['queue_position']}" if d.get("queue_position") else "")
        rows.append([d["name"], state, _dash(d.get("phase")), percent, rate, _dash(d.get("job")),
                     _dash(d.get("last_outcome")), _dash(d.get("firmware_version"))])
    print(_table(rows, ["DEVICE", "STATE", "PHASE", "PERCENT", "RATE", "JOB", "LAST OUTCOME", "FIRMWARE"]))
    return 0


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--option {pair!r}: use KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


async def cmd_upgrade(client: ControlClient, args: argparse.Namespace) -> int:
    if args.all:
        if len(args.targets) != 1:
            raise ValueError("with --all, give only FIRMWARE")
        devices = [d["name"] for d in (await client.request("GET", "/v1/devices"))["devices"]]
        if not devices:
            raise ValueError("the daemon has no devices configured")
    else:
        if len(args.targets) < 2:
            raise ValueError("give DEVICE [DEVICE ...] FIRMWARE, or --all FIRMWARE")
        devices = list(dict.fromkeys(args.targets[:-1]))  # a device named twice gets one job
    firmware = args.targets[-1]
    options = _parse_options(args.option)
    if len(devices) > 1 or args.all:
        return await _upgrade_many(client, args, devices, firmware, options)
    body: dict[str, Any] = {"device": devices[0], "firmware": firmware}
    if options:
        body["options"] = options
    job = (await client.request("POST", "/v1/jobs", body))["job"]
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            print(_outcome_line(job))
        return 0
    if not args.json:
        sys.stderr.write(f"job {job['id']}: upgrading {job['device']} with {job['firmware']}\n")
    return await _follow_job(client, job["id"], args)


def _short_outcome(job: dict[str, Any]) -> str:
    """A job's end in a few words, for a device's line: ``job 3f2a... succeeded: upgraded ...``."""
    outcome = job.get("outcome") or {}
    text = f"job {job['id']} {job['state']}"
    if outcome:
        text += f": {outcome.get('kind', '-')} {outcome.get('message', '')}".rstrip()
    return text


async def _follow_quietly(client: ControlClient, job: dict[str, Any], board: DeviceBoard | None) -> dict[str, Any]:
    """Follow one job of a batch to its end (its progress on ``board``); its final state. Raises
    :class:`DaemonUnavailable` when the daemon goes away before the job's end is known."""
    job_id, device = job["id"], job["device"]
    ended: dict[str, Any] = {}

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if event_type == "job":
            snapshot = data["snapshot"]
            if board is not None and snapshot.get("state") == "queued":
                board.set(device, f"queued at position {snapshot.get('position')}")
            return snapshot["state"] not in ("queued", "running", "cancelling")
        if event_type == "state" and board is not None and data.get("state") == "queued":
            board.set(device, f"queued at position {data.get('position')}")
        if event_type in ("phase", "progress") and board is not None:
            event = event_from_json(data)
            if event is not None:
                board.handle(device, event)
        if event_type == "outcome":
            ended.update(data)
            return True
        return event_type == "shutdown"

    await client.stream(f"/v1/jobs/{job_id}/events", on_event)
    seen = {**job, "state": ended["state"], "outcome": ended.get("outcome"), "advice": ended.get("advice")} if ended else {}
    final = await _final_job(client, job_id, seen)
    if final["state"] in ("queued", "running", "cancelling"):
        raise DaemonUnavailable(f"the netota daemon at {client.control} went away before job {job_id} ended")
    if board is not None:
        board.end(device, _short_outcome(final))
    return final


async def _upgrade_many(client: ControlClient, args: argparse.Namespace, devices: list[str], firmware: str,
                        options: dict[str, Any]) -> int:
    """One job per device; with --wait, follow them all and print a summary. The exit code is 0 when
    every device succeeded (or was already current), else that of the first device, in the order
    given, that did not (69 for one whose end was not seen because the daemon went away)."""
    jobs: dict[str, dict[str, Any]] = {}
    refused: dict[str, ApiRefused] = {}
    lost: dict[str, DaemonUnavailable] = {}
    for device in devices:
        body: dict[str, Any] = {"device": device, "firmware": firmware}
        if options:
            body["options"] = options
        try:
            jobs[device] = (await client.request("POST", "/v1/jobs", body))["job"]
        except ApiRefused as e:
            refused[device] = e
            sys.stderr.write(f"netota: {device}: refused ({e.status} {e.code}): {e.message}\n")
    if args.wait and jobs:
        board = None if args.json else DeviceBoard(sys.stderr)

        async def follow(device: str) -> None:
            try:
                jobs[device] = await _follow_quietly(client, jobs[device], board)
            except DaemonUnavailable as e:
                lost[device] = e
            except ApiRefused as e:  # e.g. 503 from a daemon that stopped between two requests
                lost[device] = DaemonUnavailable(f"refused ({e.status} {e.code}): {e.message}")

        # Each follower catches its own loss, so one broken stream never hides the others' ends
        # (anything else is a bug, reported as one).
        await gatherResults([Deferred.fromCoroutine(follow(d)) for d in list(jobs)], consumeErrors=True)
        for device, error in lost.items():
            sys.stderr.write(f"netota: {device}: {error}\n")
    codes: dict[str, int] = {}
    rows = []
    for device in devices:
        if device in refused:
            error = refused[device]
            codes[device] = error.exit_code
            rows.append([device, "-", "refused", error.code, error.message])
            continue
        job = jobs[device]
        if device in lost:
            codes[device] = EXIT_UNAVAILABLE
            rows.append([device, job["id"], "unknown", "-", "the daemon went away before the job ended"])
            continue
        if args.wait:
            codes[device] = _job_exit_code(job, strict=args.strict)
        outcome = job.get("outcome") or {}
        rows.append([device, job["id"], job["state"], outcome.get("kind", "-"),
                     outcome.get("message") or (f"position {job['position']}" if job.get("position") else "")])
    if args.json:
        _print_json({"jobs": [jobs[d] for d in devices if d in jobs and d not in lost],
                     "refused": {d: {"status": e.status, "code": e.code, "message": e.message} for d, e in refused.items()},
                     "lost": {d: {"job": jobs[d]["id"], "message": str(e)} for d, e in lost.items()}})
    else:
        print(_table(rows, ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]))
    return next((codes[d] for d in devices if codes.get(d, 0) != 0), 0)


async def cmd_jobs(client: ControlClient, args: argparse.Namespace) -> int:
    query = []
    if args.device:
        query.append(f"device={args.device}")
    if args.limit:
        query.append(f"limit={args.limit}")
    jobs = (await client.request("GET", "/v1/jobs" + ("?" + "&".join(query) if query else "")))["jobs"]
    if args.json:
        _print_json(jobs)
        return 0
    rows = []
    for j in jobs:
        outcome = (j.get("outcome") or {}).get("kind")
        progress = j.get("progress") or {}
        percent = f"{progress['percent']:.1f}%" if progress.get("percent") is not None else "-"
        rows.append([j["id"], j["device"], j["firmware"], j["state"] + (f" #{j['position']}" if j.get("position") else ""),
                     j["phase"], percent, _dash(outcome), "yes" if j.get("resumable") else "-"])
    print(_table(rows, ["JOB", "DEVICE", "FIRMWARE", "STATE", "PHASE", "PERCENT", "OUTCOME", "RESUMABLE"]))
    return 0


async def cmd_show(client: ControlClient, args: argparse.Namespace) -> int:
    job = (await client.request("GET", f"/v1/jobs/{args.job}"))["job"]
    if args.json:
        _print_json(job)
        return 0
    print(_outcome_line(job))
    for key in ("firmware", "state", "phase", "point_of_no_return", "resumable", "resumed_from", "resumed_by"):
        print(f"  {key}: {_dash(job.get(key))}")
    for entry in job.get("history", []):
        print(f"  - {entry['time']:.3f} {entry['state']} {entry['phase']} {entry['note']}")
    return 0


async def cmd_watch(client: ControlClient, args: argparse.Namespace) -> int:
    if args.job:
        args.events_json = args.json  # with --json: each event as a JSON line, then the final job
        return await _follow_job(client, args.job, args)
    board = DeviceBoard(sys.stdout)

    def on_event(event_type: str, data: dict[str, Any]) -> bool:
        if args.json:
            print(json.dumps(data, sort_keys=True), flush=True)
            return event_type == "shutdown"
        device = data.get("device", "")
        if event_type == "snapshot":
            if board.interactive:  # a line per device from the start: the rack at a glance
                for d in data.get("devices", []):
                    board.set(d["name"], f"{d['state']}  last: {_dash(d.get('last_outcome'))}  "
                                         f"firmware {_dash(d.get('firmware_version'))}")
            for job in data.get("jobs", []):
                board.set(job["device"], f"job {job['id']} {job['state']}"
                                         + (f" #{job['position']}" if job.get("position") else ""))
        elif event_type in ("phase", "progress"):
            event = event_from_json(data)
            if event is not None:
                board.handle(device, event, label=f"{device} {data['job']}")
        elif event_type == "state":
            board.set(device, f"job {data['job']} {data['state']}" + (f" #{data['position']}" if data.get("position") else ""))
        elif event_type == "outcome":
            board.end(device, _short_outcome({"id": data["job"], **data}))
        elif event_type == "shutdown":
            board.message(data.get("message") or "the daemon is shutting down")
            return True
        return False

    await client.stream("/v1/events", on_event)
    raise DaemonUnavailable(f"the netota daemon at {client.control} ended the event stream (it is shutting down or went away)")


async def cmd_cancel(client: ControlClient, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    job = (await client.request("POST", f"/v1/jobs/{args.job}/cancel", body))["job"]
    if args.json:
        _print_json(job)
    else:
        print(_outcome_line(job))
    return 0


async def cmd_resume(client: ControlClient, args: argparse.Namespace) -> int:
    job = (await client.request("POST", f"/v1/jobs/{args.job}/resume", {}))["job"]
    if not args.wait:
        if args.json:
            _print_json(job)
        else:
            print(f"job {args.job} resumed as job {job['id']}")
            print(_outcome_line(job))
        return 0
    if not args.json:
        sys.stderr.write(f"job {args.job} resumed as job {job['id']}\n")
    return await _follow_job(client, job["id"], args)


def _run(command: Callable[[ControlClient, argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def func(args: argparse.Namespace) -> int:
        from twisted.internet import task

        codes: list[int] = []
        stopping: list[bool] = []

        async def main(reactor: Any) -> None:
            reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
            try:
                client = ControlClient(reactor, args.control, args.token)
            except ValueError as e:
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_USAGE)
                return
            try:
                codes.append(await command(client, args))
            except DaemonUnavailable as e:
                if stopping:
                    return  # our own shutdown (Ctrl-C) closed the connection, not the daemon
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_UNAVAILABLE)
            except ApiRefused as e:
                sys.stderr.write(f"netota: refused ({e.status} {e.code}): {e.message}\n")
                codes.append(e.exit_code)
            except ValueError as e:
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_USAGE)
            except Exception:  # a bug, or an answer this client does not understand: never "interrupted"
                import traceback

                sys.stderr.write(f"netota: internal error:\n{traceback.format_exc()}")
                codes.append(EXIT_SOFTWARE)

        try:
            task.react(lambda reactor: ensureDeferred(main(reactor)))
        except SystemExit:
            pass
        if not codes:
            # Ctrl-C (or SIGTERM) stopped the reactor before the command finished: a job being
            # watched carries on in the daemon.
            sys.stderr.write("netota: interrupted; any job started keeps running in the daemon "
                             "(netota jobs, netota watch JOB)\n")
            return EXIT_INTERRUPTED
        return codes[0]

    return func


EPILOG = """\
The control address is --control, else $NETOTA_CONTROL, else unix:/run/netota/control.sock
(the daemon's own endpoint string works: unix:PATH[:mode=...], tcp:PORT:interface=HOST, or
http://HOST:PORT). A bearer token comes from --token or $NETOTA_TOKEN.

Exit codes: 0 succeeded (or already current), 1 failed, 2 unverified, 3 already current with
--strict, 4 aborted, 5 not applicable (double backup), 64 bad request (400/403/404), 69 the daemon
can't be reached or went away before the job ended (or the job was interrupted by its shutdown),
70 an internal error of the client, 75 busy / not cancellable / not resumable (409), 130 the
client was interrupted (Ctrl-C; a job keeps running in the daemon).
"""


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", default=os.environ.get("NETOTA_CONTROL", DEFAULT_CONTROL),
                        help="the daemon's control address (default: $NETOTA_CONTROL or %(default)s)")
    parser.add_argument("--token", default=os.environ.get("NETOTA_TOKEN"),
                        help="bearer token for a daemon that requires one (default: $NETOTA_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def add_parser(subparsers: Any) -> None:
    def sub(name: str, help_text: str, command: Callable[..., Any]) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _common(p)
        p.set_defaults(func=_run(command))
        return p

    sub("devices", "List the daemon's devices and what each is doing.", cmd_devices)

    p = sub("upgrade", "Start an upgrade of DEVICE (or several, or --all) with FIRMWARE, a file name in the "
                       "daemon's firmware_dir.", cmd_upgrade)
    p.usage = ("netota upgrade [options] DEVICE [DEVICE ...] FIRMWARE\n"
               "       netota upgrade [options] --all FIRMWARE")
    p.add_argument("targets", nargs="+", metavar="DEVICE|FIRMWARE",
                   help="the device name(s), then the firmware file name")
    p.add_argument("--all", action="store_true", help="one job for every configured device (then give only FIRMWARE)")
    p.add_argument("--wait", action="store_true",
                   help="follow the job(s) to the end: a progress bar per phase (one per device for several), "
                        "and a summary table for several devices")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="override one engine timeout for this job (e.g. deadline=600); repeatable")

    p = sub("jobs", "List jobs, newest first.", cmd_jobs)
    p.add_argument("--device", help="only this device's jobs")
    p.add_argument("--limit", type=int, help="at most this many")

    p = sub("show", "Show one job, with its history.", cmd_show)
    p.add_argument("job")

    p = sub("watch", "Follow one job to its end, or (without JOB) every job, one progress bar per device, until "
                     "interrupted.", cmd_watch)
    p.add_argument("job", nargs="?")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already ran this firmware")

    p = sub("cancel", "Cancel a queued or running job (STOP is sent to the device).", cmd_cancel)
    p.add_argument("job")
    p.add_argument("--reason", help="recorded with the job")

    p = sub("resume", "Resume an interrupted, failed or aborted job as a new job for the same device and firmware.", cmd_resume)
    p.add_argument("job")
    p.add_argument("--wait", action="store_true", help="follow the new job to its end")
    p.add_argument("--strict", action="store_true", help="exit 3 when the device already runs this firmware")
