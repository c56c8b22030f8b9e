"""``JobJournal``: every job and each of its state changes, durably in SQLite in ``state_dir``.

The daemon writes a change here *before* it acts on it (start, cancel, shutdown), so a crash or a
``kill -9`` loses no job: on the next start :meth:`JobJournal.recover` marks the jobs that were
running as interrupted, with the phase they reached and the recovery advice. History is kept.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from netota_daemon.engine.outcome import ADVICE_UNVERIFIED, Outcome, OutcomeKind, Phase, recovery_advice

log = Logger()

JOURNAL_FILE = "journal.sqlite3"


class JobState(str, enum.Enum):
    QUEUED = "queued"  # accepted, waiting for a free slot (max_parallel)
    RUNNING = "running"  # the engine is upgrading the device
    CANCELLING = "cancelling"  # cancel requested; STOP is being sent, the outcome is on its way
    FINISHED = "finished"  # ended with an outcome (see ``outcome.kind``)
    INTERRUPTED = "interrupted"  # the daemon stopped or died while the job was queued or running


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)

ADVICE_NEVER_STARTED = "The job never started, so the device was not touched: resume it or start it again."


def interrupted_advice(phase: Phase, point_of_no_return: bool, started: bool) -> str:
    """What to do about a job the daemon lost while it was queued or running."""
    if not started:
        return ADVICE_NEVER_STARTED
    if phase in (Phase.VERIFY, Phase.DONE):
        # Phase 2 completed: the device was flashed and reboots into its new firmware, not its loader.
        return ADVICE_UNVERIFIED + (
            " Resuming the job (netota resume JOB) checks it: it reads the device's firmware version back and"
            " flashes nothing."
        )
    return recovery_advice(point_of_no_return, phase) + " Resume the job to continue (netota resume JOB)."


@dataclass(frozen=True)
class JobRecord:
    """One job as the journal keeps it."""

    id: str
    device: str
    firmware: str  # the name relative to firmware_dir, as the client gave it
    state: JobState = JobState.QUEUED
    phase: Phase = Phase.DETECT
    point_of_no_return: bool = False
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    outcome: Outcome | None = None
    message: str = ""
    advice: str = ""
    resumed_from: str | None = None
    resumed_by: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def resumable(self) -> bool:
        """An interrupted job, or one that failed or was aborted, that nobody resumed yet."""
        if self.resumed_by is not None:
            return False
        if self.state is JobState.INTERRUPTED:
            return True
        return (
            self.state is JobState.FINISHED
            and self.outcome is not None
            and self.outcome.kind in (OutcomeKind.FAILED, OutcomeKind.ABORTED)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "firmware": self.firmware,
            "state": self.state.value,
            "phase": self.phase.value,
            "point_of_no_return": self.point_of_no_return,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome.to_json() if self.outcome else None,
            "message": self.message,
            "advice": self.advice,
            "resumable": self.resumable,
            "resumed_from": self.resumed_from,
            "resumed_by": self.resumed_by,
            "options": dict(self.options),
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    device TEXT NOT NULL,
    firmware TEXT NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    point_of_no_return INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outcome TEXT,
    message TEXT NOT NULL DEFAULT '',
    advice TEXT NOT NULL DEFAULT '',
    resumed_from TEXT,
    resumed_by TEXT,
    options TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_device ON jobs (device);
CREATE TABLE IF NOT EXISTS job_history (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs (id),
    time REAL NOT NULL,
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_history_job ON job_history (job_id);
"""

_COLUMNS = (
    "id",
    "device",
    "firmware",
    "state",
    "phase",
    "point_of_no_return",
    "created",
    "started",
    "finished",
    "outcome",
    "message",
    "advice",
    "resumed_from",
    "resumed_by",
    "options",
)


def _to_row(record: JobRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "device": record.device,
        "firmware": record.firmware,
        "state": record.state.value,
        "phase": record.phase.value,
        "point_of_no_return": int(record.point_of_no_return),
        "created": record.created,
        "started": record.started,
        "finished": record.finished,
        "outcome": json.dumps(record.outcome.to_json()) if record.outcome else None,
        "message": record.message,
        "advice": record.advice,
        "resumed_from": record.resumed_from,
        "resumed_by": record.resumed_by,
        "options": json.dumps(record.options, sort_keys=True),
    }


def _from_row(row: sqlite3.Row) -> JobRecord:
    try:
        return _record_from_row(row)
    except (ValueError, KeyError, TypeError) as e:
        raise JournalError(
            f"job {row['id']!r} in the journal can't be read ({e}): was it written by a newer netota? "
            "Run that version, or move the journal file aside to start a new one"
        ) from None


def _record_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        id=row["id"],
        device=row["device"],
        firmware=row["firmware"],
        state=JobState(row["state"]),
        phase=Phase(row["phase"]),
        point_of_no_return=bool(row["point_of_no_return"]),
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        outcome=Outcome.from_json(json.loads(row["outcome"])) if row["outcome"] else None,
        message=row["message"],
        advice=row["advice"],
        resumed_from=row["resumed_from"],
        resumed_by=row["resumed_by"],
        options=json.loads(row["options"] or "{}"),
    )


class JournalError(Exception):
    """The journal can't be opened or written (state_dir missing, unwritable, corrupt)."""


class JobJournal:
    """The jobs table and its history, one SQLite file; each write is committed (fsync) before it
    returns. Small writes on the reactor thread: a job changes state a handful of times."""

    def __init__(self, state_dir: str | Path, clock: IReactorTime | None = None) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        self._clock = clock
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise JournalError(f"can't open the job journal {self.path}: {e}") from None

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _write(self, statements: Iterable[tuple[str, Any]]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    self._db.execute(sql, params)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            raise JournalError(f"can't write the job journal {self.path}: {e}") from None

    def _history(self, record: JobRecord, note: str) -> tuple[str, Any]:
        return (
            "INSERT INTO job_history (job_id, time, state, phase, note) VALUES (?, ?, ?, ?, ?)",
            (record.id, self._now(), record.state.value, record.phase.value, note),
        )

    def create(self, record: JobRecord, note: str = "created") -> JobRecord:
        """Store a new job (and its first history entry)."""
        row = _to_row(record)
        sql = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})"
        self._write([(sql, row), self._history(record, note)])
        return record

    def save(self, record: JobRecord, note: str) -> JobRecord:
        """Store ``record``'s new values and a history entry saying why."""
        row = _to_row(record)
        assignments = ", ".join(f"{c} = :{c}" for c in _COLUMNS if c != "id")
        self._write([(f"UPDATE jobs SET {assignments} WHERE id = :id", row), self._history(record, note)])
        return record

    def update(self, job_id: str, note: str, **changes: Any) -> JobRecord:
        """Apply ``changes`` to the stored job and return the new record."""
        record = self.get(job_id)
        if record is None:
            raise KeyError(job_id)
        return self.save(replace(record, **changes), note)

    def get(self, job_id: str) -> JobRecord | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _from_row(row) if row else None

    def jobs(self, device: str | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs, newest first."""
        sql = "SELECT * FROM jobs"
        params: list[Any] = []
        if device is not None:
            sql += " WHERE device = ?"
            params.append(device)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_from_row(r) for r in self._db.execute(sql, params)]

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """Every recorded change of one job, oldest first."""
        rows = self._db.execute(
            "SELECT time, state, phase, note FROM job_history WHERE job_id = ? ORDER BY seq", (job_id,)
        )
        return [dict(r) for r in rows]

    def last_firmware_version(self, device: str) -> str | None:
        """The newest firmware version any of the device's jobs read from it (after, else before)."""
        rows = self._db.execute(
            "SELECT outcome FROM jobs WHERE device = ? AND outcome IS NOT NULL ORDER BY seq DESC", (device,)
        )
        for (outcome,) in rows:
            data = json.loads(outcome)
            version = data.get("firmware_version_after") or data.get("firmware_version_before")
            if version:
                return str(version)
        return None

    def recover(self) -> list[JobRecord]:
        """Mark every job left queued or running by a previous daemon as interrupted, with the phase
        it reached and the advice; returns them."""
        rows = self._db.execute(
            "SELECT * FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq",
            tuple(s.value for s in ACTIVE_STATES),
        ).fetchall()
        recovered = []
        for row in rows:
            record = _from_row(row)
            started = record.started is not None
            interrupted = replace(
                record,
                state=JobState.INTERRUPTED,
                finished=self._now(),
                message=f"the daemon stopped while the job was {record.state.value} (phase {record.phase.value})",
                advice=interrupted_advice(record.phase, record.point_of_no_return, started),
            )
            self.save(interrupted, "interrupted: found active at daemon start")
            log.warn(
                "job {job} on {device} was {state} in phase {phase} when the daemon stopped: marked interrupted",
                job=record.id,
                device=record.device,
                state=record.state.value,
                phase=record.phase.value,
            )
            recovered.append(interrupted)
        return recovered

    def close(self) -> None:
        self._db.close()
