"""The ``netota`` client: its event-stream parser and control addresses, ControlClient against an
in-memory HTTP server (StubTreq), the commands in memory against a scripted daemon (what they print,
their ``--json`` shapes, their exit codes), and a few commands as subprocesses against an
in-process daemon with fake jobs (exit codes, signals, the daemon stopping, a broken pipe)."""

from __future__ import annotations

import json
import os
import re
import shlex
import time

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from netota_daemon.cli.control_client import (
    ApiRefused,
    ControlClient,
    DaemonUnavailable,
    EventStreamParser,
    control_endpoint,
    event_from_json,
)
from netota_daemon.engine.events import PhaseChanged, Progress, TransferState, Waiting
from netota_daemon.engine.outcome import OutcomeKind, Phase
from tests.conftest import PYTHON, ROOT, run_netota, subprocess_env
from tests.daemon_fakes import AutoJobFactory, make_service, streams_opened
from tests.fake_control import FakeControl, job, run

EVENTS = [("job", {"a": 1}), ("progress", {"percent": 12.5, "text": "x: y\nz"}), ("outcome", {"kind": "ok"})]


def encoded() -> bytes:
    out = b": keep-alive\n\n"
    for name, data in EVENTS:
        out += f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
    return out


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=12), st.booleans())
def test_event_stream_parser_gives_the_same_events_however_the_bytes_are_split(cuts, crlf):
    data = encoded().replace(b"\n", b"\r\n") if crlf else encoded()
    points = sorted({c % (len(data) + 1) for c in cuts})
    parser = EventStreamParser()
    events = []
    previous = 0
    for point in [*points, len(data)]:
        events.extend(parser.feed(data[previous:point]))
        previous = point
    assert events == EVENTS


def test_event_stream_parser_accepts_crlf_and_skips_bad_json():
    parser = EventStreamParser()
    assert parser.feed(b'event: a\r\ndata: {"x": 1}\r\n\r\nevent: b\ndata: {oops\n\n') == [("a", {"x": 1})]


def test_control_addresses():
    clock = Clock()
    unix = control_endpoint(clock, "unix:/run/netota/control.sock:mode=660:lockfile=1")
    assert isinstance(unix, UNIXClientEndpoint) and unix._path == "/run/netota/control.sock"
    tcp = control_endpoint(clock, "tcp:8700:interface=127.0.0.1")
    assert isinstance(tcp, TCP4ClientEndpoint) and (tcp._host, tcp._port) == ("127.0.0.1", 8700)
    url = control_endpoint(clock, "http://127.0.0.1:8701")
    assert (url._host, url._port) == ("127.0.0.1", 8701)
    for bad in ("udp:1", "unix:", "tcp:notaport"):
        with pytest.raises(ValueError):
            control_endpoint(clock, bad)


def test_api_events_become_engine_events():
    assert event_from_json({"type": "phase", "phase": "phase2", "message": "m"}) == PhaseChanged(Phase.PHASE2, "m")
    progress = event_from_json(
        {
            "type": "progress",
            "phase": "phase2",
            "bytes_served": 450_076,
            "total_bytes": 300_000,
            "done_bytes": 299_000,
            "percent": 99.6,
            "device_percent": 86,
            "rate": 5.0,
            "point_of_no_return": True,
            "basis": "all_size",
            "state": "device_working",
            "activity": "erasing flash",
            "eta": None,
        }
    )
    assert progress == Progress(
        Phase.PHASE2,
        450_076,
        300_000,
        99.6,
        86,
        5.0,
        True,
        done_bytes=299_000,
        basis="all_size",
        state=TransferState.DEVICE_WORKING,
        activity="erasing flash",
        eta=None,
    )
    with_eta = event_from_json(
        {"type": "progress", "phase": "upload", "percent": 5, "eta": 12, "state": "transferring"}
    )
    assert isinstance(with_eta, Progress) and with_eta.eta == 12.0 and with_eta.phase is Phase.UPLOAD
    # A daemon that does not send the new fields yet: their defaults.
    old = event_from_json({"type": "progress", "phase": "phase1", "percent": 50.0, "total_bytes": 20})
    assert isinstance(old, Progress) and old.state is TransferState.TRANSFERRING and old.eta is None
    assert event_from_json(
        {
            "type": "waiting",
            "phase": "phase1",
            "message": "connecting",
            "attempt": 3,
            "last_error": "connection refused",
        }
    ) == Waiting(Phase.PHASE1, "connecting", 3, "connection refused")
    assert event_from_json({"type": "phase", "phase": "nonsense"}) is None
    assert event_from_json({"type": "progress", "phase": "phase1", "state": "dancing"}) is None
    assert event_from_json({"type": "outcome"}) is None


# ---------------------------------------------------------------- ControlClient over StubTreq


class FakeApi(Resource):
    """The control API's answers to a few requests, in memory; records each request's body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[tuple[bytes, bytes, bytes]] = []
        self.streaming: list = []

    def render(self, request):
        body = request.content.read()
        self.bodies.append((request.method, request.path, body))
        request.setHeader(b"content-type", b"application/json")
        if request.path == b"/v1/jobs/old/resume":
            if json.loads(body or b"{}").get("force") is not True:
                request.setResponseCode(409)
                return json.dumps(
                    {"error": {"code": "superseded", "message": "job new upgraded a since", "status": 409}}
                ).encode()
            request.setResponseCode(201)
            return json.dumps({"job": job("j2", resumed_from="old")}).encode()
        if request.path == b"/v1/jobs/j1/events":
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b'event: job\ndata: {"type": "job", "snapshot": {"state": "running"}}\n\n')
            self.streaming.append(request)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return json.dumps({"error": {"code": "not_found", "message": "no such path", "status": 404}}).encode()


def stub_client():
    from treq.testing import StubTreq

    api = FakeApi()
    stub = StubTreq(api)
    return api, stub, ControlClient(Clock(), "unix:/fake.sock", token="t0k", http=stub)


def settle(d: Deferred, stub) -> object:
    stub.flush()
    results: list = []
    d.addBoth(results.append)
    assert results, "no answer"
    if isinstance(results[0], Failure):
        return results[0].value
    return results[0]


def test_resume_sends_force_only_with_force_and_the_refusal_reads_plainly():
    api, stub, client = stub_client()
    refused = settle(Deferred.fromCoroutine(client.request("POST", "/v1/jobs/old/resume", {})), stub)
    assert isinstance(refused, ApiRefused) and refused.exit_code == 75
    assert (refused.status, refused.code, refused.message) == (409, "superseded", "job new upgraded a since")
    answer = settle(Deferred.fromCoroutine(client.request("POST", "/v1/jobs/old/resume", {"force": True})), stub)
    assert answer["job"]["resumed_from"] == "old"
    assert [json.loads(body) for _, _, body in api.bodies] == [{}, {"force": True}]


def test_a_stream_delivers_events_and_what_on_event_raises_is_not_a_daemon_fault():
    api, stub, client = stub_client()
    seen: list = []
    d = Deferred.fromCoroutine(client.stream("/v1/jobs/j1/events", lambda t, data: seen.append(t) or False))
    stub.flush()
    (request,) = api.streaming
    request.write(b'event: progress\ndata: {"type": "progress"}\n\nevent: shutdown\ndata: {"type": "shutdown"}\n\n')
    request.finish()
    assert settle(d, stub) is None and seen == ["job", "progress", "shutdown"]

    def broken_pipe(event_type, data):
        raise BrokenPipeError(32, "Broken pipe")

    d = Deferred.fromCoroutine(client.stream("/v1/jobs/j1/events", broken_pipe))
    assert isinstance(settle(d, stub), BrokenPipeError)


def test_a_broken_stream_is_one_plain_line():
    api, stub, client = stub_client()
    d = Deferred.fromCoroutine(client.stream("/v1/jobs/j1/events", lambda t, data: False))
    stub.flush()
    api.streaming[0].transport.loseConnection()  # the daemon dies: no final chunk
    error = settle(d, stub)
    assert isinstance(error, DaemonUnavailable)
    assert str(error).startswith("the netota daemon at unix:/fake.sock went away (the event stream broke: ")
    assert "<" not in str(error) and "Failure" not in str(error)


# ---------------------------------------------------------------- the commands, in memory


def finished(kind: str, message: str, **extra) -> dict:
    return job(kind=kind, message=message, phase="done", **extra)


def followed(final: dict, *events: tuple[str, dict]) -> FakeControl:
    """A daemon that accepts an upgrade of ``a`` and plays ``events`` on its stream, then ends it."""
    start = job()
    return FakeControl(
        answers={("POST", "/v1/jobs"): {"job": start}, ("GET", "/v1/jobs/j1"): {"job": final}},
        streams={"/v1/jobs/j1/events": [("job", {"type": "job", "job": "j1", "snapshot": start}), *events]},
    )


def outcome_event(final: dict) -> tuple[str, dict]:
    return "outcome", {
        "type": "outcome",
        "job": "j1",
        "device": "a",
        "state": final["state"],
        "outcome": final["outcome"],
    }


@pytest.mark.parametrize(
    "kind, message, code, strict_code, line",
    [
        (
            "succeeded",
            "upgraded: the device now runs firmware 2.0.0",
            0,
            0,
            "succeeded: the device now runs firmware 2.0.0",
        ),
        ("failed", "the device ended the session with ERR", 1, 1, "failed: the device ended the session with ERR"),
        ("unverified", "the new firmware did not answer", 2, 2, "unverified: the new firmware did not answer"),
        ("already_current", "the device answered SAME", 0, 3, "already current: the device answered SAME"),
        ("aborted", "aborted during phase2: cancelled", 4, 4, "aborted during phase 2: cancelled"),
        ("not_applicable", "the image is of the other kind", 64, 64, "not applicable: the image is of the other kind"),
    ],
)
def test_upgrade_wait_prints_the_outcome_in_words_and_exits_with_its_code(
    capsys, kind, message, code, strict_code, line
):
    final = finished(kind, message)
    assert run(followed(final, outcome_event(final)), "upgrade", "a", "v2.bin", "--wait") == code
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"job j1 on a: {line}")
    assert not re.search(r"(\w+): \1\b|\b(\w+) \2\b", out)  # no doubled words
    assert run(followed(final, outcome_event(final)), "upgrade", "a", "v2.bin", "--wait", "--strict") == strict_code


def test_json_output_has_the_apis_own_shapes(capsys):
    devices = {"devices": [{"name": "a", "state": "idle", "phase": None, "last_outcome": "succeeded"}]}
    jobs = {"jobs": [finished("succeeded", "upgraded: ok"), job("j0", state="interrupted", phase="phase2")]}
    shown = {"job": {**finished("succeeded", "upgraded: ok"), "history": []}}
    client = FakeControl(
        answers={
            ("GET", "/v1/devices"): devices,
            ("POST", "/v1/devices/probe"): devices,
            ("GET", "/v1/jobs"): jobs,
            ("GET", "/v1/jobs/j1"): shown,
            ("POST", "/v1/jobs"): {"job": job()},
            ("POST", "/v1/jobs/j1/cancel"): {"job": job(state="cancelling")},
            ("POST", "/v1/jobs/j0/resume"): {"job": job("j3", resumed_from="j0")},
        }
    )
    expected = [
        (("devices", "--json"), devices),
        (("devices", "--probe", "--json"), devices),
        (("jobs", "--json"), jobs),
        (("show", "j1", "--json"), shown),
        (("upgrade", "a", "v2.bin", "--json"), {"job": job()}),
        (("cancel", "j1", "--json"), {"job": job(state="cancelling")}),
        (("resume", "j0", "--json"), {"job": job("j3", resumed_from="j0")}),
    ]
    for argv, answer in expected:
        capsys.readouterr()
        assert run(client, *argv) == 0, argv
        assert json.loads(capsys.readouterr().out) == answer, argv
    final = finished("succeeded", "upgraded: ok")
    assert run(followed(final, outcome_event(final)), "upgrade", "a", "v2.bin", "--wait", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"job": final}


def test_watch_job_json_is_json_lines_ending_with_the_job(capsys):
    final = finished("succeeded", "upgraded: ok")
    client = followed(final, ("phase", {"type": "phase", "job": "j1", "phase": "phase1"}), outcome_event(final))
    assert run(client, "watch", "j1", "--json") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line.get("type") for line in lines] == ["job", "phase", "outcome", None]
    assert lines[-1] == {"job": final}


def test_jobs_has_a_time_column_and_one_spelling_for_phases_and_booleans(capsys, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        today = time.time()
        client = FakeControl(
            answers={
                ("GET", "/v1/jobs?device=a&limit=5"): {
                    "jobs": [
                        job("j2", created=today, phase="phase2", progress={"percent": 40.0}),
                        job("j1", state="interrupted", phase="phase1", resumable=True),
                    ]
                }
            }
        )
        assert run(client, "jobs", "--device", "a", "--limit", "5") == 0
        header, newer, older = capsys.readouterr().out.splitlines()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert header.split() == [
        "JOB",
        "CREATED",
        "DEVICE",
        "FIRMWARE",
        "STATE",
        "PHASE",
        "PERCENT",
        "OUTCOME",
        "RESUMABLE",
    ]
    assert re.match(r"j2 +\d\d:\d\d:\d\d +a +v2\.bin +running +phase 2 +40\.0% +- +no$", newer)
    assert re.match(r"j1 +2025-06-15 15:06 +a +v2\.bin +interrupted +phase 1 +- +interrupted +yes$", older)


def test_jobs_pages_with_the_cursor_the_daemon_gave(capsys, monkeypatch):
    """A page with older jobs ends with the command that shows them: the same filters, each word
    quoted for a shell with its value attached (a device name may start with a dash), and the
    daemon's cursor; the last page has no such line. The query is URL-encoded."""
    monkeypatch.delenv("NETOTA_CONTROL", raising=False)
    client = FakeControl(
        answers={
            ("GET", "/v1/jobs?device=-shelf+1&limit=1"): {"jobs": [job("j2", "-shelf 1")], "next_cursor": "1843"},
            ("GET", "/v1/jobs?device=-shelf+1&limit=1&cursor=1843"): {
                "jobs": [job("j1", "-shelf 1")],
                "next_cursor": None,
            },
        }
    )
    assert run(client, "jobs", "--device=-shelf 1", "--limit", "1") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "j2"
    assert lines[-1] == "older jobs: netota jobs '--device=-shelf 1' --limit=1 --cursor=1843"
    assert run(client, *shlex.split(lines[-1].split(": ", 1)[1])[1:]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["JOB", "j1"]


def test_the_next_page_command_keeps_an_explicit_control_and_never_the_token(capsys, monkeypatch):
    monkeypatch.delenv("NETOTA_CONTROL", raising=False)
    client = FakeControl(answers={("GET", "/v1/jobs"): {"jobs": [job("j2")], "next_cursor": "7"}})
    assert run(client, "jobs", "--control", "tcp:7000:interface=127.0.0.1", "--token", "s3cret") == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "older jobs: netota jobs --control=tcp:7000:interface=127.0.0.1 --cursor=7"
    )
    monkeypatch.setenv("NETOTA_CONTROL", "tcp:7000:interface=127.0.0.1")  # the next command gets it too
    assert run(client, "jobs", "--control", "tcp:7000:interface=127.0.0.1") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "older jobs: netota jobs --cursor=7"


def test_show_prints_human_times_and_durations(capsys, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    history = [
        {"time": 1_750_000_000.0, "state": "queued", "phase": "detect", "note": "created"},
        {"time": 1_750_000_000.5, "state": "running", "phase": "detect", "note": "running"},
        {"time": 1_750_000_012.0, "state": "running", "phase": "phase2", "note": "phase phase2"},
        {"time": 1_750_000_095.0, "state": "finished", "phase": "done", "note": "finished: succeeded"},
    ]
    shown = finished("succeeded", "upgraded: the device now runs firmware 2.0.0", history=history)
    shown.update(finished=1_750_000_095.0, point_of_no_return=True)
    try:
        assert run(FakeControl(answers={("GET", "/v1/jobs/j1"): {"job": shown}}), "show", "j1") == 0
        lines = capsys.readouterr().out.splitlines()
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    assert lines[:12] == [
        "job j1 on a: succeeded: the device now runs firmware 2.0.0",
        "  firmware            v2.bin",
        "  state               finished",
        "  phase               done",
        "  point of no return  yes",
        "  versions            1.0.0 -> 2.0.0",
        "  created             2025-06-15 15:06:40",
        "  started             2025-06-15 15:06:40 (queued 0.5 s)",
        "  finished            2025-06-15 15:08:15 (took 1 min 34 s)",
        "  resumable           no",
        "  resumed from        -",
        "  resumed by          -",
    ]
    assert lines[12] == "  history:"
    assert lines[13].split() == ["TIME", "AFTER", "STATE", "PHASE", "NOTE"]
    assert re.match(r"    2025-06-15 15:06:52 +\+12 s +running +phase 2 +phase 2$", lines[16])
    assert lines[17].endswith("+1 min 35 s  finished  done     finished: succeeded")


def test_the_daemon_stopping_is_one_plain_line_and_exit_69(capsys):
    """SIGTERM of the daemon while a job is followed: the job's final event (interrupted), then the
    shutdown event; the daemon no longer answers."""
    interrupted = job(state="interrupted", phase="phase2", point_of_no_return=True, finished=1_750_000_050.0)
    outcome = {"kind": "aborted", "message": "aborted during phase2: the daemon is shutting down", "phase": "phase2"}
    client = FakeControl(
        answers={
            ("POST", "/v1/jobs"): {"job": job()},
            ("GET", "/v1/jobs/j1"): DaemonUnavailable("can't reach the netota daemon at unix:x: connection refused"),
        },
        streams={
            "/v1/jobs/j1/events": [
                ("job", {"type": "job", "job": "j1", "snapshot": job(phase="phase2")}),
                (
                    "outcome",
                    {"type": "outcome", "job": "j1", "state": "interrupted", "outcome": outcome, "advice": "x"},
                ),
                ("shutdown", {"type": "shutdown", "message": "the daemon is shutting down"}),
            ]
        },
    )
    assert run(client, "upgrade", "a", "v2.bin", "--wait") == 69
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines()[-1] == (
        "netota: the daemon stopped; job j1 was interrupted in phase 2: resume it with netota resume j1"
    )
    assert "Failure" not in captured.err and "<" not in captured.err
    assert interrupted["state"] == "interrupted"

    # Its end not seen (the daemon stopped first): said as plainly.
    client = FakeControl(
        answers={("POST", "/v1/jobs"): {"job": job()}},
        streams={
            "/v1/jobs/j1/events": [
                ("job", {"type": "job", "job": "j1", "snapshot": job(phase="phase1")}),
                ("shutdown", {"type": "shutdown", "message": "the daemon is shutting down"}),
            ]
        },
    )
    assert run(client, "upgrade", "a", "v2.bin", "--wait") == 69
    assert capsys.readouterr().err.splitlines()[-1] == (
        "netota: the daemon stopped before job j1 ended (last seen in phase 1): "
        "once it is back, resume it with netota resume j1"
    )


def test_watch_started_mid_phase_shows_the_current_state_at_once(capsys):
    snapshot = job(
        phase="phase2",
        point_of_no_return=True,
        progress={
            "phase": "phase2",
            "percent": 42.0,
            "done_bytes": 126_000,
            "total_bytes": 300_000,
            "state": "transferring",
            "eta": 9.0,
            "point_of_no_return": True,
            "rate": 1000.0,
        },
    )
    client = FakeControl(
        streams={
            "/v1/jobs/j1/events": [
                ("job", {"type": "job", "job": "j1", "snapshot": snapshot}),
                DaemonUnavailable(
                    "the netota daemon at unix:x went away (the event stream broke: the connection was lost)"
                ),
            ]
        }
    )
    assert run(client, "watch", "j1") == 69
    err = capsys.readouterr().err
    lines = [line[9:] for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert lines[0] == "phase 2"
    assert lines[1].startswith("point of no return: do not power the device off")
    assert lines[-1].startswith("phase 2  42.0%  123.0 KiB/293.0 KiB") and "ETA 0:09" in lines[-1]
    assert err.splitlines()[-1].startswith("netota: the netota daemon at unix:x went away")


def test_watch_of_a_job_waiting_for_its_device_shows_the_attempt_at_once(capsys):
    waiting = {"phase": "phase1", "message": "connecting", "attempt": 4, "last_error": "connection refused"}
    client = FakeControl(
        streams={
            "/v1/jobs/j1/events": [
                ("job", {"type": "job", "job": "j1", "snapshot": job(phase="phase1", waiting=waiting)}),
                DaemonUnavailable("the netota daemon at unix:x went away"),
            ]
        }
    )
    assert run(client, "watch", "j1") == 69
    lines = [line[9:] for line in capsys.readouterr().err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]
    assert lines == ["phase 1", "phase 1  connecting (attempt 4, last: connection refused)"]


def test_a_refusal_is_its_message_and_resume_force_sends_force(capsys):
    refusal = ApiRefused(409, "superseded", "device a was upgraded since by job j9: netota resume j1 --force")
    client = FakeControl(answers={("POST", "/v1/jobs/j1/resume"): refusal})
    assert run(client, "resume", "j1") == 75
    assert capsys.readouterr().err == (
        "netota: device a was upgraded since by job j9: netota resume j1 --force (superseded)\n"
    )
    client = FakeControl(answers={("POST", "/v1/jobs/j1/resume"): {"job": job("j2", resumed_from="j1")}})
    assert run(client, "resume", "j1", "--force") == 0
    assert client.requests == [("POST", "/v1/jobs/j1/resume", {"force": True})]
    assert capsys.readouterr().out.splitlines()[0] == "job j1 resumed as job j2"


def test_a_job_that_ended_before_the_clients_stream_opened_is_not_missed(capsys):
    """The daemon snapshots a job as its stream opens: a job that ended before (a fast one) gives a
    stream of its final snapshot alone, and the client takes its end from it, alone or among
    several, with no outcome event."""
    answers: dict = {("POST", "/v1/jobs"): lambda body: {"job": job(f"j-{body['device']}", body["device"])}}
    streams = {}
    for device, kind in (("a", "failed"), ("b", "succeeded")):
        final = job(f"j-{device}", device, state="finished", kind=kind, message=f"{kind}: {device}")
        answers[("GET", f"/v1/jobs/j-{device}")] = {"job": final}
        streams[f"/v1/jobs/j-{device}/events"] = [("job", {"type": "job", "job": f"j-{device}", "snapshot": final})]
    assert run(FakeControl(answers, streams), "upgrade", "a", "v2.bin", "--wait") == 1
    assert capsys.readouterr().out.splitlines()[0] == "job j-a on a: failed: a"
    assert run(FakeControl(answers, streams), "upgrade", "b", "a", "v2.bin", "--wait") == 1
    rows = [line.split(None, 4) for line in capsys.readouterr().out.splitlines()]
    assert rows[1:] == [
        ["b", "j-b", "finished", "succeeded", "succeeded: b"],
        ["a", "j-a", "finished", "failed", "failed: a"],
    ]


def test_a_batch_exits_with_the_first_bad_devices_code_and_names_refusals(capsys):
    answers = {}

    def start(body):
        if body["device"] == "zz":
            raise ApiRefused(404, "unknown_device", "no device 'zz' in the configuration")
        return {"job": job(f"j-{body['device']}", body["device"])}

    answers[("POST", "/v1/jobs")] = start
    streams = {}
    for device, kind in (("a", "succeeded"), ("b", "failed")):
        final = job(f"j-{device}", device, kind=kind, message="upgraded: ok" if kind == "succeeded" else "ERR")
        answers[("GET", f"/v1/jobs/j-{device}")] = {"job": final}
        streams[f"/v1/jobs/j-{device}/events"] = [
            ("job", {"type": "job", "snapshot": job(f"j-{device}", device)}),
            ("outcome", {"type": "outcome", "state": "finished", "outcome": final["outcome"]}),
        ]
    client = FakeControl(answers, streams)
    assert run(client, "upgrade", "a", "b", "zz", "v2.bin", "--wait") == 1
    captured = capsys.readouterr()
    rows = [line.split(None, 4) for line in captured.out.splitlines()]
    assert rows[0] == ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]
    assert rows[1] == ["a", "j-a", "finished", "succeeded", "upgraded: ok"]
    assert rows[2] == ["b", "j-b", "finished", "failed", "ERR"]
    assert rows[3] == ["zz", "-", "refused", "-", "no device 'zz' in the configuration"]
    assert "netota: zz: no device 'zz' in the configuration (unknown_device)" in captured.err
    assert run(FakeControl(answers, streams), "upgrade", "a", "zz", "v2.bin", "--wait", "--json") == 64
    summary = json.loads(capsys.readouterr().out)
    assert summary["refused"]["zz"]["code"] == "unknown_device" and summary["jobs"][0]["id"] == "j-a"


# ---------------------------------------------------------------- a few subprocesses


def control_of(service) -> str:
    return f"unix:{service.socket_path}"


@pytest_twisted.ensureDeferred
async def test_upgrade_wait_against_a_daemon(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002, outcome=OutcomeKind.UNVERIFIED))
    service.privilegedStartService()
    service.startService()
    try:
        code, out, err = await run_netota(reactor, control_of(service), "upgrade", "a", "v2.bin", "--wait", "--json")
        assert code == 2, err
        answer = json.loads(out)
        assert answer["job"]["outcome"]["kind"] == "unverified" and answer["job"]["state"] == "finished"
        code, out, err = await run_netota(reactor, control_of(service), "upgrade", "b", "v2.bin", "--wait")
        assert code == 2, err
        assert "\r" not in err and "\x1b" not in err  # not a terminal: plain lines
        assert re.search(r"^\d\d:\d\d:\d\d phase 1  25\.0%", err, re.M) and "phase 2  100.0%" in err
    finally:
        await service.stopService()


class Client(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.out = b""
        self.err = b""

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest_twisted.ensureDeferred
async def test_the_daemon_stopping_under_a_watcher(tmp_path, reactor):
    """``netota watch JOB`` started mid-phase shows the phase at once; the daemon's stop ends it
    with one plain line and 69."""
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002, hold_in=Phase.PHASE2))
    service.privilegedStartService()
    service.startService()
    stopped = False
    try:
        record = await service.queue.start("a", "v2.bin")
        client = Client()
        following = streams_opened(service, 1, reactor)
        reactor.spawnProcess(
            client,
            PYTHON,
            [PYTHON, "-m", "netota_daemon", "watch", record["id"]],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{service.socket_path}"),
            path=str(ROOT),
        )
        await following
        await service.stopService()
        stopped = True
        client.ended.addTimeout(15, reactor)
        assert await client.ended == 69
    finally:
        if not stopped:
            await service.stopService()
    err = client.err.decode()
    assert err.splitlines()[-1] == (
        f"netota: the daemon stopped; job {record['id']} was interrupted in phase 2: "
        f"resume it with netota resume {record['id']}"
    ), err
    assert "Traceback" not in err and "Failure" not in err


@pytest_twisted.ensureDeferred
async def test_watch_all_follows_every_job_and_reports_the_daemon_going_away(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002))
    service.privilegedStartService()
    service.startService()
    stopped = False
    try:
        connected = streams_opened(service, 1, reactor)
        watching = Deferred.fromCoroutine(run_netota(reactor, control_of(service), "watch", "--json"))
        await connected
        job = await service.queue.start("b", "v2.bin")
        finished = service.queue.wait(job["id"])
        finished.addTimeout(10, reactor)
        await finished
        await service.stopService()
        stopped = True
        code, out, err = await watching
        assert code == 69 and "stopped or went away" in err
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines[0]["type"] == "snapshot"
        types = [e["type"] for e in lines if e.get("job") == job["id"]]
        assert types[0] == "state" and "phase" in types and "progress" in types and types[-1] == "outcome"
        assert lines[-1]["type"] == "shutdown"
    finally:
        if not stopped:
            await service.stopService()


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon_is_exit_69(tmp_path):
    out, err, code = await getProcessOutputAndValue(
        PYTHON,
        ["-m", "netota_daemon", "devices", "--control", f"unix:{tmp_path}/none.sock"],
        env=subprocess_env(),
        path=str(ROOT),
    )
    assert code == 69 and err.startswith(b"netota: can't reach the netota daemon at unix:")


@pytest_twisted.ensureDeferred
async def test_ctrl_c_while_waiting_leaves_the_job_running_and_exits_130(tmp_path, reactor):
    import signal

    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    service.privilegedStartService()
    service.startService()
    try:
        client = Client()
        following = streams_opened(service, 1, reactor)
        reactor.spawnProcess(
            client,
            PYTHON,
            [PYTHON, "-m", "netota_daemon", "upgrade", "a", "v2.bin", "--wait"],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{service.socket_path}"),
            path=str(ROOT),
        )
        await following  # the client follows its job's events
        client.transport.signalProcess(signal.SIGINT)
        client.ended.addTimeout(15, reactor)
        assert await client.ended == 130
        assert b"keeps running" in client.err
        (job,) = await service.queue.jobs()
        assert job["state"] == "running"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_upgrade_all_waits_for_every_device_and_prints_a_summary(tmp_path, reactor):
    factory = AutoJobFactory(step=0.002)
    service = make_service(tmp_path, reactor, factory, max_parallel=2)
    service.privilegedStartService()
    service.startService()
    # The fake jobs play only once the client follows all three (EventStreams.opened): fast as they
    # are, they would otherwise be past phase 1, or over, before its streams open, and there would
    # be no progress of theirs to see (their ends it would still see, in the streams' snapshots).
    following = streams_opened(service, 3, reactor)
    play = factory.on_run
    assert play is not None
    factory.on_run = lambda job: following.addCallback(lambda _: play(job))
    try:
        code, out, err = await run_netota(reactor, control_of(service), "upgrade", "--all", "v2.bin", "--wait")
        await following  # the client followed all three jobs
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]
        assert [line.split()[0] for line in lines[1:]] == ["a", "b", "c"]
        assert all("finished" in line and "succeeded" in line for line in lines[1:])
        # Progress of each device, prefixed with its name, on plain timestamped lines.
        assert re.search(r"^\d\d:\d\d:\d\d a: phase 1  ", err, re.M) and re.search(r"^\S+ c: phase 2  ", err, re.M)
        assert {j["state"] for j in await service.queue.jobs()} == {"finished"}
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_jobs_pages_through_a_daemons_journal(tmp_path, reactor):
    """Three jobs in the daemon's journal, two to a page: the newest two, then the line whose command
    shows the oldest one, then no further line."""
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002))
    service.privilegedStartService()
    service.startService()
    try:
        control = control_of(service)
        for device in ("a", "b", "c"):
            code, out, err = await run_netota(reactor, control, "upgrade", device, "v2.bin", "--wait")
            assert code == 0, err
        ids = [j["id"] for j in sorted(await service.queue.jobs(), key=lambda j: j["created"], reverse=True)]
        code, out, err = await run_netota(reactor, control, "jobs", "--limit", "2")
        assert code == 0, err
        lines = out.splitlines()
        assert [line.split()[0] for line in lines[1:3]] == ids[:2]
        assert lines[3].startswith("older jobs: netota jobs --limit=2 --cursor=")
        code, out, err = await run_netota(reactor, control, *shlex.split(lines[3].split(": ", 1)[1])[1:])
        assert code == 0, err
        assert [line.split()[0] for line in out.splitlines()] == ["JOB", ids[2]]
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_daemon_goes_away_exits_69_with_what_it_knows(tmp_path, reactor):
    """Both jobs held in phase 1, the daemon stops: each job's end is known (interrupted) or lost,
    never an unhandled error; exit 69, the summary lists both devices."""
    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    service.privilegedStartService()
    service.startService()
    stopped = False
    try:
        following = streams_opened(service, 2, reactor)
        batch = Deferred.fromCoroutine(
            run_netota(reactor, control_of(service), "upgrade", "a", "b", "a", "v2.bin", "--wait")
        )
        await following  # the client follows both jobs
        assert len(await service.queue.jobs()) == 2  # "a" named twice: one job
        await service.stopService()
        stopped = True
        code, out, err = await batch
        assert code == 69, err
        assert "Traceback" not in err and "interrupted; any job" not in err
        rows = [line.split()[0] for line in out.splitlines()[1:]]
        assert rows == ["a", "b"]
    finally:
        if not stopped:
            await service.stopService()


@pytest.mark.parametrize(
    "body, code", [(b'{"devices": "not a list"}', 70), (b"[1, 2]", 69), (b'{"error": "not an object"}', 69)]
)
@pytest_twisted.ensureDeferred
async def test_an_answer_the_client_does_not_understand_is_not_reported_as_ctrl_c(reactor, body, code):
    """Something that is not a netota daemon answers: a clear error and exit code, never the
    "interrupted" message and 130 of a Ctrl-C."""
    from twisted.web.server import Site

    class Answer(Resource):
        isLeaf = True

        def render_GET(self, request):
            request.setResponseCode(500 if b"error" in body else 200)
            return body

    port = reactor.listenTCP(0, Site(Answer()), interface="127.0.0.1")
    try:
        d = getProcessOutputAndValue(
            PYTHON,
            ["-m", "netota_daemon", "devices", "--control", f"http://127.0.0.1:{port.getHost().port}"],
            env=subprocess_env(),
            path=str(ROOT),
        )
        d.addTimeout(30, reactor)
        out, err, exit_code = await d
    finally:
        await port.stopListening()
    assert exit_code == code, err
    assert b"interrupted" not in err and err.startswith(b"netota: ")


class ClosedPipeReader(ProcessProtocol):
    """A child whose stdout is a pipe nobody reads any more (``| head`` that has exited)."""

    def __init__(self) -> None:
        self.ended: Deferred = Deferred()
        self.err = b""

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value.exitCode)


@pytest.mark.parametrize(
    "argv, expected",
    [(["show", "JOB"], 141), (["jobs"], 141), (["show", "--help"], 0)],  # argparse's help ignores EPIPE itself
)
@pytest_twisted.ensureDeferred
async def test_a_broken_pipe_ends_quietly(tmp_path, reactor, argv, expected):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002))
    service.privilegedStartService()
    service.startService()
    try:
        record = await service.queue.start("a", "v2.bin")
        finished = service.queue.wait(record["id"])
        finished.addTimeout(10, reactor)
        await finished
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first write: every write fails with EPIPE
        child = ClosedPipeReader()
        reactor.spawnProcess(
            child,
            PYTHON,
            [PYTHON, "-m", "netota_daemon", *[record["id"] if a == "JOB" else a for a in argv]],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{service.socket_path}"),
            path=str(ROOT),
            childFDs={0: "w", 1: write_end, 2: "r"},
        )
        os.close(write_end)
        child.ended.addTimeout(30, reactor)
        code = await child.ended
    finally:
        await service.stopService()
    assert child.err == b"", child.err.decode()
    assert code == expected


def test_the_limits_in_the_help_are_the_daemons(capsys, monkeypatch):
    """--limit's help repeats the daemon's page sizes (the client does not import the daemon)."""
    from netota_daemon.cli.main import build_parser
    from netota_daemon.daemon import batch_store, journal

    monkeypatch.setenv("COLUMNS", "200")  # one line per option
    for words, store in ((["jobs"], journal), (["batches"], batch_store)):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*words, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert f"1 to {store.MAX_PAGE}; default: the daemon's page, {store.DEFAULT_PAGE}" in text
