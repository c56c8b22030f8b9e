"""Real answers checked against the OpenAPI document the daemon serves: the schema of an
operation's success response, resolved in the document itself (``$ref`` to its components)."""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any

from tests.conftest import ROOT

DOCUMENT = ROOT / "netota_daemon" / "control" / "openapi.json"


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return document


@cache
def _registry() -> Any:
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    return Registry().with_resource("netota", DRAFT202012.create_resource(_document()))


def _operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The document's path template that ``path`` (no query) matches, and its operation."""
    for template, operations in _document()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path}: not an operation of the OpenAPI document")


def answer_errors(method: str, path: str, answer: Any) -> list[str]:
    """What is wrong with ``answer``, the body of a successful ``METHOD PATH``, by the schema of the
    operation's success response; [] when it matches."""
    from jsonschema import Draft202012Validator

    template, operation = _operation(method, path.split("?", 1)[0])
    successes = [status for status in operation["responses"] if status.startswith("2")]
    assert successes, f"{method} {template} documents no success"
    # By reference into the document, so that the schema's own $refs (#/components/...) resolve there.
    where = f"/paths/{_pointer(template)}/{method.lower()}/responses/{successes[0]}/content/application~1json/schema"
    validator = Draft202012Validator({"$ref": "netota#" + where}, registry=_registry())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(answer)'}: {e.message}" for e in validator.iter_errors(answer)]


def _pointer(template: str) -> str:
    """``template`` as a JSON pointer token (``/`` is ``~1``, ``~`` is ``~0``)."""
    return template.replace("~", "~0").replace("/", "~1")
