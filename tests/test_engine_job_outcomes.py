"""The engine's decisions, outcome by outcome and phase by phase, against a scripted fake device on
a Clock: no socket is opened and no process started (the ``no_sockets_or_processes`` fixture)."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from netota_daemon.engine.events import Finished, PhaseChanged, Progress, Waiting
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import (
    ADVICE_AFTER_PHASE1,
    ADVICE_LOADER,
    ADVICE_NOTHING_SENT,
    ADVICE_NOTHING_TO_DO,
    ADVICE_RESET,
    ADVICE_UNVERIFIED,
    FailureClass,
    OutcomeKind,
    Phase,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.description_fetch import DescriptionFetchError
from netota_daemon.protocols.ota_stream import StreamEnd
from netota_daemon.protocols.reconnect_hook import HookResult
from netota_daemon.wire.description import DeviceDescription
from tests.engine_fakes import IMAGE_SIZE, FakeDevice, FakeLink, Mode, StreamPlan, run_to_end, run_until

pytestmark = pytest.mark.usefixtures("no_sockets_or_processes")

TARGET = DeviceTarget(name="dev-1", host="192.0.2.1")  # never contacted: the link is a fake


class World:
    def __init__(self, image: FirmwareImage) -> None:
        self.clock = Clock()
        self.device = FakeDevice(self.clock)
        self.link = FakeLink(self.device)
        self.image = image
        self.events: list = []
        self.job: UpgradeJob | None = None

    def job_for(
        self,
        target: DeviceTarget = TARGET,
        verify_only: bool = False,
        behaviour: UpgradeBehaviour | None = None,
        **timeouts,
    ) -> UpgradeJob:
        self.job = UpgradeJob(
            self.clock,
            target,
            self.image,
            UpgradeTimeouts(**timeouts),
            "job-1",
            verify_only=verify_only,
            behaviour=behaviour,
            link=self.link,
        )
        self.job.events.subscribe(self.events.append)
        return self.job

    def run(self, **kwargs):
        job = self.job if self.job is not None and not kwargs else self.job_for(**kwargs)
        outcome = run_to_end(self.clock, job)
        self.check_nothing_left()
        return outcome

    def check_nothing_left(self) -> None:
        assert self.link.open_sessions == set(), "a session was left open"
        left = set(self.clock.getDelayedCalls()) - self.device.timers
        assert left == set(), f"the job left calls scheduled: {left}"

    def phases(self) -> list[Phase]:
        return [e.phase for e in self.events if isinstance(e, PhaseChanged)]

    def waiting(self) -> list[Waiting]:
        return [e for e in self.events if isinstance(e, Waiting)]


@pytest.fixture
def world(tmp_path):
    path = tmp_path / "update.ufw"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256) + b"\0" * (IMAGE_SIZE % 256))
    return World(FirmwareImage(path))


# -- the whole upgrade ---------------------------------------------------------------------------


def test_a_two_phase_upgrade_succeeds_and_the_version_is_read_back(world):
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert (outcome.firmware_version_before, outcome.firmware_version_after) == ("1.0.0", "2.0.0")
    assert outcome.advice == "" and outcome.point_of_no_return
    assert world.phases() == [Phase.DETECT, Phase.PHASE1, Phase.REBOOT, Phase.PHASE2, Phase.VERIFY, Phase.DONE]
    assert world.link.ota_phases == [1, 2]
    assert world.link.stops == []  # a clean upgrade never sends STOP
    topics = [c.detail["topic"] for c in world.link.calls if c.what == "ctp"]
    assert topics == ["APP_ACCESS", "NET_OTA_SINGLE", "APP_ACCESS"]  # phase 1, then the loader's one frame
    assert isinstance(world.events[-1], Finished) and world.events[-1].outcome is outcome
    assert outcome.details["phase2_attempts"] == 1
    assert [s["end"] for s in outcome.details["streams"]] == ["ok", "ok"]


def test_the_keepalive_runs_at_the_configured_interval_during_phase_1(world):
    sessions = []
    connect = world.link.connect_ctp
    world.link.connect_ctp = lambda timeout: connect(timeout).addCallback(lambda s: sessions.append(s) or s)
    world.run(keepalive_interval=7.0)
    assert sessions[0].keepalive == 7.0  # phase 1's session; the loader's answers one frame only
    assert sessions[1].keepalive is None


def test_a_device_already_in_its_loader_goes_straight_to_phase_2(world):
    world.device.mode = Mode.LOADER
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert outcome.firmware_version_before is None  # the loader's document says 1.0.1 whatever is installed
    assert world.link.ota_phases == [2]
    assert "NET_OTA_SINGLE" not in [c.detail.get("topic") for c in world.link.calls]


def test_verify_only_reads_the_version_and_sends_nothing_else(world):
    outcome = world.run(verify_only=True)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.firmware_version_after == "1.0.0"
    assert set(world.link.names()) == {"fetch"}


# -- detect --------------------------------------------------------------------------------------


def test_an_unusable_interface_fails_before_anything_is_sent(world):
    world.link.check_error = "network interface 'wlan9' does not exist"
    outcome = world.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.CONNECTION, Phase.DETECT)
    assert "wlan9" in outcome.message and outcome.advice == ADVICE_NOTHING_SENT
    assert world.link.calls == []


def test_a_refusing_device_is_retried_for_the_connect_window_and_each_attempt_is_told(world):
    world.device.mode = Mode.DOWN
    outcome = world.run(connect_window=10.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.CONNECTION, Phase.DETECT)
    assert outcome.advice == ADVICE_NOTHING_SENT and "connection refused" in outcome.message
    waits = world.waiting()
    assert [w.attempt for w in waits] == list(range(1, len(waits) + 1)) and len(waits) >= 5
    assert all(w.last_error == "connection refused" and w.phase is Phase.DETECT for w in waits)
    assert world.clock.seconds() == pytest.approx(10.0, abs=1.1)


def test_a_silent_device_is_a_timeout(world):
    world.device.fetch_hangs = True
    outcome = world.run(connect_window=30.0, http=10.0)
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.TIMEOUT)
    assert "timed out" in outcome.message


def test_a_garbage_description_is_a_protocol_error(world):
    world.device.description_override = lambda d: DescriptionFetchError("the description document is not valid JSON")
    outcome = world.run(connect_window=5.0)
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.PROTOCOL_ERROR)
    assert "not valid JSON" in outcome.message


@pytest.mark.parametrize("ota_type", ["0", None])
def test_a_double_backup_device_takes_the_upload_route_not_the_3335_stream(world, ota_type):
    world.device.ota_type = ota_type
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.details["route"] == "double_backup"
    assert "upload" in world.link.names() and world.link.ota_phases == []


# -- phase 1 -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plan", "failure", "words"),
    [
        ({"net_ota_single": "0"}, FailureClass.DEVICE_REFUSED, "refused NET_OTA_SINGLE (status '0')"),
        ({"app_access": "errno"}, FailureClass.DEVICE_REFUSED, "errno 3"),
        ({"app_access": "silent"}, FailureClass.TIMEOUT, "no reply to APP_ACCESS"),
        ({"net_ota_single": "silent"}, FailureClass.TIMEOUT, "no reply to NET_OTA_SINGLE"),
        ({"app_access": "drop"}, FailureClass.CONNECTION, "APP_ACCESS: the CTP connection closed"),
    ],
)
def test_ctp_failures_in_phase_1_keep_the_old_firmware(world, plan, failure, words):
    for key, value in plan.items():
        setattr(world.device.ctp, key, value)
    outcome = world.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, failure, Phase.PHASE1)
    assert words in outcome.message and outcome.advice == ADVICE_RESET
    assert world.link.ota_phases == []  # nothing was streamed


def test_a_refused_ctp_port_fails_phase_1_after_the_connect_window(world):
    world.device.refuse = {"ctp"}
    outcome = world.run(connect_window=5.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.CONNECTION, Phase.PHASE1)
    assert "CTP port 3333" in outcome.message and outcome.advice == ADVICE_RESET
    assert {w.phase for w in world.waiting()} == {Phase.PHASE1}


@pytest.mark.parametrize(
    ("end", "failure"),
    [
        (StreamEnd.ERR, FailureClass.DEVICE_ERROR),
        (StreamEnd.DROPPED, FailureClass.CONNECTION),
        (StreamEnd.TIMEOUT, FailureClass.TIMEOUT),
        (StreamEnd.PROTOCOL_ERROR, FailureClass.PROTOCOL_ERROR),
    ],
)
def test_a_failed_phase_1_stream_is_not_retried_and_keeps_the_old_firmware(world, end, failure):
    world.device.phase1[0] = StreamPlan(end=end)
    outcome = world.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, failure, Phase.PHASE1)
    assert outcome.advice == ADVICE_RESET and not outcome.point_of_no_return
    assert world.link.ota_phases == [1]  # one session: phase 1 is never retried


def test_same_in_phase_1_is_already_current(world):
    world.device.phase1[0] = StreamPlan(reads=1, end=StreamEnd.SAME)
    outcome = world.run()
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ALREADY_CURRENT, Phase.DONE)
    assert outcome.advice == ADVICE_NOTHING_TO_DO and world.link.ota_phases == [1]


def test_a_job_stopped_while_closing_phase_1_after_the_ok_gets_the_rejoin_advice(world):
    world.device.ctp_close_seconds = 2.0  # the device's OK came; the session is still closing
    job = world.job_for()
    results = []
    job.run().addBoth(results.append)
    run_until(world.clock, lambda: "ctp_close" in world.link.names())
    job.cancel("operator")
    outcome = run_to_end(world.clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.PHASE1)
    assert outcome.advice == ADVICE_AFTER_PHASE1  # phase 1 completed: the device reboots into its loader
    assert world.link.ota_phases == [1] and world.link.stops == []


# -- reboot --------------------------------------------------------------------------------------


def test_a_device_that_never_comes_back_after_phase_1_times_out_with_the_rejoin_advice(world):
    world.device.stays_down = True
    outcome = world.run(reboot=60.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.TIMEOUT, Phase.REBOOT)
    assert "within 60 s" in outcome.message and "connection refused" in outcome.message
    assert outcome.advice == ADVICE_AFTER_PHASE1


def test_the_reconnect_hook_runs_at_both_reboots_with_the_devices_environment(world):
    target = DeviceTarget(
        name="dev-1", host="192.0.2.1", interface=None, reconnect_command="rejoin", expected_ssid="cam-7"
    )
    outcome = world.run(target=target)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert [h["NETOTA_PHASE"] for h in world.link.hooks] == ["reboot", "verify"]
    assert world.link.hooks[0] == {
        "NETOTA_DEVICE": "dev-1",
        "NETOTA_INTERFACE": "",
        "NETOTA_SSID": "cam-7",
        "NETOTA_PHASE": "reboot",
    }


@pytest.mark.parametrize(
    "result",
    [
        HookResult(exit_code=1, output="no such ssid"),
        HookResult(None, timed_out=True),
        HookResult(None, error="could not start"),
    ],
)
def test_a_failing_hook_is_not_fatal_the_poll_decides(world, result):
    world.device.hook_result = result
    target = DeviceTarget(name="dev-1", host="192.0.2.1", reconnect_command="rejoin")
    outcome = world.run(target=target)
    assert outcome.kind is OutcomeKind.SUCCEEDED


def test_a_hook_that_hangs_is_bounded_by_the_hook_timeout(world):
    world.device.hook_hangs = True
    target = DeviceTarget(name="dev-1", host="192.0.2.1", reconnect_command="sleep forever")
    outcome = world.run(target=target, hook=20.0)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    hook_times = [c.time for c in world.link.calls if c.what == "hook"]
    fetch_after = [c.time for c in world.link.calls if c.what == "fetch" and c.time > hook_times[0]]
    assert fetch_after[0] == pytest.approx(hook_times[0] + 20.0)


# -- phase 2 -------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", [StreamEnd.DROPPED, StreamEnd.TIMEOUT, StreamEnd.ERR])
def test_phase_2_is_retried_from_the_start_after_a_drop_a_timeout_or_the_loaders_err(world, first):
    world.device.phase2.appendleft(StreamPlan(all_size=True, end=first))
    outcome = world.run()
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert world.link.ota_phases == [1, 2, 2]
    assert outcome.details["phase2_attempts"] == 2
    attempts = [e.message for e in world.events if isinstance(e, PhaseChanged) and e.phase is Phase.PHASE2]
    assert attempts[1].startswith("attempt 2: the loader reads the image again from the start")


def test_phase_2_is_retried_after_the_loaders_ctp_refused_a_whole_connect_window(world):
    device = world.device
    device.mode = Mode.LOADER
    device.refuse = {"ctp"}
    world.clock.callLater(40.0, device.refuse.clear)  # longer than one connect window
    outcome = world.run(connect_window=30.0)
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    assert outcome.details["phase2_attempts"] == 2 and world.link.ota_phases == [2]


def test_the_loaders_err_is_retried_phase2_error_retries_times_then_fails(world):
    world.device.phase2[0] = StreamPlan(all_size=True, end=StreamEnd.ERR)
    outcome = world.run(behaviour=UpgradeBehaviour(phase2_error_retries=2))
    assert (outcome.kind, outcome.failure, outcome.phase) == (
        OutcomeKind.FAILED,
        FailureClass.DEVICE_ERROR,
        Phase.PHASE2,
    )
    assert world.link.ota_phases == [1, 2, 2, 2]
    assert outcome.point_of_no_return and outcome.advice == ADVICE_LOADER


def test_phase_2_retries_end_at_the_deadline_with_what_the_last_attempt_hit(world):
    world.device.phase2[0] = StreamPlan(
        all_size=True, end=StreamEnd.DROPPED, message="the device closed the OTA connection"
    )
    outcome = world.run(deadline=120.0)
    assert (outcome.kind, outcome.failure, outcome.phase) == (OutcomeKind.FAILED, FailureClass.TIMEOUT, Phase.PHASE2)
    assert "deadline of 120 s passed during phase 2" in outcome.message
    assert "the device closed the OTA connection" in outcome.message
    assert outcome.advice == ADVICE_LOADER and world.link.ota_phases.count(2) > 3
    assert world.clock.seconds() == pytest.approx(120.0, abs=1.0)


def test_a_protocol_error_in_phase_2_is_not_retried(world):
    world.device.phase2[0] = StreamPlan(all_size=True, end=StreamEnd.PROTOCOL_ERROR, message="asked for 0 bytes")
    outcome = world.run()
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.PROTOCOL_ERROR)
    assert world.link.ota_phases == [1, 2] and outcome.advice == ADVICE_LOADER


@pytest.mark.parametrize("after_all_size", [False, True])
def test_same_from_the_loader_is_a_device_error_never_already_current(world, after_all_size):
    plan = (
        StreamPlan(all_size=after_all_size, end=StreamEnd.SAME)
        if after_all_size
        else StreamPlan(reads=1, end=StreamEnd.SAME)
    )
    world.device.phase2[0] = plan
    outcome = world.run()
    assert (outcome.kind, outcome.failure, outcome.phase) == (
        OutcomeKind.FAILED,
        FailureClass.DEVICE_ERROR,
        Phase.PHASE2,
    )
    assert outcome.point_of_no_return is after_all_size
    assert outcome.advice == ADVICE_LOADER  # the device stays in its loader either way
    assert "SAME" in outcome.message


@pytest.mark.parametrize("past_all_size", [False, True])
def test_the_old_firmware_answering_in_phase_2(world, past_all_size):
    device = world.device
    device.phase2[0] = StreamPlan(all_size=past_all_size, end=StreamEnd.DROPPED)
    seen = {"phase2": 0}
    connect_ota = world.link.connect_ota

    def counting(*args):
        if device.mode is Mode.LOADER:
            seen["phase2"] += 1
        return connect_ota(*args)

    world.link.connect_ota = counting
    device.description_override = lambda d: (
        DeviceDescription(ota_type="1", ota_step="0", firmware_version="2.0.0" if past_all_size else "1.0.0")
        if d.mode is Mode.LOADER and seen["phase2"] >= 1
        else None
    )
    outcome = world.run()
    if past_all_size:  # the loader finished while we were away: verify reads the new version
        assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.firmware_version_after == "2.0.0"
    else:  # it never touched flash: nothing was upgraded
        assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.DEVICE_ERROR)
        assert "upgraded nothing" in outcome.message and outcome.advice == ADVICE_RESET


# -- verify --------------------------------------------------------------------------------------


def test_a_new_firmware_that_never_answers_is_unverified(world):
    world.device.new_firmware_silent = True
    outcome = world.run(verify=60.0)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.UNVERIFIED, Phase.VERIFY)
    assert outcome.advice == ADVICE_UNVERIFIED and outcome.point_of_no_return


# -- progress ------------------------------------------------------------------------------------


def test_progress_only_moves_forward_per_attempt_and_reaches_100_only_at_ok(world):
    world.device.phase2.appendleft(StreamPlan(all_size=True, end=StreamEnd.DROPPED))
    world.run()
    segment: list[Progress] = []
    segments = [segment]
    for event in world.events:
        if isinstance(event, PhaseChanged):
            segment = []
            segments.append(segment)
        elif isinstance(event, Progress):
            segment.append(event)
    for seg in segments:
        percents = [p.percent for p in seg]
        assert percents == sorted(percents), percents
        assert all(p.percent < 100 or p.state.value == "done" for p in seg)
    ends = [seg[-1] for seg in segments if seg]
    assert [p.state.value for p in ends] == ["done", "transferring", "done"]  # phase 1, the dropped attempt, attempt 2
    assert all(p.percent == 100.0 for p in ends if p.state.value == "done")
    phase2 = [p for p in segments[-3] if p.phase is Phase.PHASE2]  # attempt 2
    assert segments[-4][-1].percent > 0 and phase2[0].percent == 0.0  # the loader starts again: so does the bar
    assert {p.basis for p in phase2} >= {"header", "all_size", "done"}
    assert all(p.point_of_no_return for p in phase2 if p.basis in ("all_size", "done"))


# -- bugs below and inside the engine still end in an outcome -----------------------------------


def test_a_cleanup_that_raises_still_delivers_the_outcome(world):
    world.device.ctp.net_ota_single = "silent"  # phase 1's session is open when the job is cancelled
    job = world.job_for()
    job.run()
    run_until(world.clock, lambda: "NET_OTA_SINGLE" in [c.detail.get("topic") for c in world.link.calls])
    world.device.ctp_close_raises = True
    with capturedLogs() as logged:
        job.cancel("operator")
        outcome = run_to_end(world.clock, job)
    assert (outcome.kind, outcome.phase) == (OutcomeKind.ABORTED, Phase.PHASE1)
    assert isinstance(world.events[-1], Finished) and world.events[-1].outcome is outcome
    assert any("closing the job's connections failed" in str(e.get("log_format")) for e in logged)


class ImageWhoseKindBreaks(FirmwareImage):
    """An image whose kind can be read once (the route's check), and then raises: a bug in
    building the outcome itself."""

    reads = 0

    @property
    def kind(self):  # type: ignore[override]
        self.reads += 1
        if self.reads > 1:
            raise RuntimeError("the kind broke")
        return super().kind


def test_a_bug_while_building_the_outcome_still_fires_run_with_a_failed_outcome(tmp_path):
    path = tmp_path / "update.ufw"
    path.write_bytes(bytes(range(256)) * (IMAGE_SIZE // 256) + b"\0" * (IMAGE_SIZE % 256))
    world = World(ImageWhoseKindBreaks(path))
    with capturedLogs() as logged:
        outcome = world.run()
    assert (outcome.kind, outcome.failure) == (OutcomeKind.FAILED, FailureClass.PROTOCOL_ERROR)
    assert outcome.message == "internal error: RuntimeError: the kind broke"
    assert outcome.advice  # what to do next, for the phase it reached
    assert isinstance(world.events[-1], Finished) and world.events[-1].outcome is outcome
    assert any("failed unexpectedly" in str(e.get("log_format")) for e in logged)
