"""The control API over a real UNIX socket (in-process daemon, fake engine jobs): every endpoint,
every error, the event streams, the bearer token."""

from __future__ import annotations

import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from netota_daemon.cli.control_client import ApiRefused, ControlClient
from netota_daemon.engine.outcome import Phase
from tests.daemon_fakes import AutoJobFactory, FakeJobFactory, make_service, streams_opened


async def started(service):
    service.privilegedStartService()
    service.startService()
    return service


@pytest.fixture
def held(tmp_path, reactor):
    """A daemon whose jobs stay in phase 1 until cancelled."""
    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    service.privilegedStartService()
    service.startService()
    yield service
    pytest_twisted.blockon(service.stopService())


def client_for(service, reactor, token=None):
    return ControlClient(reactor, f"unix:{service.socket_path}", token)


async def refused(coro) -> ApiRefused:
    try:
        await coro
    except ApiRefused as e:
        return e
    raise AssertionError("the request was not refused")


@pytest_twisted.ensureDeferred
async def test_socket_mode_is_0660(held):
    assert stat.S_IMODE(os.stat(held.socket_path).st_mode) == 0o660
    assert stat.S_ISSOCK(os.stat(held.socket_path).st_mode)


@pytest_twisted.ensureDeferred
async def test_devices_start_list_show(held, reactor):
    client = client_for(held, reactor)
    devices = (await client.request("GET", "/v1/devices"))["devices"]
    assert [d["name"] for d in devices] == ["a", "b", "c"] and devices[0]["state"] == "idle"
    job = (await client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))["job"]
    assert job["state"] == "running" and job["device"] == "a"
    devices = (await client.request("GET", "/v1/devices"))["devices"]
    assert devices[0]["state"] == "running" and devices[0]["job"] == job["id"]
    jobs = (await client.request("GET", "/v1/jobs"))["jobs"]
    assert [j["id"] for j in jobs] == [job["id"]]
    assert (await client.request("GET", "/v1/jobs?device=b"))["jobs"] == []
    shown = (await client.request("GET", f"/v1/jobs/{job['id']}"))["job"]
    assert shown["history"][0]["note"] == "created"
    status = await client.request("GET", "/v1/status")
    assert status["running"] == 1 and status["max_parallel"] == 2


@pytest_twisted.ensureDeferred
async def test_busy_is_409_and_leaves_the_running_job_alone(held, reactor):
    client = client_for(held, reactor)
    job = (await client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))["job"]
    error = await refused(client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))
    assert (error.status, error.code) == (409, "busy")
    assert (await client.request("GET", f"/v1/jobs/{job['id']}"))["job"]["state"] == "running"


@pytest_twisted.ensureDeferred
async def test_queued_jobs_show_their_position(held, reactor):
    client = client_for(held, reactor)
    for device in ("a", "b"):
        await client.request("POST", "/v1/jobs", {"device": device, "firmware": "v2.bin"})
    job = (await client.request("POST", "/v1/jobs", {"device": "c", "firmware": "v2.bin"}))["job"]
    assert job["state"] == "queued" and job["position"] == 1
    devices = {d["name"]: d for d in (await client.request("GET", "/v1/devices"))["devices"]}
    assert devices["c"]["state"] == "queued" and devices["c"]["queue_position"] == 1


@pytest.mark.parametrize(
    "body, status, code",
    [
        (b"{not json", 400, "bad_json"),
        (b"[1, 2]", 400, "bad_json"),
        (b"", 400, "bad_json"),
        (b'{"device": "a", "firmware": "v2.bin", "force": true}', 400, "unknown_field"),
        (b'{"device": "a"}', 400, "missing_field"),
        (b'{"device": 5, "firmware": "v2.bin"}', 400, "bad_field"),
        (b'{"device": "zz", "firmware": "v2.bin"}', 404, "unknown_device"),
        (b'{"device": "a", "firmware": "../v2.bin"}', 403, "firmware_outside"),
        (b'{"device": "a", "firmware": "/etc/passwd"}', 403, "firmware_outside"),
        (b'{"device": "a", "firmware": "escape.bin"}', 403, "firmware_outside"),
        (b'{"device": "a", "firmware": "missing.bin"}', 404, "firmware_not_found"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"nope": 1}}', 400, "bad_options"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": NaN}}', 400, "bad_json"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": 1e999}}', 400, "bad_json"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": 1e300}}', 400, "bad_options"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_4xx_with_a_json_error(held, reactor, tmp_path, body, status, code):
    import treq

    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 10)
    escape = held.config.firmware_dir / "escape.bin"
    if not escape.is_symlink():
        escape.symlink_to(outside)
    client = client_for(held, reactor)
    response = await client._http.post("http://netota/v1/jobs", data=body, timeout=10)
    answer = json.loads(await treq.content(response))
    assert response.code == status
    assert answer["error"]["code"] == code and answer["error"]["message"]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert (await client.request("GET", "/v1/jobs"))["jobs"] == []  # nothing was created


@pytest_twisted.ensureDeferred
async def test_unknown_paths_methods_and_jobs(held, reactor):
    client = client_for(held, reactor)
    assert (await refused(client.request("GET", "/v2/devices"))).status == 404
    assert (await refused(client.request("GET", "/v1/jobs/nope"))).code == "unknown_job"
    assert (await refused(client.request("POST", "/v1/jobs/nope/cancel", {}))).status == 404
    assert (await refused(client.request("POST", "/v1/jobs/nope/resume", {}))).status == 404
    assert (await refused(client.request("GET", "/v1/jobs/nope/events"))).status == 404
    assert (await refused(client.request("DELETE", "/v1/devices"))).status == 405
    assert (await refused(client.request("GET", "/v1/jobs?limit=x"))).code == "bad_query"
    assert (await refused(client.request("GET", "/v1/jobs?limit=99999999999999999999"))).code == "bad_query"
    assert (await refused(client.request("GET", "/v1/jobs?device=zz"))).code == "unknown_device"
    assert (await refused(client.request("POST", "/v1/jobs/x/cancel", {"why": 1}))).code == "unknown_field"


@pytest_twisted.ensureDeferred
async def test_cancel_then_cancel_again_is_refused_then_resume(held, reactor):
    client = client_for(held, reactor)
    job = (await client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))["job"]
    events: list[tuple[str, dict]] = []
    following = streams_opened(held, 1, reactor)
    d = Deferred.fromCoroutine(
        client.stream(f"/v1/jobs/{job['id']}/events", lambda t, d: events.append((t, d)) and False)
    )
    d.addTimeout(10, reactor)
    await following
    cancelled = (await client.request("POST", f"/v1/jobs/{job['id']}/cancel", {"reason": "test"}))["job"]
    assert cancelled["state"] == "cancelling"
    await d  # the stream ends after the outcome
    assert events[0][0] == "job"
    assert events[-1][0] == "outcome" and events[-1][1]["outcome"]["kind"] == "aborted"
    error = await refused(client.request("POST", f"/v1/jobs/{job['id']}/cancel", {}))
    assert (error.status, error.code) == (409, "not_active")
    resumed = (await client.request("POST", f"/v1/jobs/{job['id']}/resume", {}))["job"]
    assert resumed["resumed_from"] == job["id"] and resumed["state"] == "running"
    error = await refused(client.request("POST", f"/v1/jobs/{job['id']}/resume", {}))
    assert (error.status, error.code) == (409, "not_resumable")


@pytest_twisted.ensureDeferred
async def test_event_streams_carry_phase_progress_and_outcome(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.005))
    await started(service)
    try:
        client = client_for(service, reactor)
        everything: list[tuple[str, dict]] = []
        all_done = Deferred.fromCoroutine(
            client.stream("/v1/events", lambda t, d: everything.append((t, d)) or t == "outcome")
        )
        job = (await client.request("POST", "/v1/jobs", {"device": "b", "firmware": "v2.bin"}))["job"]
        one: list[tuple[str, dict]] = []
        job_done = Deferred.fromCoroutine(
            client.stream(f"/v1/jobs/{job['id']}/events", lambda t, d: one.append((t, d)) and False)
        )
        job_done.addTimeout(10, reactor)
        all_done.addTimeout(10, reactor)
        await job_done
        await all_done
        kinds = [t for t, _ in one]
        assert kinds[0] == "job" and kinds[-1] == "outcome"
        phases = [d["phase"] for t, d in one if t == "phase"]
        assert "phase1" in phases and "phase2" in phases
        assert any(t == "progress" and d["phase"] == "phase2" and d["point_of_no_return"] for t, d in one)
        assert one[-1][1]["outcome"]["kind"] == "succeeded"
        assert everything[0][0] == "snapshot"
        assert everything[-1][0] == "outcome" and everything[-1][1]["job"] == job["id"]
        # A finished job's stream gives its snapshot and ends.
        late: list[tuple[str, dict]] = []
        await client.stream(f"/v1/jobs/{job['id']}/events", lambda t, d: late.append((t, d)) and False)
        assert [t for t, _ in late] == ["job"] and late[0][1]["snapshot"]["state"] == "finished"
        devices = (await client.request("GET", "/v1/devices"))["devices"]
        b = next(d for d in devices if d["name"] == "b")
        assert (b["last_outcome"], b["firmware_version"]) == ("succeeded", "2.0.0")
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_bearer_token_is_required_when_configured(tmp_path, reactor):
    service = make_service(tmp_path, reactor, FakeJobFactory(), token="s3cret")
    await started(service)
    try:
        error = await refused(client_for(service, reactor).request("GET", "/v1/devices"))
        assert (error.status, error.code) == (401, "unauthorized")
        error = await refused(client_for(service, reactor, token="wrong").request("GET", "/v1/devices"))
        assert error.status == 401
        devices = await client_for(service, reactor, token="s3cret").request("GET", "/v1/devices")
        assert len(devices["devices"]) == 3
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_a_request_after_the_daemon_stopped_is_503_not_an_internal_error(tmp_path, reactor):
    """A connection accepted before the listener closed can still deliver a request after the
    journal is closed: it gets 503 shutting_down (the client says the daemon went away)."""
    from twisted.web.test.requesthelper import DummyRequest

    service = make_service(tmp_path, reactor, FakeJobFactory())
    await started(service)
    job = await service.queue.start("a", "v2.bin")
    await service.stopService()
    request = DummyRequest([b"v1", b"jobs", job["id"].encode()])
    service.control.render(request)
    assert request.responseCode == 503 and request.finished
    assert json.loads(b"".join(request.written))["error"]["code"] == "shutting_down"


class _SlowReaderRequest:
    """Just enough of a twisted.web request for an EventStream: what it writes, kept in order."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.producer = None
        self.finished = False
        self._finish: Deferred = Deferred()

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def notifyFinish(self) -> Deferred:
        return self._finish

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def events(self) -> list[tuple[str, dict]]:
        from netota_daemon.cli.control_client import EventStreamParser

        return EventStreamParser().feed(b"".join(self.written))


def test_a_stream_whose_reader_stalls_holds_only_the_latest_progress_of_each_job():
    from twisted.internet.task import Clock

    from netota_daemon.control.events import EventStream

    subscribers = []
    request = _SlowReaderRequest()
    stream = EventStream(request, accept=lambda e: True, last=lambda e: e["type"] == "outcome", clock=Clock())
    stream.open(lambda deliver: (subscribers.append(deliver), lambda: subscribers.remove(deliver))[1])
    deliver = subscribers[0]
    assert request.producer is stream

    def progress(job: str, percent: float) -> dict:
        return {"type": "progress", "job": job, "device": job, "phase": "phase1", "percent": percent}

    deliver(progress("j1", 1.0))
    stream.pauseProducing()  # the client stopped reading: the transport's buffer is full
    for percent in range(2, 1000):
        deliver(progress("j1", percent / 10))
        deliver(progress("j2", percent / 10))
    deliver({"type": "phase", "job": "j2", "device": "j2", "phase": "phase2"})  # j2's held progress is stale now
    assert len(request.events()) == 2  # j1 1 %, then the phase change: nothing piled up
    stream.resumeProducing()
    deliver({"type": "outcome", "job": "j1", "device": "j1"})
    got = [(t, d["job"], d.get("percent")) for t, d in request.events()]
    assert got == [("progress", "j1", 1.0), ("phase", "j2", None), ("progress", "j1", 99.9), ("outcome", "j1", None)]
    assert request.finished and request.producer is None and subscribers == []


@pytest_twisted.ensureDeferred
async def test_on_shutdown_every_watcher_gets_each_jobs_final_event_then_shutdown_then_its_end(tmp_path, reactor):
    """SIGTERM or a restart with clients watching: each stream (all jobs, or one) carries the
    final event of every job it follows, then ``shutdown``, then the response ends cleanly."""
    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1), max_parallel=2)
    await started(service)
    client = client_for(service, reactor)
    jobs = {}
    for device in ("a", "b", "c"):  # a and b run, c is queued
        jobs[device] = (await client.request("POST", "/v1/jobs", {"device": device, "firmware": "v2.bin"}))["job"]
    assert jobs["c"]["state"] == "queued"
    watched: dict[str, list[tuple[str, dict]]] = {}
    ended = []
    following = streams_opened(service, 4, reactor)
    for name, path in (
        ("all 1", "/v1/events"),
        ("all 2", "/v1/events"),
        ("job a", f"/v1/jobs/{jobs['a']['id']}/events"),
        ("job c", f"/v1/jobs/{jobs['c']['id']}/events"),
    ):
        events = watched.setdefault(name, [])
        d = Deferred.fromCoroutine(client.stream(path, lambda t, d, events=events: events.append((t, d)) and False))
        d.addTimeout(20, reactor)
        ended.append(d)
    await following
    await service.stopService()
    for d in ended:
        await d  # each stream ended cleanly (a broken one raises DaemonUnavailable)
    ids = {jobs[d]["id"] for d in jobs}
    for name in ("all 1", "all 2"):
        events = watched[name]
        assert events[-1][0] == "shutdown", name
        finals = {d["job"]: d for t, d in events if t == "outcome"}
        assert set(finals) == ids, name
        assert all(d["state"] == "interrupted" for d in finals.values())
    for name, job in (("job a", jobs["a"]), ("job c", jobs["c"])):
        types = [t for t, _ in watched[name]]
        assert types[0] == "job" and types[-2:] == ["outcome", "shutdown"], (name, types)
        assert watched[name][-2][1]["job"] == job["id"] and watched[name][-2][1]["state"] == "interrupted"


def test_a_reader_that_never_reads_is_cut_off_once_a_mebibyte_of_events_waits_for_it():
    from twisted.internet.task import Clock

    from netota_daemon.control.events import MAX_UNREAD_BYTES, EventStream

    class Transport:
        aborted = False

        def abortConnection(self) -> None:
            self.aborted = True

    subscribers = []
    request = _SlowReaderRequest()
    request.transport = Transport()
    stream = EventStream(request, accept=lambda e: True, last=lambda e: False, clock=Clock())
    stream.open(lambda deliver: (subscribers.append(deliver), lambda: subscribers.remove(deliver))[1])
    stream.pauseProducing()
    state = {"type": "state", "job": "j1", "device": "d", "state": "running", "message": "x" * 1000}
    deliver = subscribers[0]
    for _ in range(2 * MAX_UNREAD_BYTES // 1000):  # a phase, state or outcome is never dropped...
        deliver(state)
        if request.transport.aborted:
            break
    assert request.transport.aborted and stream.closed and subscribers == []  # ...the reader is
    assert len(b"".join(request.written)) <= MAX_UNREAD_BYTES + 2048


class _RawClient:
    """Bytes to the control socket and everything it answers, until it closes the connection."""

    def __init__(self) -> None:
        from twisted.internet.protocol import Protocol

        self.received = b""
        self.closed: Deferred = Deferred()
        outer = self

        class _Protocol(Protocol):
            def dataReceived(self, data: bytes) -> None:
                outer.received += data

            def connectionLost(self, reason=None) -> None:
                outer.closed.callback(outer.received)

        self.protocol = _Protocol()


@pytest_twisted.ensureDeferred
async def test_the_listening_daemon_answers_a_tls_hello_with_json_and_closes_idle_connections(tmp_path, reactor):
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    service = make_service(tmp_path, reactor, FakeJobFactory(), control_idle_timeout=0.5)
    await started(service)
    try:
        hello = _RawClient()
        await connectProtocol(UNIXClientEndpoint(reactor, service.socket_path), hello.protocol)
        hello.protocol.transport.write(bytes.fromhex("16030100c4010000c00303") + bytes(32))
        answer = await hello.closed.addTimeout(10, reactor)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["code"] == "not_http"

        idle = _RawClient()
        await connectProtocol(UNIXClientEndpoint(reactor, service.socket_path), idle.protocol)
        assert await idle.closed.addTimeout(10, reactor) == b""  # closed after 0.5 s, nothing said

        half = _RawClient()
        await connectProtocol(UNIXClientEndpoint(reactor, service.socket_path), half.protocol)
        half.protocol.transport.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        answer = await half.closed.addTimeout(10, reactor)
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer
    finally:
        await service.stopService()
