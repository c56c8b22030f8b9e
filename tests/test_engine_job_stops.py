"""Deadlines and cancels always win: for every step that waits (both routes), a stop that comes in the same
reactor pass as the step's own timeout (just before it, at the same moment, just after it) ends the
job at once, as a timeout for the deadline and as aborted for a cancel, and is never turned into a
retry. On a Clock with the scripted fake device; no sockets, no processes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from twisted.internet.task import Clock

from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import ADVICE_LOADER, ADVICE_UPLOAD_UNSETTLED, FailureClass, OutcomeKind, Phase
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ftp_upload import UploadEnd
from netota_daemon.protocols.ota_stream import StreamEnd
from tests.engine_fakes import (
    IMAGE_SIZE,
    FakeDevice,
    FakeLink,
    Mode,
    StreamPlan,
    UploadPlan,
    run_to_end,
    run_until,
)
from tests.images import image_bytes_of

pytestmark = pytest.mark.usefixtures("no_sockets_or_processes")

TIMEOUTS = UpgradeTimeouts(connect=10.0, ctp_reply=10.0, http=10.0, hook=20.0, connect_window=30.0)
HOOKED = DeviceTarget(name="dev-1", host="192.0.2.1", reconnect_command="rejoin")
PLAIN = DeviceTarget(name="dev-1", host="192.0.2.1")


@dataclass
class Step:
    """A waiting step: how to get the job stuck in it, and when the step's own timer fires."""

    phase: Phase
    setup: Callable[[FakeDevice], None]
    started: Callable[[FakeLink], float | None]  # when the step began (None: not yet)
    timeout: float | None  # the step's own timer, from its start (None: when it ends the job on its own)
    target: DeviceTarget = PLAIN
    double_backup: bool = False  # a double-backup device (an FTP upload), else single backup
    final_failure: FailureClass | None = None  # how the step's own timeout ends the job, when it does


def first_call(what: str, after: Callable[[FakeLink], bool] = lambda link: True) -> Callable[[FakeLink], float | None]:
    def started(link: FakeLink) -> float | None:
        if not after(link):
            return None
        times = [c.time for c in link.calls if c.what == what]
        return times[0] if times else None

    return started


def nth_fetch_in(phase_done: int, n: int) -> Callable[[FakeLink], float | None]:
    """The time of the n-th description fetch after ``phase_done`` OTA sessions ended OK."""

    def started(link: FakeLink) -> float | None:
        oks = [c.time for c in link.calls if c.what == "ota_end" and c.detail["end"] == "ok"]
        if len(oks) < phase_done:
            return None
        fetches = [c.time for c in link.calls if c.what == "fetch" and c.time >= oks[phase_done - 1]]
        return fetches[n - 1] if len(fetches) >= n else None

    return started


def _hang_connects(device: FakeDevice) -> None:
    device.connect_hangs = True


def _silent_ctp(device: FakeDevice) -> None:
    device.ctp.app_access = "silent"


def _hang_fetch(device: FakeDevice) -> None:
    device.fetch_hangs = True


def _phase2_times_out_at_7s(device: FakeDevice) -> None:
    device.phase2[0] = StreamPlan(all_size=True, hang_after=3, end=StreamEnd.TIMEOUT, end_after=7.0)


def _stays_down(device: FakeDevice) -> None:
    device.stays_down = True


def _new_firmware_silent(device: FakeDevice) -> None:
    device.new_firmware_silent = True


def _hook_hangs(device: FakeDevice) -> None:
    device.hook_hangs = True


def _upload_stalls_at_7s(device: FakeDevice) -> None:
    device.uploads[0] = UploadPlan(end=UploadEnd.TIMEOUT, code=None, fraction=0.3, seconds=7.0, message="stalled")


def _image_not_accepted(device: FakeDevice) -> None:
    device.uploads[0] = UploadPlan(accepted=False)  # the 226 comes, the device never reboots


STEPS = {
    "connect": Step(Phase.PHASE1, _hang_connects, first_call("connect_ctp"), TIMEOUTS.connect),
    "ctp reply": Step(Phase.PHASE1, _silent_ctp, first_call("ctp"), TIMEOUTS.ctp_reply),
    "description fetch": Step(Phase.DETECT, _hang_fetch, first_call("fetch"), TIMEOUTS.http),
    "stream": Step(
        Phase.PHASE2,
        _phase2_times_out_at_7s,
        lambda link: next(
            (c.time for c in link.calls if c.what == "connect_ota" and c.detail["mode"] == "loader"), None
        ),
        7.0,
    ),
    "reboot poll": Step(Phase.REBOOT, _stays_down, nth_fetch_in(1, 3), 0.0),
    "verify poll": Step(Phase.VERIFY, _new_firmware_silent, nth_fetch_in(2, 3), 0.0),
    "hook": Step(Phase.REBOOT, _hook_hangs, first_call("hook"), TIMEOUTS.hook, target=HOOKED),
    "ftp upload": Step(Phase.UPLOAD, _upload_stalls_at_7s, first_call("upload"), 7.0, double_backup=True),
    "upload reboot": Step(
        Phase.REBOOT,
        _image_not_accepted,
        first_call("upload_end"),
        None,  # its polls give up when the next would pass upload_reboot: the dry run tells when
        double_backup=True,
        final_failure=FailureClass.DEVICE_ERROR,  # it did not reboot: it did not accept the image
    ),
}


def make(tmp_path, step: Step, deadline: float = 10_000.0):
    clock = Clock()
    device = FakeDevice(clock, ota_type="0" if step.double_backup else "1")
    step.setup(device)
    link = FakeLink(device)
    path = tmp_path / "update.ufw"
    path.write_bytes(image_bytes_of("double") if step.double_backup else b"\x5a" * IMAGE_SIZE)
    job = UpgradeJob(clock, step.target, FirmwareImage(path), TIMEOUTS.replaced(deadline=deadline), "job-1", link=link)
    return clock, device, link, job


def moment(tmp_path, step: Step) -> float:
    """When the step's own timer fires, from a dry run of the same (deterministic) scenario."""
    clock, device, link, job = make(tmp_path, step)
    if step.timeout is None:
        outcome = run_to_end(clock, job)
        assert outcome.phase is step.phase and outcome.failure is step.final_failure, outcome
        return clock.seconds()
    job.run()
    run_until(clock, lambda: step.started(link) is not None)
    start = step.started(link)
    assert start is not None
    job.cancel("dry run over")
    run_until(clock, lambda: job.outcome is not None)
    return start + step.timeout


#: Just before the step's own timer, at the same moment (the deadline's timer was scheduled first),
#: and just after it: all in one pass of the clock.
ORDERS = {"stop first": -1e-6, "same moment": 0.0, "timer first": 1e-6}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("name", list(STEPS))
def test_the_deadline_wins_over_the_steps_own_timeout(tmp_path, name, order):
    step = STEPS[name]
    at = moment(tmp_path, step) + ORDERS[order]
    clock, device, link, job = make(tmp_path, step, deadline=at)
    outcome = run_to_end(clock, job)
    if order != "timer first":  # else the step ended first, and the job may have gone on to the next
        assert job.phase is step.phase
    if step.phase is Phase.VERIFY:
        assert outcome.kind is OutcomeKind.UNVERIFIED, outcome
    elif order == "timer first" and step.final_failure is not None:  # the step's own end may come first
        assert outcome.kind is OutcomeKind.FAILED and outcome.failure in (FailureClass.TIMEOUT, step.final_failure)
    else:
        assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.TIMEOUT), outcome
        if order != "timer first":  # else a step whose timeout is final (a CTP reply) may speak first
            assert f"deadline of {at:g} s passed during" in outcome.message
    assert clock.seconds() <= at + 0.01  # promptly: no retry, no other wait after the deadline
    assert [c for c in link.calls if c.time > at + 1e-3] == []
    assert link.open_sessions == set()
    assert set(clock.getDelayedCalls()) <= device.timers
    if step.phase is Phase.PHASE2:
        assert outcome.advice == ADVICE_LOADER
        assert [stop[1] for stop in link.stops] in ([2], [])  # STOP on the stream it was still in
    if step.double_backup and outcome.phase is Phase.REBOOT and outcome.failure is FailureClass.TIMEOUT:
        assert outcome.advice == ADVICE_UPLOAD_UNSETTLED  # it was sent whole: the device may still take it
    if step.double_backup:
        assert link.stops == [] and "connect_ctp" not in link.names()  # no CTP, no 3335 on this route


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("name", list(STEPS))
def test_a_cancel_wins_over_the_steps_own_timeout(tmp_path, name, order):
    step = STEPS[name]
    at = moment(tmp_path, step) + ORDERS[order]
    clock, device, link, job = make(tmp_path, step)
    cancel = clock.callLater(at, job.cancel, "operator")
    outcome = run_to_end(clock, job)
    if cancel.active():
        cancel.cancel()
    if order == "timer first" and outcome.kind is OutcomeKind.FAILED:
        # The step's own timeout was final (a CTP reply; a device that did not reboot after its upload).
        assert outcome.failure in (FailureClass.TIMEOUT, step.final_failure)
    else:
        assert outcome.kind is OutcomeKind.ABORTED, outcome
        assert "operator" in outcome.message
        if order != "timer first":
            assert outcome.phase is step.phase
    assert clock.seconds() <= at + 0.01
    assert link.open_sessions == set()
    assert set(clock.getDelayedCalls()) <= device.timers


def test_a_cancel_while_a_deadline_stop_is_in_progress_ends_aborted(tmp_path):
    step = STEPS["stream"]
    at = moment(tmp_path, step) - 1.0  # the stream is running
    clock, device, link, job = make(tmp_path, step, deadline=at)
    job.run()  # schedules the deadline first ...
    clock.callLater(at, job.cancel, "operator")  # ... so this runs in the same pass, after it
    outcome = run_to_end(clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.PHASE2), outcome
    assert [stop[1] for stop in link.stops] == [2]  # STOP asked of the phase-2 stream


def test_a_cancel_after_the_outcome_is_a_no_op(tmp_path):
    clock, device, link, job = make(tmp_path, STEPS["description fetch"], deadline=5.0)
    outcome = run_to_end(clock, job)
    job.cancel("too late")
    assert job.outcome is outcome and clock.getDelayedCalls() == []


@pytest.mark.parametrize("phase", [Phase.DETECT, Phase.PHASE1, Phase.REBOOT, Phase.PHASE2, Phase.VERIFY])
def test_a_cancel_in_each_phase_stops_at_once_with_stop_on_an_open_stream(tmp_path, phase):
    step = Step(phase, _hang_fetch if phase is Phase.DETECT else (lambda d: None), lambda link: None, 0.0)
    clock, device, link, job = make(tmp_path, step)
    device.phase1[0] = StreamPlan(reads=50)
    device.phase2[0] = StreamPlan(all_size=True, reads=50)
    job.run()
    if phase in (Phase.PHASE1, Phase.PHASE2):
        run_until(
            clock,
            lambda: job.phase is phase and bool(link.open_sessions - {None}) and "connect_ota" in link.names()[-3:],
        )
    else:
        run_until(clock, lambda: job.phase is phase)
    job.cancel("operator")
    outcome = run_to_end(clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, phase)
    if phase is Phase.PHASE1:
        assert [s[1] for s in link.stops] == [1]
    elif phase is Phase.PHASE2:
        assert [s[1] for s in link.stops] == [2]
    else:
        assert link.stops == []
    assert link.open_sessions == set()
    assert set(clock.getDelayedCalls()) <= device.timers


def test_the_device_being_in_mode_gone_is_bounded_by_the_connect_window(tmp_path):
    step = Step(Phase.DETECT, lambda d: setattr(d, "mode", Mode.GONE), lambda link: None, 0.0)
    clock, device, link, job = make(tmp_path, step)
    outcome = run_to_end(clock, job)
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.TIMEOUT)
    assert clock.seconds() == pytest.approx(TIMEOUTS.connect_window, abs=TIMEOUTS.http)
