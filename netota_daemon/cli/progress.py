"""The progress display of upgrades on a terminal: phase, percent, bytes, rate and ETA.

:class:`ProgressRenderer` draws one upgrade: it is fed :mod:`netota_daemon.engine.events` objects
(by ``netota flash`` directly, by the daemon client from its event stream) and writes to a text
stream, normally stderr. On a terminal it redraws one line; elsewhere (a log file, a pipe) it writes
a plain line per phase and per 10 % step, so logs stay readable. :class:`DeviceBoard` draws several
at once, a line per device (``netota watch``, ``netota upgrade --wait`` with several devices).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

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
    seconds = max(0, round(seconds))
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
            self._write_line("point of no return: the loader is rewriting flash; do not power the device off")
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


class _PrefixedLines:
    """A text stream that starts every line with a prefix (one device's lines on a log)."""

    def __init__(self, out: TextIO, prefix: str) -> None:
        self.out = out
        self.prefix = prefix
        self._at_line_start = True

    def write(self, text: str) -> int:
        for piece in text.splitlines(keepends=True):
            if self._at_line_start:
                self.out.write(self.prefix)
            self.out.write(piece)
            self._at_line_start = piece.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return False


#: ANSI sequences the board uses on a terminal: to the start of the line N lines up, erase the
#: line, erase to the end of the screen.
_UP = "\x1b[{}F"
_ERASE_LINE = "\x1b[2K"
_ERASE_BELOW = "\x1b[J"


class DeviceBoard:
    """One progress bar per device, for following several jobs at once (``watch`` without a job,
    ``upgrade --wait`` with several devices).

    On a terminal it keeps a block of lines, one per device, and redraws it in place (at most every
    REDRAW_INTERVAL, at once for a phase change or an end); other text is printed above the block.
    Elsewhere (a log, a pipe) each device's lines are written as they come, prefixed with a label,
    a line per phase and per 10 % step, as ``netota flash`` does on a log.
    """

    def __init__(
        self,
        out: TextIO,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.out = out
        self.interactive = out.isatty() if interactive is None else interactive
        self.clock = clock
        self.size = size  # (columns, lines); the terminal's own when None
        self._lines: dict[str, str] = {}  # device -> its current line (interactive)
        self._drawn = 0  # lines of the block now on the screen
        self._last_draw = float("-inf")
        self._logs: dict[str, ProgressRenderer] = {}  # device -> its prefixed log (not interactive)

    def set(self, device: str, text: str) -> None:
        """Show ``text`` as ``device``'s line (a state, an outcome), at once."""
        if self.interactive:
            self._lines[device] = f"{device}  {text}"
            self._draw()
        else:
            self.out.write(f"{device}: {text}\n")
            self.out.flush()

    def handle(self, device: str, event: JobEvent, label: str | None = None) -> None:
        """A phase change or progress of ``device``'s job (``label`` prefixes its lines on a log)."""
        if not self.interactive:
            log = self._logs.get(device)
            if log is None:
                log = self._logs[device] = ProgressRenderer(
                    _PrefixedLines(self.out, f"{label or device}: "), interactive=False
                )
            log.handle(event)
            return
        if isinstance(event, PhaseChanged):
            text = f"{PHASE_LABELS.get(event.phase, event.phase.value)}: {event.message}".rstrip(": ")
            self._lines[device] = f"{device}  {text}"
            self._draw()
        elif isinstance(event, Progress):
            self._lines[device] = f"{device}  {progress_line(event)}"
            now = self.clock()
            if now - self._last_draw >= REDRAW_INTERVAL or event.percent >= 100.0 or event.point_of_no_return:
                self._draw()

    def end(self, device: str, text: str) -> None:
        """``device``'s job ended: its line (or its log) says how; a next job starts a new log."""
        self._logs.pop(device, None)
        self.set(device, text)

    def message(self, text: str) -> None:
        """A line of text that is not any device's: above the block on a terminal."""
        if self.interactive and self._drawn:
            self.out.write(_UP.format(self._drawn) + _ERASE_BELOW)
            self._drawn = 0
            self.out.write(text + "\n")
            self._draw()
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def _draw(self) -> None:
        self._last_draw = self.clock()
        width, height = self.size or shutil.get_terminal_size()
        lines = list(self._lines.values())
        room = max(2, height - 1)  # the cursor can't go back up past the top of the screen
        if len(lines) > room:
            lines = [*lines[: room - 1], f"... and {len(lines) - room + 1} more devices (netota devices)"]
        parts = [_UP.format(self._drawn)] if self._drawn else []
        for line in lines:
            # Cut to the terminal's width: a wrapped line would throw the cursor arithmetic off.
            parts.append(_ERASE_LINE + line[: max(1, width - 1)] + "\n")
        if len(lines) < self._drawn:
            parts.append(_ERASE_BELOW)
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(lines)
