"""``JournalRetention``: prunes the job journal to its configured retention (``journal_retention_days``,
``journal_retention_jobs``) at start and then every hour, on the journal's thread, in small
batches between the queue's own writes. A device's newest job is always kept."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.daemon.journal_thread import AsyncJournal

log = Logger()

PRUNE_INTERVAL = 3600.0


class JournalRetention(Service):
    name = "journal-retention"

    def __init__(
        self,
        journal: AsyncJournal,
        keep_days: float,
        keep_jobs: int,
        clock: IReactorTime,
        interval: float = PRUNE_INTERVAL,
    ) -> None:
        self.journal = journal
        self.keep_days = keep_days
        self.keep_jobs = keep_jobs
        self.interval = interval
        self._loop = LoopingCall(self.prune_now)
        self._loop.clock = clock
        self._running: Deferred[int] | None = None
        self._stopping = False
        self.pruned = 0  # jobs pruned since the daemon started

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.keep_days > 0 or self.keep_jobs > 0:
            self._loop.start(self.interval, now=True)

    def prune_now(self) -> Deferred[int] | None:
        """Start a pruning pass unless one runs; its Deferred fires with how many jobs it deleted."""
        if self._running is not None:
            return None
        d = Deferred.fromCoroutine(
            self.journal.prune(self.keep_days, self.keep_jobs, should_stop=lambda: self._stopping)
        )

        def done(count: int) -> int:
            self._running = None
            self.pruned += count
            if count:
                log.info(
                    "journal: pruned {count} job(s) past the retention ({days:g} days, {jobs} jobs)",
                    count=count,
                    days=self.keep_days,
                    jobs=self.keep_jobs,
                )
            return count

        def failed(failure: Failure) -> int:
            self._running = None
            log.failure("journal: pruning failed", failure)
            return 0

        d.addCallbacks(done, failed)
        if not d.called:
            self._running = d
        return d

    def when_idle(self) -> Deferred[None]:
        """Fires once no pruning pass runs (at once if none does)."""
        done: Deferred[None] = Deferred()
        if self._running is None:
            done.callback(None)
        else:

            def passed(result: int) -> int:
                done.callback(None)
                return result

            self._running.addBoth(passed)
        return done

    def stopService(self) -> Deferred[int] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._loop.running:
            self._loop.stop()
        return self._running
