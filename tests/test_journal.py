"""JobJournal: durable jobs and history in SQLite; recovery after a crash."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock

from netota_daemon.daemon.journal import (
    JOURNAL_FILE,
    JobJournal,
    JobRecord,
    JobState,
    JournalError,
)
from netota_daemon.engine.outcome import (
    ADVICE_LOADER,
    ADVICE_NEVER_STARTED,
    ADVICE_RESET,
    ADVICE_UNVERIFIED,
    ADVICE_UPLOAD_UNSETTLED,
    Outcome,
    OutcomeKind,
    Phase,
    Route,
)


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


def test_a_double_backup_job_lost_while_its_device_rebooted_is_told_to_check_before_resuming(tmp_path):
    """The whole image went out: the device may have taken it. Neither 'phase 1 completed, rejoin its
    loader' (single backup's reboot) nor 'the old firmware is intact'."""
    journal, _ = make(tmp_path)
    journal.update("j1", "running", state=JobState.RUNNING, started=1.0, phase=Phase.REBOOT, route=Route.DOUBLE_BACKUP)
    journal.close()
    after = JobJournal(tmp_path)
    (recovered,) = after.recover()
    assert recovered.advice == ADVICE_UPLOAD_UNSETTLED
    assert after.get("j1").route is Route.DOUBLE_BACKUP and after.get("j1").to_json()["route"] == "double_backup"


def test_a_journal_without_the_route_column_gets_it_and_reads_its_rows_as_unknown(tmp_path):
    journal, _ = make(tmp_path)
    journal.close()
    with sqlite3.connect(tmp_path / JOURNAL_FILE) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN route")
    reopened = JobJournal(tmp_path)
    assert reopened.get("j1").route is None and reopened.get("j1").to_json()["route"] is None
    reopened.update("j1", "phase upload", route=Route.DOUBLE_BACKUP)
    assert JobJournal(tmp_path).get("j1").route is Route.DOUBLE_BACKUP


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


def finished(job_id: str, device: str, created: float, kind: OutcomeKind = OutcomeKind.SUCCEEDED, **extra) -> JobRecord:
    return JobRecord(
        id=job_id,
        device=device,
        firmware="f",
        created=created,
        state=JobState.FINISHED,
        outcome=Outcome(kind=kind, message="", phase=Phase.DONE, **extra),
    )


def test_pages_follow_the_cursor_newest_first(tmp_path):
    journal = JobJournal(tmp_path)
    for n in range(7):
        journal.create(finished(f"j{n}", "a" if n % 2 else "b", float(n)))
    page = journal.page(limit=3)
    assert [r.id for r in page.records] == ["j6", "j5", "j4"] and page.next_cursor is not None
    page = journal.page(limit=3, cursor=page.next_cursor)
    assert [r.id for r in page.records] == ["j3", "j2", "j1"]
    last = journal.page(limit=3, cursor=page.next_cursor)
    assert [r.id for r in last.records] == ["j0"] and last.next_cursor is None
    assert [r.id for r in journal.page(device="a").records] == ["j5", "j3", "j1"]
    with pytest.raises(ValueError):
        journal.page(cursor="1; DROP TABLE jobs")


def test_retention_prunes_old_and_surplus_ended_jobs_in_batches_but_never_active_or_a_devices_newest(tmp_path):
    clock = Clock()
    clock.advance(100 * 86400)
    journal = JobJournal(tmp_path, clock)
    day = 86400.0
    journal.create(finished("a-old", "a", 1 * day))
    journal.create(JobRecord(id="a-running", device="a", firmware="f", created=2 * day, state=JobState.RUNNING))
    journal.create(finished("b-old", "b", 3 * day))  # b's newest: kept, however old
    for n in range(10):
        journal.create(finished(f"c{n}", "c", 90 * day + n))
    journal.save(journal.get("a-old"), "a note")  # history rows go with their job
    boundary = journal.prune_boundary(keep_days=30, keep_jobs=0)
    keep = journal.newest_of_each_device()
    after, total = 0, 0
    while True:
        last, count = journal.prune_batch(after, boundary, keep, batch=1)
        total += count
        if last == after:
            break
        after = last
    assert total == 1
    assert journal.get("a-old") is None and journal.history("a-old") == []
    assert journal.get("a-running") is not None and journal.get("b-old") is not None
    # Now by count: keep the newest 5 jobs (c9 ... c5); c's older ones go, a's running and b's newest stay.
    boundary = journal.prune_boundary(keep_days=0, keep_jobs=5)
    _, count = journal.prune_batch(0, boundary, journal.newest_of_each_device(), batch=100)
    assert count == 5
    assert {r.id for r in journal.jobs()} == {"a-running", "b-old", "c5", "c6", "c7", "c8", "c9"}
    assert journal.prune_boundary(keep_days=0, keep_jobs=0) is None


def test_a_later_upgrade_of_the_device_supersedes_an_earlier_job(tmp_path):
    journal = JobJournal(tmp_path)
    journal.create(finished("old", "a", 1.0, OutcomeKind.FAILED))
    journal.create(finished("other-device", "b", 2.0))
    assert journal.superseded_by("old") is None
    journal.create(finished("later-failure", "a", 3.0, OutcomeKind.FAILED))
    assert journal.superseded_by("old") is None
    journal.create(finished("later", "a", 4.0, firmware_version_after="2.0.0"))
    assert journal.superseded_by("old").id == "later"
    assert journal.superseded_by("later") is None and journal.superseded_by("nope") is None


def test_a_journal_written_before_progress_was_kept_opens_and_gains_the_column(tmp_path):
    with sqlite3.connect(tmp_path / JOURNAL_FILE) as db:  # the schema as the first release wrote it
        db.executescript(
            """
            CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, device TEXT NOT NULL,
                firmware TEXT NOT NULL, state TEXT NOT NULL, phase TEXT NOT NULL,
                point_of_no_return INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, started REAL, finished REAL,
                outcome TEXT, message TEXT NOT NULL DEFAULT '', advice TEXT NOT NULL DEFAULT '', resumed_from TEXT,
                resumed_by TEXT, options TEXT NOT NULL DEFAULT '{}');
            CREATE TABLE job_history (seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, time REAL NOT NULL,
                state TEXT NOT NULL, phase TEXT NOT NULL, note TEXT NOT NULL DEFAULT '');
            INSERT INTO jobs (id, device, firmware, state, phase, created) VALUES ('j1', 'a', 'f', 'finished', 'done', 1);
            """
        )
    journal = JobJournal(tmp_path)
    record = journal.get("j1")
    assert record.progress is None and record.to_json()["progress"] is None
    journal.save(replace(record, progress={"percent": 50.0}), "progress kept")
    assert JobJournal(tmp_path).get("j1").progress == {"percent": 50.0}


@pytest_twisted.ensureDeferred
async def test_the_journal_thread_runs_calls_in_order_off_the_reactor_thread(tmp_path, reactor):
    import threading

    from netota_daemon.daemon.journal_thread import AsyncJournal, ThreadExecutor

    executor = ThreadExecutor(reactor)
    journal = AsyncJournal(JobJournal(tmp_path), executor)
    journal.start()
    record = JobRecord(id="j1", device="a", firmware="f", created=1.0)
    writes = [journal.create(record)]
    for n in range(50):
        writes.append(journal.save(replace(record, message=f"step {n}"), f"step {n}"))
    read = journal.get("j1")  # after every write before it
    thread = await executor.submit(threading.current_thread)
    await gatherResults(writes)
    assert (await read).message == "step 49"
    assert [h["note"] for h in await journal.history("j1")][-1] == "step 49"
    assert thread is not threading.current_thread()
    assert thread.daemon  # a daemon that is never stopped (a crash) does not keep the process alive
    await journal.close()
    with pytest.raises(JournalError, match="closed"):
        await journal.get("j1")
