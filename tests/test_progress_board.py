"""The multi-device board (``netota watch``, ``upgrade --wait`` with several devices): a line per
device on a terminal of 60, 80 and 200 columns, redrawn in place; prefixed lines on a log."""

from __future__ import annotations

import io
import re

import pytest
from twisted.internet.task import Clock

from netota_daemon.cli.progress import NO_RETURN_TEXT, DeviceBoard
from netota_daemon.engine.events import PhaseChanged, TransferState, Waiting
from netota_daemon.engine.outcome import Phase
from tests.terminal import Screen
from tests.test_flash_progress import progress

WORKING = TransferState.DEVICE_WORKING
DEVICES = ("shelf1", "shelf2-with-a-long-name", "s3")


def a_rack() -> list[tuple[str, object]]:
    """Three devices at different points of their upgrades, interleaved."""
    return [
        ("shelf1", PhaseChanged(Phase.PHASE1, "main firmware")),
        ("shelf2-with-a-long-name", Waiting(Phase.PHASE1, "connecting", 4, "connection refused")),
        ("s3", PhaseChanged(Phase.PHASE2, "update loader")),
        ("shelf1", progress(Phase.PHASE1, 25.0, eta=30.0, device=24)),
        ("s3", progress(Phase.PHASE2, 13.6, served=40_000)),
        ("shelf1", progress(Phase.PHASE1, 55.0, eta=12.0, device=54)),
        ("s3", progress(Phase.PHASE2, 0.0, no_return=True, served=50_000)),
        ("s3", progress(Phase.PHASE2, 30.0, eta=20.0, no_return=True, served=120_000, device=29)),
        ("shelf1", progress(Phase.PHASE1, 99.0, WORKING, activity="writing the update loader", device=1)),
        ("s3", progress(Phase.PHASE2, 99.5, WORKING, activity="erasing flash", no_return=True, served=450_000)),
    ]


def draw(width: int, interactive: bool = True, height: int = 40) -> str:
    out = io.StringIO()
    now = [0.0]
    board = DeviceBoard(
        out, interactive=interactive, clock=lambda: now[0], size=(width, height), colour=False, wall=lambda: 0.0
    )
    for name in DEVICES:
        board.set(name, "idle  last: succeeded  firmware 1.0.0")
    for device, event in a_rack():
        now[0] += 0.5
        board.handle(device, event)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.mark.parametrize("width", [60, 80, 200])
def test_on_a_terminal_a_line_per_device_that_fits(width):
    screen = Screen(width).feed(draw(width))
    assert not screen.overflows
    assert all(len(line) < width for line in screen.drawn), [line for line in screen.drawn if len(line) >= width]
    shown = screen.shown
    # The point of no return of s3, whole, above the block; then one line per device, in place.
    block = shown[-3:]
    above = " ".join(line.strip() for line in shown[:-3])
    assert above == f"s3: {NO_RETURN_TEXT}"
    # The names' column is at most a quarter of the line: a longer name is cut, the columns align.
    names = ["shelf1", "shelf2-with-a-long-name"[: max(8, width // 4)], "s3"]
    assert [line.split()[0] for line in block] == names
    assert len({line.index("phase") for line in block}) == 1
    assert re.match(r"shelf1 +phase 1  99\.0%  device working: writ", block[0])
    assert re.match(r"shelf2\S* +phase 1  connecting \(attempt 4", block[1])
    assert re.match(r"s3 +phase 2  99\.5%  device working: eras", block[2])
    if width >= 80:
        assert "device working: erasing flash" in block[2]
    # s3's percent never went back (13.6 % shown, not the 0 % of the point of no return).
    s3 = [line for line in screen.drawn if line.startswith("s3 ")]
    percents = [float(m.group(1)) for line in s3 if (m := re.search(r"(\d+\.\d)%", line))]
    assert percents == sorted(percents) and percents[0] == 13.6


@pytest.mark.parametrize("width", [60, 80, 200])
def test_not_a_terminal_each_device_has_prefixed_timestamped_lines(width):
    text = draw(width, interactive=False)
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert all(
        re.match(r"\d\d:\d\d:\d\d (shelf1|shelf2-with-a-long-name|s3): ", line) or line.startswith(" ")
        for line in lines
    )
    joined = " ".join(line.strip() for line in lines)
    assert "s3: point of no return: do not power the device off" in joined
    assert "shelf1: phase 1  99.0%  device working: writing the update loader" in joined
    assert "connecting (attempt 4, last: connection refused)" in joined


def test_more_devices_than_the_screen_has_lines():
    out = io.StringIO()
    board = DeviceBoard(out, interactive=True, size=(80, 5))
    for name in "abcdefg":
        board.set(name, "idle")
    board.set("b", "running")
    assert Screen(80).feed(out.getvalue()).shown == [
        "a  idle",
        "b  running",
        "c  idle",
        "... and 4 more devices (netota devices)",
    ]


def test_a_note_goes_above_the_block_and_an_end_replaces_the_line():
    out = io.StringIO()
    board = DeviceBoard(out, interactive=True, size=(100, 40), colour=False)
    board.set("a", "idle")
    board.set("b", "idle")
    board.handle("a", progress(Phase.PHASE1, 40.0, eta=3.0))
    board.message("the daemon stopped")
    board.end("a", "job j1 succeeded: the device now runs firmware 2.0.0")
    assert Screen(100).feed(out.getvalue()).shown == [
        "the daemon stopped",
        "a  job j1 succeeded: the device now runs firmware 2.0.0",
        "b  idle",
    ]


def test_the_board_follows_a_resize_without_an_event():
    clock = Clock()
    size = [(200, 40)]
    out = io.StringIO()
    board = DeviceBoard(out, interactive=True, clock=clock.seconds, size=lambda: size[0], reactor=clock, colour=False)
    board.handle("a", progress(Phase.PHASE2, 50.0, eta=10.0, no_return=True, device=49))
    assert "device 49%" in Screen(200).feed(out.getvalue()).shown[-1]
    size[0] = (60, 40)
    clock.advance(1.0)
    last = Screen(200).feed(out.getvalue()).shown[-1]
    assert len(last) < 60 and last.startswith("a  phase 2  [") and "device 49%" not in last
    board.close()
    assert not clock.getDelayedCalls()
