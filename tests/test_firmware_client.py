"""``netota firmware list|add|rm``: the commands in memory against a scripted daemon (what they send,
print and exit with), ``ControlClient.upload`` over treq's in-memory agent against the real firmware endpoints (the
file streamed in chunks with its length up front, ``If-None-Match: *`` honoured), and the commands
against a real daemon (the file on disk, a refusal, an oversized upload refused while it is sent)."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from netota_daemon.cli.control_client import UPLOAD_CHUNK, ApiRefused, ControlClient, DaemonUnavailable
from netota_daemon.control.firmware import FirmwareEndpoints
from netota_daemon.control.routing import ControlResource
from netota_daemon.daemon.firmware_catalog import FirmwareCatalog
from tests.conftest import run_netota
from tests.daemon_fakes import AutoJobFactory, make_service
from tests.fake_control import FakeControl, run


def entry(name: str, data: bytes, kind: str = "single_backup", version: str | None = "2.0.0") -> dict:
    """A catalogue entry as the API has it."""
    return {
        "name": name,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "modified": 1_750_000_000.0,
        "kind": kind,
        "description": "UFW container" if kind == "single_backup" else None,
        "version": version,
    }


def stores(name: str):
    """A daemon's answer to an upload: what it received, hashed."""
    return lambda data: {"firmware": entry(name, data)}


# ---------------------------------------------------------------- the commands, in memory


def test_list_prints_a_table_and_json_prints_the_apis_answer(capsys, monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    answer = {"firmware": [entry("ac79-2.0.0.ufw", b"x" * 300_000), entry("odd.bin", b"y", "unknown", None)]}
    client = FakeControl(answers={("GET", "/v1/firmware"): answer})
    assert run(client, "firmware", "list") == 0
    header, first, second = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "KIND", "VERSION", "SIZE", "MODIFIED", "SHA256"]
    sha = hashlib.sha256(b"x" * 300_000).hexdigest()
    assert first.split() == [
        *("ac79-2.0.0.ufw", "single", "backup", "2.0.0", "293.0", "KiB", "2025-06-15", "15:06", sha[:16] + "...")
    ]
    assert second.split()[:4] == ["odd.bin", "unknown", "-", "1"]
    assert run(client, "firmware", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == answer


def test_list_of_an_empty_catalogue_says_so(capsys):
    client = FakeControl(answers={("GET", "/v1/firmware"): {"firmware": []}})
    assert run(client, "firmware", "list") == 0
    assert capsys.readouterr().out == (
        "no images in the daemon's firmware_dir (add one with netota firmware add FILE)\n"
    )


def test_add_streams_the_file_refusing_to_replace_and_shows_what_the_daemon_stored(capsys, tmp_path):
    data = os.urandom(3 * UPLOAD_CHUNK + 17)
    image = tmp_path / "ac79-2.0.0.ufw"
    image.write_bytes(data)
    client = FakeControl(answers={("PUT", "/v1/firmware/ac79-2.0.0.ufw"): stores("ac79-2.0.0.ufw")})
    assert run(client, "firmware", "add", str(image)) == 0
    assert client.uploaded == [data]
    assert client.requests == [
        ("PUT", "/v1/firmware/ac79-2.0.0.ufw", {"bytes": len(data), "headers": {b"If-None-Match": [b"*"]}})
    ]
    assert capsys.readouterr().out.splitlines() == [
        "added:       ac79-2.0.0.ufw",
        f"size:        {len(data)} bytes",
        f"sha256:      {hashlib.sha256(data).hexdigest()}",
        "kind:        single backup (UFW container)",
        "version:     2.0.0",
    ]


def test_add_under_another_name_replacing_with_json(capsys, tmp_path):
    image = tmp_path / "build.bin"
    image.write_bytes(b"image bytes")
    path = "/v1/firmware/shelf%201%23new.ufw"  # the name is one path segment, quoted
    client = FakeControl(answers={("PUT", path): stores("shelf 1#new.ufw")})
    assert run(client, "firmware", "add", str(image), "--name", "shelf 1#new.ufw", "--replace", "--json") == 0
    assert client.requests == [("PUT", path, {"bytes": 11, "headers": {}})]
    assert json.loads(capsys.readouterr().out) == {"firmware": entry("shelf 1#new.ufw", b"image bytes")}


def test_add_reports_a_daemon_copy_that_differs_from_what_was_sent(capsys, tmp_path):
    image = tmp_path / "v2.ufw"
    image.write_bytes(b"what was sent")
    client = FakeControl(answers={("PUT", "/v1/firmware/v2.ufw"): {"firmware": entry("v2.ufw", b"something else")}})
    assert run(client, "firmware", "add", str(image)) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("netota: the daemon stored v2.ufw with 14 bytes, sha256 ")
    assert f"but 13 bytes with sha256 {hashlib.sha256(b'what was sent').hexdigest()} were sent" in captured.err
    assert len(captured.err.splitlines()) == 1


def written(name: str, data: bytes = b"x"):
    def make(directory):
        (directory / name).write_bytes(data)
        return directory / name

    return make


@pytest.mark.parametrize(
    "make, extra, words",
    [
        (lambda d: d / "missing.ufw", [], "can't read "),
        (lambda d: d, [], "Is a directory"),
        (written("empty.ufw", b""), [], "is empty"),
        (written("v2.ufw"), ["--name", "../v2.ufw"], "leaves firmware_dir"),
        (written("v2.ufw"), ["--name", ".v2.ufw"], "must not start with a dot"),
        (written(".v2.ufw"), [], "must not start with a dot"),
    ],
)
def test_add_refuses_what_it_cannot_send_before_sending_anything(capsys, tmp_path, make, extra, words):
    client = FakeControl()
    path = make(tmp_path)
    assert run(client, "firmware", "add", str(path), *extra) == 64
    err = capsys.readouterr().err
    assert err.startswith("netota: ") and words in err and len(err.splitlines()) == 1
    assert client.requests == []


@pytest.mark.parametrize(
    "error, code, line",
    [
        (
            ApiRefused(409, "firmware_exists", "firmware 'v2.ufw' already exists"),
            75,
            "netota: firmware 'v2.ufw' already exists: --replace replaces it (firmware_exists)",
        ),
        (
            ApiRefused(409, "firmware_in_use", "firmware 'v2.ufw' is used by a queued or running job"),
            75,
            "netota: firmware 'v2.ufw' is used by a queued or running job (firmware_in_use)",
        ),
        (
            ApiRefused(413, "too_large", "the request body is larger than 1000 bytes"),
            64,
            "netota: the request body is larger than 1000 bytes (too_large)",
        ),
        (
            DaemonUnavailable("can't reach the netota daemon at unix:/run/netota/control.sock: no such file"),
            69,
            "netota: can't reach the netota daemon at unix:/run/netota/control.sock: no such file",
        ),
    ],
)
def test_a_refused_add_is_one_line_with_its_exit_code(capsys, tmp_path, error, code, line):
    image = tmp_path / "v2.ufw"
    image.write_bytes(b"x")
    client = FakeControl(answers={("PUT", "/v1/firmware/v2.ufw"): error})
    assert run(client, "firmware", "add", str(image)) == code
    assert capsys.readouterr().err.splitlines() == [line]


def test_rm_says_what_was_removed_and_a_missing_name_is_64(capsys):
    removed = entry("old.ufw", b"old")
    client = FakeControl(
        answers={
            ("DELETE", "/v1/firmware/old.ufw"): {"removed": removed},
            ("DELETE", "/v1/firmware/gone%3F.ufw"): ApiRefused(
                404, "firmware_not_found", "no firmware 'gone?.ufw' in /srv/fw"
            ),
        }
    )
    assert run(client, "firmware", "rm", "old.ufw") == 0
    assert capsys.readouterr().out == f"removed old.ufw (3 bytes, sha256 {removed['sha256']})\n"
    assert run(client, "firmware", "rm", "old.ufw", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"removed": removed}
    assert run(client, "firmware", "rm", "gone?.ufw") == 64
    assert capsys.readouterr().err == "netota: no firmware 'gone?.ufw' in /srv/fw (firmware_not_found)\n"


# ---------------------------------------------------------------- ControlClient.upload, in memory


class ReadRecorder(io.BytesIO):
    """A file that records the size of every read that returned bytes."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.reads: list[int] = []

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if data:
            self.reads.append(len(data))
        return data


class Recording(Resource):
    """The real API resource, with each request's headers recorded."""

    isLeaf = True

    def __init__(self, api: ControlResource) -> None:
        super().__init__()
        self.api = api
        self.headers: list[dict[bytes, bytes]] = []

    def render(self, request):
        self.headers.append({k.lower(): v[0] for k, v in request.requestHeaders.getAllRawHeaders()})
        return self.api.render(request)


def answered(d: Deferred, clock: Clock, agent) -> object:
    """Run the upload's reads (on ``clock``) and the in-memory connection until ``d`` fires."""
    results: list = []
    d.addBoth(results.append)
    for _ in range(1000):
        if results:
            break
        clock.advance(0)
        agent.flush()
    assert results, "the upload never finished"
    return results[0].value if isinstance(results[0], Failure) else results[0]


def test_upload_streams_the_file_in_chunks_with_its_length_and_honours_if_none_match(tmp_path):
    from treq.client import HTTPClient
    from treq.testing import RequestTraversalAgent  # StubTreq's agent: StubTreq itself takes no body producer

    firmware_dir = tmp_path / "fw"
    firmware_dir.mkdir()
    api = ControlResource()
    api.add(FirmwareEndpoints(FirmwareCatalog(firmware_dir, maybeDeferred)).routes())  # the catalogue's work inline
    recording = Recording(api)
    agent = RequestTraversalAgent(recording)
    clock = Clock()
    cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work), started=True)
    client = ControlClient(clock, "unix:/fake.sock", http=HTTPClient(agent), cooperator=cooperator)

    data = os.urandom(5 * UPLOAD_CHUNK + 123)
    source = ReadRecorder(data)
    answer = answered(Deferred.fromCoroutine(client.upload("/v1/firmware/v2.ufw", source)), clock, agent)
    assert answer["firmware"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert (firmware_dir / "v2.ufw").read_bytes() == data
    assert len(source.reads) == 6 and max(source.reads) == UPLOAD_CHUNK  # read a chunk at a time, never whole
    headers = recording.headers[0]
    assert headers[b"content-length"] == str(len(data)).encode() and b"transfer-encoding" not in headers
    assert headers[b"content-type"] == b"application/octet-stream"

    # Create-only: the name is taken, nothing is replaced.
    again = ReadRecorder(b"other bytes")
    refused = answered(
        Deferred.fromCoroutine(client.upload("/v1/firmware/v2.ufw", again, {b"If-None-Match": [b"*"]})), clock, agent
    )
    assert isinstance(refused, ApiRefused) and (refused.status, refused.code) == (409, "firmware_exists")
    assert (firmware_dir / "v2.ufw").read_bytes() == data
    assert sorted(os.listdir(firmware_dir)) == ["v2.ufw"]  # no partial file left


# ---------------------------------------------------------------- against a real daemon


@pytest_twisted.ensureDeferred
async def test_add_list_rm_against_a_daemon(tmp_path, reactor):
    service = make_service(tmp_path, reactor, AutoJobFactory(), firmware_max_upload=1_000_000)
    service.privilegedStartService()
    service.startService()
    firmware_dir = service.config.firmware_dir
    control = f"unix:{service.socket_path}"
    data = os.urandom(700_000)
    (tmp_path / "build.ufw").write_bytes(data)
    try:
        code, out, err = await run_netota(
            reactor, control, "firmware", "add", str(tmp_path / "build.ufw"), "--name", "new.ufw"
        )
        assert code == 0, err
        assert f"sha256:      {hashlib.sha256(data).hexdigest()}" in out.splitlines()
        assert (firmware_dir / "new.ufw").read_bytes() == data

        code, out, err = await run_netota(reactor, control, "firmware", "list", "--json")
        assert code == 0, err
        listed = {item["name"]: item for item in json.loads(out)["firmware"]}
        assert sorted(listed) == ["new.ufw", "v2.bin"] and listed["new.ufw"]["size"] == 700_000

        code, out, err = await run_netota(reactor, control, "firmware", "rm", "new.ufw")
        assert (code, out) == (0, f"removed new.ufw (700000 bytes, sha256 {hashlib.sha256(data).hexdigest()})\n"), err
        assert sorted(os.listdir(firmware_dir)) == ["v2.bin"]

        # In process, through the daemon's socket: a taken name and an oversized upload (refused by
        # its length, before the daemon has it all) are refused, and nothing is left behind.
        client = ControlClient(reactor, f"unix:{service.socket_path}")
        with pytest.raises(ApiRefused) as taken:
            await client.upload("/v1/firmware/v2.bin", io.BytesIO(b"other"), {b"If-None-Match": [b"*"]})
        assert (taken.value.status, taken.value.code) == (409, "firmware_exists")
        with pytest.raises(ApiRefused) as large:
            await client.upload("/v1/firmware/big.bin", io.BytesIO(os.urandom(3_000_000)))
        assert (large.value.status, large.value.code) == (413, "too_large")
        assert sorted(os.listdir(firmware_dir)) == ["v2.bin"]
    finally:
        await service.stopService()
