"""``JobJournal``: every job and each of its state changes, durably in SQLite in ``state_dir``.

The daemon writes a change here *before* it acts on it (start, cancel, shutdown), so a crash or a
``kill -9`` loses no job: on the next start :meth:`JobJournal.recover` marks the jobs that were
running as interrupted, with the phase they reached and the recovery advice. History is kept for
the configured retention (:meth:`JobJournal.prune_batch`); every query that could grow with it is
bounded (pages, indexes, limits).

The class is synchronous SQLite. While the daemon runs, every call is made on the journal's own
thread (:mod:`netota_daemon.daemon.journal_thread`), never on the reactor's; only the start-up
recovery, before the control socket listens, calls it directly.
"""

from __future__ import annotations

import enum
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from netota_daemon.engine.outcome import Happened, Outcome, OutcomeKind, Phase, Route, advice, phase_label

log = Logger()

JOURNAL_FILE = "journal.sqlite3"


class JobState(str, enum.Enum):
    QUEUED = "queued"  # accepted, waiting for a free slot (max_parallel)
    RUNNING = "running"  # the engine is upgrading the device
    CANCELLING = "cancelling"  # cancel requested; STOP is being sent, the outcome is on its way
    FINISHED = "finished"  # ended with an outcome (see ``outcome.kind``)
    INTERRUPTED = "interrupted"  # the daemon stopped or died while the job was queued or running


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.CANCELLING)


def interrupted_advice(record: JobRecord, started: bool) -> str:
    """What to do about a job the daemon lost while it was queued (``started`` False) or running."""
    happened = Happened.INTERRUPTED if started else Happened.NEVER_STARTED
    return advice(happened, record.phase, record.point_of_no_return, record.route or Route.SINGLE_BACKUP)


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
    progress: dict[str, Any] | None = None  # the latest progress object, kept at phase changes, no return, end
    also: tuple[str, ...] = ()  # further images of the job's set (one of each kind): the engine sends one
    batch: str | None = None  # the batch this job belongs to
    image_sha256: str | None = None  # the SHA-256 of the job's image (None: a set of images, or an older row)
    route: Route | None = None  # the device's build, once the job has seen it (None: not yet, or an older row)

    @property
    def firmware_set(self) -> tuple[str, ...]:
        """Every image the job was given, ``firmware`` first."""
        return (self.firmware, *self.also)

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
            "firmware_set": list(self.firmware_set),
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
            "progress": dict(self.progress) if self.progress is not None else None,
            "batch": self.batch,
            "image_sha256": self.image_sha256,
            "route": self.route.value if self.route else None,
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
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
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


def write_transaction(db: sqlite3.Connection, statements: Iterable[tuple[str, Any]]) -> None:
    """``statements`` (SQL, parameters) in one write transaction: all of them, or none (rolled back
    on any error, which is raised again for the caller to name its file)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        for sql, params in statements:
            db.execute(sql, params)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


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
    "progress",
    "also",
    "batch",
    "image_sha256",
    "route",
)

#: Columns added after the first release, with their definitions: added to an older journal on open.
_ADDED_COLUMNS = {"progress": "TEXT", "also": "TEXT", "batch": "TEXT", "image_sha256": "TEXT", "route": "TEXT"}
#: Indexes on added columns, made once the columns exist.
_ADDED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS jobs_image ON jobs (image_sha256)",
    "CREATE INDEX IF NOT EXISTS jobs_batch ON jobs (batch)",
)
#: Jobs with an image searched for the version it installs (skip_current with no version given).
IMAGE_SEARCH = 50

#: Jobs in one page of ``GET /v1/jobs`` by default, and at most.
DEFAULT_PAGE = 100
MAX_PAGE = 500
#: Jobs deleted in one pruning transaction: small, so the queue's writes are never held up long.
PRUNE_BATCH = 500
#: How many of a device's newest ended jobs are searched for its last known firmware version.
VERSION_SEARCH = 100
#: History entries returned for one job (a job writes a handful; a bound all the same).
MAX_HISTORY = 1000

ENDED_STATES = (JobState.FINISHED, JobState.INTERRUPTED)


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
        "progress": json.dumps(record.progress, sort_keys=True) if record.progress is not None else None,
        "also": json.dumps(list(record.also)) if record.also else None,
        "batch": record.batch,
        "image_sha256": record.image_sha256,
        "route": record.route.value if record.route else None,
    }


class JournalError(Exception):
    """The journal can't be opened, read or written (state_dir missing, unwritable, corrupt, a row
    written by a newer version)."""


def _from_row(row: sqlite3.Row) -> JobRecord:
    try:
        return _record_from_row(row)
    except (ValueError, KeyError, TypeError, IndexError) as e:
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
        progress=json.loads(row["progress"]) if row["progress"] else None,
        also=tuple(str(name) for name in json.loads(row["also"])) if row["also"] else (),
        batch=row["batch"],
        image_sha256=row["image_sha256"],
        route=Route(row["route"]) if row["route"] else None,
    )


@dataclass(frozen=True)
class JobPage:
    """One page of the job list, newest first; ``next_cursor`` asks for the page after it (None: last)."""

    records: list[JobRecord]
    next_cursor: str | None


class JobJournal:
    """The jobs table and its history, one SQLite file; each write is committed (fsync) before it
    returns. Called from one thread at a time (the journal's thread while the daemon runs)."""

    def __init__(self, state_dir: str | Path, clock: IReactorTime | None = None) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        self._clock = clock
        #: Called (on the writing thread) with the seconds each committed write took: the metrics.
        self.on_write: Callable[[float], None] | None = None
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            # Opened here, used on the journal's thread: one thread at a time, never two at once.
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            present = {row["name"] for row in self._db.execute("PRAGMA table_info(jobs)")}
            for column, definition in _ADDED_COLUMNS.items():
                if column not in present:
                    self._db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")
            for index in _ADDED_INDEXES:
                self._db.execute(index)
        except (OSError, sqlite3.Error) as e:
            raise JournalError(f"can't open the job journal {self.path}: {e}") from None

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _write(self, statements: Iterable[tuple[str, Any]]) -> None:
        began = time.perf_counter()
        try:
            write_transaction(self._db, statements)
        except sqlite3.Error as e:
            raise JournalError(f"can't write the job journal {self.path}: {e}") from None
        if self.on_write is not None:
            self.on_write(time.perf_counter() - began)

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise JournalError(f"can't read the job journal {self.path}: {e}") from None

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
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _from_row(rows[0]) if rows else None

    def jobs(self, device: str | None = None, limit: int | None = None) -> list[JobRecord]:
        """Jobs, newest first (every one without ``limit``: for tests and tools, not the daemon)."""
        sql = "SELECT * FROM jobs"
        params: list[Any] = []
        if device is not None:
            sql += " WHERE device = ?"
            params.append(device)
        sql += " ORDER BY seq DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [_from_row(r) for r in self._read(sql, params)]

    def page(self, device: str | None = None, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> JobPage:
        """At most ``limit`` jobs, newest first, older than ``cursor`` (a page's ``next_cursor``: digits,
        else ValueError)."""
        limit = max(1, min(limit, MAX_PAGE))
        clauses: list[str] = []
        params: list[Any] = []
        if device is not None:
            clauses.append("device = ?")
            params.append(device)
        if cursor is not None:
            if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19:
                raise ValueError(f"{cursor!r} is not a job list cursor")
            clauses.append("seq < ?")
            params.append(int(cursor))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._read(f"SELECT * FROM jobs{where} ORDER BY seq DESC LIMIT ?", [*params, limit + 1])
        more = len(rows) > limit
        rows = rows[:limit]
        return JobPage([_from_row(r) for r in rows], str(rows[-1]["seq"]) if more else None)

    def history(self, job_id: str) -> list[dict[str, Any]]:
        """Every recorded change of one job, oldest first."""
        rows = self._read(
            "SELECT time, state, phase, note FROM job_history WHERE job_id = ? ORDER BY seq LIMIT ?",
            (job_id, MAX_HISTORY),
        )
        return [dict(r) for r in rows]

    def last_firmware_version(self, device: str) -> str | None:
        """The newest firmware version one of the device's last jobs read from it (after, else before)."""
        rows = self._read(
            "SELECT outcome FROM jobs WHERE device = ? AND outcome IS NOT NULL ORDER BY seq DESC LIMIT ?",
            (device, VERSION_SEARCH),
        )
        for (outcome,) in rows:
            try:
                data = json.loads(outcome)
            except ValueError:
                continue
            version = data.get("firmware_version_after") or data.get("firmware_version_before")
            if version:
                return str(version)
        return None

    def batch_job(self, batch: str, device: str) -> JobRecord | None:
        """The device's newest job of ``batch`` (a batch's start the daemon died in), or None."""
        rows = self._read(
            "SELECT * FROM jobs WHERE batch = ? AND device = ? ORDER BY seq DESC LIMIT 1", (batch, device)
        )
        return _from_row(rows[0]) if rows else None

    def image_jobs(self, image_sha256: str, limit: int = IMAGE_SEARCH) -> list[JobRecord]:
        """The newest ended jobs that flashed the image with this SHA-256, newest first (bounded)."""
        rows = self._read(
            "SELECT * FROM jobs WHERE image_sha256 = ? AND state = ? ORDER BY seq DESC LIMIT ?",
            (image_sha256, JobState.FINISHED.value, limit),
        )
        return [_from_row(r) for r in rows]

    def superseded_by(self, job_id: str) -> JobRecord | None:
        """A later job of the same device that upgraded it (succeeded, or found it already current),
        the newest one; None if there is none (or no job ``job_id``)."""
        rows = self._read("SELECT seq, device FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            return None
        seq, device = rows[0]["seq"], rows[0]["device"]
        later = self._read(
            "SELECT * FROM jobs WHERE device = ? AND seq > ? AND state = ? ORDER BY seq DESC",
            (device, seq, JobState.FINISHED.value),
        )
        for row in later:
            record = _from_row(row)
            if record.outcome is not None and record.outcome.kind in (
                OutcomeKind.SUCCEEDED,
                OutcomeKind.ALREADY_CURRENT,
            ):
                return record
        return None

    # ----- retention

    def prune_boundary(self, keep_days: float, keep_jobs: int) -> int | None:
        """The newest ``seq`` retention allows to prune (jobs up to it are beyond the count, or
        created more than ``keep_days`` ago); None if none. 0 turns a limit off."""
        boundary: int | None = None
        if keep_jobs > 0:
            rows = self._read("SELECT seq FROM jobs ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep_jobs,))
            if rows:
                boundary = rows[0]["seq"]
        if keep_days > 0:
            cutoff = self._now() - keep_days * 86400.0
            rows = self._read("SELECT MAX(seq) AS seq FROM jobs WHERE created < ?", (cutoff,))
            if rows and rows[0]["seq"] is not None:
                boundary = max(boundary or 0, rows[0]["seq"])
        return boundary

    def newest_of_each_device(self) -> set[int]:
        """The ``seq`` of each device's newest job: never pruned (its device's last job and image)."""
        return {row[0] for row in self._read("SELECT MAX(seq) FROM jobs GROUP BY device")}

    def prune_batch(self, after: int, boundary: int, keep: set[int], batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete ended jobs (and their history) with ``after < seq <= boundary``, except ``keep``, looking
        at ``batch`` jobs in one transaction. Returns (the last seq looked at, how many were deleted);
        the last seq equals ``after`` when nothing was left."""
        rows = self._read(
            "SELECT seq, id, state FROM jobs WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?", (after, boundary, batch)
        )
        if not rows:
            return after, 0
        ended = {s.value for s in ENDED_STATES}
        victims = [row for row in rows if row["state"] in ended and row["seq"] not in keep]
        if victims:
            marks = ", ".join("?" for _ in victims)
            self._write(
                [
                    (f"DELETE FROM job_history WHERE job_id IN ({marks})", [row["id"] for row in victims]),
                    (f"DELETE FROM jobs WHERE seq IN ({marks})", [row["seq"] for row in victims]),
                ]
            )
        return rows[-1]["seq"], len(victims)

    def recover(self) -> list[JobRecord]:
        """Mark every job left queued or running by a previous daemon as interrupted, with the phase
        it reached and the advice; returns them."""
        rows = self._read(
            "SELECT * FROM jobs WHERE state IN (?, ?, ?) ORDER BY seq",
            tuple(s.value for s in ACTIVE_STATES),
        )
        recovered = []
        for row in rows:
            record = _from_row(row)
            started = record.started is not None
            interrupted = replace(
                record,
                state=JobState.INTERRUPTED,
                finished=self._now(),
                message=f"the daemon stopped while the job was {record.state.value} (in {phase_label(record.phase)})",
                advice=interrupted_advice(record, started),
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
