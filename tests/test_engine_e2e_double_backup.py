"""The double-backup route against the simulated double-backup device and its lwIP-like FTP server,
over loopback, on the real reactor: a small smoke layer (the decisions are tested on a Clock in
``test_engine_job_double_backup.py``). Each test checks the outcome, what the device received
(``db-received.bin``, its events), that netota never broke the device's FTP rules, and that nothing
is left running. The engine's waits are at least 5x the simulated device's gaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from netota_daemon.engine.events import Progress
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import ADVICE_UPLOAD_INCOMPLETE, FailureClass, OutcomeKind, Phase
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import open_image
from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import make_image
from tests.conftest import one_reactor_turn

TIME_SCALE = 0.05  # the 1 s burn is 50 ms, the 2 s to the reset 100 ms
IMAGE_SIZE = 300_000

FAST = UpgradeTimeouts(
    deadline=60.0,
    connect=5.0,
    http=5.0,
    connect_window=10.0,
    poll_interval=0.05,
    verify=20.0,
    ftp_reply=5.0,
    ftp_stall=2.0,  # the stall fault below holds the upload 3 s; a healthy upload never pauses 0.1 s
    ftp_final_reply=5.0,  # the 226 comes after the 50 ms burn
    upload_reboot=5.0,  # the device resets 100 ms after the 226
)

#: What netota must never make the device record.
BROKEN_RULES = ("ftp_protocol_error", "ftp_crash", "ftp_not_modelled")


class Run:
    def __init__(self, reactor: Any, tmp_path: Path, timeouts: UpgradeTimeouts = FAST, **sim: Any) -> None:
        self.reactor = reactor
        self.state_dir = tmp_path / "device"
        self.image_path = make_image(tmp_path / "update-ota.ufw", "2.0.0", IMAGE_SIZE, kind="double")
        self.image_bytes = self.image_path.read_bytes()
        self.device = SimulatedDevice(
            reactor,
            SimConfig(
                state_dir=self.state_dir,
                listen="127.0.0.1",
                ctp_port=0,
                http_port=0,
                ota_port=0,
                ftp_port=0,
                pasv_base=0,  # PASV ports from the kernel: tests must not collide on fixed ones
                double_backup=True,
                time_scale=TIME_SCALE,
                **{"reboot_seconds": 20.0, **sim},  # away 1 s after its reset (a real one: seconds), 20x the poll
            ),
        )
        self.timeouts = timeouts
        self.events: list[Any] = []

    async def start(self) -> Run:
        await self.device.start()
        ports = self.device.ports
        target = DeviceTarget(name="cam-1", host="127.0.0.1", http_port=ports["http"], ftp_port=ports["ftp"])
        self.job = UpgradeJob(self.reactor, target, open_image(self.image_path), self.timeouts, "job-db")
        self.job.events.subscribe(self.events.append)
        return self

    async def run(self, on_event: Any = None) -> Any:
        if on_event is not None:
            self.job.events.subscribe(lambda e: on_event(e, self.job))
        outcome = await self.job.run().addTimeout(60, self.reactor)
        await self.device.stop()
        await one_reactor_turn(self.reactor)
        assert self.reactor.getDelayedCalls() == [], self.reactor.getDelayedCalls()
        broken = [e for e in self.device.events if e["event"] in BROKEN_RULES]
        assert broken == [], broken
        return outcome

    def named(self, event: str) -> list[dict]:
        return [e for e in self.device.events if e["event"] == event]

    def received(self) -> bytes:
        return (self.state_dir / "db-received.bin").read_bytes()


@pytest_twisted.ensureDeferred
async def test_a_double_backup_upgrade_uploads_the_image_and_reads_the_new_version(reactor, tmp_path):
    run = await Run(reactor, tmp_path).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == ("1.0.0", "2.0.0")
    assert run.received() == run.image_bytes
    assert [e["outcome"] for e in run.named("ftp_upload_end")] == ["closed"]
    commands = [e["verb"] for e in run.named("ftp_command")]
    assert commands[:5] == ["USER", "PASS", "TYPE", "PASV", "STOR"] and "ABOR" not in commands
    upload = [e for e in run.events if isinstance(e, Progress) and e.phase is Phase.UPLOAD]
    assert [p.percent for p in upload] == sorted(p.percent for p in upload) and upload[-1].percent == 100.0


@pytest_twisted.ensureDeferred
async def test_a_device_back_before_the_first_poll_is_known_by_its_new_version(reactor, tmp_path):
    # Away for 0.1 s only (the simulator's own reboot at this time scale, as in the README's
    # example), polled every 1 s as netota flash does: its new firmware_version tells the reboot.
    run = await Run(reactor, tmp_path, FAST.replaced(poll_interval=1.0), reboot_seconds=2.0).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.firmware_version_after == "2.0.0" and run.received() == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_a_dropped_upload_is_retried_from_the_start_and_succeeds(reactor, tmp_path):
    run = await Run(reactor, tmp_path, ftp_drop_after_bytes=100_000).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert [e["outcome"] for e in run.named("ftp_upload_end")] == ["reset", "closed"]
    assert run.received() == run.image_bytes and outcome.details["upload_attempts"] == 2
    assert [e["verb"] for e in run.named("ftp_command")].count("PASV") == 2  # a fresh PASV for each


@pytest_twisted.ensureDeferred
async def test_busy_and_a_stall_are_retried(reactor, tmp_path):
    run = await Run(reactor, tmp_path, ftp_busy_once=True, ftp_stall_after_bytes="100000:60").start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    # 550 busy, then the stall: the kernel's buffers may hold the rest of the image through it (the
    # upload then ends when the device reads again), or the stall outlasts ftp_stall (a third attempt)
    assert outcome.details["upload_attempts"] in (2, 3)
    assert run.named("ftp_fault_busy") and run.named("ftp_fault_stall")
    assert run.received() == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_a_refused_login_fails_with_the_devices_own_words(reactor, tmp_path):
    run = await Run(reactor, tmp_path, ftp_reject_login_once=True).start()
    outcome = await run.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (
        OutcomeKind.FAILED,
        FailureClass.DEVICE_REFUSED,
        Phase.UPLOAD,
    )
    assert "503" in outcome.message and "password" in outcome.message
    assert run.device.firmware_version == "1.0.0"


@pytest_twisted.ensureDeferred
async def test_a_cancel_mid_upload_burns_nothing(reactor, tmp_path):
    run = await Run(reactor, tmp_path, flash_kbps=2000).start()  # slow enough to cancel mid-way

    def cancel_halfway(event: Any, job: UpgradeJob) -> None:
        if isinstance(event, Progress) and event.phase is Phase.UPLOAD and event.done_bytes >= IMAGE_SIZE // 3:
            job.cancel("test abort")

    outcome = await run.run(cancel_halfway)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.UPLOAD), outcome
    assert outcome.advice == ADVICE_UPLOAD_INCOMPLETE
    # The data connection was reset before the control one was closed. A device busy writing flash may
    # see the control close first: like lwIP's ftpd it then attempts the burn, which the size check stops.
    (end,) = run.named("ftp_upload_end")
    assert end["outcome"] in ("reset", "control_lost") and end["bytes"] < IMAGE_SIZE
    assert [e["burned"] for e in run.named("db_burn")] in ([], [False])
    assert run.device.firmware_version == "1.0.0" and run.named("reboot") == []
