"""A property test of the control API over random requests (Hypothesis, in memory through StubTreq):
whatever the method, path, query string and body, the answer is a documented success or a JSON 4xx
with the usual error body, never a 5xx and never a traceback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netota_daemon.engine.outcome import OutcomeKind
from tests.daemon_fakes import ApiWorld, fired

ROOT = Path(__file__).resolve().parent.parent

#: Every error code the API documents (docs/control-api.md's table).
DOCUMENTED_CODES = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", (ROOT / "docs" / "control-api.md").read_text(), re.M))

SEGMENTS = ["v1", "jobs", "devices", "probe", "status", "events", "cancel", "resume", "", "..", "%00"]
NAMES = ["a", "b", "c", "zz", "", "v2.bin", "../v2.bin", "/etc/passwd", "\ud800", "a\x00"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)

plausible_bodies = st.fixed_dictionaries(
    {},
    optional={
        "device": st.sampled_from(NAMES) | json_values,
        "firmware": st.sampled_from(NAMES) | json_values,
        "options": st.dictionaries(st.sampled_from(["deadline", "receive", "echo_final_notice", "nope"]), json_values)
        | json_values,
        "reason": st.text(max_size=600) | json_values,
        "force": json_values,
        "devices": st.lists(st.sampled_from(NAMES)) | json_values,
    },
)


def encode_body(value) -> bytes:
    return json.dumps(value, ensure_ascii=True).encode()


bodies = (
    st.none()
    | st.binary(max_size=200)
    | plausible_bodies.map(encode_body)
    | json_values.map(encode_body)
    | st.sampled_from([b"[" * 50 + b"]" * 50, b'{"device": 1e999}', b'{"a": NaN}', b'{"x": "\\udc00"}'])
)

ROUTES = [
    ("GET", "/v1/jobs"),
    ("POST", "/v1/jobs"),
    ("GET", "/v1/jobs/{job}"),
    ("POST", "/v1/jobs/{job}/cancel"),
    ("POST", "/v1/jobs/{job}/resume"),
    ("GET", "/v1/jobs/{job}/events"),
    ("GET", "/v1/devices"),
    ("POST", "/v1/devices/probe"),
    ("GET", "/v1/status"),
    ("GET", "/v1/events"),
    ("GET", "/v1"),
]
job_ids = st.sampled_from(["{existing}", "{existing}", "nope", "0" * 12, "x" * 100]) | st.text(max_size=8).map(
    lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")
)
likely_bodies = st.fixed_dictionaries(
    {"device": st.sampled_from(["a", "b", "c"]), "firmware": st.sampled_from(["v2.bin", "v2.bin", "nope.bin"])},
    optional={
        "options": st.dictionaries(
            st.sampled_from(["deadline", "receive", "max_receive_timeouts", "echo_final_notice"]),
            st.integers(-5, 10**6) | st.floats(-1, 1e7, allow_nan=False) | st.booleans(),
            max_size=2,
        )
    },
).map(encode_body) | st.fixed_dictionaries({}, optional={"force": st.booleans(), "reason": st.text(max_size=20)}).map(
    encode_body
)
routed = st.builds(
    lambda route, job, body: (route[0], route[1].replace("{job}", job), body),
    st.sampled_from(ROUTES),
    job_ids,
    st.none() | likely_bodies,
)
segments = st.sampled_from(SEGMENTS) | st.text(max_size=12).map(
    lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")
)
paths = st.lists(segments, max_size=5).map(lambda parts: "/" + "/".join(parts))
prefixed = st.lists(segments, max_size=4).map(lambda parts: "/v1/" + "/".join(parts))
queries = st.dictionaries(
    st.sampled_from(["device", "limit", "cursor", "x"]) | st.text(max_size=5),
    st.sampled_from(["1", "0", "1000", "1001", "a", "99999999999999999999", "-1", "²"]) | st.text(max_size=10),
    max_size=3,
)
methods = st.integers(0, 9).flatmap(
    lambda i: (
        st.sampled_from(["GET", "POST"])
        if i < 7
        else st.sampled_from(["HEAD", "DELETE", "PUT", "PATCH", "OPTIONS"])
        if i < 9
        else st.from_regex(r"\A[A-Z]{1,8}\Z")
    )
)


def call(world: ApiWorld, method: str, url: str, body: bytes | None) -> tuple[int, dict, bytes]:
    d = world.http.request(method, url, data=body)
    world.http.flush()
    response = fired(d)
    kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
    if kind.startswith(b"text/event-stream"):
        world.api.streams.close_all("test")  # the stream ends; its body is not what is tested here
        world.http.flush()
        return response.code, {"stream": True}, kind
    content = world.http.content(response)
    world.http.flush()
    return response.code, response.headers, fired(content)


starts = st.tuples(st.just("POST"), st.just("/v1/jobs"), likely_bodies)
acts = st.tuples(
    st.just("POST"),
    st.sampled_from(["/v1/jobs/{existing}/cancel", "/v1/jobs/{existing}/resume"]),
    st.none() | st.sampled_from([b'{"force": true}', b'{"reason": "test"}', b"{}"]),
)
wild = st.tuples(methods, paths | prefixed, bodies)
any_request = st.one_of(
    [
        starts,
        starts,
        acts,
        routed,
        routed,
        routed,
        st.tuples(methods, st.sampled_from(ROUTES).map(lambda r: r[1]), bodies),
        wild,
    ]
)
any_query = st.integers(0, 2).flatmap(lambda i: queries if i == 0 else st.just({}))


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=any_request, query=any_query)
def test_every_answer_is_a_documented_success_or_a_json_4xx(tmp_path, request, query):
    method, path, body = request
    world = WORLDS.get(tmp_path) or WORLDS.setdefault(tmp_path, ApiWorld(tmp_path))
    existing = world.factory.order[-1].job_id if world.factory.order else "none"
    path = path.replace("{existing}", existing)
    url = "http://netota" + path + ("?" + urlencode(query, encoding="utf-8", errors="surrogatepass") if query else "")
    status, headers, content = call(world, method, url, body)
    assert status < 500, (method, url, body, status, content)
    if isinstance(headers, dict):  # an event stream: a documented success
        assert status == 200
        return
    if method == "HEAD":
        assert content == b""
        return
    data = json.loads(content)
    if status >= 400:
        assert set(data) == {"error"} and data["error"]["status"] == status
        assert data["error"]["code"] in DOCUMENTED_CODES, data
        assert isinstance(data["error"]["message"], str) and data["error"]["message"]
    else:
        assert status in (200, 201) and isinstance(data, dict)
    # Jobs that were started run on: every other example, they end (one way or another), so devices
    # free up and cancel, resume and busy all get their turn.
    world.examples = getattr(world, "examples", 0) + 1
    if world.examples % 2 == 0:
        kinds = (OutcomeKind.SUCCEEDED, OutcomeKind.FAILED, OutcomeKind.ABORTED)
        for n, job in enumerate(world.factory.order):
            if job.running:
                job.finish(kinds[n % 3])


WORLDS: dict = {}


def test_the_documented_codes_were_read():
    assert {"bad_json", "busy", "superseded", "not_http", "too_many_connections"} <= DOCUMENTED_CODES
