"""``BatchStore``: every batch, durably, in the daemon's SQLite journal file (table ``batches``).

A batch row holds what the batch was asked (firmware, the image's SHA-256 and kind, how its devices
were chosen, the job options) and its whole decision state (:meth:`BatchPolicy.to_json`: policy,
members, each member's state and jobs). The daemon saves the row *before* it acts on a decision, so
after a restart or a ``kill -9`` the batch carries on from the row. Each write is one committed
transaction (``synchronous=FULL``, as the job journal).

The class is synchronous SQLite, like the job journal; the daemon calls it through
:class:`AsyncBatchStore` on the journal's own thread, so batch and job writes commit in the order
they were made and nothing here runs on the reactor. Listings are bounded pages.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from netota_daemon.daemon.journal import JournalError, write_transaction

JOURNAL_FILE = "journal.sqlite3"
DEFAULT_PAGE = 50
MAX_PAGE = 1000
#: Ended batches kept (the oldest beyond it are deleted as each batch ends); unfinished ones always.
KEEP_ENDED = 1000

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    firmware TEXT NOT NULL,
    state TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_state ON batches (state);
"""

#: Batch states that are over (the rest are carried on after a restart).
ENDED_STATES = ("finished", "cancelled")


class BatchStoreError(JournalError):
    """The batches can't be read or written (the message names the file); a journal error like the
    job journal's own."""


@dataclass(frozen=True)
class BatchRow:
    id: str
    created: float
    firmware: str
    state: str
    data: dict[str, Any]  # Batch.to_record()


@dataclass(frozen=True)
class BatchPage:
    rows: list[BatchRow]
    next_cursor: str | None  # give it back for the next (older) page; None: this was the last


class BatchStore:
    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / JOURNAL_FILE
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise BatchStoreError(f"can't open the batch journal {self.path}: {e}") from None

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        try:
            write_transaction(self._db, [(sql, params)])
        except sqlite3.Error as e:
            raise BatchStoreError(f"can't write the batch journal {self.path}: {e}") from None

    def create(self, row: BatchRow) -> BatchRow:
        self._write(
            "INSERT INTO batches (id, created, firmware, state, data) VALUES (?, ?, ?, ?, ?)",
            (row.id, row.created, row.firmware, row.state, json.dumps(row.data, sort_keys=True)),
        )
        return row

    def save(self, batch_id: str, state: str, data: dict[str, Any]) -> None:
        self._write(
            "UPDATE batches SET state = ?, data = ? WHERE id = ?",
            (state, json.dumps(data, sort_keys=True), batch_id),
        )

    @staticmethod
    def _row(row: sqlite3.Row) -> BatchRow:
        try:
            data = json.loads(row["data"])
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise BatchStoreError(f"batch {row['id']!r} in the journal can't be read ({e})") from None
        return BatchRow(id=row["id"], created=row["created"], firmware=row["firmware"], state=row["state"], data=data)

    def get(self, batch_id: str) -> BatchRow | None:
        row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return self._row(row) if row else None

    def active(self) -> list[BatchRow]:
        """Every batch not over yet, oldest first (at start-up: what to carry on)."""
        rows = self._db.execute(
            f"SELECT * FROM batches WHERE state NOT IN ({', '.join('?' for _ in ENDED_STATES)}) ORDER BY seq",
            ENDED_STATES,
        )
        return [self._row(r) for r in rows]

    def page(self, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> BatchPage:
        """Batches newest first, at most ``limit`` (1..MAX_PAGE); ``cursor`` from the previous page."""
        limit = max(1, min(limit, MAX_PAGE))
        if cursor is not None and not (isinstance(cursor, str) and cursor.isdigit() and len(cursor) < 19):
            raise ValueError(f"cursor {cursor!r} is not one this daemon gave")
        sql, params = "SELECT * FROM batches", [] if cursor is None else [int(cursor)]
        if cursor is not None:
            sql += " WHERE seq < ?"
        rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        return BatchPage([self._row(r) for r in rows], str(rows[-1]["seq"]) if more and rows else None)

    def prune(self, keep: int = KEEP_ENDED) -> int:
        """Delete the ended batches older than the newest ``keep`` batches; how many were deleted."""
        rows = self._db.execute("SELECT seq FROM batches ORDER BY seq DESC LIMIT 1 OFFSET ?", (keep,)).fetchall()
        if not rows:
            return 0
        marks = ", ".join("?" for _ in ENDED_STATES)
        before = self._db.total_changes
        self._write(f"DELETE FROM batches WHERE seq <= ? AND state IN ({marks})", (rows[0]["seq"], *ENDED_STATES))
        return self._db.total_changes - before

    def close(self) -> None:
        self._db.close()


#: ``submit(call) -> Deferred``: runs ``call`` on the journal's thread (the job journal's executor).
Submit = Callable[[Callable[[], Any]], Deferred[Any]]


class AsyncBatchStore:
    """:class:`BatchStore`'s calls, each run by ``submit`` and answered with a Deferred."""

    def __init__(self, store: BatchStore, submit: Submit) -> None:
        self.store = store
        self._submit = submit

    def create(self, row: BatchRow) -> Deferred[BatchRow]:
        return self._submit(lambda: self.store.create(row))

    def save(self, batch_id: str, state: str, data: dict[str, Any]) -> Deferred[None]:
        return self._submit(lambda: self.store.save(batch_id, state, data))

    def get(self, batch_id: str) -> Deferred[BatchRow | None]:
        return self._submit(lambda: self.store.get(batch_id))

    def active(self) -> Deferred[list[BatchRow]]:
        return self._submit(self.store.active)

    def page(self, limit: int = DEFAULT_PAGE, cursor: str | None = None) -> Deferred[BatchPage]:
        return self._submit(lambda: self.store.page(limit, cursor))

    def prune(self, keep: int = KEEP_ENDED) -> Deferred[int]:
        return self._submit(lambda: self.store.prune(keep))

    def close(self) -> Deferred[None]:
        return self._submit(self.store.close)
