"""The OpenAPI document: valid OpenAPI 3.1, the same in docs/ and the package, naming every route the
daemon serves, served at /v1/openapi.json."""

from __future__ import annotations

import importlib.util
import json

from openapi_spec_validator import validate
from twisted.internet.task import Clock

from netota_daemon.control.batches import BatchEndpoints
from netota_daemon.control.devices import DeviceEndpoints
from netota_daemon.control.events import EventStreams
from netota_daemon.control.firmware import FirmwareEndpoints
from netota_daemon.control.jobs import JobEndpoints
from netota_daemon.control.openapi import OpenApiEndpoints, document
from netota_daemon.control.status import StatusEndpoints
from tests.conftest import ROOT

PACKAGE = ROOT / "netota_daemon" / "control" / "openapi.json"
DOCS = ROOT / "docs" / "openapi.json"


def test_the_document_is_valid_and_the_same_in_docs_and_the_package():
    validate(json.loads(DOCS.read_text()))
    assert DOCS.read_bytes() == PACKAGE.read_bytes()
    spec = importlib.util.spec_from_file_location("make_openapi", ROOT / "tools" / "make_openapi.py")
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert json.loads(PACKAGE.read_text()) == maker.DOCUMENT, "run python tools/make_openapi.py"


def test_every_route_and_method_is_described():
    groups = [
        StatusEndpoints(None, None),  # type: ignore[arg-type]
        DeviceEndpoints(None, None),  # type: ignore[arg-type]
        JobEndpoints(None),  # type: ignore[arg-type]
        EventStreams(None, None, Clock(), 1),  # type: ignore[arg-type]
        FirmwareEndpoints(None),  # type: ignore[arg-type]
        BatchEndpoints(None, None, None, None, None),  # type: ignore[arg-type]
        OpenApiEndpoints(),
    ]
    paths = document()["paths"]
    assert "/metrics" in paths
    for route in [r for group in groups for r in group.routes()]:
        path = "/v1" + "".join(f"/{part}" for part in route.pattern)
        assert path in paths, path
        assert {m.lower() for m in route.methods} <= set(paths[path]), path
