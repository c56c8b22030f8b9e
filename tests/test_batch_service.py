"""Batches through the control API of an in-process daemon (a real UNIX socket, fake engine jobs): the
requests and their refusals, membership on each job, the batch's event stream, a restart in the
middle of a batch, and the job-end command."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from netota_daemon.cli.control_client import ApiRefused, ControlClient
from netota_daemon.daemon.config import DaemonConfig, DeviceConfig, check_control_endpoint
from netota_daemon.engine.outcome import OutcomeKind, Phase
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.service import NetotaService
from tests.daemon_fakes import AutoJobFactory, short_socket_dir
from tests.waiting import Changes

NO_PREFLIGHT = {"preflight": False}


class Outcomes(AutoJobFactory):
    """Fake jobs whose outcome is chosen per device; ``hold`` devices stay in phase 1 until cancelled."""

    def __init__(self, failing=(), hold=()):
        super().__init__(step=0.005, stop_delay=0.005)
        self.failing = set(failing)
        self.hold = set(hold)

    def outcome_for(self, job):
        return OutcomeKind.FAILED if job.target.name in self.failing else OutcomeKind.SUCCEEDED

    def _play(self, job):
        if job.target.name in self.hold:
            job.reactor.callLater(self.step, job.enter, Phase.PHASE1)
            return
        super()._play(job)


def make_service(tmp_path, reactor, factory, devices=("a", "b", "c", "d"), tags=None, **settings):
    firmware_dir = Path(tmp_path) / "fw"
    firmware_dir.mkdir(exist_ok=True)
    if not (firmware_dir / "v2.bin").exists():
        (firmware_dir / "v2.bin").write_bytes(os.urandom(2048))
    socket_path = os.path.join(short_socket_dir(), "control.sock")
    tags = tags or {}
    config = DaemonConfig(
        source="test",
        control=check_control_endpoint("test", f"unix:{socket_path}:lockfile=1", None),
        state_dir=Path(tmp_path) / "state",
        firmware_dir=firmware_dir,
        max_parallel=2,
        shutdown_grace=5.0,
        devices={
            n: DeviceConfig(DeviceTarget(name=n, host="127.0.0.1"), UpgradeTimeouts(), tags=tuple(tags.get(n, ())))
            for n in devices
        },
        **settings,
    )
    service = NetotaService(config, reactor, job_factory=factory, environ={})
    service.socket_path = socket_path
    service.privilegedStartService()
    service.startService()
    return service


def client_for(service, reactor):
    return ControlClient(reactor, f"unix:{service.socket_path}")


async def refused(coro) -> ApiRefused:
    try:
        await coro
    except ApiRefused as e:
        return e
    raise AssertionError("the request was not refused")


async def batch_end(client, batch_id, events=None):
    """Follow the batch's stream to its batch_end; every event in ``events``."""
    seen = [] if events is None else events

    def on_event(kind, data):
        seen.append((kind, data))
        return kind == "batch_end" or (kind == "snapshot" and data["snapshot"]["state"] in ("finished", "cancelled"))

    d = Deferred.fromCoroutine(client.stream(f"/v1/batches/{batch_id}/events", on_event))
    from twisted.internet import reactor

    await d.addTimeout(30, reactor)
    return (await client.request("GET", f"/v1/batches/{batch_id}"))["batch"]


@pytest.fixture
def stopping():
    services = []
    yield services.append
    for service in services:
        if service.running:
            pytest_twisted.blockon(service.stopService())


@pytest_twisted.ensureDeferred
async def test_a_batch_through_the_api_with_its_stream_and_membership_on_each_job(tmp_path, reactor, stopping):
    service = make_service(tmp_path, reactor, Outcomes(failing={"c"}))
    stopping(service)
    client = client_for(service, reactor)
    answer = await client.request(
        "POST",
        "/v1/batches",
        {
            "firmware": "v2.bin",
            "all": True,
            "policy": {**NO_PREFLIGHT, "canary": 1, "max_failures": 1, "max_parallel": 1},
        },
    )
    batch = answer["batch"]
    assert batch["state"] == "running" and [m["device"] for m in batch["members"]] == ["a", "b", "c", "d"]
    events = []
    final = await batch_end(client, batch["id"], events)
    assert final["state"] == "finished" and final["result"] == "failed"
    assert final["stop_reason"] == "max_failures"
    states = {m["device"]: (m["state"], m["reason"]) for m in final["members"]}
    assert states["a"] == ("succeeded", None) and states["c"] == ("failed", None)
    assert states["b"] == ("succeeded", None)  # after the canary, one at a time
    assert states["d"] == ("skipped", "max_failures")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "snapshot" and "member" in kinds and "progress" in kinds and kinds[-1] == "batch_end"
    # Every job says which batch it belongs to; the skipped device has none.
    jobs = (await client.request("GET", "/v1/jobs"))["jobs"]
    assert sorted(j["device"] for j in jobs) == ["a", "b", "c"]
    assert {j["batch"] for j in jobs} == {batch["id"]}
    assert all(len(j["image_sha256"]) == 64 for j in jobs)
    listed = await client.request("GET", "/v1/batches?limit=5")
    assert [b["id"] for b in listed["batches"]] == [batch["id"]] and listed["next_cursor"] is None
    assert "members" not in listed["batches"][0] and listed["batches"][0]["counts"]["skipped"] == 1


@pytest_twisted.ensureDeferred
async def test_every_bad_batch_request_is_a_clear_4xx(tmp_path, reactor, stopping):
    service = make_service(tmp_path, reactor, Outcomes(hold={"a"}), tags={"a": ["top"]})
    stopping(service)
    client = client_for(service, reactor)
    cases = [
        ({"firmware": "v2.bin", "devices": ["zz"]}, 404, "unknown_device"),
        ({"firmware": "v2.bin", "tag": "nope"}, 404, "unknown_tag"),
        ({"firmware": "v2.bin", "all": True, "policy": {"canary": "1"}}, 400, "bad_policy"),
        ({"firmware": "v2.bin", "all": True, "policy": {"max_parallel": 3}}, 400, "bad_policy"),
        ({"firmware": "v2.bin", "all": True, "colour": 1}, 400, "unknown_field"),
        ({"all": True}, 400, "missing_field"),
        ({"firmware": "../etc/passwd", "all": True}, 403, "firmware_outside"),
        ({"firmware": "v9.bin", "all": True}, 404, "firmware_not_found"),
    ]
    for body, status, code in cases:
        error = await refused(client.request("POST", "/v1/batches", body))
        assert (error.status, error.code) == (status, code), body
    batch = (await client.request("POST", "/v1/batches", {"firmware": "v2.bin", "tag": "top", "policy": NO_PREFLIGHT}))[
        "batch"
    ]
    error = await refused(client.request("POST", "/v1/batches", {"firmware": "v2.bin", "devices": ["a", "b"]}))
    assert (error.status, error.code) == (409, "busy") and batch["id"] in error.message
    error = await refused(client.request("GET", "/v1/batches/nope"))
    assert (error.status, error.code) == (404, "unknown_batch")
    error = await refused(client.request("GET", "/v1/batches?limit=0"))
    assert (error.status, error.code) == (400, "bad_query")
    error = await refused(client.request("GET", "/v1/batches?cursor=x"))
    assert (error.status, error.code) == (400, "bad_query")
    cancelled = (await client.request("POST", f"/v1/batches/{batch['id']}/cancel", {"reason": "test"}))["batch"]
    assert cancelled["state"] in ("cancelling", "cancelled")
    final = await batch_end(client, batch["id"])
    assert final["state"] == "cancelled" and final["members"][0]["state"] == "cancelled"
    error = await refused(client.request("POST", f"/v1/batches/{batch['id']}/cancel", {}))
    assert (error.status, error.code) == (409, "not_active")


@pytest_twisted.ensureDeferred
async def test_a_batch_carries_on_after_the_daemon_restarts(tmp_path, reactor, stopping):
    factory = Outcomes(hold={"a", "b"})
    service = make_service(tmp_path, reactor, factory)
    client = client_for(service, reactor)
    batch = (await client.request("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": NO_PREFLIGHT}))[
        "batch"
    ]
    changes = Changes(reactor)
    service.queue.subscribe(changes.poke)
    await changes.until(lambda: len(factory.order) == 2, "two member jobs running")
    await service.stopService()  # the jobs are interrupted; the batch stays as journaled
    again = make_service(tmp_path, reactor, Outcomes())
    stopping(again)
    final = await batch_end(client_for(again, reactor), batch["id"])
    assert final["result"] == "succeeded"
    members = {m["device"]: m for m in final["members"]}
    assert len(members["a"]["jobs"]) == 2 and len(members["b"]["jobs"]) == 2  # resumed after the restart
    assert len(members["c"]["jobs"]) == 1
    resumed = (await client_for(again, reactor).request("GET", f"/v1/jobs/{members['a']['job']}"))["job"]
    assert resumed["resumed_from"] == members["a"]["jobs"][0] and resumed["batch"] == batch["id"]


@pytest_twisted.ensureDeferred
async def test_the_job_end_command_gets_each_job_and_is_counted(tmp_path, reactor, stopping):
    out = tmp_path / "hooks"
    out.mkdir()
    command = f'cat > "{out}/$NETOTA_JOB.json"; echo "$NETOTA_OUTCOME $NETOTA_BATCH" > "{out}/$NETOTA_JOB.env"'
    service = make_service(tmp_path, reactor, Outcomes(failing={"b"}), devices=("a", "b"), on_job_end=command)
    stopping(service)
    client = client_for(service, reactor)
    batch = (await client.request("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": NO_PREFLIGHT}))[
        "batch"
    ]
    final = await batch_end(client, batch["id"])
    changes = Changes(reactor)
    changes.watch_directory(out)
    try:
        await changes.until(lambda: len(list(out.glob("*.env"))) == 2, "both hooks")
        await changes.until(lambda: service.hooks.stats()["on_job_end"]["sent"] == 2, "both hooks counted", 10)
    finally:
        changes.close()
    for member in final["members"]:
        job = json.loads((out / f"{member['job']}.json").read_text())
        assert job["id"] == member["job"] and job["batch"] == batch["id"]
        kind = "succeeded" if member["device"] == "a" else "failed"
        assert (out / f"{member['job']}.env").read_text().split() == [kind, batch["id"]]
    status = await client.request("GET", "/v1/status")
    assert status["notifications"]["on_job_end"]["sent"] == 2 and status["notifications"]["on_job_end"]["failed"] == 0
