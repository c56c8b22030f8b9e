"""The upgrade engine against the simulated device, over loopback, on the real reactor.

Each test runs one job and checks the outcome, the advice, what the device received (its
``phase<N>-received.bin`` files and events) and that nothing is left running afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from netota_daemon.engine.events import Finished, PhaseChanged, Progress
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import (
    ADVICE_DOUBLE_BACKUP,
    ADVICE_LOADER,
    ADVICE_NOTHING_SENT,
    ADVICE_RESET,
    ADVICE_UNVERIFIED,
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

TIME_SCALE = 0.02  # device seconds -> real seconds: the 5 s reply wait is 100 ms, enough on 2 loaded cores
IMAGE_SIZE = 200_000

#: Engine waits for a device running at TIME_SCALE: small, but above the device's scaled gaps.
FAST = UpgradeTimeouts(
    deadline=20.0,
    connect=2.0,
    ctp_reply=2.0,
    http=2.0,
    ota_accept=1.0,
    receive=0.2,
    max_receive_timeouts=10,
    reboot=1.5,
    verify=1.5,
    poll_interval=0.05,
    keepalive_interval=0.2,
    connect_window=2.0,
    hook=5.0,
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
    assert outcome.firmware_version_before == "1.0.0"
    assert outcome.firmware_version_after == "2.0.0"
    assert outcome.point_of_no_return
    assert run.received(1) == run.image_bytes
    assert run.received(2) == run.image_bytes
    assert run.device.firmware_version == "2.0.0"
    assert [s["outcome"] for s in run.sessions()] == ["ok", "ok"]
    assert not any(s["stop_received"] for s in run.sessions())
    phases = [e.phase for e in run.events if isinstance(e, PhaseChanged)]
    assert phases == [Phase.DETECT, Phase.PHASE1, Phase.REBOOT, Phase.PHASE2, Phase.VERIFY, Phase.DONE]
    progress = [e for e in run.events if isinstance(e, Progress)]
    assert {p.phase for p in progress} == {Phase.PHASE1, Phase.PHASE2}
    assert max(p.percent for p in progress if p.phase is Phase.PHASE2) == pytest.approx(100.0)
    assert any(p.point_of_no_return for p in progress)
    assert isinstance(run.events[-1], Finished) and run.events[-1].outcome == outcome


@pytest_twisted.ensureDeferred
async def test_device_already_in_loader_goes_straight_to_phase2(reactor, tmp_path):
    run = await Run(reactor, tmp_path, mode="loader").start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    # the loader's fixed document says 1.0.1 whatever is installed: not reported as the version before
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == (None, "2.0.0")
    assert "same version" not in outcome.message
    assert [s["phase"] for s in run.sessions()] == [2]
    assert run.received(2) == run.image_bytes
    assert Phase.PHASE1 not in [e.phase for e in run.events if isinstance(e, PhaseChanged)]


@pytest_twisted.ensureDeferred
async def test_verify_only_reads_the_version_and_flashes_nothing(reactor, tmp_path):
    """Resuming a job that ended after phase 2 completed: the device already runs the new firmware."""
    run = await Run(reactor, tmp_path, verify_only=True, firmware_version="2.0.0").start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.firmware_version_after == "2.0.0"
    assert run.sessions() == []  # no OTA session
    assert not any(e["event"] == "ctp_connect" for e in run.device.events)  # not even a CTP session
    assert [e.phase for e in run.events if isinstance(e, PhaseChanged)] == [Phase.DETECT, Phase.VERIFY, Phase.DONE]


@pytest_twisted.ensureDeferred
async def test_drop_mid_phase1_fails_with_reset_advice(reactor, tmp_path):
    run = await Run(reactor, tmp_path, drop_after_reads=3, fault_phase=1).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.CONNECTION
    assert outcome.phase is Phase.PHASE1
    assert outcome.advice == ADVICE_RESET
    assert not outcome.point_of_no_return
    assert [s["outcome"] for s in run.sessions()] == ["dropped"]


@pytest_twisted.ensureDeferred
async def test_drop_mid_phase2_is_retried_from_the_start(reactor, tmp_path):
    run = await Run(reactor, tmp_path, drop_after_reads=4, fault_phase=2).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.details["phase2_attempts"] == 2
    assert [(s["phase"], s["outcome"]) for s in run.sessions()] == [(1, "ok"), (2, "dropped"), (2, "ok")]
    assert run.received(2) == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_short_stall_is_survived(reactor, tmp_path):
    # 30 device seconds = 0.6 s: well under the 11 receive timeouts of 0.2 s that end a session
    run = await Run(reactor, tmp_path, stall_after_reads="3:30", fault_phase=1).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert any(e["event"] == "fault_stall" for e in run.device.events)
    # the CTP session was kept alive while phase 1 streamed (keep-alive every 0.2 s, stall 0.6 s)
    assert any(e["event"] == "ctp_frame" and e["topic"] == "CTP_KEEP_ALIVE" for e in run.device.events)


@pytest_twisted.ensureDeferred
async def test_long_stall_times_out_with_stop(reactor, tmp_path):
    # 300 device seconds = 6 s: more than 10 receive timeouts of 0.2 s in a row
    run = await Run(reactor, tmp_path, stall_after_reads="3:300", fault_phase=1).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.phase is Phase.PHASE1
    assert outcome.advice == ADVICE_RESET
    assert "receive timeouts" in outcome.message
    assert any(e["event"] == "stop_received" for e in run.device.events)


@pytest_twisted.ensureDeferred
async def test_corrupt_headers_are_skipped(reactor, tmp_path):
    run = await Run(reactor, tmp_path, corrupt_header_every=3).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert sum(s["bad_headers"] for s in outcome.details["streams"]) > 0
    assert run.received(2) == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_corrupt_reply_in_phase2_is_retried(reactor, tmp_path):
    run = await Run(reactor, tmp_path, corrupt_reply_check=True, fault_phase=2).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert [(s["phase"], s["outcome"]) for s in run.sessions()] == [(1, "ok"), (2, "err"), (2, "ok")]
    assert any(e["event"] == "checksum_error" for e in run.device.events)


@pytest_twisted.ensureDeferred
async def test_corrupt_reply_in_phase1_is_the_devices_error(reactor, tmp_path):
    run = await Run(reactor, tmp_path, corrupt_reply_check=True, fault_phase=1).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.DEVICE_ERROR
    assert outcome.phase is Phase.PHASE1
    assert outcome.advice == ADVICE_RESET


@pytest_twisted.ensureDeferred
async def test_err_at_the_end(reactor, tmp_path):
    run = await Run(reactor, tmp_path, reject_image=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.DEVICE_ERROR
    assert outcome.phase is Phase.PHASE1
    assert outcome.advice == ADVICE_RESET
    assert "ERR" in outcome.message


@pytest_twisted.ensureDeferred
async def test_err_at_the_end_of_phase2_after_the_point_of_no_return(reactor, tmp_path):
    run = await Run(reactor, tmp_path, mode="loader", reject_image=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.DEVICE_ERROR
    assert outcome.phase is Phase.PHASE2
    assert outcome.point_of_no_return
    assert outcome.advice == ADVICE_LOADER
    # the loader's ERR is retried phase2_error_retries times, then reported
    assert [s["outcome"] for s in run.sessions()] == ["err"] * (1 + FAST.phase2_error_retries)


@pytest_twisted.ensureDeferred
async def test_same_is_already_current(reactor, tmp_path):
    run = await Run(reactor, tmp_path, same_as_installed=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.ALREADY_CURRENT, outcome
    assert outcome.ok
    assert outcome.phase is Phase.DONE and outcome.advice == "Nothing to do."
    # (run.run() stops the device, so its mode is "down" by now: the events tell what it did)
    assert [(s["phase"], s["outcome"]) for s in run.sessions()] == [(1, "same")]
    assert not any(e["event"] == "reboot" for e in run.device.events)  # it stayed in its main firmware


@pytest_twisted.ensureDeferred
async def test_same_answered_with_err_by_current_firmware(reactor, tmp_path):
    run = await Run(reactor, tmp_path, same_as_installed=True, same_status="err").start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.DEVICE_ERROR
    assert "already installed" in outcome.message


@pytest_twisted.ensureDeferred
async def test_device_that_never_comes_back_after_phase1(reactor, tmp_path):
    run = await Run(reactor, tmp_path, no_reboot=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.TIMEOUT
    assert outcome.phase is Phase.REBOOT
    assert "update loader" in outcome.advice and "WIFI_OTA_XXXXXX" in outcome.advice


@pytest_twisted.ensureDeferred
async def test_new_firmware_that_never_answers_is_unverified(reactor, tmp_path):
    run = await Run(reactor, tmp_path, phase2_reboot_seconds=100_000).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.UNVERIFIED, outcome
    assert outcome.phase is Phase.VERIFY
    assert outcome.advice == ADVICE_UNVERIFIED
    assert run.received(2) == run.image_bytes


@pytest_twisted.ensureDeferred
async def test_double_backup_device_is_not_applicable(reactor, tmp_path):
    run = await Run(reactor, tmp_path, double_backup=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.NOT_APPLICABLE, outcome
    assert outcome.advice == ADVICE_DOUBLE_BACKUP
    assert run.sessions() == []
    assert not any(e["event"] == "ctp_connect" for e in run.device.events)


@pytest_twisted.ensureDeferred
async def test_nothing_listening_fails_with_connection(reactor, tmp_path):
    # A port held bound but not listening: connections to it are refused, and no other test on
    # this host can start listening on it meanwhile.
    import socket

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    try:
        target = DeviceTarget(name="absent", host="127.0.0.1", ctp_port=port, http_port=port, ota_port=port)
        image = open_image(make_image(tmp_path / "update.ufw", "2.0.0", 1000))
        outcome = await UpgradeJob(reactor, target, image, FAST, "job-3").run()
    finally:
        holder.close()
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.failure is FailureClass.CONNECTION
    assert outcome.phase is Phase.DETECT
    assert outcome.advice == ADVICE_NOTHING_SENT
    assert "refused" in outcome.message
    await one_reactor_turn(reactor)
    assert reactor.getDelayedCalls() == []


def _cancel_when(predicate: Callable[[Any], bool]):
    def on_event(event: Any, job: UpgradeJob) -> None:
        if predicate(event):
            job.cancel("test abort")

    return on_event


@pytest.mark.parametrize(
    "where,predicate,advice",
    [
        ("detect", lambda e: isinstance(e, PhaseChanged) and e.phase is Phase.DETECT, ADVICE_NOTHING_SENT),
        (
            "phase1",
            lambda e: isinstance(e, Progress) and e.phase is Phase.PHASE1 and e.bytes_served > 50_000,
            ADVICE_RESET,
        ),
        ("reboot", lambda e: isinstance(e, PhaseChanged) and e.phase is Phase.REBOOT, None),
        (
            "phase2",
            lambda e: isinstance(e, Progress) and e.phase is Phase.PHASE2 and e.point_of_no_return,
            ADVICE_LOADER,
        ),
        ("verify", lambda e: isinstance(e, PhaseChanged) and e.phase is Phase.VERIFY, ADVICE_UNVERIFIED),
    ],
)
@pytest_twisted.ensureDeferred
async def test_abort_at_each_phase(reactor, tmp_path, where, predicate, advice):
    run = await Run(reactor, tmp_path).start()
    streaming = where in ("phase1", "phase2")
    outcome = await run.run(
        _cancel_when(predicate),
        device_event=(lambda e: e["event"] == "session_end" and e["phase"] == int(where[-1])) if streaming else None,
    )
    assert outcome.kind is OutcomeKind.ABORTED, outcome
    assert outcome.phase.value == where
    assert "test abort" in outcome.message
    if advice is not None:
        assert outcome.advice == advice
    else:
        assert "rejoin its WiFi" in outcome.advice
    if streaming:
        # STOP went on the wire before the close, and the device saw it
        last = run.sessions()[-1]
        assert last["stop_received"] and last["outcome"] in ("aborted", "err")


@pytest_twisted.ensureDeferred
async def test_overall_deadline(reactor, tmp_path):
    # the device stays down after phase 1 and the reboot wait is longer than the whole job
    run = await Run(reactor, tmp_path, FAST.replaced(deadline=2.0, reboot=30.0), no_reboot=True).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.TIMEOUT
    assert "deadline" in outcome.message
    assert outcome.phase is Phase.REBOOT


@pytest_twisted.ensureDeferred
async def test_reconnect_hook_runs_with_the_device_environment(reactor, tmp_path):
    out = tmp_path / "hook.txt"
    run = Run(reactor, tmp_path)
    await run.start()
    run.job.target = run.job.target.__class__(
        **{
            **run.job.target.__dict__,
            "reconnect_command": f'echo "$NETOTA_DEVICE $NETOTA_SSID $NETOTA_PHASE" >> {out}',
            "expected_ssid": "WIFI_OTA_XXXXXX",
        }
    )
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert out.read_text().splitlines() == ["sim-1 WIFI_OTA_XXXXXX reboot", "sim-1 WIFI_OTA_XXXXXX verify"]


@pytest_twisted.ensureDeferred
async def test_garbage_description_is_a_protocol_error(reactor, tmp_path):
    from twisted.internet.protocol import Factory, Protocol

    class NotHttp(Protocol):
        def dataReceived(self, data):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length:5\r\n\r\nhello")
            self.transport.loseConnection()

    port = reactor.listenTCP(0, Factory.forProtocol(NotHttp), interface="127.0.0.1")
    try:
        target = DeviceTarget(name="odd", host="127.0.0.1", http_port=port.getHost().port)
        image = open_image(make_image(tmp_path / "update.ufw", "2.0.0", 1000))
        outcome = await UpgradeJob(reactor, target, image, FAST, "job-2").run()
    finally:
        await port.stopListening()
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.failure is FailureClass.PROTOCOL_ERROR
    assert "not valid JSON" in outcome.message


@pytest_twisted.ensureDeferred
async def test_final_notice_echo_option(reactor, tmp_path):
    run = await Run(reactor, tmp_path, FAST.replaced(echo_final_notice=True)).start()
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    # the device saw an echo of each final 100 % notice (and none of the all_size notice, which
    # it would have failed the session for)
    assert [e["phase"] for e in run.device.events if e["event"] == "notice_echo"] == [1, 2]
    assert [s["outcome"] for s in run.sessions()] == ["ok", "ok"]


async def _loader_left_after_a_drop(reactor: Any, tmp_path: Path, drop_after_reads: int) -> tuple[Any, dict]:
    """The phase-2 session drops after ``drop_after_reads`` replies; before the next attempt the
    device runs its main firmware again. Returns the outcome and the one phase-2 session.
    (SimulatedDevice has no public "reboot now": the test uses its internal reboot.)"""
    run = await Run(reactor, tmp_path, mode="loader", drop_after_reads=drop_after_reads, fault_phase=2).start()
    rebooted = run.device.wait_for_event(lambda e: e["event"] == "fault_drop", timeout=10)
    rebooted.addCallback(lambda _: run.device._reboot("main", 0.0, 0.0, "test: the device left its loader"))
    outcome = await run.run()
    await rebooted
    (session,) = run.sessions()  # one phase-2 session, which never ended OK on the wire
    assert session["phase"] == 2 and session["outcome"] != "ok"
    return outcome, session


@pytest_twisted.ensureDeferred
async def test_loader_that_finished_while_disconnected_is_verified(reactor, tmp_path):
    # The session dropped after the all_size notice (the loader was rewriting flash): the device
    # back in its main firmware finished phase 2 (its OK was lost): the job reads the version.
    outcome, session = await _loader_left_after_a_drop(reactor, tmp_path, drop_after_reads=3)
    assert session["all_size_sent"]
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.firmware_version_after == "1.0.0"


@pytest_twisted.ensureDeferred
async def test_loader_that_fell_back_to_the_old_firmware_is_not_a_success(reactor, tmp_path):
    # The session dropped before the all_size notice (flash untouched): the device back in its
    # main firmware runs its old firmware. Nothing was upgraded: the job must not claim success.
    outcome, session = await _loader_left_after_a_drop(reactor, tmp_path, drop_after_reads=1)
    assert not session["all_size_sent"]
    assert outcome.kind is OutcomeKind.FAILED, outcome
    assert outcome.failure is FailureClass.DEVICE_ERROR
    assert outcome.phase is Phase.PHASE2
    assert not outcome.point_of_no_return
    assert "main firmware again (version 1.0.0)" in outcome.message and "upgraded nothing" in outcome.message
    assert outcome.advice == ADVICE_RESET


@pytest_twisted.ensureDeferred
async def test_abort_after_phase1_ok_while_closing_ctp_gets_the_reboot_advice(reactor, tmp_path):
    # Phase 1 ended OK; the job is still closing its CTP session (on a real device that can take
    # seconds: the device drops its WiFi stations after OK) when it is cancelled. The device is
    # rebooting into its loader, so "the old firmware is intact, reset the device" would mislead.
    run = await Run(reactor, tmp_path).start()
    job = run.job
    close_ctp = job._close_ctp

    async def close_and_cancel(ctp):
        if job.phase is Phase.PHASE1 and job._stream_results and job._stream_results[-1]["end"] == "ok":
            job.cancel("test abort")
        return await close_ctp(ctp)

    job._close_ctp = close_and_cancel
    outcome = await run.run()
    assert outcome.kind is OutcomeKind.ABORTED, outcome
    assert outcome.phase is Phase.PHASE1
    assert "rejoin its WiFi" in outcome.advice and outcome.advice != ADVICE_RESET
