"""The job journal off the reactor: :class:`AsyncJournal` runs every :class:`JobJournal` call on one
thread of its own, in the order the calls were made, and answers with Deferreds.

One thread, so writes commit in the order the queue made them and a read sees every write made
before it; off the reactor, so an fsync, a long history or pruning never stalls the devices'
timers or the control API. The queue acts on a change only once the Deferred of its write has
fired (the "journal before acting" rule). Tests give an :class:`ImmediateExecutor` (each call runs
at once, on the caller's thread) or one that lets them decide when a write commits.
"""

from __future__ import annotations

from collections.abc import Callable
from threading import Thread
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from netota_daemon.daemon.journal import DEFAULT_PAGE, PRUNE_BATCH, JobJournal, JobPage, JobRecord, JournalError

log = Logger()

T = TypeVar("T")


class JournalExecutor(Protocol):
    """Runs journal calls one at a time, in order."""

    def start(self) -> None: ...

    def submit(self, call: Callable[[], T]) -> Deferred[T]: ...

    def stop(self) -> None: ...


def _daemon_thread(*args: Any, **kwargs: Any) -> Thread:
    return Thread(*args, daemon=True, **kwargs)


class _JournalPool(ThreadPool):
    # A daemon thread: should the service never be stopped (a crash), the process still exits. Each
    # write is a committed SQLite transaction, so a write cut short is one never acted on.
    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]


class ThreadExecutor:
    """One worker thread (a one-thread :class:`ThreadPool`): calls run in submission order."""

    def __init__(self, reactor: IReactorFromThreads, name: str = "netota-journal") -> None:
        self._reactor = reactor
        self._pool = _JournalPool(minthreads=1, maxthreads=1, name=name)

    def start(self) -> None:
        if not self._pool.started:
            self._pool.start()

    def submit(self, call: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(self._reactor, self._pool, call)

    def stop(self) -> None:
        """Join the thread (after the calls already submitted have run)."""
        if self._pool.started:
            self._pool.stop()


class ImmediateExecutor:
    """Runs each call at once on the caller's thread (tests on a Clock, tools)."""

    def start(self) -> None:
        pass

    def submit(self, call: Callable[[], T]) -> Deferred[T]:
        return maybeDeferred(call)

    def stop(self) -> None:
        pass


class AsyncJournal:
    """:class:`JobJournal`'s calls, each run by ``executor`` and answered with a Deferred."""

    def __init__(self, journal: JobJournal, executor: JournalExecutor) -> None:
        self.journal = journal
        self._executor = executor
        self._closed = False

    @property
    def path(self) -> Any:
        return self.journal.path

    def start(self) -> None:
        """Start the journal's thread (calls made before it wait for it)."""
        self._executor.start()

    def _call(self, method: Callable[..., T], *args: Any, **kwargs: Any) -> Deferred[T]:
        if self._closed:
            return fail(JournalError(f"the job journal {self.journal.path} is closed"))
        return self._executor.submit(lambda: method(*args, **kwargs))

    def create(self, record: JobRecord, note: str = "created") -> Deferred[JobRecord]:
        return self._call(self.journal.create, record, note)

    def save(self, record: JobRecord, note: str) -> Deferred[JobRecord]:
        return self._call(self.journal.save, record, note)

    def update(self, job_id: str, note: str, **changes: Any) -> Deferred[JobRecord]:
        return self._call(self.journal.update, job_id, note, **changes)

    def get(self, job_id: str) -> Deferred[JobRecord | None]:
        return self._call(self.journal.get, job_id)

    def history(self, job_id: str) -> Deferred[list[dict[str, Any]]]:
        return self._call(self.journal.history, job_id)

    def page(
        self, device: str | None = None, limit: int = DEFAULT_PAGE, cursor: str | None = None
    ) -> Deferred[JobPage]:
        return self._call(self.journal.page, device, limit, cursor)

    def batch_job(self, batch: str, device: str) -> Deferred[JobRecord | None]:
        return self._call(self.journal.batch_job, batch, device)

    def image_jobs(self, image_sha256: str) -> Deferred[list[JobRecord]]:
        return self._call(self.journal.image_jobs, image_sha256)

    def device_jobs(self, device: str, limit: int) -> Deferred[list[JobRecord]]:
        return self._call(self.journal.jobs, device, limit)

    def run(self, call: Callable[[], T]) -> Deferred[T]:
        """Run ``call`` on the journal's thread, in order with the journal's own calls (another
        store in the same file: the batches)."""
        if self._closed:
            return fail(JournalError(f"the job journal {self.journal.path} is closed"))
        return self._executor.submit(call)

    def superseded_by(self, job_id: str) -> Deferred[JobRecord | None]:
        return self._call(self.journal.superseded_by, job_id)

    def last_firmware_version(self, device: str) -> Deferred[str | None]:
        return self._call(self.journal.last_firmware_version, device)

    async def prune(
        self,
        keep_days: float,
        keep_jobs: int,
        batch: int = PRUNE_BATCH,
        should_stop: Callable[[], bool] | None = None,
    ) -> int:
        """Delete the ended jobs retention no longer keeps (never a device's newest job), in small
        transactions, each its own call, so the queue's writes go in between; ``should_stop`` is
        asked between two. Returns how many were deleted."""
        boundary = await self._call(self.journal.prune_boundary, keep_days, keep_jobs)
        if boundary is None:
            return 0
        keep = await self._call(self.journal.newest_of_each_device)
        after, deleted = 0, 0
        while not self._closed and not (should_stop and should_stop()):
            last, count = await self._call(self.journal.prune_batch, after, boundary, keep, batch)
            deleted += count
            if last == after:
                break
            after = last
        return deleted

    def flush(self) -> Deferred[None]:
        """Fires once every call submitted before it has run."""
        return self._executor.submit(lambda: None)

    async def close(self) -> None:
        """Run what is pending, close the database on its thread, and stop the thread."""
        if self._closed:
            return
        self._closed = True
        try:
            await self._executor.submit(self.journal.close)
        finally:
            self._executor.stop()
