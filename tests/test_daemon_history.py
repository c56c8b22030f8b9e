"""A long history does not block the reactor: with 200 000 jobs in the journal (built with sqlite
directly), listing, status and a running upgrade stay responsive while retention prunes 50 000 of
them, and a real upgrade (the engine against an in-process simulated device, whose 5 s reply wait
is 1 s here, twice the lag allowed) succeeds. Responsiveness is the reactor's lag, measured by a
LoopingCall timing its own lateness; the bound is many times what an idle reactor shows, and far
below what a listing of the whole history on the reactor costs (seconds)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall

from netota_daemon.cli.control_client import ControlClient
from netota_daemon.daemon.config import DeviceConfig
from netota_daemon.daemon.jobs import default_job_factory
from netota_daemon.daemon.journal import JOURNAL_FILE, JobJournal
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.sim.image import make_image
from tests.daemon_fakes import make_service
from tests.sim_devices import start_device

JOBS = 200_000
KEEP = 150_000
DEVICES = ("a", "b", "c")
#: Seconds the reactor may be late: an idle one is late by milliseconds, this test's own work (its
#: client decodes the pages in the same process) by up to ~0.1 s on two loaded cores; listing every
#: job on the reactor, as the daemon once did, took seconds (at 250 000 jobs past the 30 s watchdog),
#: and pruning 50 000 jobs in one go on it 0.7 s.
MAX_LAG = 0.5
#: The simulated device's time scale: its 5 s reply wait is 1 s, so a stall the lag bound allows
#: can't fail the upgrade, which then takes a few seconds.
DEVICE_TIME_SCALE = 0.2


def build_journal(state_dir: Path, now: float) -> None:
    """200 000 finished jobs, two history rows each, the newest created a minute ago."""
    JobJournal(state_dir).close()  # the schema
    outcome = json.dumps(
        {
            "kind": "succeeded",
            "message": "upgraded",
            "phase": "done",
            "failure": None,
            "advice": "",
            "point_of_no_return": True,
            "firmware_version_before": "1.0.0",
            "firmware_version_after": "2.0.0",
            "details": {},
        }
    )
    start = now - (JOBS + 1) * 60.0
    with sqlite3.connect(state_dir / JOURNAL_FILE) as db:
        db.execute("PRAGMA synchronous=OFF")
        db.executemany(
            "INSERT INTO jobs (id, device, firmware, state, phase, point_of_no_return, created, started, finished,"
            " outcome, message, advice, options) VALUES (?, ?, 'v2.bin', 'finished', 'done', 1, ?, ?, ?, ?,"
            " 'upgraded', '', '{}')",
            (
                (f"{n:012x}", DEVICES[n % 3], start + n * 60, start + n * 60, start + n * 60 + 50, outcome)
                for n in range(JOBS)
            ),
        )
        db.executemany(
            "INSERT INTO job_history (job_id, time, state, phase, note) VALUES (?, ?, ?, ?, ?)",
            (
                row
                for n in range(JOBS)
                for row in (
                    (f"{n:012x}", start + n * 60, "queued", "detect", "created"),
                    (f"{n:012x}", start + n * 60 + 50, "finished", "done", "finished: succeeded"),
                )
            ),
        )


class LagMeter:
    """How late a LoopingCall on the reactor runs, at worst."""

    def __init__(self, reactor, interval: float = 0.02) -> None:
        self.reactor = reactor
        self.interval = interval
        self.worst = 0.0
        self.ticks = 0
        self._last = reactor.seconds()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor

    def _tick(self) -> None:
        now = self.reactor.seconds()
        self.worst = max(self.worst, now - self._last - self.interval)
        self._last = now
        self.ticks += 1

    def start(self) -> None:
        self._last = self.reactor.seconds()
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        self._loop.stop()


@pytest_twisted.ensureDeferred
async def test_200000_jobs_listing_status_and_an_upgrade_stay_responsive_while_the_journal_is_pruned(tmp_path, reactor):
    state = tmp_path / "state"
    state.mkdir()
    build_journal(state, reactor.seconds())
    device = await start_device(reactor, tmp_path / "device", time_scale=DEVICE_TIME_SCALE)
    ports = device.ports
    configs = {n: DeviceConfig(DeviceTarget(name=n, host="127.0.0.1"), UpgradeTimeouts()) for n in DEVICES}
    configs["b"] = DeviceConfig(
        DeviceTarget(name="b", host="127.0.0.1", ctp_port=ports["ctp"], http_port=ports["http"], ota_port=ports["ota"]),
        UpgradeTimeouts(),
    )
    service = make_service(
        tmp_path,
        reactor,
        default_job_factory,  # the real engine
        device_configs=configs,
        journal_retention_jobs=KEEP,
        journal_retention_days=0,
    )
    make_image(tmp_path / "fw" / "v2.bin", "2.0.0", 64 * 1024)  # a real image, for the real engine
    service.privilegedStartService()  # recovery: before the socket listens, bounded by indexes
    meter = LagMeter(reactor)
    meter.start()
    service.startService()  # pruning starts now, on the journal's thread
    try:
        client = ControlClient(reactor, f"unix:{service.socket_path}")
        job = (await client.request("POST", "/v1/jobs", {"device": "b", "firmware": "v2.bin"}))["job"]
        finished = service.queue.wait(job["id"])
        pages = []
        cursor = None
        for _ in range(5):
            page = await client.request("GET", "/v1/jobs?limit=200" + (f"&cursor={cursor}" if cursor else ""))
            pages.append(page)
            cursor = page["next_cursor"]
        first = await client.request("GET", "/v1/jobs")
        by_device, status, oldest, devices = await gatherResults(
            [
                Deferred.fromCoroutine(client.request("GET", "/v1/jobs?device=a&limit=10")),
                Deferred.fromCoroutine(client.request("GET", "/v1/status")),
                Deferred.fromCoroutine(client.request("GET", f"/v1/jobs/{JOBS - 1:012x}")),
                Deferred.fromCoroutine(client.request("GET", "/v1/devices")),
            ]
        )
        finished.addTimeout(60, reactor)
        record = await finished
        await service.retention.when_idle()
        after_prune = await client.request("GET", "/v1/status")
    finally:
        meter.stop()
        await service.stopService()
        await device.stop()

    assert record.outcome.kind.value == "succeeded", record.outcome  # the upgrade ran to its end during all this
    assert record.outcome.firmware_version_after == "2.0.0"
    assert [e["outcome"] for e in device.events if e["event"] == "session_end"] == ["ok", "ok"]  # both phases
    assert len(first["jobs"]) == 100 and first["jobs"][0]["id"] == job["id"]  # the default page, newest first
    assert [len(p["jobs"]) for p in pages] == [200] * 5 and all(p["next_cursor"] for p in pages)
    listed = [j["id"] for p in pages for j in p["jobs"]]
    assert len(set(listed)) == 1000  # pages neither overlap nor skip
    assert len(by_device["jobs"]) == 10 and {j["device"] for j in by_device["jobs"]} == {"a"}
    assert status["devices"] == 3 and after_prune["running"] == 0
    assert oldest["job"]["history"][-1]["note"] == "finished: succeeded"
    assert {d["name"]: d["firmware_version"] for d in devices["devices"]}["a"] == "2.0.0"
    # The pass counts the jobs when it starts: the new job may or may not be among them.
    assert JOBS - KEEP <= service.retention.pruned <= JOBS + 1 - KEEP
    kept = JobJournal(state)
    assert kept.page(limit=1).records[0].id == job["id"]
    assert len(kept.jobs(limit=KEEP + 10)) in (KEEP, KEEP + 1)
    assert meter.ticks > 10
    assert meter.worst < MAX_LAG, f"the reactor was {meter.worst:.3f} s late"
    print(f"reactor lag at worst {meter.worst:.3f} s over {meter.ticks} ticks")
