"""``GET /v1/openapi.json``: the OpenAPI 3.1 document of the control API, shipped in the package
(``netota_daemon/control/openapi.json``; ``docs/openapi.json`` is the same file, which a test
checks)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

from netota_daemon import __version__
from netota_daemon.control.routing import Answer, ApiRequest, Route


@cache
def document() -> dict[str, Any]:
    text = (resources.files("netota_daemon.control") / "openapi.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


class OpenApiEndpoints:
    def routes(self) -> list[Route]:
        return [Route(("openapi.json",), {"GET": self.openapi})]

    def openapi(self, request: ApiRequest) -> Answer:
        request.query(())
        data = dict(document())
        data["info"] = {**data["info"], "version": __version__}
        return Answer(data)
