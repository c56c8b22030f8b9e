"""The JSON log format of ``twistd netota --log-format json`` and ``netota flash --log-file``.

One JSON object per line and per log event, for log collectors and ``jq``::

    {"time": "2025-06-01T12:00:03.120+00:00", "level": "info",
     "message": "job 3f2a9c0d1e4b on shelf1: running", "namespace": "netota_daemon.daemon.jobs",
     "job": "3f2a9c0d1e4b", "device": "shelf1", "phase": null}

- ``time``: ISO 8601, UTC, milliseconds. ``level``: ``debug``, ``info``, ``warning``, ``error`` or
  ``critical``. ``message``: the event rendered as the text log would write it.
  ``namespace``: the module that logged it.
- ``job``, ``device``, ``phase``: always present (``null`` when the event is not about one); ``phase``
  is the API's identifier (``phase2``), as in the control API.
- Then the event's own fields (``firmware``, ``reason``, ``kind``, ...), JSON values: enums as their
  value, objects with ``to_json()`` as that, anything else as its text. A field named like one of
  the keys above (an outcome's ``message``) is written as ``field_message``.
- A logged failure adds ``error`` (its message), ``error_type`` and ``traceback``.

Twisted's own bookkeeping (the ``log_*`` keys, the legacy ``format``/``system``/``isError`` keys) is
not written: only what a reader can use.
"""

from __future__ import annotations

import enum
import json
import sys
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import FileLogObserver, ILogObserver, LogLevel, formatEvent
from twisted.python.failure import Failure

#: The keys every line has, in this order.
RESERVED = ("time", "level", "message", "namespace", "job", "device", "phase")
#: Keys of Twisted's event dict that are its bookkeeping (the legacy ``twisted.python.log`` ones), not
#: the event's fields. (A legacy ``message`` is a tuple; a ``message`` field of a new-style event is kept.)
_TWISTED_KEYS = frozenset({"format", "system", "isError", "why", "failure", "time", "printed"})
_LEVELS = {
    LogLevel.debug: "debug",
    LogLevel.info: "info",
    LogLevel.warn: "warning",
    LogLevel.error: "error",
    LogLevel.critical: "critical",
}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, enum.Enum):
        return _json_value(value.value)
    to_json = getattr(value, "to_json", None)
    if callable(to_json):
        try:
            return _json_value(to_json())
        except Exception:
            return str(value)
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_value(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json(event: dict[str, Any]) -> dict[str, Any]:
    """One Twisted log event as the object this format writes."""
    level = event.get("log_level")
    if level is None:  # a legacy event (twisted.python.log.msg): an error or not
        level = LogLevel.critical if event.get("isError") else LogLevel.info
    moment = event.get("log_time")
    data: dict[str, Any] = {
        "time": datetime.fromtimestamp(moment if moment is not None else 0.0, UTC).isoformat(timespec="milliseconds"),
        "level": _LEVELS.get(level, getattr(level, "name", str(level))),
        "message": formatEvent(event),
        "namespace": event.get("log_namespace"),
        "job": _json_value(event.get("job")),
        "device": _json_value(event.get("device")),
        "phase": _json_value(event.get("phase")),
    }
    for key, value in event.items():
        if key.startswith("log_") or key in _TWISTED_KEYS or key in ("job", "device", "phase"):
            continue
        if key == "message" and isinstance(value, tuple):
            continue
        data[f"field_{key}" if key in RESERVED else key] = _json_value(value)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        data["error"] = failure.getErrorMessage()
        data["error_type"] = getattr(failure.type, "__name__", str(failure.type))
        data["traceback"] = failure.getTraceback()
    return data


def format_json_line(event: dict[str, Any]) -> str:
    """The event as one line of this format (with its newline); an event that can't be written as
    JSON still gives a line that says so, never an exception in the logging system."""
    try:
        return json.dumps(event_as_json(event), ensure_ascii=False) + "\n"
    except Exception as e:  # a broken __str__ in some field: the line says what it was about
        fallback = {"time": None, "level": "error", "message": f"a log event could not be written as JSON: {e}"}
        return json.dumps(fallback) + "\n"


def json_file_log_observer(out: IO[str]) -> ILogObserver:
    """An observer writing this format to ``out``."""
    return cast(ILogObserver, FileLogObserver(out, format_json_line))  # it implements ILogObserver


def json_log_observer() -> ILogObserver:
    """This format on stdout: the observer ``twistd --logger`` makes for ``--log-format json``."""
    return json_file_log_observer(sys.stdout)
