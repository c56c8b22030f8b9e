"""JobQueue: per-device exclusion, max_parallel with queue positions, cancel, resume, shutdown,
journal-before-action, and event fan-out; driven by a Clock, fake engine jobs and a journal whose
calls run at once (ImmediateExecutor) or when the test says (ManualExecutor)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from netota_daemon.daemon.config import DaemonConfig, DeviceConfig
from netota_daemon.daemon.firmware_store import FirmwareStore
from netota_daemon.daemon.jobs import (
    BadOptions,
    DeviceBusy,
    FirmwareInvalid,
    FirmwareNotAllowed,
    FirmwareNotFound,
    JobNotActive,
    JobQueue,
    NotResumable,
    ShuttingDown,
    UnknownDevice,
    UnknownJob,
)
from netota_daemon.daemon.journal import JobJournal, JobState
from netota_daemon.daemon.journal_thread import AsyncJournal, ImmediateExecutor
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.engine.outcome import (
    ADVICE_AFTER_PHASE1,
    ADVICE_LOADER,
    ADVICE_RESUME,
    ADVICE_UPLOAD_UNSETTLED,
    OutcomeKind,
    Phase,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from tests.daemon_fakes import FakeJobFactory, fired

DEVICES = ("a", "b", "c", "d")
#: What the journal's history says of a two-phase job that succeeded.
TWO_PHASE_NOTES = [
    "created",
    "running",
    "entered phase 1",
    "entered phase 2",
    "point of no return",
    "finished: succeeded",
]


class World:
    def __init__(self, tmp_path: Path, max_parallel: int = 2, executor=None) -> None:
        self.clock = Clock()
        self.clock.advance(100)
        self.firmware_dir = tmp_path / "fw"
        self.firmware_dir.mkdir()
        (self.firmware_dir / "v2.bin").write_bytes(os.urandom(4096))
        devices = {n: DeviceConfig(DeviceTarget(name=n, host="127.0.0.1"), UpgradeTimeouts()) for n in DEVICES}
        self.config = DaemonConfig(
            source="test",
            state_dir=tmp_path / "state",
            firmware_dir=self.firmware_dir,
            max_parallel=max_parallel,
            devices=devices,
            shutdown_grace=5.0,
        )
        self.journal = JobJournal(self.config.state_dir, self.clock)  # read directly by the assertions
        self.executor = executor or ImmediateExecutor()
        self.registry = DeviceRegistry(devices.values())
        self.factory = FakeJobFactory(stop_delay=1.0)
        self.queue = JobQueue(
            self.clock,
            self.config,
            AsyncJournal(self.journal, self.executor),
            self.registry,
            FirmwareStore(self.firmware_dir),
            job_factory=self.factory,
        )
        self.events: list[dict] = []
        self.queue.subscribe(self.events.append)

    def start(self, device: str, firmware: str = "v2.bin", **kw) -> dict:
        return fired(self.queue.start(device, firmware, **kw))

    def get(self, job_id: str) -> dict:
        return fired(self.queue.get(job_id))

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> dict:
        return fired(self.queue.cancel(job_id, reason))

    def resume(self, job_id: str, force: bool = False) -> dict:
        return fired(self.queue.resume(job_id, force))


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_start_writes_the_journal_before_running_and_passes_the_device(world):
    seen = []
    world.factory.on_run = lambda job: seen.append(world.journal.get(job.job_id).state)
    job = world.start("a", options={"receive": 2})
    assert job["state"] == "running" and job["device"] == "a" and job["firmware"] == "v2.bin"
    fake = world.factory.jobs[job["id"]]
    assert seen == [JobState.RUNNING]  # durable before the engine ran
    assert fake.target.name == "a" and fake.image.size == 4096
    assert fake.timeouts.receive == 2 and fake.timeouts.deadline == UpgradeTimeouts().deadline
    assert fake.log_context == {"job": job["id"], "device": "a"}
    assert world.registry.get("a").state == "running"


def test_a_second_job_for_a_busy_device_is_refused_and_the_first_is_untouched(world):
    first = world.start("a")
    with pytest.raises(DeviceBusy) as info:
        world.start("a")
    assert info.value.kind.value == "busy" and first["id"] in info.value.message
    assert world.factory.jobs[first["id"]].running and world.factory.jobs[first["id"]].cancelled is None
    assert len(world.journal.jobs()) == 1


def test_max_parallel_queues_with_positions_and_starts_in_order(world):
    ids = [world.start(d)["id"] for d in DEVICES]
    states = [world.get(i) for i in ids]
    assert [s["state"] for s in states] == ["running", "running", "queued", "queued"]
    assert [s["position"] for s in states] == [None, None, 1, 2]
    assert world.registry.get("d").queue_position == 2
    assert [j.job_id for j in world.factory.order] == ids[:2]

    world.factory.jobs[ids[1]].finish()
    assert world.get(ids[2])["state"] == "running"
    assert world.get(ids[3])["position"] == 1
    assert world.registry.get("d").queue_position == 1
    position_events = [e for e in world.events if e["type"] == "state" and e["job"] == ids[3]]
    assert [e["position"] for e in position_events] == [2, 1]
    # A device with a queued job is busy too.
    with pytest.raises(DeviceBusy):
        world.start("d")


def test_engine_events_are_fanned_out_with_job_and_device_and_journaled(world):
    job_id = world.start("a")["id"]
    other = []
    unsubscribe = world.queue.subscribe(other.append)
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    fake.progress(50.0)
    fake.enter(Phase.PHASE2)
    fake.progress(10.0, point_of_no_return=True)
    unsubscribe()
    fake.finish(OutcomeKind.SUCCEEDED, "flashed", firmware_version_after="2.0.0")
    types = [(e["type"], e.get("phase")) for e in other]
    assert types == [("phase", "phase1"), ("progress", "phase1"), ("phase", "phase2"), ("progress", "phase2")]
    assert all(e["job"] == job_id and e["device"] == "a" for e in world.events)
    outcome = world.events[-1]
    assert outcome["type"] == "outcome" and outcome["outcome"]["kind"] == "succeeded"
    record = world.journal.get(job_id)
    assert record.state is JobState.FINISHED and record.point_of_no_return and record.phase is Phase.PHASE2
    notes = [h["note"] for h in world.journal.history(job_id)]
    assert notes == TWO_PHASE_NOTES
    status = world.registry.get("a")
    assert (status.state, status.last_outcome, status.firmware_version, status.last_job) == (
        "idle",
        "succeeded",
        "2.0.0",
        job_id,
    )


def test_progress_is_visible_on_the_job_and_device(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    fake.progress(40.0)
    assert world.get(job_id)["progress"]["percent"] == 40.0
    assert world.registry.get("a").percent == 40.0


def test_cancel_running_job_journals_cancelling_before_stopping_the_engine(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    at_cancel = []
    world.factory.on_cancel = lambda job: at_cancel.append(world.journal.get(job.job_id).state)
    answer = world.cancel(job_id, "operator said so")
    assert answer["state"] == "cancelling"
    assert at_cancel == [JobState.CANCELLING]
    assert fake.cancelled == "operator said so"
    world.clock.advance(1.0)  # the engine's STOP and close
    record = world.journal.get(job_id)
    assert record.state is JobState.FINISHED and record.outcome.kind is OutcomeKind.ABORTED
    assert record.resumable
    # A cancel after the job finished is refused.
    with pytest.raises(JobNotActive) as info:
        world.cancel(job_id)
    assert info.value.code == "not_active" and "aborted" in info.value.message


def test_cancel_queued_job_ends_it_without_touching_the_device(world):
    world.start("a")
    world.start("b")
    queued = world.start("c")["id"]
    answer = world.cancel(queued)
    assert answer["state"] == "finished" and answer["outcome"]["kind"] == "aborted"
    assert queued not in world.factory.jobs  # no engine job was ever made
    assert "not touched" in answer["outcome"]["advice"]
    world.start("c")  # the device is free again


def test_unknown_things(world):
    with pytest.raises(UnknownDevice) as info:
        world.start("zz")
    assert info.value.code == "unknown_device"
    for call in (world.get, world.cancel, world.resume):
        with pytest.raises(UnknownJob):
            call("nope")


@pytest.mark.parametrize("name", ["../v2.bin", "/etc/passwd", "sub/../../x", "~root/x"])
def test_firmware_names_leaving_firmware_dir_are_refused(world, name):
    with pytest.raises(FirmwareNotAllowed) as info:
        world.start("a", name)
    assert info.value.code == "firmware_outside"
    assert world.journal.jobs() == []


def test_a_symlink_out_of_firmware_dir_is_refused_and_one_inside_is_fine(world, tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"x" * 100)
    (world.firmware_dir / "escape.bin").symlink_to(outside)
    (world.firmware_dir / "alias.bin").symlink_to(world.firmware_dir / "v2.bin")
    with pytest.raises(FirmwareNotAllowed, match="symlink"):
        world.start("a", "escape.bin")
    assert world.start("a", "alias.bin")["state"] == "running"


def test_missing_and_unusable_firmware(world):
    with pytest.raises(FirmwareNotFound):
        world.start("a", "nope.bin")
    (world.firmware_dir / "empty.bin").write_bytes(b"")
    with pytest.raises(FirmwareInvalid, match="empty"):
        world.start("a", "empty.bin")
    (world.firmware_dir / "dir").mkdir()
    with pytest.raises(FirmwareInvalid):
        world.start("a", "dir")


@pytest.mark.parametrize(
    "options",
    [
        {"nope": 1},
        {"receive": "5"},
        {"receive": -1},
        [1],
        {"echo_final_notice": 1},
        {"receive": 0},
        {"deadline": float("nan")},
        {"deadline": float("inf")},
        {"max_receive_timeouts": -1},
    ],
)
def test_bad_options_are_refused(world, options):
    # NaN and inf pass a plain "< 0" check; a NaN timer would break the reactor's timer ordering.
    with pytest.raises(BadOptions):
        world.start("a", options=options)
    assert world.journal.jobs() == [] and world.factory.order == []


def test_good_options_are_checked_as_in_the_config_file(world):
    job = world.start("a", options={"deadline": 60, "keepalive_interval": 0, "max_receive_timeouts": 0})
    timeouts = world.factory.jobs[job["id"]].timeouts
    assert (timeouts.deadline, timeouts.keepalive_interval, timeouts.max_receive_timeouts) == (60.0, 0.0, 0)
    assert isinstance(timeouts.deadline, float)


def test_resume_makes_a_new_job_for_the_same_device_and_firmware(world):
    first = world.start("a", options={"receive": 3})["id"]
    fake = world.factory.jobs[first]
    fake.enter(Phase.PHASE2)
    fake.finish(OutcomeKind.FAILED, "dropped")
    resumed = world.resume(first)
    assert resumed["id"] != first and resumed["resumed_from"] == first
    assert resumed["device"] == "a" and resumed["firmware"] == "v2.bin" and resumed["options"] == {"receive": 3}
    assert world.factory.jobs[resumed["id"]].verify_only is False  # phase 2 did not complete: upgrade again
    assert world.journal.get(first).resumed_by == resumed["id"]
    with pytest.raises(NotResumable):
        world.resume(first)  # once only
    with pytest.raises(NotResumable):
        world.resume(resumed["id"])  # still running
    world.factory.jobs[resumed["id"]].finish()
    with pytest.raises(NotResumable, match="succeeded"):
        world.resume(resumed["id"])


def test_resuming_a_job_that_ended_in_verify_only_checks_the_device(world):
    first = world.start("a")["id"]
    fake = world.factory.jobs[first]
    fake.enter(Phase.PHASE2)
    fake.enter(Phase.VERIFY)  # phase 2 completed: the device boots its new firmware
    world.cancel(first)
    world.clock.advance(world.factory.stop_delay)
    assert world.journal.get(first).outcome.kind is OutcomeKind.ABORTED
    resumed = world.resume(first)
    assert world.factory.jobs[resumed["id"]].verify_only is True


def test_shutdown_records_interrupted_before_cancelling_and_keeps_it(world):
    running = world.start("a")["id"]
    world.start("b")
    queued = world.start("c")["id"]
    fake = world.factory.jobs[running]
    fake.enter(Phase.PHASE2)
    fake.progress(20, point_of_no_return=True)
    at_cancel = {}
    world.factory.on_cancel = lambda job: at_cancel.setdefault(job.job_id, world.journal.get(job.job_id).state)
    done = world.queue.shutdown()
    assert at_cancel[running] is JobState.INTERRUPTED
    assert world.journal.get(queued).state is JobState.INTERRUPTED
    assert not done.called
    with pytest.raises(ShuttingDown):
        world.start("d")
    assert world.cancel(running)["state"] == "interrupted"  # a cancel now changes nothing
    world.clock.advance(1.0)
    assert done.called
    record = world.journal.get(running)
    assert record.state is JobState.INTERRUPTED and record.outcome.kind is OutcomeKind.ABORTED
    assert record.point_of_no_return and record.resumable and "loader" in record.advice
    assert world.journal.get(queued).resumable
    assert [e["state"] for e in world.events if e["type"] == "outcome"].count("interrupted") == 3


def test_the_route_is_learned_from_the_phases_and_decides_an_interrupted_jobs_advice(world):
    double = world.start("a")["id"]
    single = world.start("b")["id"]
    for job_id, first in ((double, Phase.UPLOAD), (single, Phase.PHASE1)):
        fake = world.factory.jobs[job_id]
        fake.enter(first)
        fake.enter(Phase.REBOOT)
    assert world.get(double)["route"] == "double_backup" and world.get(single)["route"] == "single_backup"
    world.queue.shutdown()
    world.clock.advance(1.0)
    assert world.journal.get(double).advice == ADVICE_UPLOAD_UNSETTLED  # it may be taking the image
    assert world.journal.get(single).advice.startswith(ADVICE_AFTER_PHASE1)  # it reboots into its loader


def test_an_engine_failure_in_a_double_backup_reboot_does_not_claim_the_device_refused_the_image(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.UPLOAD)
    fake.enter(Phase.REBOOT)
    fake.fail_with(RuntimeError("boom"))
    assert world.journal.get(job_id).advice == ADVICE_UPLOAD_UNSETTLED


def test_shutdown_gives_up_waiting_after_the_grace(world):
    world.factory.stop_delay = 100.0
    world.start("a")
    done = world.queue.shutdown()
    world.clock.advance(5.0)
    assert done.called  # the journal already says interrupted
    assert world.journal.jobs()[0].state is JobState.INTERRUPTED


def test_wait_fires_with_the_final_record(world):
    job_id = world.start("a")["id"]
    results = []
    world.queue.wait(job_id).addCallback(results.append)
    world.factory.jobs[job_id].finish()
    assert results[0].state is JobState.FINISHED


def test_progress_events_are_published_at_most_ten_a_second_but_never_the_important_ones(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    for percent in (10.0, 20.0, 30.0):  # same instant: only the first of the phase goes out
        fake.progress(percent)
    world.clock.advance(0.15)
    fake.progress(40.0)
    fake.progress(100.0)  # the end of a phase always goes out
    fake.enter(Phase.PHASE2)
    fake.progress(5.0)  # the first of a new phase
    fake.progress(6.0, point_of_no_return=True)  # passing the point of no return
    fake.progress(7.0)
    published = [(e["phase"], e["percent"]) for e in world.events if e["type"] == "progress"]
    assert published == [("phase1", 10.0), ("phase1", 40.0), ("phase1", 100.0), ("phase2", 5.0), ("phase2", 6.0)]
    # The job and its device always show the latest.
    assert world.get(job_id)["progress"]["percent"] == 7.0
    assert world.registry.get("a").percent == 7.0


def test_an_engine_that_fails_gets_the_recovery_advice_of_its_phase(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE2)
    fake.progress(30.0, point_of_no_return=True)
    fake.fail_with(RuntimeError("boom"))
    record = world.journal.get(job_id)
    assert record.state is JobState.FINISHED and record.outcome.kind is OutcomeKind.FAILED
    assert "boom" in record.outcome.message and record.outcome.point_of_no_return
    assert record.advice == ADVICE_LOADER + ADVICE_RESUME  # not empty: the device waits in its loader
    world.start("a")  # the device is free again


def test_an_engine_that_raises_at_once_ends_its_job_and_frees_the_device(world):
    def explode(job):
        raise RuntimeError("no run for you")

    world.factory.on_run = explode
    job = world.start("a")
    record = world.journal.get(job["id"])
    assert record.state is JobState.FINISHED and record.outcome.kind is OutcomeKind.FAILED
    assert "no run for you" in record.outcome.message
    world.factory.on_run = None
    assert world.start("a")["state"] == "running"


def test_a_job_that_succeeds_while_the_daemon_stops_is_finished_not_interrupted(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.VERIFY)
    world.factory.stop_delay = 100.0  # the STOP has not taken effect yet when the job ends on its own
    done = world.queue.shutdown()
    fake.finish(OutcomeKind.SUCCEEDED, "upgraded", firmware_version_after="2.0.0")
    assert done.called
    record = world.journal.get(job_id)
    assert record.state is JobState.FINISHED and record.outcome.kind is OutcomeKind.SUCCEEDED
    assert not record.resumable and record.advice == ""


def test_active_jobs_are_the_queued_and_running_ones_oldest_first(world):
    done = world.start("a")["id"]
    world.factory.jobs[done].finish()
    ids = [world.start(d)["id"] for d in ("b", "c", "d")]
    assert [(j["id"], j["state"], j["position"]) for j in world.queue.active_jobs()] == [
        (ids[0], "running", None),
        (ids[1], "running", None),
        (ids[2], "queued", 1),
    ]


def test_a_journal_that_fails_never_leaves_a_device_busy_or_a_job_unstarted_acted_on(world):
    from netota_daemon.daemon.journal import JournalError

    save = world.journal.save

    def failing_save(record, note):
        if note in ("running", "finished: succeeded"):
            raise JournalError(f"disk full ({note})")
        return save(record, note)

    world.journal.save = failing_save
    refused = world.start("a")  # accepted (created), but can't be recorded as running: not acted on
    assert world.factory.order == []
    assert world.get(refused["id"])["outcome"]["kind"] == "failed"
    assert world.registry.get("a").state == "idle"

    world.journal.save = save
    job_id = world.start("a")["id"]
    world.journal.save = failing_save
    ended = []
    world.queue.wait(job_id).addCallback(ended.append)
    world.factory.jobs[job_id].finish()  # its end can't be recorded
    assert ended and ended[0].outcome.kind is OutcomeKind.SUCCEEDED
    assert world.registry.get("a").state == "idle" and not world.queue.is_active(job_id)
    world.journal.save = save
    assert world.start("a")["state"] == "running"  # the device is free


# ----- the journal before acting, with commits the test decides (ManualExecutor)


@pytest.fixture
def manual(tmp_path):
    from tests.daemon_fakes import ManualExecutor

    return World(tmp_path, executor=ManualExecutor())


def test_a_job_starts_only_after_its_rows_committed_and_is_answered_after_the_first(manual):
    answered = []
    manual.queue.start("a", "v2.bin").addCallback(answered.append)
    assert manual.journal.jobs() == [] and answered == [] and manual.events == []
    with pytest.raises(DeviceBusy):  # the device is taken while its job is being written
        fired(manual.queue.start("a", "v2.bin"))
    manual.executor.run_one()  # "created" commits: the client hears of it, the job waits for its "running" row
    (job,) = answered
    assert manual.journal.get(job["id"]).state is JobState.QUEUED
    assert manual.factory.order == [] and [e["type"] for e in manual.events] == ["state"]
    manual.executor.run_one()  # "running" commits: now the engine runs
    assert [j.job_id for j in manual.factory.order] == [job["id"]]
    assert manual.journal.get(job["id"]).state is JobState.RUNNING


def test_an_event_waits_for_its_row_and_a_later_one_never_overtakes_it(manual):
    manual.queue.start("a", "v2.bin")
    manual.executor.run_all()
    fake = manual.factory.order[0]
    before = len(manual.events)
    fake.enter(Phase.PHASE1)  # writes "entered phase 1"
    fake.progress(10.0)  # writes nothing, but must come after the phase
    fake.waiting(1, "connection refused")
    assert len(manual.events) == before  # held behind the phase row
    manual.executor.run_one()
    assert [e["type"] for e in manual.events[before:]] == ["phase", "progress", "waiting"]


def test_a_cancel_stops_the_engine_only_after_cancelling_is_recorded(manual):
    manual.queue.start("a", "v2.bin")
    manual.executor.run_all()
    fake = manual.factory.order[0]
    answer = []
    manual.queue.cancel(fake.job_id, "operator").addCallback(answer.append)
    assert fake.cancelled is None and answer == []
    manual.executor.run_one()
    assert fake.cancelled == "operator" and answer[0]["state"] == "cancelling"
    assert manual.journal.get(fake.job_id).state is JobState.CANCELLING


def test_a_job_cancelled_while_it_is_starting_never_reaches_the_device(manual):
    manual.queue.start("a", "v2.bin")
    manual.executor.run_one()  # created; "running" is being written
    (job_id,) = [e["job"] for e in manual.events]
    answer = []
    manual.queue.cancel(job_id, "changed my mind").addCallback(answer.append)
    manual.executor.run_all()
    assert manual.factory.order == []  # no engine job was made
    record = manual.journal.get(job_id)
    assert record.state is JobState.FINISHED and record.outcome.kind is OutcomeKind.ABORTED
    assert "before it started" in record.outcome.message and "not touched" in record.advice
    assert answer[0]["state"] == "cancelling"
    assert manual.registry.get("a").state == "idle"


def test_a_job_whose_row_can_not_be_written_is_refused_and_frees_its_device(manual):
    from netota_daemon.daemon.jobs import JournalUnavailable
    from netota_daemon.daemon.journal import JournalError

    failed = []
    manual.queue.start("a", "v2.bin").addErrback(failed.append)
    manual.executor.fail_next = JournalError("disk full")
    manual.executor.run_one()
    assert failed and failed[0].check(JournalUnavailable) and "disk full" in failed[0].getErrorMessage()
    manual.queue.start("a", "v2.bin")  # the device is free
    manual.executor.run_all()
    assert len(manual.factory.order) == 1


def test_a_jobs_firmware_is_in_use_from_the_moment_its_image_is_open(manual):
    """While a job's row is being written its image is already open: its file must not be replaced
    or removed (the catalogue asks firmware_in_use) until the job is over, or refused."""
    from netota_daemon.daemon.journal import JournalError

    assert manual.queue.firmware_in_use() == set()
    failed = []
    manual.queue.start("a", "v2.bin").addErrback(failed.append)
    assert manual.queue.active_jobs() == [] and manual.queue.firmware_in_use() == {"v2.bin"}
    manual.executor.fail_next = JournalError("disk full")
    manual.executor.run_one()
    assert failed and manual.queue.firmware_in_use() == set()  # refused: nothing holds the file
    manual.queue.start("a", "v2.bin")
    assert manual.queue.firmware_in_use() == {"v2.bin"}
    manual.executor.run_all()
    assert [j["state"] for j in manual.queue.active_jobs()] == ["running"]
    assert manual.queue.firmware_in_use() == {"v2.bin"}


def test_shutdown_stops_an_engine_only_after_interrupted_is_recorded(manual):
    manual.queue.start("a", "v2.bin")
    manual.executor.run_all()
    fake = manual.factory.order[0]
    manual.queue.shutdown()
    assert fake.cancelled is None
    manual.executor.run_one()
    assert fake.cancelled is not None
    assert manual.journal.get(fake.job_id).state is JobState.INTERRUPTED


# ----- progress, waiting, resume, shutdown events


def test_waiting_events_reach_the_streams_the_job_and_its_device_until_it_connects(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.waiting(1, None)
    fake.waiting(2, "connection refused")
    waiting = [e for e in world.events if e["type"] == "waiting"]
    assert [(e["attempt"], e["last_error"], e["job"], e["device"]) for e in waiting] == [
        (1, None, job_id, "a"),
        (2, "connection refused", job_id, "a"),
    ]
    assert world.get(job_id)["waiting"]["last_error"] == "connection refused"
    device = world.registry.get("a").to_json()
    assert device["waiting"] == {
        "phase": "detect",
        "message": "connecting",
        "attempt": 2,
        "last_error": "connection refused",
    }
    fake.enter(Phase.PHASE1)
    assert world.get(job_id)["waiting"] is None and world.registry.get("a").to_json()["waiting"] is None


def test_the_progress_fields_are_kept_on_the_job_and_the_device(world):
    from netota_daemon.engine.events import TransferState

    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    fake.progress_event(
        bytes_served=5000,
        total_bytes=9000,
        percent=50.0,
        device_percent=48,
        rate=1234.5,
        done_bytes=4500,
        basis="offset",
        state=TransferState.DEVICE_WORKING,
        activity="erasing flash",
        eta=None,
    )
    expected = {
        "phase": "phase1",
        "bytes_served": 5000,
        "total_bytes": 9000,
        "percent": 50.0,
        "device_percent": 48,
        "rate": 1234.5,
        "point_of_no_return": False,
        "done_bytes": 4500,
        "basis": "offset",
        "state": "device_working",
        "activity": "erasing flash",
        "eta": None,
    }
    assert world.get(job_id)["progress"] == expected
    device = world.registry.get("a").to_json()
    assert device["progress"] == expected and (device["percent"], device["rate"]) == (50.0, 1234.5)
    assert world.events[-1] == {"type": "progress", "job": job_id, "device": "a", **expected}


def test_the_journal_keeps_the_latest_progress_at_phase_changes_no_return_and_the_end_only(world):
    job_id = world.start("a")["id"]
    fake = world.factory.jobs[job_id]
    fake.enter(Phase.PHASE1)
    for percent in (10.0, 60.0, 100.0):
        fake.progress(percent)
    assert world.journal.get(job_id).progress is None  # progress events write nothing
    fake.enter(Phase.PHASE2)
    assert world.journal.get(job_id).progress["percent"] == 100.0  # phase 1's last, kept at the change
    fake.progress(1.0)
    fake.progress(2.0, point_of_no_return=True)
    stored = world.journal.get(job_id).progress
    assert stored["percent"] == 2.0 and stored["point_of_no_return"]
    fake.progress(70.0)
    fake.finish()
    reopened = JobJournal(world.config.state_dir)  # as after a restart
    record = reopened.get(job_id)
    assert record.progress["percent"] == 70.0 and record.progress["phase"] == "phase2"
    assert record.to_json()["progress"] == record.progress
    notes = [h["note"] for h in reopened.history(job_id)]
    assert notes == TWO_PHASE_NOTES


def test_resuming_a_job_whose_device_a_later_job_upgraded_needs_force(world):
    from netota_daemon.daemon.jobs import Superseded

    old = world.start("a")["id"]
    world.factory.jobs[old].enter(Phase.PHASE2)
    world.factory.jobs[old].finish(OutcomeKind.FAILED, "dropped")
    newer = world.start("a")["id"]
    world.factory.jobs[newer].finish(OutcomeKind.SUCCEEDED, "upgraded", firmware_version_after="2.0.0")
    with pytest.raises(Superseded) as info:
        world.resume(old)
    assert info.value.code == "superseded" and newer in info.value.message and "2.0.0" in info.value.message
    assert len(world.journal.jobs()) == 2  # nothing was started
    resumed = world.resume(old, force=True)
    assert resumed["resumed_from"] == old and resumed["state"] == "running"
    # A later job that failed does not count: the device was not upgraded.
    world.factory.jobs[resumed["id"]].finish(OutcomeKind.FAILED, "again")
    third = world.start("b")["id"]
    world.factory.jobs[third].finish(OutcomeKind.FAILED, "x")
    retry = world.start("b")["id"]
    world.factory.jobs[retry].finish(OutcomeKind.ABORTED, "y")
    assert world.resume(third)["resumed_from"] == third


def test_shutdown_gives_each_job_that_would_not_stop_its_final_event(world):
    world.factory.stop_delay = 100.0
    running, also_running, queued = (world.start(d)["id"] for d in ("a", "b", "c"))
    done = world.queue.shutdown()
    assert [e["job"] for e in world.events if e["type"] == "outcome"] == [queued]  # it ends at once
    world.clock.advance(world.config.shutdown_grace)
    assert done.called
    outcomes = {e["job"]: e for e in world.events if e["type"] == "outcome"}
    assert set(outcomes) == {running, also_running, queued}
    assert outcomes[running]["state"] == "interrupted" and outcomes[running]["outcome"] is None
    assert "netota resume" in outcomes[running]["advice"]
    assert outcomes[queued]["state"] == "interrupted"
    assert world.journal.get(running).state is JobState.INTERRUPTED
    world.clock.advance(100.0)  # the engine ends at last: no second final event
    assert [e["job"] for e in world.events if e["type"] == "outcome"].count(running) == 1


def test_jobs_are_listed_in_pages_newest_first(world):
    ids = []
    for _ in range(5):
        job_id = world.start("a")["id"]
        world.factory.jobs[job_id].finish()
        ids.append(job_id)
    first, cursor = fired(world.queue.page(limit=2))
    assert [j["id"] for j in first] == ids[:-3:-1] and cursor is not None
    second, cursor = fired(world.queue.page(limit=2, cursor=cursor))
    third, last = fired(world.queue.page(limit=2, cursor=cursor))
    assert [j["id"] for j in second + third] == ids[2::-1] and last is None
    assert fired(world.queue.page(device="b")) == ([], None)
    with pytest.raises(UnknownDevice):
        fired(world.queue.page(device="zz"))
