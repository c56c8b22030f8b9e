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


def _template(method: str, path: str) -> str:
    """The document's path template that ``path`` (no query) matches, for ``method``."""
    for template, operations in _document()["paths"].items():
        pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method in operations:
            return template
    raise AssertionError(f"{method.upper()} {path}: not an operation of the OpenAPI document")


def answer_errors(method: str, path: str, answer: Any) -> list[str]:
    """What is wrong with ``answer``, the body of a successful ``METHOD PATH``, by the schema of the
    operation's success response; [] when it matches."""
    method = method.lower()
    validator = _validator(method, _template(method, path.split("?", 1)[0]))
    return [f"{'/'.join(map(str, e.absolute_path)) or '(answer)'}: {e.message}" for e in validator.iter_errors(answer)]


@cache
def _validator(method: str, template: str) -> Any:
    """The validator of ``METHOD TEMPLATE``'s success response (one per operation, kept)."""
    from jsonschema import Draft202012Validator

    operation = _document()["paths"][template][method]
    successes = [status for status in operation["responses"] if status.startswith("2")]
    assert successes, f"{method} {template} documents no success"
    # By reference into the document, so that the schema's own $refs (#/components/...) resolve there.
    where = f"/paths/{_pointer(template)}/{method}/responses/{successes[0]}/content/application~1json/schema"
    return Draft202012Validator({"$ref": "netota#" + where}, registry=_registry())


def _pointer(template: str) -> str:
    """``template`` as a JSON pointer token (``/`` is ``~1``, ``~`` is ``~0``)."""
    return template.replace("~", "~0").replace("/", "~1")
