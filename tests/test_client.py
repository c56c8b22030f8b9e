"""The ``netota`` client: its event-stream parser, control addresses, and the commands as
subprocesses against an in-process daemon with fake jobs (exit codes, JSON, the daemon going away)."""

from __future__ import annotations

import json
import re

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue

from netota_daemon.cli.control_client import EventStreamParser, control_endpoint, event_from_json
from netota_daemon.engine.events import PhaseChanged, Progress
from netota_daemon.engine.outcome import OutcomeKind, Phase
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.daemon_fakes import AutoJobFactory, make_service, streams_opened

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
            "phase": "phase1",
            "bytes_served": 10,
            "total_bytes": 20,
            "percent": 50.0,
            "device_percent": 49,
            "rate": 5.0,
            "point_of_no_return": False,
        }
    )
    assert progress == Progress(Phase.PHASE1, 10, 20, 50.0, 49, 5.0, False)
    assert event_from_json({"type": "phase", "phase": "nonsense"}) is None
    assert event_from_json({"type": "outcome"}) is None


async def netota(service, *args: str, timeout: float = 30) -> tuple[int, str, str]:
    from twisted.internet import reactor

    d = getProcessOutputAndValue(
        PYTHON,
        ["-m", "netota_daemon", *args],
        env=subprocess_env(NETOTA_CONTROL=f"unix:{service.socket_path}"),
        path=str(ROOT),
    )
    d.addTimeout(timeout, reactor)
    out, err, code = await d
    return code, out.decode(), err.decode()


@pytest.mark.parametrize(
    "kind, expected", [(OutcomeKind.FAILED, 1), (OutcomeKind.UNVERIFIED, 2), (OutcomeKind.ALREADY_CURRENT, 0)]
)
@pytest_twisted.ensureDeferred
async def test_upgrade_wait_exits_with_the_outcomes_code(tmp_path, reactor, kind, expected):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002, outcome=kind))
    service.privilegedStartService()
    service.startService()
    try:
        code, out, err = await netota(service, "upgrade", "a", "v2.bin", "--wait", "--json")
        assert code == expected, err
        job = json.loads(out)
        assert job["outcome"]["kind"] == kind.value and job["state"] == "finished"
        code, out, err = await netota(service, "upgrade", "a", "v2.bin", "--wait", "--strict")
        assert code == (3 if kind is OutcomeKind.ALREADY_CURRENT else expected)
        assert kind.value in out
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_watch_all_follows_every_job_and_reports_the_daemon_going_away(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002))
    service.privilegedStartService()
    service.startService()
    stopped = False
    try:
        from twisted.internet.defer import Deferred

        connected = streams_opened(service, 1, reactor)
        watching = Deferred.fromCoroutine(netota(service, "watch", "--json"))
        await connected
        job = service.queue.start("b", "v2.bin")
        finished = service.queue.wait(job["id"])
        finished.addTimeout(10, reactor)
        await finished
        await service.stopService()
        stopped = True
        code, out, err = await watching
        assert code == 69 and "shutting down" in err
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
    code = (
        await getProcessOutputAndValue(
            PYTHON,
            ["-m", "netota_daemon", "devices", "--control", f"unix:{tmp_path}/none.sock"],
            env=subprocess_env(),
            path=str(ROOT),
        )
    )[2]
    assert code == 69


@pytest_twisted.ensureDeferred
async def test_ctrl_c_while_waiting_leaves_the_job_running_and_exits_130(tmp_path, reactor):
    import signal

    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import ProcessProtocol

    from netota_daemon.engine.outcome import Phase

    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    service.privilegedStartService()
    service.startService()
    try:

        class Client(ProcessProtocol):
            def __init__(self) -> None:
                self.ended: Deferred = Deferred()
                self.err = b""

            def errReceived(self, data: bytes) -> None:
                self.err += data

            def processEnded(self, reason) -> None:
                self.ended.callback(reason.value.exitCode)

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
        (job,) = service.queue.jobs()
        assert job["state"] == "running"
    finally:
        await service.stopService()


class PerDeviceOutcome(AutoJobFactory):
    """Auto jobs whose outcome depends on the device."""

    def __init__(self, outcomes: dict[str, OutcomeKind]) -> None:
        super().__init__(step=0.002)
        self.outcomes = outcomes

    def outcome_for(self, job) -> OutcomeKind:
        return self.outcomes.get(job.target.name, OutcomeKind.SUCCEEDED)


@pytest_twisted.ensureDeferred
async def test_upgrade_all_waits_for_every_device_and_prints_a_summary(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002), max_parallel=2)
    service.privilegedStartService()
    service.startService()
    try:
        code, out, err = await netota(service, "upgrade", "--all", "v2.bin", "--wait")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["DEVICE", "JOB", "STATE", "OUTCOME", "MESSAGE"]
        assert [line.split()[0] for line in lines[1:]] == ["a", "b", "c"]
        assert all("finished" in line and "succeeded" in line for line in lines[1:])
        # Progress of each device, prefixed with its name, on plain timestamped lines.
        assert re.search(r"^\d\d:\d\d:\d\d a: phase 1  ", err, re.M) and re.search(r"^\S+ c: phase 2  ", err, re.M)
        assert {j["state"] for j in service.queue.jobs()} == {"finished"}
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_exits_non_zero_when_any_device_fails_or_is_refused(tmp_path, reactor):
    service = make_service(tmp_path, reactor, PerDeviceOutcome({"b": OutcomeKind.FAILED}))
    service.privilegedStartService()
    service.startService()
    try:
        code, out, err = await netota(service, "upgrade", "a", "b", "v2.bin", "--wait", "--json")
        assert code == 1, err
        summary = json.loads(out)
        assert [(j["device"], j["outcome"]["kind"]) for j in summary["jobs"]] == [("a", "succeeded"), ("b", "failed")]
        code, out, err = await netota(service, "upgrade", "a", "zz", "v2.bin", "--wait", "--json")
        assert code == 64, err
        summary = json.loads(out)
        assert summary["refused"]["zz"]["code"] == "unknown_device"
        assert summary["jobs"][0]["outcome"]["kind"] == "succeeded"
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_batch_whose_daemon_goes_away_exits_69_with_what_it_knows(tmp_path, reactor):
    """Both jobs held in phase 1, the daemon stops: each job's end is known (interrupted) or lost,
    never an unhandled error; exit 69, the summary lists both devices."""
    from twisted.internet.defer import Deferred

    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    service.privilegedStartService()
    service.startService()
    stopped = False
    try:
        following = streams_opened(service, 2, reactor)
        batch = Deferred.fromCoroutine(netota(service, "upgrade", "a", "b", "a", "v2.bin", "--wait"))
        await following  # the client follows both jobs
        assert len(service.queue.jobs()) == 2  # "a" named twice: one job
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
    from twisted.web.resource import Resource
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
