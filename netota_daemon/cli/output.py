"""Where the ``netota`` command's output goes: stdout that ends quietly when its reader went away.

``netota show JOB | head -3``: once ``head`` has its lines and exits, the next write to stdout
fails with a broken pipe. The command then stops writing, points stdout at /dev/null (so the
interpreter's last flush is silent too) and exits 141 (128 + SIGPIPE), with no traceback.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def print_json(data: Any, lines: bool = False) -> None:
    """``data`` as JSON on stdout: indented, or on one line (``lines``: a JSON-lines stream)."""
    if lines:
        print(json.dumps(data, sort_keys=True), flush=True)
    else:
        print(json.dumps(data, indent=2, sort_keys=True), flush=True)


def bad_argument_json(message: str, code: int) -> str:
    """The one JSON object a command with ``--json`` prints for a bad argument (``netota flash``)."""
    return json.dumps({"error": "bad_argument", "message": message, "exit_code": code})


def silence_stdout() -> None:
    """After a broken pipe: every later write to stdout (the interpreter's flush at exit too) goes
    to /dev/null instead of raising again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass
