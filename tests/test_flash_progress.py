"""The progress display of one job (``netota flash``, ``upgrade --wait``, ``watch JOB``): what a
person sees on a terminal of 60, 80 and 200 columns, and what a log gets."""

from __future__ import annotations

import io
import re

import pytest
from twisted.internet.task import Clock

from netota_daemon.cli.progress import (
    ESSENTIAL,
    NO_RETURN_TEXT,
    Field,
    JobView,
    ProgressRenderer,
    colour_wanted,
    fit,
    waiting_text,
)
from netota_daemon.cli.text import format_bytes, format_duration
from netota_daemon.engine.events import Finished, PhaseChanged, Progress, TransferState, Waiting
from netota_daemon.engine.outcome import Outcome, OutcomeKind, Phase
from tests.terminal import Screen

IMAGE = 300_000
WORKING = TransferState.DEVICE_WORKING
DONE = TransferState.DONE


def progress(
    phase: Phase,
    percent: float,
    state: TransferState = TransferState.TRANSFERRING,
    eta: float | None = None,
    no_return: bool = False,
    activity: str = "",
    served: int | None = None,
    device: int = 0,
    rate: float = 40_000.0,
    basis: str = "offset",
) -> Progress:
    done = int(IMAGE * percent / 100)
    return Progress(
        phase=phase,
        bytes_served=done if served is None else served,
        total_bytes=IMAGE,
        percent=percent,
        device_percent=device,
        rate=rate,
        point_of_no_return=no_return,
        done_bytes=done,
        basis=basis,
        state=state,
        activity=activity,
        eta=eta,
    )


def an_upgrade() -> list:
    """A whole single-backup upgrade as the engine reports it, with the awkward parts: connection
    attempts, the device writing after the last reply, a phase-2 percent that would go back at the
    point of no return (13.6 % -> 0 %), bytes served beyond the image."""
    return [
        PhaseChanged(Phase.DETECT, "reading the description document"),
        PhaseChanged(Phase.PHASE1, "main firmware: the device reads the update loader"),
        Waiting(Phase.PHASE1, "connecting", 1, None),
        Waiting(Phase.PHASE1, "connecting", 2, "connection refused"),
        progress(Phase.PHASE1, 0.0),
        progress(Phase.PHASE1, 10.0, eta=9.0, device=9),
        progress(Phase.PHASE1, 34.5, eta=6.0, device=33),
        progress(Phase.PHASE1, 71.0, eta=2.0, device=70),
        progress(Phase.PHASE1, 99.0, WORKING, activity="writing the update loader", device=1),
        progress(Phase.PHASE1, 99.0, WORKING, activity="writing the update loader", device=1),
        progress(Phase.PHASE1, 100.0, DONE, device=100),
        PhaseChanged(Phase.REBOOT, "waiting for the update loader"),
        PhaseChanged(Phase.PHASE2, "update loader: rewriting flash"),
        progress(Phase.PHASE2, 0.0, basis="header"),
        progress(Phase.PHASE2, 13.6, served=60_000),
        progress(Phase.PHASE2, 0.0, no_return=True, served=70_000),  # the old engine's step back
        progress(Phase.PHASE2, 20.0, eta=8.0, no_return=True, served=130_000, device=19),
        progress(Phase.PHASE2, 65.0, eta=3.0, no_return=True, served=300_000, device=64),
        progress(Phase.PHASE2, 99.5, WORKING, no_return=True, activity="erasing flash", served=450_076),
        progress(Phase.PHASE2, 100.0, DONE, no_return=True, served=450_076, device=100),
        PhaseChanged(Phase.VERIFY, "waiting for the new firmware"),
        Finished(Outcome(OutcomeKind.SUCCEEDED, "upgraded", Phase.DONE)),
    ]


def render(width: int, interactive: bool, colour: bool = False, events: list | None = None) -> str:
    out = io.StringIO()
    now = [0.0]
    renderer = ProgressRenderer(
        out, interactive=interactive, clock=lambda: now[0], width=width, colour=colour, wall=lambda: 1e9 + now[0]
    )
    for event in events or an_upgrade():
        now[0] += 0.5  # every event is drawn: none falls inside the redraw interval
        renderer(event)
    return out.getvalue()


def logical_lines(log: str) -> list[str]:
    """A log's lines with the continuation lines of a wrapped one joined back to it."""
    lines: list[str] = []
    for line in log.splitlines():
        if line.startswith(" ") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


PERCENT = re.compile(r"^(phase \d|upload)\s.*?(\d+\.\d)%")


def percents_by_phase(lines: list[str]) -> dict[str, list[float]]:
    shown: dict[str, list[float]] = {}
    for line in lines:
        m = PERCENT.search(re.sub(r"^\d\d:\d\d:\d\d ", "", line))
        if m:
            shown.setdefault(m.group(1), []).append(float(m.group(2)))
    return shown


@pytest.mark.parametrize("width", [60, 80, 200])
def test_on_a_terminal_every_line_fits_and_tells_the_truth(width):
    screen = Screen(width).feed(render(width, interactive=True))
    drawn = screen.drawn
    assert not screen.overflows
    assert all(len(line) < width for line in drawn), [line for line in drawn if len(line) >= width]
    shown = percents_by_phase(drawn)
    for phase, values in shown.items():
        assert values == sorted(values), (phase, values)  # never backwards within a phase
    assert max(shown["phase 2"]) == 100.0 and 0.0 not in shown["phase 2"][shown["phase 2"].index(13.6) :]
    # The device working: its own display, no bar and no ETA.
    working = [line for line in drawn if "device working: erasing flash" in line]
    assert working and all("ETA" not in line and "[" not in line for line in working)
    assert any("device working: writing the update loader" in line for line in drawn)
    # The point of no return: a line of its own, whole (wrapped if need be, never cut).
    assert " ".join(line.strip() for line in screen.shown).count(NO_RETURN_TEXT) == 1
    # Connection attempts.
    assert any("connecting (attempt 2, last: connection refused)" in line for line in drawn)
    # An ETA only where the event had one.
    assert not [line for line in drawn if "phase 1" in line and "34.5%" not in line and "ETA 0:06" in line]
    # Every phase spelled one way.
    assert not [line for line in drawn if re.search(r"phase\d|phase \d/\d", line)]
    # What stays on the screen: a line per phase and its final state, no half lines.
    assert screen.shown[0] == "detect: reading the description document"
    assert any(line.startswith("phase 1  [") and "100.0%" in line and "done" in line for line in screen.shown)
    assert screen.shown[-1] == "verify: waiting for the new firmware"


@pytest.mark.parametrize("width", [60, 80, 200])
def test_not_a_terminal_writes_plain_timestamped_lines(width):
    text = render(width, interactive=False)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) or line.startswith(" " * 9) for line in lines)
    stamped = [line[9:] for line in logical_lines(text)]
    assert stamped[0] == "detect: reading the description document"
    # One line per phase change, per state and per 10 % step: 0, 10, 34.5, 71 each once.
    phase1 = [line for line in stamped if line.startswith("phase 1  ")]
    assert [re.search(r"(\d+\.\d)%", line).group(1) for line in phase1 if "%" in line] == [
        "0.0",
        "10.0",
        "34.5",
        "71.0",
        "99.0",
        "100.0",
    ]
    assert sum("device working: writing the update loader" in line for line in phase1) == 1
    assert "no return" not in " ".join(phase1)
    for values in percents_by_phase(logical_lines(text)).values():
        assert values == sorted(values)
    joined = " ".join(line.strip() for line in lines)
    assert NO_RETURN_TEXT in joined and "connecting (attempt 2, last: connection refused)" in joined
    assert "[" not in joined  # no bars in a log


def test_the_point_of_no_return_is_red_with_colour_and_bold_without():
    red = render(80, interactive=True, colour=True)
    assert f"\x1b[1;31m{NO_RETURN_TEXT[:20]}" in red
    bold = render(80, interactive=True, colour=False)
    assert "\x1b[1;31m" not in bold and f"\x1b[1m{NO_RETURN_TEXT[:20]}" in bold
    assert "\x1b[1m" not in render(80, interactive=False, colour=True)  # never an escape in a log


def test_colour_follows_no_color_and_the_flag():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert colour_wanted(Tty(), environ={})
    assert not colour_wanted(Tty(), environ={"NO_COLOR": "1"})
    assert colour_wanted(Tty(), environ={"NO_COLOR": ""})  # no-color.org: only a non-empty value
    assert not colour_wanted(Tty(), no_color=True, environ={})
    assert not colour_wanted(Tty(), environ={"TERM": "dumb"})
    assert not colour_wanted(io.StringIO(), environ={})


def test_narrow_lines_drop_the_least_useful_fields_first():
    view = JobView()
    view.update(progress(Phase.PHASE2, 40.0, eta=3.0, no_return=True, served=200_000, device=39), 0.0)
    fields = view.fields(0.0)

    def texts(width: int) -> list[str]:
        return [text for text, _ in fit(fields, width)]

    wide = texts(200)
    assert wide[0] == "phase 2" and wide[2] == "40.0%"
    assert wide[3:] == [
        f"{format_bytes(120_000)}/{format_bytes(IMAGE)}",
        "39.1 KiB/s",
        "ETA 0:03",
        "device 39%",
        "no return",
        f"served {format_bytes(200_000)}",
    ]
    # Dropped in order as the line narrows: served, the device's percent, the rate, the bytes, the
    # bar, the ETA; then what is left is cut.
    assert "device 39%" in texts(120) and not [t for t in texts(120) if t.startswith("served")]
    assert "39.1 KiB/s" in texts(100) and "device 39%" not in texts(100)
    assert texts(79)[2:] == ["40.0%", "117.2 KiB/293.0 KiB", "ETA 0:03", "no return"]
    assert texts(60)[2:] == ["40.0%", "ETA 0:03", "no return"] and texts(60)[1].startswith("[")
    assert texts(40) == ["phase 2", "40.0%", "ETA 0:03", "no return"]
    assert texts(30) == ["phase 2", "40.0%", "no return"]
    assert texts(12) == ["phase 2", "40."]  # cut, never wrapped
    for width in range(1, 120):
        drawn = fit(fields, width)
        assert sum(len(t) for t, _ in drawn) + 2 * (len(drawn) - 1) <= width


def test_the_bar_keeps_its_width_on_one_terminal():
    widths = set()
    for percent, eta in ((1.0, None), (50.0, 12.0), (99.0, 1.0)):
        view = JobView()
        view.update(progress(Phase.PHASE1, percent, eta=eta), 0.0)
        widths |= {len(t) for t, f in fit(view.fields(0.0), 79) if f.bar is not None}
    assert widths == {21}


def test_a_terminal_line_follows_resizes_and_the_device_working_time():
    clock = Clock()
    width = [120]
    out = io.StringIO()
    renderer = ProgressRenderer(out, interactive=True, clock=clock.seconds, width=lambda: width[0], reactor=clock)
    renderer(progress(Phase.PHASE2, 99.0, WORKING, activity="erasing flash", no_return=True))
    clock.advance(1.0)
    width[0] = 40  # the terminal narrows: the next tick draws to the new width, with no event
    clock.advance(1.0)
    screen = Screen(120).feed(out.getvalue())
    assert screen.drawn[-1].endswith("device working: erasing flash  0:01  device 0%  no return")
    assert screen.shown[-1] == "phase 2  99.0%  device working: eras..."  # 39 columns: cut (and says so), not wrapped
    width[0] = 200
    clock.advance(3.0)
    assert (
        Screen(200).feed(out.getvalue()).shown[-1].endswith("device working: erasing flash  0:05  device 0%  no return")
    )
    renderer(Finished(Outcome(OutcomeKind.SUCCEEDED, "ok", Phase.DONE)))
    assert not clock.getDelayedCalls()  # the ticker stops with the job


def test_a_terminal_redraw_is_throttled_but_the_last_state_is_always_drawn():
    out = io.StringIO()
    now = [0.0]
    renderer = ProgressRenderer(out, interactive=True, clock=lambda: now[0], width=100)
    renderer(progress(Phase.PHASE1, 10.0))
    now[0] += 0.01
    renderer(progress(Phase.PHASE1, 11.0))  # too soon after the last draw: held back...
    assert "11.0%" not in out.getvalue()
    now[0] += 0.01
    renderer(progress(Phase.PHASE1, 99.0, WORKING, activity="writing"))  # ...but a new state is drawn at once
    assert "device working: writing" in out.getvalue()
    now[0] += 0.01
    renderer(progress(Phase.PHASE1, 99.5, WORKING, activity="writing"))
    renderer(PhaseChanged(Phase.REBOOT))  # the phase's last state stays on the screen
    assert Screen(100).feed(out.getvalue()).shown == ["phase 1  99.5%  device working: writing  device 0%", "reboot"]


def test_waiting_text_names_the_attempt_and_what_the_last_one_hit():
    assert waiting_text(Waiting(Phase.PHASE1, "connecting", 3, "connection refused")) == (
        "connecting (attempt 3, last: connection refused)"
    )
    assert waiting_text(Waiting(Phase.REBOOT, "", 0, None)) == "connecting"
    assert waiting_text(Waiting(Phase.VERIFY, "waiting for the new firmware", 2, None)) == (
        "waiting for the new firmware (attempt 2)"
    )


def test_a_log_writes_each_connection_attempt_that_says_something_new():
    out = io.StringIO()
    now = [0.0]
    renderer = ProgressRenderer(out, interactive=False, clock=lambda: now[0], width=100, wall=lambda: 0.0)
    for attempt in range(1, 12):
        now[0] += 1.0
        renderer(Waiting(Phase.PHASE1, "connecting", attempt, None if attempt == 1 else "connection refused"))
    lines = [line[9:] for line in out.getvalue().splitlines()]
    # The first, the first with an error, then one every 5 s: never 30 s of silence, never a flood.
    assert lines == [
        "phase 1  connecting (attempt 1)",
        "phase 1  connecting (attempt 2, last: connection refused)",
        "phase 1  connecting (attempt 7, last: connection refused)",
    ]


def test_a_phase_announced_again_keeps_its_percent():
    view = JobView()
    view.update(PhaseChanged(Phase.PHASE2, "loader"), 0.0)
    view.update(progress(Phase.PHASE2, 40.0), 0.0)
    view.update(PhaseChanged(Phase.PHASE2, "loader: attempt 2"), 0.0)
    view.update(progress(Phase.PHASE2, 5.0), 0.0)
    assert view.percent == 40.0
    view.update(PhaseChanged(Phase.VERIFY), 0.0)
    assert view.percent == 0.0 and view.no_return is False


def test_a_field_list_of_essentials_only_is_cut_not_dropped():
    fields = [Field("shelf1", ESSENTIAL), Field("device working: writing and checking the image", ESSENTIAL)]
    assert [t for t, _ in fit(fields, 30)] == ["shelf1", "device working: wri..."]  # cut, and says so


def test_formats():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert format_duration(75) == "1:15"
    assert format_duration(3700) == "1:01:40"
