"""``LogLimiter``: warnings a device can cause, logged at a bounded rate with a count.

A broken or hostile device can send thousands of bad headers or unsolicited frames a second; each
one logged would fill the disk. The first few of a kind in each interval are logged as they come;
the rest are counted and summed up in one line ("skipped 18342 more bad headers in the last 10 s")
when the next one comes after the interval, or when the owner calls :meth:`LogLimiter.flush`
(at the end of a session). No timer is kept: a quiet device costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Each kind of warning: this many are logged per interval, the rest are counted.
BURST = 3
INTERVAL = 10.0


@dataclass
class _Window:
    started: float
    logged: int = 0
    suppressed: int = 0


class LogLimiter:
    """Rate-limits ``log.warn`` per ``kind``; ``summary`` names the kind in the count line."""

    def __init__(
        self,
        clock: IReactorTime,
        log: Logger,
        context: dict[str, Any] | None = None,
        burst: int = BURST,
        interval: float = INTERVAL,
    ) -> None:
        self._clock = clock
        self._log = log
        self._context = dict(context or {})
        self._burst = burst
        self._interval = interval
        self._windows: dict[str, _Window] = {}
        self._summaries: dict[str, str] = {}
        self.total: dict[str, int] = {}

    def warn(self, kind: str, summary: str, format: str, **fields: Any) -> None:
        """Log ``format`` (a Twisted log format with ``fields``) unless ``kind`` was logged ``burst``
        times in this interval; ``summary`` says what is counted ("bad headers")."""
        self.total[kind] = self.total.get(kind, 0) + 1
        self._summaries[kind] = summary
        now = self._clock.seconds()
        window = self._windows.get(kind)
        if window is None or now - window.started >= self._interval:
            if window is not None:
                self._report(kind, window, now)
            window = self._windows[kind] = _Window(started=now)
        if window.logged < self._burst:
            window.logged += 1
            self._log.warn(format, **fields, **self._context)
        else:
            window.suppressed += 1

    def flush(self) -> None:
        """Log the counts still pending (the session is ending)."""
        now = self._clock.seconds()
        for kind, window in self._windows.items():
            self._report(kind, window, now)
        self._windows.clear()

    def _report(self, kind: str, window: _Window, now: float) -> None:
        if window.suppressed:
            self._log.warn(
                "skipped {count} more {summary} in the last {seconds:.0f} s",
                count=window.suppressed,
                summary=self._summaries[kind],
                seconds=max(now - window.started, 0.0),
                **self._context,
            )
            window.suppressed = 0
