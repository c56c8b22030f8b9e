"""The upgrade engine against the simulated device, over loopback, on the real reactor: a small
smoke layer (the engine's decisions are tested on a Clock in ``test_engine_job_*.py``).

Each test runs one job and checks the outcome, what the device received (its
``phase<N>-received.bin`` files and events) and that nothing is left running afterwards. The
engine's waits are at least 5x the longest gap of the simulated device, so a loaded machine can't
turn a healthy device into a timeout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from netota_daemon.engine.events import Finished, PhaseChanged, Progress, TransferState
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import (
    ADVICE_LOADER,
    ADVICE_NOTHING_SENT,
    FailureClass,
    OutcomeKind,
    Phase,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import open_image
from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import make_image
from tests.conftest import one_reactor_turn

TIME_SCALE = 0.05  # device seconds -> real seconds: its longest silence (a 5 s notice wait) is 0.25 s
IMAGE_SIZE = 200_000

#: Engine waits for a device running at TIME_SCALE: each at least 5x the device's gap it covers.
FAST = UpgradeTimeouts(
    deadline=60.0,
    connect=5.0,
    ctp_reply=5.0,
    http=5.0,
    ota_accept=5.0,
    receive=2.0,  # 8x the 0.25 s notice wait
    max_receive_timeouts=10,
    reboot=20.0,  # the loader is up after 0.25 s
    verify=20.0,
    poll_interval=0.05,
    keepalive_interval=1.0,
    connect_window=10.0,
    hook=10.0,
)


class Run:
    """One job against one simulated device, and what came of it."""

    def __init__(
        self, reactor: Any, tmp_path: Path, timeouts: UpgradeTimeouts = FAST, verify_only: bool = False, **sim: Any
    ) -> None:
        self.reactor = reactor
        self.verify_only = verify_only
        self.state_dir = tmp_path / "device"
        self.image_path = make_image(tmp_path / "update.ufw", "2.0.0", IMAGE_SIZE)
        self.image_bytes = Path(self.image_path).read_bytes()
        sim.setdefault("firmware_version", "1.0.0")
        self.device = SimulatedDevice(
            reactor,
            SimConfig(
                state_dir=self.state_dir,
                listen="127.0.0.1",
                ctp_port=0,
                http_port=0,
                ota_port=0,
                time_scale=TIME_SCALE,
                **sim,
            ),
        )
        self.timeouts = timeouts
        self.events: list[Any] = []
        self.job: UpgradeJob | None = None

    async def start(self) -> Run:
        await self.device.start()
        ports = self.device.ports
        target = DeviceTarget(
            name="sim-1", host="127.0.0.1", ctp_port=ports["ctp"], http_port=ports["http"], ota_port=ports["ota"]
        )
        self.job = UpgradeJob(
            self.reactor, target, open_image(self.image_path), self.timeouts, "job-1", verify_only=self.verify_only
        )
        self.job.events.subscribe(self.events.append)
        return self

    async def run(
        self,
        on_event: Callable[[Any, UpgradeJob], None] | None = None,
        device_event: Callable[[dict], bool] | None = None,
    ):
        """Run the job; then (optionally) wait for a device event, stop the device and check that
        nothing is left: no timer, no connection."""
        assert self.job is not None
        if on_event is not None:
            self.job.events.subscribe(lambda e: on_event(e, self.job))
        d = self.job.run()
        d.addTimeout(30, self.reactor)
        outcome = await d
        if device_event is not None:
            await self.device.wait_for_event(device_event, timeout=10)
        await self.device.stop()
        await one_reactor_turn(self.reactor)
        assert self.reactor.getDelayedCalls() == [], self.reactor.getDelayedCalls()
        return outcome

    def received(self, phase: int) -> bytes:
        return (self.state_dir / f"phase{phase}-received.bin").read_bytes()

    def sessions(self) -> list[dict]:
        return [e for e in self.device.events if e["event"] == "session_end"]


@pytest.fixture
def open_sockets(reactor):
    """Fails the test if it leaves a socket registered with the reactor."""
    before = set(reactor.getReaders()) | set(reactor.getWriters())
    yield
    after = set(reactor.getReaders()) | set(reactor.getWriters())
    left = [s for s in after - before if "Waker" not in type(s).__name__]
    assert left == [], f"left open: {left}"


pytestmark = pytest.mark.usefixtures("open_sockets")


@pytest_twisted.ensureDeferred
async def test_full_two_phase_upgrade(reactor, tmp_path):
    run = await Run(reactor, tmp_path).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == ("1.0.0", "2.0.0")
    assert outcome.point_of_no_return
    assert run.received(1) == run.image_bytes
    assert run.received(2) == run.image_bytes
    assert run.device.firmware_version == "2.0.0"
    assert [s["outcome"] for s in run.sessions()] == ["ok", "ok"]
    assert not any(s["stop_received"] for s in run.sessions())
    phases = [e.phase for e in run.events if isinstance(e, PhaseChanged)]
    assert phases == [Phase.DETECT, Phase.PHASE1, Phase.REBOOT, Phase.PHASE2, Phase.VERIFY, Phase.DONE]
    progress = [e for e in run.events if isinstance(e, Progress)]
    assert isinstance(run.events[-1], Finished) and run.events[-1].outcome == outcome
    # honest progress, from the real stream: forward only, 100 only at OK, the device's own bytes
    for phase in (Phase.PHASE1, Phase.PHASE2):
        mine = [p for p in progress if p.phase is phase]
        assert [p.percent for p in mine] == sorted(p.percent for p in mine)
        assert [p.percent for p in mine].count(100.0) == 1 and mine[-1].state is TransferState.DONE
        assert any(p.state is TransferState.DEVICE_WORKING for p in mine)  # e.g. after the final notice
    served = sum(s["bytes"] for s in run.sessions() if s["phase"] == 2)
    assert [p for p in progress if p.phase is Phase.PHASE2][-1].bytes_served == served
    assert any(p.basis == "all_size" and p.total_bytes == IMAGE_SIZE and p.point_of_no_return for p in progress)


@pytest_twisted.ensureDeferred
async def test_device_already_in_loader_goes_straight_to_phase2(reactor, tmp_path):
    run = await Run(reactor, tmp_path, mode="loader").start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == (None, "2.0.0")
    assert [s["phase"] for s in run.sessions()] == [2]
    assert run.received(2) == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_drop_mid_phase2_is_retried_from_the_start(reactor, tmp_path):
    run = await Run(reactor, tmp_path, drop_after_reads=4, fault_phase=2).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.details["phase2_attempts"] == 2
    assert [(s["phase"], s["outcome"]) for s in run.sessions()] == [(1, "ok"), (2, "dropped"), (2, "ok")]
    assert run.received(2) == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_cancel_mid_phase2_sends_stop_the_device_sees(reactor, tmp_path):
    run = await Run(reactor, tmp_path).start()

    def cancel_past_the_point_of_no_return(event: Any, job: UpgradeJob) -> None:
        if isinstance(event, Progress) and event.phase is Phase.PHASE2 and event.basis == "all_size":
            job.cancel("test abort")

    outcome = await run.run(
        cancel_past_the_point_of_no_return,
        device_event=lambda e: e["event"] == "session_end" and e["phase"] == 2,
    )
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.PHASE2), outcome
    assert outcome.advice == ADVICE_LOADER
    last = run.sessions()[-1]
    assert last["stop_received"] and last["outcome"] in ("aborted", "err")


@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_with_connection(reactor, tmp_path):
    run = Run(reactor, tmp_path, FAST.replaced(connect_window=1.0))
    await run.start()
    await run.device.stop()  # every port closed: connections are refused
    assert run.job is not None
    d = run.job.run()
    outcome = await d.addTimeout(30, reactor)
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.CONNECTION), outcome
    assert outcome.advice == ADVICE_NOTHING_SENT and "connection refused" in outcome.message
    await one_reactor_turn(reactor)
    assert reactor.getDelayedCalls() == []
