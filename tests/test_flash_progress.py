"""The progress renderer: what a person sees on stderr during ``netota flash``."""

from __future__ import annotations

import io

from netota_daemon.cli.progress import ProgressRenderer, format_bytes, format_duration, progress_line
from netota_daemon.engine.events import Finished, PhaseChanged, Progress
from netota_daemon.engine.outcome import Outcome, OutcomeKind, Phase


def progress(percent: float, rate: float = 1024.0, phase: Phase = Phase.PHASE2, no_return: bool = False) -> Progress:
    total = 102_400
    return Progress(phase, int(total * percent / 100), total, percent, int(percent) // 2, rate, no_return)


def test_formats():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert format_duration(75) == "1:15"
    assert format_duration(3700) == "1:01:40"


def test_progress_line_has_phase_percent_bytes_rate_eta():
    line = progress_line(progress(25.0, rate=1024.0))
    assert line.startswith("phase 2/2 [######------------------]  25.0%")
    assert "25.0 KiB/100.0 KiB" in line
    assert "1.0 KiB/s" in line
    assert "ETA 1:15" in line  # 75 KiB left at 1 KiB/s
    assert "device 12%" in line
    assert "ETA --:--" in progress_line(progress(10.0, rate=0.0))


def test_non_interactive_writes_a_line_per_phase_and_per_ten_percent():
    out = io.StringIO()
    renderer = ProgressRenderer(out, interactive=False)
    renderer(PhaseChanged(Phase.PHASE1, "main firmware"))
    for percent in (1.0, 5.0, 12.0, 15.0, 19.0, 21.0):
        renderer(progress(percent, phase=Phase.PHASE1))
    renderer(Finished(Outcome(OutcomeKind.SUCCEEDED, "ok", Phase.DONE)))
    lines = out.getvalue().splitlines()
    assert lines[0] == "phase 1/2: main firmware"
    assert [line.split("]")[1].split("%")[0].strip() for line in lines[1:]] == ["1.0", "12.0", "21.0"]
    assert "\r" not in out.getvalue()


def test_interactive_redraws_one_line_and_tells_the_point_of_no_return():
    out = io.StringIO()
    now = [0.0]
    renderer = ProgressRenderer(out, interactive=True, clock=lambda: now[0])
    renderer(progress(10.0))
    now[0] += 0.01
    renderer(progress(11.0))  # too soon: not drawn now (only when the line ends)
    assert " 11.0%" not in out.getvalue()
    now[0] += 0.5
    renderer(progress(20.0, no_return=True))
    renderer(PhaseChanged(Phase.VERIFY, "waiting"))
    text = out.getvalue()
    assert text.count("\r") >= 2
    assert "point of no return" in text and "(no return)" in text
    assert text.endswith("verify: waiting\n")


def test_phase_line_keeps_the_message_whole():
    out = io.StringIO()
    renderer = ProgressRenderer(out, interactive=False)
    renderer(PhaseChanged(Phase.DETECT, "reading the description document of fe80::1 :"))
    renderer(PhaseChanged(Phase.REBOOT))
    assert out.getvalue().splitlines() == ["detect: reading the description document of fe80::1 :", "reboot"]
