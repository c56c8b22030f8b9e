"""JobJournal: durable jobs and history in SQLite; recovery after a crash."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
from twisted.internet.task import Clock

from netota_daemon.daemon.journal import (
    ADVICE_NEVER_STARTED,
    JOURNAL_FILE,
    JobJournal,
    JobRecord,
    JobState,
)
from netota_daemon.engine.outcome import ADVICE_LOADER, ADVICE_RESET, ADVICE_UNVERIFIED, Outcome, OutcomeKind, Phase


def make(tmp_path, **changes) -> tuple[JobJournal, JobRecord]:
    clock = Clock()
    clock.advance(1000)
    journal = JobJournal(tmp_path, clock)
    record = JobRecord(id="j1", device="dev", firmware="fw.bin", created=clock.seconds(), **changes)
    journal.create(record)
    return journal, record


def test_create_save_and_read_back_from_another_connection(tmp_path):
    journal, record = make(tmp_path, options={"deadline": 60})
    journal.save(replace(record, state=JobState.RUNNING, started=1001.0), "running")
    journal.save(replace(record, state=JobState.RUNNING, started=1001.0, phase=Phase.PHASE1), "phase phase1")
    # Each write is committed before save() returns: a second connection (another process) sees it.
    db = sqlite3.connect(tmp_path / JOURNAL_FILE)
    assert db.execute("SELECT state, phase, options FROM jobs WHERE id = 'j1'").fetchone() == (
        "running",
        "phase1",
        '{"deadline": 60}',
    )
    journal.close()
    reopened = JobJournal(tmp_path)
    got = reopened.get("j1")
    assert got.state is JobState.RUNNING and got.phase is Phase.PHASE1 and got.options == {"deadline": 60}
    assert [h["note"] for h in reopened.history("j1")] == ["created", "running", "phase phase1"]
    assert [h["state"] for h in reopened.history("j1")] == ["queued", "running", "running"]


def test_outcome_round_trips(tmp_path):
    journal, record = make(tmp_path)
    outcome = Outcome(
        kind=OutcomeKind.FAILED,
        message="ERR",
        phase=Phase.PHASE2,
        point_of_no_return=True,
        advice=ADVICE_LOADER,
        firmware_version_before="1.0",
    )
    journal.update("j1", "finished", state=JobState.FINISHED, outcome=outcome, phase=Phase.PHASE2)
    got = JobJournal(tmp_path).get("j1")
    assert got.outcome == outcome
    assert got.resumable  # failed, nobody resumed it yet
    assert got.to_json()["outcome"]["kind"] == "failed"


def test_recover_marks_running_jobs_interrupted_with_phase_and_advice(tmp_path):
    journal, _ = make(tmp_path)
    journal.update("j1", "running", state=JobState.RUNNING, started=1.0, phase=Phase.PHASE2, point_of_no_return=True)
    journal.create(JobRecord(id="j2", device="b", firmware="f", created=2.0))  # queued, never started
    journal.create(JobRecord(id="j3", device="c", firmware="f", created=3.0))
    journal.update("j3", "running", state=JobState.RUNNING, started=3.0, phase=Phase.PHASE1)
    journal.create(
        JobRecord(
            id="j4",
            device="d",
            firmware="f",
            created=4.0,
            state=JobState.FINISHED,
            outcome=Outcome(kind=OutcomeKind.SUCCEEDED, message="ok", phase=Phase.DONE),
        )
    )
    journal.close()  # as if the daemon was killed

    after = JobJournal(tmp_path)
    recovered = {r.id: r for r in after.recover()}
    assert set(recovered) == {"j1", "j2", "j3"}
    j1, j2, j3 = after.get("j1"), after.get("j2"), after.get("j3")
    assert j1.state is JobState.INTERRUPTED and j1.phase is Phase.PHASE2 and j1.point_of_no_return
    assert j1.advice.startswith(ADVICE_LOADER) and "netota resume" in j1.advice
    assert j1.resumable
    assert j2.state is JobState.INTERRUPTED and j2.advice == ADVICE_NEVER_STARTED
    assert j3.advice.startswith(ADVICE_RESET)
    assert after.get("j4").state is JobState.FINISHED
    assert after.history("j1")[-1]["note"].startswith("interrupted")
    assert after.recover() == []  # nothing left to recover


def test_resumable_rules(tmp_path):
    base = JobRecord(id="x", device="d", firmware="f")
    assert not base.resumable  # queued
    assert replace(base, state=JobState.INTERRUPTED).resumable
    assert not replace(base, state=JobState.INTERRUPTED, resumed_by="y").resumable
    ok = Outcome(kind=OutcomeKind.SUCCEEDED, message="", phase=Phase.DONE)
    aborted = Outcome(kind=OutcomeKind.ABORTED, message="", phase=Phase.PHASE1)
    assert not replace(base, state=JobState.FINISHED, outcome=ok).resumable
    assert replace(base, state=JobState.FINISHED, outcome=aborted).resumable


def test_jobs_newest_first_and_by_device(tmp_path):
    journal, _ = make(tmp_path)
    journal.create(JobRecord(id="j2", device="other", firmware="f"))
    journal.create(JobRecord(id="j3", device="dev", firmware="f"))
    assert [r.id for r in journal.jobs()] == ["j3", "j2", "j1"]
    assert [r.id for r in journal.jobs(device="dev")] == ["j3", "j1"]
    assert [r.id for r in journal.jobs(limit=1)] == ["j3"]


def test_a_job_lost_after_phase_2_is_not_told_its_device_waits_in_the_loader(tmp_path):
    """Phase 2 completed (verify): the device reboots into its new firmware; the loader advice
    (do not power off, rejoin WIFI_OTA_...) would be wrong."""
    journal, _ = make(tmp_path)
    journal.update("j1", "running", state=JobState.RUNNING, started=1.0, phase=Phase.VERIFY, point_of_no_return=True)
    (recovered,) = journal.recover()
    assert recovered.advice.startswith(ADVICE_UNVERIFIED) and ADVICE_LOADER not in recovered.advice
    assert recovered.resumable


def test_a_row_this_version_cannot_read_is_a_clear_error(tmp_path):
    from netota_daemon.daemon.journal import JOURNAL_FILE, JournalError

    journal = JobJournal(tmp_path)
    journal.create(JobRecord(id="j1", device="a", firmware="v2.bin", created=1.0))
    journal.close()
    with sqlite3.connect(tmp_path / JOURNAL_FILE) as db:  # as a newer netota might have written it
        db.execute("UPDATE jobs SET state = 'paused' WHERE id = 'j1'")
    journal = JobJournal(tmp_path)
    with pytest.raises(JournalError, match=r"'j1'.*newer netota"):
        journal.get("j1")
    journal.close()
