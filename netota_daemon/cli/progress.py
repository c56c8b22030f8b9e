"""The progress display of one upgrade on a terminal: phase, percent, bytes, rate and ETA.

:class:`ProgressRenderer` is fed :mod:`netota_daemon.engine.events` objects (by ``netota flash``
directly, by the daemon client from its event stream) and writes to a text stream, normally stderr.
On a terminal it redraws one line; elsewhere (a log file, a pipe) it writes a plain line per phase
and per 10 % step, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from netota_daemon.engine.events import Finished, JobEvent, PhaseChanged, Progress
from netota_daemon.engine.outcome import Phase

BAR_WIDTH = 24
#: A terminal line is redrawn at most this often (seconds).
REDRAW_INTERVAL = 0.1

PHASE_LABELS = {
    Phase.DETECT: "detect",
    Phase.PHASE1: "phase 1/2",
    Phase.REBOOT: "reboot",
    Phase.PHASE2: "phase 2/2",
    Phase.VERIFY: "verify",
    Phase.DONE: "done",
}


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """75 -> '1:15'; 3700 -> '1:01:40'."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_line(event: Progress) -> str:
    """One progress line (no newline), e.g.
    ``phase 2/2 [##########--------------]  41.7%  83.3 KiB/200.0 KiB  1.2 MiB/s  ETA 0:03  device 40%``."""
    filled = int(BAR_WIDTH * min(event.percent, 100.0) / 100.0)
    bar = "#" * filled + "-" * (BAR_WIDTH - filled)
    done_bytes = event.total_bytes * min(event.percent, 100.0) / 100.0
    parts = [
        f"{PHASE_LABELS.get(event.phase, event.phase.value)} [{bar}] {event.percent:5.1f}%",
        f"{format_bytes(done_bytes)}/{format_bytes(event.total_bytes)}",
        f"{format_bytes(event.rate)}/s",
    ]
    remaining = event.total_bytes - done_bytes
    if event.rate > 0 and remaining > 0:
        parts.append(f"ETA {format_duration(remaining / event.rate)}")
    elif remaining <= 0:
        parts.append("ETA 0:00")
    else:
        parts.append("ETA --:--")
    parts.append(f"device {event.device_percent}%")
    if event.point_of_no_return:
        parts.append("(no return)")
    return "  ".join(parts)


class ProgressRenderer:
    """Writes a job's events to ``stream``; call it (or :meth:`handle`) with each event."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.clock = clock
        self._line_open = False
        self._last_draw = float("-inf")
        self._last_step: tuple[Phase, int] | None = None
        self._no_return_told = False
        self._last_line = ""

    def __call__(self, event: JobEvent) -> None:
        self.handle(event)

    def handle(self, event: JobEvent) -> None:
        if isinstance(event, PhaseChanged):
            self._end_line()
            label = PHASE_LABELS.get(event.phase, event.phase.value)
            self._write_line(f"{label}: {event.message}" if event.message else label)
        elif isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, Finished):
            self._end_line()

    def _progress(self, event: Progress) -> None:
        if event.point_of_no_return and not self._no_return_told:
            self._no_return_told = True
            self._end_line()
            self._write_line(
                "point of no return: the loader is rewriting flash; do not power the device off"
            )
        line = progress_line(event)
        if self.interactive:
            now = self.clock()
            if now - self._last_draw < REDRAW_INTERVAL and event.percent < 100.0:
                self._last_line = line
                return
            self._last_draw = now
            padding = " " * max(0, len(self._last_line) - len(line)) if self._line_open else ""
            self.stream.write("\r" + line + padding)
            self.stream.flush()
            self._line_open = True
            self._last_line = line
        else:
            step = (event.phase, int(event.percent // 10))
            if step != self._last_step:
                self._last_step = step
                self._write_line(line)

    def _write_line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _end_line(self) -> None:
        if self._line_open:
            if self._last_line:
                self.stream.write("\r" + self._last_line)
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False
