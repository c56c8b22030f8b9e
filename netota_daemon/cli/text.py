"""How ``netota`` writes values for a person: sizes, durations, times, yes/no, phases and outcomes.

One spelling for each everywhere the command prints text (bars, tables, ``show``, outcome lines):
phases as :func:`~netota_daemon.engine.outcome.phase_label` writes them ("phase 2"), outcome kinds
and failure classes in words ("already current", "device error"), booleans as yes/no. ``--json``
keeps the API's identifiers.
"""

from __future__ import annotations

import re
from datetime import datetime, tzinfo
from typing import Any

from netota_daemon.engine.outcome import phase_label


def format_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A clock-style duration, for ETAs and elapsed times on a bar: 75 -> '1:15'; 3700 -> '1:01:40'."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_elapsed(seconds: float) -> str:
    """A duration in words, for ``show``: 3.42 -> '3.4 s', 75 -> '1 min 15 s', 3700 -> '1 h 1 min'."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, secs = divmod(whole, 60)
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    hours, rest = divmod(whole, 3600)
    minutes = rest // 60
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def format_time(epoch: float | None, tz: tzinfo | None = None) -> str:
    """A moment in local time (``tz`` for tests): '2025-06-01 12:00:03'; '-' for None."""
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, tz).strftime("%Y-%m-%d %H:%M:%S")


def format_short_time(epoch: float | None, now: float, tz: tzinfo | None = None) -> str:
    """A moment for a table column: '12:00:03' today, else '2025-06-01 12:00'; '-' for None."""
    if epoch is None:
        return "-"
    moment = datetime.fromtimestamp(epoch, tz)
    if moment.date() == datetime.fromtimestamp(now, tz).date():
        return moment.strftime("%H:%M:%S")
    return moment.strftime("%Y-%m-%d %H:%M")


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def dash(value: Any) -> str:
    """A missing value in a table or a list: '-'."""
    return "-" if value is None or value == "" else str(value)


_DOUBLED_PHASE = re.compile(r"\bphase\s+(?=phase\d\b)")
_PHASE_ID = re.compile(r"\bphase(\d)\b")


def human_text(text: str) -> str:
    """Free text from the daemon or the engine with the API's phase identifiers written as a person
    reads them: 'aborted during phase2' -> 'aborted during phase 2', 'phase phase2' -> 'phase 2'."""
    return _PHASE_ID.sub(r"phase \1", _DOUBLED_PHASE.sub("", text))


def phase_text(phase: Any) -> str:
    """A phase identifier (or None) as a person reads it: 'phase2' -> 'phase 2', None -> '-'."""
    return "-" if phase is None or phase == "" else phase_label(str(phase))


def kind_label(kind: Any) -> str:
    """An outcome kind or failure class in words: 'already_current' -> 'already current'."""
    return "-" if kind is None or kind == "" else str(kind).replace("_", " ")


#: Words an engine message may start with that say the same as the outcome kind.
_KIND_SYNONYMS = {"succeeded": ("upgraded",), "already current": ("already current",)}


def outcome_text(kind: str, message: str = "", failure: str | None = None) -> str:
    """How an upgrade ended, in one phrase without doubled words: ('succeeded', 'upgraded: the
    device now runs firmware 2.0.0') -> 'succeeded: the device now runs firmware 2.0.0';
    ('aborted', 'aborted during phase2: Ctrl-C') -> 'aborted during phase 2: Ctrl-C'."""
    label = kind_label(kind)
    tag = f" ({kind_label(failure)})" if failure else ""
    message = human_text(message.strip())
    if not message:
        return label + tag
    lowered = message.lower()
    if lowered.startswith(label) and not lowered[len(label) : len(label) + 1].isalnum():
        return label + tag + message[len(label) :]
    for synonym in _KIND_SYNONYMS.get(label, ()):
        if lowered.startswith(synonym + ":"):
            message = message[len(synonym) + 1 :].strip()
            break
    return f"{label}{tag}: {message}"


def table(rows: list[list[str]], headers: list[str]) -> str:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows, strict=True)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
