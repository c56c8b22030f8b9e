"""The control API's edges, in memory: every body through the bounded JSON decoder, paging, the
resume guard, the token compared as bytes; and the connections (channel) on a StringTransport with
a MemoryReactorClock: input that is not HTTP, oversized lines and bodies, idle and half-open
connections, the connection and stream limits. No socket is opened."""

from __future__ import annotations

import json

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from netota_daemon.control.api import ControlApi
from netota_daemon.control.channel import ControlSite
from netota_daemon.control.json_body import MAX_DEPTH, BodyError, decode_json
from netota_daemon.daemon.metrics import DaemonMetrics
from netota_daemon.engine.outcome import OutcomeKind, Phase
from netota_daemon.wire.ctp import request as ctp_request
from tests.daemon_fakes import ApiWorld


@pytest.fixture
def world(tmp_path):
    return ApiWorld(tmp_path)


def refusal(answer) -> tuple[int, str]:
    status, headers, body = answer
    assert headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "status"}
    assert body["error"]["status"] == status and body["error"]["message"]
    return status, body["error"]["code"]


def start_body(**options) -> bytes:
    return json.dumps({"device": "a", "firmware": "v2.bin", "options": options}).encode()


# ----- bodies


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"device": "a", "firmware": "v2.bin", "options": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": ' + b"9" * 400 + b"}}", "more than"),
        (b'{"device": "a", "firmware": "\\ud800.bin"}', "lone surrogate"),
        (b'{"device": "a\\udfff", "firmware": "v2.bin"}', "lone surrogate"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": NaN}}', "NaN"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": -Infinity}}', "Infinity"),
        (b'{"device": "a", "firmware": "v2.bin", "options": {"deadline": 1e400}}', "too large"),
        (b'{"device": "a", "device": "b", "firmware": "v2.bin"}', "twice"),
        (b'{"device": "\xff", "firmware": "v2.bin"}', "not UTF-8"),
        (b'{"device": "a", "firmware": "v2.bin"', "not valid JSON"),
    ],
)
def test_each_hostile_body_is_a_400_with_the_usual_error(world, body, words):
    answer = world.call("POST", "/v1/jobs", body)
    assert refusal(answer) == (400, "bad_json")
    assert words in answer[2]["error"]["message"]
    assert world.journal.jobs() == [] and world.factory.order == []


def test_a_body_over_64_kib_is_413(world):
    assert refusal(world.call("POST", "/v1/jobs", b" " * (64 * 1024 + 1))) == (413, "too_large")


def test_the_decoder_takes_what_json_is_and_bounds_only_what_hurts():
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    assert decode_json(nested.encode()) is not None
    assert decode_json(
        b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": -12.5e3, "c": "\\u00e9\\ud83d\\ude00"}'
    ) == {
        "a": "[" * 36,
        "b": -12500.0,
        "c": "é😀",  # a surrogate pair is one character, not a lone surrogate
    }
    with pytest.raises(BodyError, match="nested"):
        decode_json(("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1)).encode())


def test_a_huge_number_an_option_allows_in_json_is_still_out_of_range(world):
    assert refusal(world.call("POST", "/v1/jobs", start_body(deadline=1e300))) == (400, "bad_options")
    assert refusal(world.call("POST", "/v1/jobs", start_body(max_receive_timeouts=10**19))) == (400, "bad_options")


# ----- queries, paging, resume


def test_jobs_are_listed_a_page_at_a_time_with_a_cursor(world):
    ids = []
    for _ in range(7):
        status, _, body = world.call("POST", "/v1/jobs", b'{"device": "a", "firmware": "v2.bin"}')
        assert status == 201
        world.factory.order[-1].finish()
        ids.append(body["job"]["id"])
    seen, cursor = [], None
    while True:
        status, _, page = world.call("GET", "/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else ""))
        assert status == 200 and len(page["jobs"]) <= 3
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    status, _, default = world.call("GET", "/v1/jobs")
    assert [j["id"] for j in default["jobs"]] == ids[::-1] and default["next_cursor"] is None


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=1001",
        "limit=x",
        "limit=%C2%B2",
        "limit=1&limit=2",
        "cursor=abc",
        "cursor=-1",
        "sort=id",
        "limit=%FF",
    ],
)
def test_bad_queries_are_400(world, query):
    assert refusal(world.call("GET", f"/v1/jobs?{query}")) == (400, "bad_query")


def test_resume_of_a_job_whose_device_was_upgraded_since_needs_force(world):
    _, _, body = world.call("POST", "/v1/jobs", b'{"device": "a", "firmware": "v2.bin"}')
    old = body["job"]["id"]
    fake = world.factory.order[-1]
    fake.enter(Phase.PHASE2)
    fake.finish(OutcomeKind.FAILED, "dropped")
    world.call("POST", "/v1/jobs", b'{"device": "a", "firmware": "v2.bin"}')
    world.factory.order[-1].finish(OutcomeKind.SUCCEEDED, "upgraded", firmware_version_after="2.0.0")
    answer = world.call("POST", f"/v1/jobs/{old}/resume")
    assert refusal(answer) == (409, "superseded") and "force" in answer[2]["error"]["message"]
    assert refusal(world.call("POST", f"/v1/jobs/{old}/resume", b'{"force": "yes"}')) == (400, "bad_field")
    status, headers, body = world.call("POST", f"/v1/jobs/{old}/resume", b'{"force": true}')
    assert status == 201 and body["job"]["resumed_from"] == old
    assert headers.getRawHeaders(b"location") == [f"/v1/jobs/{body['job']['id']}".encode()]


def test_a_job_shows_its_latest_progress_and_waiting(world):
    _, _, body = world.call("POST", "/v1/jobs", b'{"device": "a", "firmware": "v2.bin"}')
    job_id = body["job"]["id"]
    fake = world.factory.order[-1]
    fake.waiting(3, "connection refused")
    job = world.call("GET", f"/v1/jobs/{job_id}")[2]["job"]
    assert job["waiting"] == {
        "phase": "detect",
        "message": "connecting",
        "attempt": 3,
        "last_error": "connection refused",
    }
    fake.enter(Phase.PHASE1)
    fake.progress(40.0)
    job = world.call("GET", f"/v1/jobs/{job_id}")[2]["job"]
    assert job["waiting"] is None and job["progress"]["percent"] == 40.0 and job["progress"]["basis"] == "offset"
    device = world.call("GET", "/v1/devices")[2]["devices"][0]
    assert device["progress"] == job["progress"] and device["waiting"] is None


# ----- the token


def test_the_token_is_compared_as_bytes(tmp_path):
    world = ApiWorld(tmp_path, token="s3cr\u00e9t")  # refused by the config; here, the bytes still decide
    assert refusal(world.call("GET", "/v1/status")) == (401, "unauthorized")
    latin1 = {b"Authorization": [b"Bearer s3cr\xe9t"]}  # the same text in latin-1: other bytes
    assert refusal(world.call("GET", "/v1/status", headers=latin1)) == (401, "unauthorized")
    utf8 = {b"Authorization": [b"Bearer s3cr\xc3\xa9t"]}
    assert world.call("GET", "/v1/status", headers=utf8)[0] == 200


# ----- the connections


class Connection:
    """One ControlChannel on a StringTransport, built by the world's site."""

    def __init__(self, world: ApiWorld, site: ControlSite | None = None) -> None:
        self.transport = StringTransport()
        self.channel = (site or world.api.site).buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def answer(self) -> tuple[int, dict]:
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


TLS_HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(32)


@pytest.mark.parametrize(
    "data, status, code",
    [
        (TLS_HELLO, 400, "not_http"),
        (ctp_request("APP_ACCESS", "PUT", type="0", ver="20906"), 400, "not_http"),
        (b"\x00\x01\x02\x03", 400, "not_http"),
        (b"get / HTTP/1.1\r\n", 400, "not_http"),
        (b"GET /v1/status HTTP/1.1\r\nX-Long: " + b"a" * 20 * 1024 + b"\r\n\r\n", 400, "bad_request"),
        (b"GET " + b"/" * 20 * 1024, 400, "bad_request"),
        (b"GET /v1/status\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/status HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400, "bad_request"),
        (b"GET /v1/status HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 400, "bad_request"),
        (b"POST /v1/jobs HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n", 413, "too_large"),
        (
            b"POST /v1/jobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(5)),
            413,
            "too_large",
        ),
    ],
)
def test_input_that_is_not_a_request_we_serve_gets_a_json_answer_and_the_connection_closes(world, data, status, code):
    connection = Connection(world)
    connection.send(data)
    got_status, body = connection.answer()
    assert (got_status, body["error"]["code"], body["error"]["status"]) == (status, code, status)
    assert body["error"]["message"] and connection.closed
    assert world.journal.jobs() == []


def test_a_request_that_never_arrives_whole_times_out_with_408(world):
    connection = Connection(world)
    connection.send(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")  # half a request, then nothing
    world.clock.advance(59)
    assert not connection.closed
    world.clock.advance(1)
    assert connection.answer()[0] == 408 and connection.closed


def test_a_trickling_request_is_cut_off_after_the_timeout_from_its_first_byte(world):
    connection = Connection(world)
    for byte in b"GET /v1/status HTTP/1.1\r\n":
        connection.send(bytes([byte]))
        world.clock.advance(5)  # well inside the idle timeout each time
        if connection.closed:
            break
    assert connection.closed and connection.answer()[0] == 408


def test_idle_connections_are_closed_before_and_between_requests(world):
    silent = Connection(world)
    world.clock.advance(60)
    assert silent.closed and silent.transport.value() == b""  # nothing to answer
    used = Connection(world)
    used.send(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert used.transport.value().startswith(b"HTTP/1.1 200 ") and not used.closed
    world.clock.advance(60)
    assert used.closed


def test_a_full_house_of_idle_connections_makes_room_for_a_new_one(tmp_path):
    world = ApiWorld(tmp_path, max_connections=16)
    idle = [Connection(world) for _ in range(16)]
    for n, connection in enumerate(idle):
        connection.channel.last_activity = n  # the first is the longest idle
    newcomer = Connection(world)
    assert idle[0].closed and not any(c.closed for c in idle[1:])
    newcomer.send(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert newcomer.transport.value().startswith(b"HTTP/1.1 200 ")


def test_when_every_connection_is_busy_a_new_one_gets_503_and_streams_leave_room(tmp_path):
    world = ApiWorld(tmp_path, max_connections=16)
    world.hold_probes = True
    streams = [Connection(world) for _ in range(8)]
    for connection in streams:
        connection.send(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"event: snapshot" in connection.transport.value()
    ninth = Connection(world)
    ninth.send(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")  # streams may not take the reserve
    assert b'"too_many_streams"' in ninth.transport.value()
    assert ninth.transport.value().startswith(b"HTTP/1.1 503 ")
    from twisted.internet.error import ConnectionDone
    from twisted.python.failure import Failure

    ninth.channel.connectionLost(Failure(ConnectionDone()))  # it goes away
    busy = [Connection(world) for _ in range(8)]
    for connection in busy:
        connection.send(b"POST /v1/devices/probe HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    assert len(world.api.site.channels) == 16 and all(not c.channel.idle for c in busy)
    refused = Connection(world)
    assert refused.answer()[1]["error"]["code"] == "too_many_connections" and refused.closed
    for d in world.held_probes:
        d.callback(None)
    assert all(c.transport.value().startswith(b"HTTP/1.1 200 ") for c in busy)


def test_the_metrics_endpoint_serves_only_metrics_with_the_control_endpoints_bounds(world):
    metrics = DaemonMetrics({"a": None}, "9.9.9", start_time=1000.0)
    api = ControlApi(world.queue, world.registry, world.prober, world.clock, metrics=metrics)
    site = api.make_metrics_site(token="t0ken")
    scrape = Connection(world, site)
    scrape.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n")
    assert scrape.transport.value().startswith(b"HTTP/1.1 200 ")
    assert b'netota_build_info{version="9.9.9"} 1.0' in scrape.transport.value()
    anonymous = Connection(world, site)
    anonymous.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert anonymous.answer()[1]["error"]["code"] == "unauthorized"
    api_path = Connection(world, site)
    api_path.send(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t0ken\r\n\r\n")
    assert api_path.answer()[1]["error"]["code"] == "not_found"
    hello = Connection(world, site)
    hello.send(TLS_HELLO)
    assert hello.answer()[1]["error"]["code"] == "not_http" and hello.closed
    silent = Connection(world, site)
    world.clock.advance(60)
    assert silent.closed and silent.transport.value() == b""


def test_a_body_of_whitespace_is_not_json_but_no_body_is_none(world):
    """An endpoint whose fields are all optional takes no body as {}; a body of blanks is not JSON."""
    answer = world.call("POST", "/v1/devices/probe", b" \r\n")
    assert refusal(answer) == (400, "bad_json")
    assert world.call("POST", "/v1/devices/probe", b"")[0] == 200


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b'"' + b'\\"' * 32000, "not valid JSON"),  # an unterminated string of escaped quotes
        (b'{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[", "b": ' + b"[" * 10 + b"]" * 10 + b"}", None),
        (b'["\\\\", ' + b"[" * 40 + b"]" * 40 + b"]", "nested"),  # an escaped backslash ends its string
        (b'["\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["]', None),  # an escaped quote does not
    ],
)
def test_the_nesting_count_skips_brackets_inside_strings_and_follows_escapes(body, words):
    if words is None:
        assert decode_json(body) is not None
    else:
        with pytest.raises(BodyError, match=words):
            decode_json(body)
