"""The one JSON decoder every control request body goes through, with bounds.

:func:`decode_json` takes at most :data:`MAX_BODY` bytes of UTF-8 and refuses, with a
:class:`BodyError` saying what and where: nesting deeper than :data:`MAX_DEPTH`, a number of more
than :data:`MAX_NUMBER_CHARS` characters (a 400-digit integer) or one that is not finite
(``1e400``, ``NaN``, ``Infinity``), a string that is not valid Unicode (a lone surrogate such as
``"\\ud800"``), and a key given twice. Nothing it accepts can make a handler raise later: every
value is a plain, bounded JSON value.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_BODY = 64 * 1024
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 32


class BodyError(Exception):
    """The body is not JSON this API takes; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


#: What matters to the nesting count: brackets, and the quotes and backslashes that tell whether a
#: bracket is inside a string.
_SIGNIFICANT = re.compile(r'[\[\]{}"\\]')


def _check_depth(text: str) -> None:
    """Refuse deep nesting before the parser sees it (the parser recurses once per level). One pass
    over the significant characters, linear in the body's length whatever it holds (an unterminated
    string of escapes included)."""
    depth = 0
    in_string = False
    escaped_at = -2  # the index of a backslash that escapes the next character
    for match in _SIGNIFICANT.finditer(text):
        char, at = match.group(), match.start()
        if in_string:
            if escaped_at == at - 1:
                continue  # this character is escaped
            if char == "\\":
                escaped_at = at
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                raise BodyError(f"the JSON is nested more than {MAX_DEPTH} levels deep")
        elif char in "]}":
            depth -= 1


def _integer(text: str) -> int:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number has more than {MAX_NUMBER_CHARS} characters ({text[:12]}...)")
    return int(text)


def _float(text: str) -> float:
    if len(text) > MAX_NUMBER_CHARS:
        raise BodyError(f"a number has more than {MAX_NUMBER_CHARS} characters ({text[:12]}...)")
    value = float(text)
    if not math.isfinite(value):
        raise BodyError(f"the number {text} is too large")
    return value


def _constant(name: str) -> Any:
    raise BodyError(f"{name} is not a JSON number")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise BodyError(f"the key {_printable(key)} is given twice")
        result[key] = value
    return result


def _printable(text: str) -> str:
    shown = json.dumps(text)  # escapes lone surrogates and control characters
    return shown if len(shown) <= 40 else shown[:37] + '..."'


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BodyError(f"the string {_printable(value)} is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def decode_json(raw: bytes) -> Any:
    """The JSON value in ``raw``, or :class:`BodyError`."""
    if len(raw) > MAX_BODY:
        raise BodyError(f"the body is larger than {MAX_BODY} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(f"the body is not UTF-8 (byte {e.start})") from None
    _check_depth(text)
    try:
        value = json.loads(
            text, parse_int=_integer, parse_float=_float, parse_constant=_constant, object_pairs_hook=_object
        )
    except json.JSONDecodeError as e:
        raise BodyError(f"the body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise BodyError(f"the body is not valid JSON: {e}") from None
    _check_strings(value)
    return value
