"""A property test of the control API over random requests (Hypothesis, in memory through StubTreq):
whatever the method, path, query string and body, the answer is a documented success (the schema of
its operation's success in the OpenAPI document) or a JSON 4xx with the usual error body, never a
5xx and never a traceback. The API is the whole of it, as the daemon wires it: jobs, devices, the
firmware catalogue, batches and rescue (``ApiWorld(full=True)``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import quote, urlencode

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs, formatEvent

from netota_daemon.engine.outcome import OutcomeKind
from netota_daemon.wire.description import LOADER_DOCUMENT, main_firmware_document
from tests.daemon_fakes import ApiWorld, fired
from tests.images import image_bytes_of
from tests.openapi_schema import answer_errors

ROOT = Path(__file__).resolve().parent.parent

#: Every error code the API documents (docs/control-api.md's table).
DOCUMENTED_CODES = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", (ROOT / "docs" / "control-api.md").read_text(), re.M))

SEGMENTS = ["v1", "jobs", "devices", "probe", "status", "events", "cancel", "resume", "", "..", "%00"]
SEGMENTS += ["batches", "firmware", "rescue", "openapi.json", "v2.bin", "%2e%2e", "%2F"]
NAMES = ["a", "b", "c", "zz", "", "v2.bin", "../v2.bin", "/etc/passwd", "\ud800", "a\x00"]
#: Firmware names an upload, a lookup or a removal may be given: good ones, and every kind of bad.
FIRMWARE_NAMES = ["v2.bin", "v2.bin", "new.ufw", "new.ufw", "up.bin", "nope.bin", ".hidden", ".upload-x", ".", ".."]
FIRMWARE_NAMES += ["../v2.bin", "../../etc/passwd", "/etc/passwd", "a/b", "a\\b", "a\x00b", "\x00", "\ud800"]
FIRMWARE_NAMES += ["\udfff.bin", "x" * 255, "x" * 256, "\u00e9" * 128, " ", "a\nb", "a\x7fb", "v2.bin ", "~"]

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
        "all": json_values,
        "tag": st.sampled_from(["rack", "x", ""]) | json_values,
        "policy": json_values,
        "target_version": json_values,
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
    ("GET", "/v1/openapi.json"),
    ("GET", "/v1/firmware"),
    ("GET", "/v1/firmware/{name}"),
    ("PUT", "/v1/firmware/{name}"),
    ("DELETE", "/v1/firmware/{name}"),
    ("GET", "/v1/batches"),
    ("POST", "/v1/batches"),
    ("GET", "/v1/batches/{batch}"),
    ("POST", "/v1/batches/{batch}/cancel"),
    ("GET", "/v1/batches/{batch}/events"),
    ("POST", "/v1/rescue"),
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


def quoted(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each as often as its weight says (``st.one_of`` merges equal branches,
    so repeating one there does not weigh it)."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


def mostly(likely: st.SearchStrategy, other: st.SearchStrategy) -> st.SearchStrategy:
    """``likely`` three times in four, else ``other`` (so a body gets past its first check often)."""
    return weighted((3, likely), (1, other))


batch_ids = st.sampled_from(["{batch}", "{batch}", "{batch}", "nope", "0" * 12, "x" * 65, "%00"]) | st.text(
    max_size=8
).map(quoted)
firmware_names = (st.sampled_from(FIRMWARE_NAMES) | st.text(max_size=12)).map(quoted) | st.sampled_from(
    ["..%2Fv2.bin", "%2e%2e", "v2.bin%00", "%ff.bin", "%c0%ae%c0%ae"]
)
#: Counts as a policy may give them: in range, at its edges, and absurd (negative, huge, not integers).
absurd_counts = st.sampled_from([0, 1, 2, 3, -1, 1_000_000, 1_000_001, 10**30, 1.5, True, False, "2", None, [], {}])
absurd_counts = absurd_counts | st.integers(-(10**30), 10**30) | json_values
flags = st.booleans() | st.sampled_from([None, 0, 1, "true", []])
policies = mostly(
    st.fixed_dictionaries(
        {},
        optional={
            "canary": absurd_counts,
            "max_failures": absurd_counts,
            "max_parallel": absurd_counts,
            "preflight": flags,
            "skip_current": flags,
            "resume_interrupted": flags,
        },
    ),
    st.dictionaries(st.text(max_size=12), json_values, max_size=2) | json_values,
)
#: Which devices a batch is for: mostly one valid way, else none, several or bad ones.
selections = mostly(
    st.sampled_from([{"all": True}, {"tag": "rack"}, {"tag": "lab"}, {"devices": ["a"]}, {"devices": ["c", "b"]}]),
    st.fixed_dictionaries(
        {},
        optional={
            "devices": st.lists(st.sampled_from(["a", "b", "c", "a", "zz", ""]), max_size=4) | json_values,
            "all": flags | json_values,
            "tag": st.sampled_from(["rack", "lab", "nope", ""]) | json_values,
        },
    ),
)
batch_fields = st.fixed_dictionaries(
    {
        "firmware": mostly(
            st.sampled_from(["v2.bin", "v2.bin", "new.ufw", "nope.bin", "../v2.bin", "", "\x00"]), json_values
        )
    },
    optional={
        "policy": st.just({"preflight": False}) | policies,
        "target_version": mostly(st.sampled_from(["2.0.0", "9.9", " ", ""]), json_values),
        "options": mostly(
            st.dictionaries(st.sampled_from(["deadline", "receive", "nope"]), st.integers(-1, 10**7), max_size=2),
            json_values,
        ),
    },
)
batch_bodies = st.builds(lambda fields, selection: {**fields, **selection}, batch_fields, selections)
rescue_bodies = st.fixed_dictionaries(
    {},
    optional={
        "devices": mostly(st.lists(st.sampled_from(["a", "b", "c", "zz", ""]), max_size=4), json_values),
        "firmware": mostly(
            st.sampled_from(["v2.bin", "new.ufw", "up.bin", "nope.bin", "../v2.bin", "", " ", "a\x00", "/", "."]),
            json_values,
        ),
    },
)
cancel_bodies = st.fixed_dictionaries({}, optional={"reason": st.text(max_size=600) | json_values})
route_bodies = {
    "/v1/batches": batch_bodies.map(encode_body),
    "/v1/rescue": rescue_bodies.map(encode_body),
    "/v1/batches/{batch}/cancel": cancel_bodies.map(encode_body),
    "/v1/firmware/{name}": st.binary(min_size=1, max_size=300) | st.sampled_from([b"", b"\x00" * 64]),
}


def route_request(route: tuple[str, str]) -> st.SearchStrategy:
    method, template = route
    return st.builds(
        lambda job, batch, name, body: (
            method,
            template.replace("{job}", job).replace("{batch}", batch).replace("{name}", name),
            body,
        ),
        job_ids,
        batch_ids,
        firmware_names,
        mostly(route_bodies.get(template, likely_bodies), st.none()),
    )


routed = st.sampled_from(ROUTES).flatmap(route_request)
#: The routes of the firmware catalogue, batches and rescue, drawn more often than their share of ROUTES.
routed_new = st.sampled_from([r for r in ROUTES if r[1].startswith(("/v1/firmware", "/v1/batches", "/v1/rescue"))])
routed_new = routed_new.flatmap(route_request)
segments = st.sampled_from(SEGMENTS) | st.text(max_size=12).map(
    lambda t: quote(t.encode("utf-8", "surrogatepass"), safe="")
)
paths = st.lists(segments, max_size=5).map(lambda parts: "/" + "/".join(parts))
prefixed = st.lists(segments, max_size=4).map(lambda parts: "/v1/" + "/".join(parts))
queries = st.dictionaries(
    st.sampled_from(["device", "limit", "cursor", "x"]) | st.text(max_size=5),
    st.sampled_from(["1", "0", "1000", "1001", "a", "99999999999999999999", "-1", "²", "١٢", "1" * 18, "1" * 19])
    | st.text(max_size=10),
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


def call(world: ApiWorld, method: str, url: str, body: bytes | None, headers: dict | None) -> tuple[int, dict, bytes]:
    d = world.http.request(method, url, data=body, headers=headers)
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
#: Batches likely to be accepted, and what is done to the newest one.
batch_starts = st.tuples(
    st.just("POST"),
    st.just("/v1/batches"),
    st.fixed_dictionaries(
        {
            "firmware": st.sampled_from(["v2.bin", "v2.bin", "new.ufw"]),
            "policy": st.fixed_dictionaries(
                {"preflight": st.booleans()},
                optional={
                    "canary": st.integers(0, 3),
                    "max_failures": st.integers(1, 3),
                    "max_parallel": st.integers(1, 2),
                    "skip_current": st.booleans(),
                },
            ),
        }
    ).flatmap(
        lambda body: st.sampled_from([{"all": True}, {"tag": "rack"}, {"devices": ["c", "a"]}, {"devices": ["b"]}]).map(
            lambda selection: encode_body({**body, **selection})
        )
    ),
)
batch_acts = st.builds(
    lambda action, body: (*action, body),
    st.sampled_from(
        [
            ("GET", "/v1/batches/{batch}"),
            ("POST", "/v1/batches/{batch}/cancel"),
            ("POST", "/v1/batches/{batch}/cancel"),
            ("GET", "/v1/batches/{batch}/events"),
        ]
    ),
    st.none() | st.sampled_from([b'{"reason": "test"}', b"{}"]),
)
#: Uploads and removals of the images jobs and batches use (while they run, too).
#: Real images of both kinds (so a device's build and an image's kind meet), and bytes of no kind.
IMAGES = [image_bytes_of("single", size=4096), image_bytes_of("double", size=4096)]
uploads = mostly(
    st.tuples(
        st.just("PUT"),
        st.sampled_from(["/v1/firmware/new.ufw", "/v1/firmware/up.bin", "/v1/firmware/v2.bin"]),
        st.sampled_from(IMAGES) | st.binary(min_size=1, max_size=300),
    ),
    st.tuples(
        st.just("DELETE"),
        st.sampled_from(["/v1/firmware/new.ufw", "/v1/firmware/up.bin", "/v1/firmware/v2.bin"]),
        st.none(),
    ),
)
rescues = st.tuples(st.just("POST"), st.just("/v1/rescue"), st.none() | rescue_bodies.map(encode_body))
wild = st.tuples(methods, paths | prefixed, bodies)
any_request = weighted(
    (2, starts),
    (1, acts),
    (1, batch_starts),
    (2, batch_acts),
    (1, uploads),
    (1, rescues),
    (3, routed),
    (3, routed_new),
    (1, st.tuples(methods, st.sampled_from(ROUTES).map(lambda r: r[1]), bodies)),
    (1, wild),
)
any_query = st.integers(0, 2).flatmap(lambda i: queries if i == 0 else st.just({}))
any_headers = st.sampled_from([None, None, None, None, {"If-None-Match": "*"}, {"If-None-Match": "x"}])


@settings(
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=any_request, query=any_query, headers=any_headers)
def test_every_answer_is_a_documented_success_or_a_json_4xx(tmp_path, request, query, headers):
    method, path, body = request
    world = WORLDS.get(tmp_path) or WORLDS.setdefault(tmp_path, make_world(tmp_path))
    existing = world.factory.order[-1].job_id if world.factory.order else "none"
    newest = world.batch_store.page(1).rows
    path = path.replace("{existing}", existing).replace("{batch}", newest[0].id if newest else "none")
    url = "http://netota" + path + ("?" + urlencode(query, encoding="utf-8", errors="surrogatepass") if query else "")
    with capturedLogs() as events:
        try:
            answer = call(world, method, url, body, headers)
        finally:
            # Jobs that were started run on: every other example, they end (one way or another), so
            # devices free up and cancel, resume, busy and the batches' next steps all get their turn.
            world.examples = getattr(world, "examples", 0) + 1
            if world.examples % 2 == 0:
                kinds = (OutcomeKind.SUCCEEDED, OutcomeKind.FAILED, OutcomeKind.ABORTED)
                for n, job in enumerate(world.factory.order):
                    if job.running:
                        job.finish(kinds[n % 3])
            world.clock.advance(1)
    check_answer(method, path, url, body, *answer)
    # Nor a traceback in the log: not the request's, nor one of what it set going (a batch's steps).
    failures = [formatEvent(e) + "\n" + e["log_failure"].getTraceback() for e in events if "log_failure" in e]
    assert not failures, (method, url, body, failures)


def check_answer(method: str, path: str, url: str, body: bytes | None, status: int, headers, content) -> None:
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
        # The router ignores trailing slashes (``/v1/jobs/`` is ``/v1/jobs``); the document names none.
        assert answer_errors(method, path.rstrip("/"), data) == [], (method, url, data)


def make_world(tmp_path) -> ApiWorld:
    """The whole API; two of the three devices share a tag (a batch by tag is one way to ask for one).
    a runs single-backup main firmware, b a double-backup build, c waits in its loader (rescue's case)."""
    world = ApiWorld(tmp_path, full=True, tags={"a": ("rack",), "b": ("rack", "lab")})
    world.descriptions.update(b=main_firmware_document("9.9", single_backup=False), c=LOADER_DOCUMENT)
    return world


WORLDS: dict = {}


def test_the_documented_codes_were_read():
    assert {"bad_json", "busy", "superseded", "not_http", "too_many_connections"} <= DOCUMENTED_CODES


def test_the_whole_api_is_there_to_be_tested(tmp_path):
    """The world the property test runs in answers every area, so a 404 there is the route's own."""
    world = make_world(tmp_path)
    status, _, put = world.call("PUT", "/v1/firmware/new.ufw", IMAGES[0])
    assert status == 201 and put["firmware"]["kind"] == "single_backup"
    status, _, listed = world.call("GET", "/v1/firmware")
    assert status == 200 and [f["name"] for f in listed["firmware"]] == ["new.ufw", "v2.bin"]
    status, _, started = world.call("POST", "/v1/batches", encode_body({"firmware": "new.ufw", "tag": "rack"}))
    assert status == 201, started
    batch = started["batch"]["id"]
    # Its preflight probed both: a runs a single-backup build and got its job, b's double-backup build
    # can't take the image.
    members = {m["device"]: m for m in started["batch"]["members"]}
    assert (members["a"]["state"], members["b"]["state"], members["b"]["reason"]) == (
        "running",
        "refused",
        "wrong_kind",
    )
    assert [job.target.name for job in world.factory.order] == ["a"]
    status, _, shown = world.call("GET", f"/v1/batches/{batch}")
    assert status == 200 and shown["batch"]["id"] == batch
    # c waits in its loader and no job ever flashed it: rescue starts one with the image it is given.
    status, _, rescued = world.call("POST", "/v1/rescue", encode_body({"devices": ["c"], "firmware": "new.ufw"}))
    assert status == 200 and [r["action"] for r in rescued["rescues"]] == ["start"], rescued
    assert world.factory.order[-1].target.name == "c"
    status, _, cancelled = world.call("POST", f"/v1/batches/{batch}/cancel", b"{}")
    assert status == 200 and cancelled["batch"]["state"] == "cancelling", cancelled
