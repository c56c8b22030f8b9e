"""What a person sees while a device is flashed: a line per job, fitted to the terminal.

:class:`JobView` turns a job's events (:mod:`netota_daemon.engine.events`) into what its line shows:
the phase ("phase 2", :func:`~netota_daemon.engine.outcome.phase_label`), one percentage that only
moves forward within a phase, and then, by state:

- transferring: a bar, the bytes the percentage is based on (``done_bytes``/``total_bytes``), the
  rate, an ETA only when the event carries one, the device's own percentage;
- the device working (after netota's last reply, before its OK): "device working: erasing flash"
  and how long it has been at it, never a full bar with an ETA;
- done; or, while the engine waits for the device, "connecting (attempt 3, last: connection refused)".

Each piece is a :class:`Field` with a rank: a narrow terminal drops the least useful first (bytes
served, the device's percentage, the rate, the bytes, the bar, the ETA), and cuts what is left
rather than wrap. The point of no return is a line of its own, red (bold without colour).

:class:`ProgressRenderer` draws one job (``netota flash``, ``upgrade --wait``, ``watch JOB``) and
:class:`DeviceBoard` several, a line per device (``watch``, ``upgrade --wait`` with several). On a
terminal they redraw in place, read the terminal's width at every redraw, and with a reactor also
redraw every second (so a resize, or the time the device has been working, shows without an event).
Elsewhere (a log, a pipe, ``| tee``) they write plain lines, never a carriage return or an escape:
one per phase change, per 10 %, per change of state, each with the time.

Colour is used only on a terminal, and never with ``NO_COLOR`` set or ``--no-color``.
"""

from __future__ import annotations

import io
import os
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from netota_daemon.cli.text import format_bytes, format_duration, human_text
from netota_daemon.engine.events import Finished, JobEvent, PhaseChanged, Progress, TransferState, Waiting
from netota_daemon.engine.outcome import Phase, phase_label

#: A terminal line is redrawn at most this often (seconds), except when what it says changes.
REDRAW_INTERVAL = 0.1
#: With a reactor, a terminal's lines are redrawn this often (seconds) even without events.
TICK_INTERVAL = 1.0
#: The bar's inner width: a quarter of the line, within BAR_MIN..BAR_MAX (the same on every redraw
#: of a terminal of one width, so it does not jump as other fields come and go).
BAR_MIN = 10
BAR_MAX = 30
#: Width assumed when the output is not a terminal (and $COLUMNS does not say).
LOG_WIDTH = 120
SEPARATOR = "  "
_UP = "\x1b[{}F"  # to the start of the line N lines up
_ERASE_LINE = "\x1b[2K"
_ERASE_BELOW = "\x1b[J"

NO_RETURN_TEXT = (
    "point of no return: do not power the device off until the upgrade ends (the loader is rewriting its flash)"
)

# Ranks: a narrow line drops the lowest first; ESSENTIAL fields (the phase, the percent, what the
# device or the engine is doing) are never dropped, only cut at the end of the line.
ESSENTIAL = 100
RANK_STATE = ESSENTIAL  # "device working: ...", "connecting (...)", "done"
RANK_PERCENT = ESSENTIAL
RANK_ELAPSED = 85
RANK_NO_RETURN = 80
RANK_ETA = 70
RANK_BAR = 60
RANK_BYTES = 50
RANK_RATE = 40
RANK_DEVICE = 30
RANK_MESSAGE = 20
RANK_SERVED = 10


# ---------------------------------------------------------------- the output


def colour_wanted(stream: Any, no_color: bool = False, environ: Mapping[str, str] | None = None) -> bool:
    """Colour on ``stream``: only a terminal, and not with ``--no-color``, a non-empty ``NO_COLOR``
    (no-color.org) or ``TERM=dumb``."""
    env = os.environ if environ is None else environ
    if no_color or env.get("NO_COLOR") or env.get("TERM") == "dumb":
        return False
    return _isatty(stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def terminal_width(stream: Any, fallback: int = 80, environ: Mapping[str, str] | None = None) -> int:
    """The width of the terminal ``stream`` writes to, read now (so it follows resizes); else
    ``$COLUMNS``; else ``fallback``."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
        if columns > 0:
            return columns
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        pass
    env = os.environ if environ is None else environ
    try:
        columns = int(env.get("COLUMNS", ""))
        if columns > 0:
            return columns
    except ValueError:
        pass
    return fallback


def terminal_height(stream: Any, fallback: int = 24) -> int:
    try:
        lines = os.get_terminal_size(stream.fileno()).lines
        return lines if lines > 0 else fallback
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return fallback


class Style:
    """Escape sequences for a terminal: ``alert`` is red and bold with colour, bold without; nothing
    at all when not a terminal."""

    def __init__(self, terminal: bool, colour: bool) -> None:
        self.terminal = terminal
        self.colour = colour and terminal

    def alert(self, text: str) -> str:
        if self.colour:
            return f"\x1b[1;31m{text}\x1b[0m"
        if self.terminal:
            return f"\x1b[1m{text}\x1b[0m"
        return text


# ---------------------------------------------------------------- fitting a line


@dataclass(frozen=True)
class Field:
    """One piece of a line. ``rank``: the higher, the longer it stays as the line narrows. A bar
    field (``bar`` is its fill, 0..1) is as wide as :func:`bar_width` says for the line."""

    text: str
    rank: int
    alert: bool = False
    bar: float | None = None


#: The end of a field cut to fit the line.
CUT = "..."


def bar_width(width: int) -> int:
    """The inner width of a bar on a line of ``width`` columns."""
    return min(BAR_MAX, max(BAR_MIN, width // 4))


def fit(fields: list[Field], width: int, cut: bool = True) -> list[tuple[str, Field]]:
    """The fields that fit in ``width`` columns (joined by two spaces), each with its text as drawn:
    the lowest-ranked are dropped first; if the essential ones alone are too long, they are cut
    (unless ``cut`` is false: a log wraps them instead)."""
    width = max(1, width)
    inner = bar_width(width)
    kept = [f for f in fields if f.text or f.bar is not None]

    def needed(chosen: list[Field]) -> int:
        widths = (inner + 2 if f.bar is not None else len(f.text) for f in chosen)
        return sum(widths) + len(SEPARATOR) * max(0, len(chosen) - 1)

    while needed(kept) > width:
        droppable = [f for f in kept if f.rank < ESSENTIAL]
        if not droppable:
            break
        lowest = min(droppable, key=lambda f: f.rank)
        kept.remove(lowest)
    drawn: list[tuple[str, Field]] = []
    for f in kept:
        if f.bar is not None:
            filled = int(inner * min(max(f.bar, 0.0), 1.0))
            drawn.append(("[" + "#" * filled + "-" * (inner - filled) + "]", f))
        else:
            drawn.append((f.text, f))
    # Still too long (a narrow terminal, a long activity text): cut from the end, never wrap.
    if not cut:
        return drawn
    total = sum(len(text) for text, _ in drawn) + len(SEPARATOR) * max(0, len(drawn) - 1)
    while total > width and drawn:
        text, f = drawn[-1]
        excess = total - width
        if len(text) > excess:
            room = len(text) - excess
            # Cut text says so ("..."), where there is room for it and a word before it.
            drawn[-1] = (text[: room - len(CUT)] + CUT if room > 2 * len(CUT) else text[:room], f)
            break
        drawn.pop()
        total = sum(len(t) for t, _ in drawn) + len(SEPARATOR) * max(0, len(drawn) - 1)
    return drawn


def render(drawn: list[tuple[str, Field]], style: Style) -> str:
    return SEPARATOR.join(style.alert(text) if f.alert else text for text, f in drawn)


def fitted(fields: list[Field], width: int, style: Style) -> str:
    return render(fit(fields, width), style)


def wrapped(text: str, width: int, style: Style, alert: bool = False, indent: str = "") -> list[str]:
    """A notice (written once, never redrawn) on as many lines of ``width`` as it needs, at word
    boundaries; lines after the first start with ``indent``."""
    lines = textwrap.wrap(text, max(1, width), subsequent_indent=indent) or [""]
    return [style.alert(line) if alert else line for line in lines]


# ---------------------------------------------------------------- one job's state


@dataclass(frozen=True)
class Notice:
    """A line of its own, above the bar: a phase change, or the point of no return (``alert``)."""

    text: str
    alert: bool = False


class JobView:
    """What one job's line shows, from its events; no I/O. ``update`` returns the notices an event
    gives (a phase change, the point of no return)."""

    def __init__(self) -> None:
        self.phase: Phase | None = None
        self.message = ""
        self.progress: Progress | None = None
        self.percent = 0.0  # the highest percent of this phase: what is shown never goes back
        self.waiting: Waiting | None = None
        self.working_since: float | None = None
        self.no_return = False
        self.finished = False

    def _enter(self, phase: Phase, message: str = "") -> None:
        self.phase = phase
        self.message = message
        self.progress = None
        self.percent = 0.0
        self.waiting = None
        self.working_since = None

    def update(self, event: JobEvent, now: float) -> list[Notice]:
        notices: list[Notice] = []
        if isinstance(event, PhaseChanged):
            if event.phase is self.phase:  # announced again (a retry): what was shown stays
                self.message, self.waiting = human_text(event.message), None
            else:
                self._enter(event.phase, human_text(event.message))
            label = phase_label(event.phase)
            notices.append(Notice(f"{label}: {self.message}" if self.message else label))
        elif isinstance(event, Waiting):
            if event.phase is not self.phase:
                self._enter(event.phase)
            self.waiting = event
        elif isinstance(event, Progress):
            if event.phase is not self.phase:
                self._enter(event.phase)
            working = event.state is TransferState.DEVICE_WORKING
            if working and self.working_since is None:
                self.working_since = now
            elif not working:
                self.working_since = None
            self.progress = event
            self.waiting = None
            self.percent = max(self.percent, min(max(event.percent, 0.0), 100.0))
            if event.point_of_no_return and not self.no_return:
                self.no_return = True
                notices.append(Notice(NO_RETURN_TEXT, alert=True))
        elif isinstance(event, Finished):
            self.finished = True
        return notices

    @property
    def state(self) -> tuple[Any, ...]:
        """What the line says, coarsely: a change of it is drawn at once, and logged off a terminal
        (a phase, a state, each 10 % step, each wait)."""
        if self.waiting is not None:
            return (self.phase, "waiting", self.waiting.message, self.waiting.last_error)
        if self.progress is None:
            return (self.phase, None)
        return (self.phase, self.progress.state, int(self.percent // 10), self.no_return)

    def fields(self, now: float) -> list[Field]:
        if self.phase is None:
            return []
        fields = [Field(phase_label(self.phase), ESSENTIAL)]
        if self.waiting is not None:
            fields.append(Field(waiting_text(self.waiting), RANK_STATE))
            return fields
        p = self.progress
        if p is None:
            if self.message:
                fields.append(Field(self.message, RANK_MESSAGE))
            return fields
        percent = Field(f"{self.percent:.1f}%", RANK_PERCENT)
        no_return = Field("no return", RANK_NO_RETURN, alert=True) if self.no_return else None
        device = Field(f"device {p.device_percent}%", RANK_DEVICE)
        if p.state is TransferState.DEVICE_WORKING:
            fields += [percent, Field(f"device working: {p.activity or 'the device is busy'}", RANK_STATE)]
            if self.working_since is not None and now - self.working_since >= 1.0:
                fields.append(Field(format_duration(now - self.working_since), RANK_ELAPSED))
            fields.append(device)
        elif p.state is TransferState.DONE:
            fields += [Field("", RANK_BAR, bar=1.0), percent, Field("done", RANK_STATE)]
            if p.total_bytes:
                fields.append(Field(format_bytes(p.total_bytes), RANK_BYTES))
        else:
            fields += [Field("", RANK_BAR, bar=self.percent / 100.0), percent]
            if p.basis == "header":
                fields.append(Field("reading the image header", RANK_BYTES))
            elif p.total_bytes and (p.done_bytes or not p.percent) and p.percent >= self.percent:
                # (Not bytes that contradict the percent shown: behind it, or none from an engine
                # that does not count them.)
                fields.append(Field(f"{format_bytes(p.done_bytes)}/{format_bytes(p.total_bytes)}", RANK_BYTES))
            if p.rate > 0:
                fields.append(Field(f"{format_bytes(p.rate)}/s", RANK_RATE))
            if p.eta is not None:
                fields.append(Field(f"ETA {format_duration(p.eta)}", RANK_ETA))
            fields.append(device)
        if no_return is not None:
            fields.append(no_return)
        if p.bytes_served and p.bytes_served != p.done_bytes:
            fields.append(Field(f"served {format_bytes(p.bytes_served)}", RANK_SERVED))
        return fields


def waiting_text(event: Waiting) -> str:
    """'connecting (attempt 3, last: connection refused)'."""
    text = human_text(event.message) or "connecting"
    details = []
    if event.attempt:
        details.append(f"attempt {event.attempt}")
    if event.last_error:
        details.append(f"last: {human_text(event.last_error)}")
    return f"{text} ({', '.join(details)})" if details else text


# ---------------------------------------------------------------- one job


Width = int | Callable[[], int] | None


class ProgressRenderer:
    """Draws one job's events on ``stream`` (normally stderr); call it (or :meth:`handle`) with each.

    ``interactive``: a terminal (redraw one line) or not (plain timestamped lines); the stream's
    own ``isatty()`` when None. ``width``: columns, or a function read at every redraw (the
    terminal's own when None). ``colour``: None decides from the stream and ``NO_COLOR``.
    ``reactor``: when given, a terminal line is redrawn every TICK_INTERVAL. ``prefix`` starts
    every line (a device's name on a log)."""

    def __init__(
        self,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        width: Width = None,
        colour: bool | None = None,
        reactor: IReactorTime | None = None,
        wall: Callable[[], float] = time.time,
        prefix: str = "",
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = _isatty(self.stream) if interactive is None else interactive
        self.clock = clock
        self.wall = wall
        self.prefix = prefix
        self._width = width
        self.style = Style(self.interactive, colour_wanted(self.stream) if colour is None else colour)
        self.view = JobView()
        self._line_open = False
        self._last_draw = float("-inf")
        self._drawn_state: tuple[Any, ...] | None = None
        self._logged_state: tuple[Any, ...] | None = None
        self._last_wait_log = float("-inf")
        self._ticker: LoopingCall | None = None
        if reactor is not None and self.interactive:
            self._ticker = LoopingCall(self.redraw)
            self._ticker.clock = reactor

    def __call__(self, event: JobEvent) -> None:
        self.handle(event)

    def width(self) -> int:
        if callable(self._width):
            return self._width()
        if self._width is not None:
            return self._width
        return terminal_width(self.stream) if self.interactive else terminal_width(None, LOG_WIDTH)

    def handle(self, event: JobEvent) -> None:
        now = self.clock()
        if self.interactive and (
            isinstance(event, (PhaseChanged, Finished))
            or getattr(event, "phase", self.view.phase) is not self.view.phase
        ):
            self._end_line()  # the last state of a phase stays on the screen, as its record
        notices = self.view.update(event, now)
        if isinstance(event, Finished):
            self.close()
            return
        if self.interactive:
            if notices and self._line_open:
                self.stream.write("\r" + _ERASE_LINE)  # the notice takes the bar's place; the bar follows
                self._line_open = False
            for notice in notices:
                for line in wrapped(notice.text, self._room(), self.style, notice.alert, indent="  "):
                    self._write(self.prefix + line)
            state = self.view.state
            due = now - self._last_draw >= REDRAW_INTERVAL or state != self._drawn_state or bool(notices)
            if due and not isinstance(event, PhaseChanged):  # a phase's notice says all there is yet
                self._draw(now)
        else:
            for notice in notices:
                self._log(notice.text, wrap=True)
            self._log_state(event, now)

    def redraw(self) -> None:
        """Draw the line again now (the ticker, a resize)."""
        if self._line_open:
            self._draw(self.clock())

    def close(self) -> None:
        """End the line (the job ended, or the display is no longer needed)."""
        self._end_line()
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()

    # ----- a terminal

    def _room(self) -> int:
        # One column spare: a line exactly as wide as the terminal leaves the cursor past its edge.
        return max(1, self.width() - 1 - len(self.prefix))

    def _draw(self, now: float) -> None:
        fields = self.view.fields(now)
        if not fields:
            return
        self.stream.write("\r" + _ERASE_LINE + self.prefix + fitted(fields, self._room(), self.style))
        self.stream.flush()
        self._line_open = True
        self._last_draw = now
        self._drawn_state = self.view.state
        if self._ticker is not None and not self._ticker.running:
            self._ticker.start(TICK_INTERVAL, now=False)

    def _end_line(self) -> None:
        if self._line_open:
            self._draw(self.clock())  # the latest state, which the throttle may have held back
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    # ----- a log

    def _log(self, text: str, wrap: bool = False) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.wall()))
        head = f"{stamp} {self.prefix}"
        if not wrap:
            self._write(head + text)
            return
        lines = wrapped(text, max(20, self.width() - len(head)), self.style, indent="  ")
        self._write(head + lines[0])
        for line in lines[1:]:
            self._write(" " * len(head) + line)

    def _log_state(self, event: JobEvent, now: float) -> None:
        state = self.view.state
        if isinstance(event, Waiting):
            # Each attempt when it says something new, else at most one line every 5 s.
            if state == self._logged_state and now - self._last_wait_log < 5.0:
                return
            self._last_wait_log = now
        elif state == self._logged_state or isinstance(event, PhaseChanged):
            return
        self._logged_state = state
        fields = [f for f in self.view.fields(now) if f.bar is None]  # no bars in a log
        stamp_room = len("00:00:00 ") + len(self.prefix)
        kept = fit(fields, max(20, self.width() - stamp_room), cut=False)
        self._log(render(kept, self.style), wrap=True)


# ---------------------------------------------------------------- several jobs


class DeviceBoard:
    """One line per device, for following several jobs at once (``watch`` without a job,
    ``upgrade --wait`` with several devices).

    On a terminal it keeps a block of lines, one per device, redrawn in place (at most every
    REDRAW_INTERVAL, at once when a line's state changes) and fitted to the width read at each
    redraw; other text (the point of no return of a device) is printed above the block. Elsewhere
    (a log, a pipe) each device's lines are written as :class:`ProgressRenderer` writes them,
    prefixed with the device."""

    def __init__(
        self,
        out: TextIO,
        interactive: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        size: tuple[int, int] | Callable[[], tuple[int, int]] | None = None,
        colour: bool | None = None,
        reactor: IReactorTime | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.out = out
        self.interactive = _isatty(out) if interactive is None else interactive
        self.clock = clock
        self.wall = wall
        self.size = size  # (columns, lines), or a function giving them; the terminal's own when None
        self.colour = colour_wanted(out) if colour is None else colour
        self.style = Style(self.interactive, self.colour)
        self._texts: dict[str, str] = {}  # device -> a line of text (a state, an outcome)
        self._views: dict[str, JobView] = {}  # device -> its job's view while it has one
        self._drawn = 0  # lines of the block now on the screen
        self._drawn_states: dict[str, tuple[Any, ...]] = {}
        self._last_draw = float("-inf")
        self._logs: dict[str, ProgressRenderer] = {}  # device -> its prefixed log (not interactive)
        self._ticker: LoopingCall | None = None
        if reactor is not None and self.interactive:
            self._ticker = LoopingCall(self.redraw)
            self._ticker.clock = reactor

    def _size(self) -> tuple[int, int]:
        if callable(self.size):
            return self.size()
        if self.size is not None:
            return self.size
        return terminal_width(self.out), terminal_height(self.out)

    def set(self, device: str, text: str) -> None:
        """Show ``text`` as ``device``'s line (a state, an outcome), at once."""
        if self.interactive:
            self._views.pop(device, None)
            self._texts[device] = human_text(text)
            self._draw()
        else:
            self._log(f"{device}: {human_text(text)}", wrap=True)

    def handle(self, device: str, event: JobEvent, label: str | None = None) -> None:
        """An event of ``device``'s job (``label`` prefixes its lines on a log)."""
        if not self.interactive:
            log = self._logs.get(device)
            if log is None:
                log = self._logs[device] = ProgressRenderer(
                    self.out,
                    interactive=False,
                    clock=self.clock,
                    wall=self.wall,
                    width=None if self.size is None else lambda: self._size()[0],
                    prefix=f"{label or device}: ",
                )
            log.handle(event)
            return
        view = self._views.get(device)
        if view is None:
            view = self._views[device] = JobView()
            self._texts.setdefault(device, "")
        now = self.clock()
        notices = view.update(event, now)
        for notice in notices:
            if notice.alert:
                self.message(f"{device}: {notice.text}", alert=True)
        changed = view.state != self._drawn_states.get(device)
        if changed or notices or now - self._last_draw >= REDRAW_INTERVAL:
            self._draw()

    def end(self, device: str, text: str) -> None:
        """``device``'s job ended: its line (or its log) says how; a next job starts a new log."""
        self._logs.pop(device, None)
        self.set(device, text)

    def message(self, text: str, alert: bool = False) -> None:
        """A line that is not a device's (wrapped if need be): above the block on a terminal."""
        if self.interactive:
            width = self._size()[0]
            lines = wrapped(human_text(text), max(1, width - 1), self.style, alert, indent="  ")
            if self._drawn:
                self.out.write(_UP.format(self._drawn) + _ERASE_BELOW)
                self._drawn = 0
            self.out.write("".join(line + "\n" for line in lines))
            self._draw()
        else:
            self._log(human_text(text), wrap=True)

    def redraw(self) -> None:
        if self.interactive and self._drawn:
            self._draw()

    def close(self) -> None:
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()

    def _log(self, text: str, wrap: bool = False) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(self.wall()))
        width = self._size()[0] if self.size is not None else terminal_width(None, LOG_WIDTH)
        lines = wrapped(text, max(20, width - len(stamp) - 1), self.style, indent="  ") if wrap else [text]
        self.out.write(f"{stamp} {lines[0]}\n" + "".join(" " * (len(stamp) + 1) + line + "\n" for line in lines[1:]))
        self.out.flush()

    def _line(self, device: str, name_width: int, width: int, now: float) -> str:
        name = Field(device[:name_width].ljust(name_width), ESSENTIAL)
        view = self._views.get(device)
        if view is not None and view.phase is not None:
            fields = [name, *view.fields(now)]
        else:
            fields = [name, Field(self._texts.get(device, ""), RANK_STATE)]
        return fitted(fields, width, self.style)

    def _draw(self) -> None:
        now = self.clock()
        self._last_draw = now
        width, height = self._size()
        devices = list(self._texts)
        # The names' column: as wide as the longest name, but at most a quarter of the line.
        name_width = min(max((len(d) for d in devices), default=0), max(8, width // 4))
        room = max(2, height - 1)  # the cursor can't go back up past the top of the screen
        shown = devices if len(devices) <= room else devices[: room - 1]
        lines = [self._line(d, name_width, max(1, width - 1), now) for d in shown]
        if len(devices) > len(shown):
            more = f"... and {len(devices) - len(shown)} more devices (netota devices)"
            lines.append(more[: max(1, width - 1)])
        parts = [_UP.format(self._drawn)] if self._drawn else []
        for line in lines:
            parts.append(_ERASE_LINE + line + "\n")
        if len(lines) < self._drawn:
            parts.append(_ERASE_BELOW)
        self.out.write("".join(parts))
        self.out.flush()
        self._drawn = len(lines)
        self._drawn_states = {d: v.state for d, v in self._views.items()}
        if self._ticker is not None and not self._ticker.running:
            self._ticker.start(TICK_INTERVAL, now=False)
