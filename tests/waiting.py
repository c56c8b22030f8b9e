"""Waiting for what another process does, as an event with a bound, never a sleep.

:class:`Changes` is poked whenever something a test may be waiting for could have changed: a
datagram arrived, a child process wrote or ended, a file appeared or grew in a watched directory
(inotify). :meth:`Changes.until` re-checks its predicate on each poke, and gives up after its bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer, inotify
from twisted.python.filepath import FilePath

_FILE_EVENTS = inotify.IN_CREATE | inotify.IN_MODIFY | inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO


class Changes:
    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._waiters: list[defer.Deferred[None]] = []
        self._notifiers: list[inotify.INotify] = []

    def poke(self, *ignored: Any) -> None:
        """Something may have changed: wake every waiter to re-check."""
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def watch_directory(self, directory: Path) -> None:
        """Poke on every file created, written or moved into ``directory`` (which must exist)."""
        notifier = inotify.INotify(self.reactor)
        notifier.startReading()
        notifier.watch(FilePath(str(directory)), mask=_FILE_EVENTS, callbacks=[self.poke])
        self._notifiers.append(notifier)

    def close(self) -> None:
        for notifier in self._notifiers:
            notifier.loseConnection()
        self._notifiers.clear()

    def _next(self) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._waiters.remove(d))
        self._waiters.append(d)
        return d

    async def until(self, predicate: Callable[[], Any], what: str, timeout: float = 30) -> Any:
        """The first true value of ``predicate``, checked now and after every poke; an
        AssertionError naming ``what`` after ``timeout`` seconds."""
        deadline = self.reactor.seconds() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - self.reactor.seconds()
            if remaining <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            try:
                await self._next().addTimeout(remaining, self.reactor)
            except defer.TimeoutError:
                pass  # one last check above, then the error
