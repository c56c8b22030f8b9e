"""The OpenAPI document against a running daemon (the live rig: ``twistd netota`` and a simulator):
schemathesis generates requests for every operation from ``docs/openapi.json``, valid ones and
invalid ones, and every answer must be documented (its status, its content type) and match its
schema, and none may be a 5xx. The event streams never end, so they are read here instead: every
event's data matches the schema the document gives its type.

The run is bounded and deterministic: :data:`EXAMPLES` examples per operation and mode (valid and
invalid), the same ones every run (Hypothesis' ``derandomize``), no shrinking. ``make test-api`` runs
only these tests, with 500 examples (``SCHEMATHESIS_EXAMPLES=N``); ``NETOTA_SCHEMATHESIS_EXAMPLES``
and ``NETOTA_SCHEMATHESIS_SEED`` (other examples than the fixed ones) set them for any run."""

from __future__ import annotations

import json
import os
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import threads

from tests.conftest import ROOT
from tests.live_rig import LiveRig

EXAMPLES = int(os.environ.get("NETOTA_SCHEMATHESIS_EXAMPLES", "20"))
SEED = os.environ.get("NETOTA_SCHEMATHESIS_SEED")
DOCUMENT = ROOT / "docs" / "openapi.json"
#: Endless answers (server-sent events): read below instead.
STREAMS = ("/v1/events", "/v1/jobs/{job}/events", "/v1/batches/{batch}/events")


def run_schemathesis(base_url: str) -> list[str]:
    """Every operation, positive and negative examples; the failures, in words."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_path(DOCUMENT)
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    bounded = settings(
        max_examples=EXAMPLES,
        derandomize=SEED is None,  # the same examples every run, unless a seed asks for others
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # no shrinking: the run stays bounded
    )

    def run(strategy: Any, these_checks: list[Any]) -> None:
        @bounded
        @given(case=strategy)
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base_url, checks=these_checks, timeout=30)

        (seed(int(SEED))(check) if SEED is not None else check)()

    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in STREAMS:
            continue
        for mode, these_checks in (
            (GenerationMode.POSITIVE, checks),
            (GenerationMode.NEGATIVE, [*checks, negative_data_rejection]),
        ):
            try:
                run(operation.as_strategy(generation_mode=mode), these_checks)
            except Unsatisfiable:  # nothing of this operation can be made invalid (no parameters, no body)
                assert mode is GenerationMode.NEGATIVE, operation.path
            except Exception as e:  # one failure per operation and mode, in words
                failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {e}")
    return failures


@pytest_twisted.ensureDeferred
async def test_every_answer_of_a_running_daemon_is_documented_and_matches_its_schema(rig):
    rig.make_image("v2.bin", "2.0.0", 20_000)
    await rig.start_sim("dev1")
    await rig.start_daemon()
    job = rig.api("POST", "/v1/jobs", {"device": "dev1", "firmware": "v2.bin"})["job"]  # a job in the history
    failures = await threads.deferToThread(run_schemathesis, rig.url)
    assert not failures, "\n\n".join(failures)
    assert rig.api("GET", f"/v1/jobs/{job['id']}")["job"]["id"] == job["id"]
    # What longer runs found, kept: a null where a list of devices may be left out is refused.
    for path, body in (
        ("/v1/devices/probe", b'{"devices": null}'),
        ("/v1/rescue", b'{"devices": null}'),
    ):
        request = urllib.request.Request(rig.url + path, data=body, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400, (path, body)
        assert json.loads(refused.value.read())["error"]["code"] in ("bad_field", "bad_json"), (path, body)


def events(response: Any) -> Iterator[tuple[str, Any]]:
    """(type, data) of each server-sent event a response carries, as they arrive."""
    event_type, data = "message", []
    for raw in response:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event_type, json.loads("\n".join(data))
            event_type, data = "message", []
        elif line.startswith("event:"):
            event_type = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def follow_a_job(rig: LiveRig) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """Both streams around one upgrade, then the daemon's stop: (every job's events, the job's)."""
    everything: list[tuple[str, Any]] = []
    with urllib.request.urlopen(rig.url + "/v1/events", timeout=60) as all_events:
        stream = events(all_events)
        everything.append(next(stream))  # the snapshot: the stream is open before the job starts
        job = rig.api("POST", "/v1/jobs", {"device": "dev1", "firmware": "v2.bin"})["job"]
        with urllib.request.urlopen(rig.url + f"/v1/jobs/{job['id']}/events", timeout=60) as job_events:
            of_the_job = list(events(job_events))  # it ends after the job's outcome
        for event in stream:
            everything.append(event)
            if event[0] == "outcome" and event[1]["job"] == job["id"]:
                break
        assert rig.daemon is not None
        rig.reactor.callFromThread(rig.daemon.kill, signal.SIGTERM)  # the stream's last event is then shutdown
        everything.extend(stream)
    return everything, of_the_job


@pytest_twisted.ensureDeferred
async def test_every_event_of_both_streams_matches_the_schema_the_document_gives_its_type(rig):
    from jsonschema import Draft202012Validator
    from referencing import Registry
    from referencing.jsonschema import DRAFT202012

    document = json.loads(DOCUMENT.read_text())
    registry = Registry().with_resource("netota", DRAFT202012.create_resource(document))
    content = "content"
    streams = {
        "/v1/events": document["paths"]["/v1/events"]["get"]["responses"]["200"][content],
        "/v1/jobs/{job}/events": document["paths"]["/v1/jobs/{job}/events"]["get"]["responses"]["200"][content],
    }

    def validator(schema: dict[str, Any]) -> Draft202012Validator:
        pointer = schema["$ref"].replace("#", "netota#", 1)
        return Draft202012Validator({"$ref": pointer}, registry=registry)

    rig.make_image("v2.bin", "2.0.0", 60_000)
    await rig.start_sim("dev1")
    await rig.start_daemon()
    everything, of_the_job = await threads.deferToThread(follow_a_job, rig)
    for path, seen in (("/v1/events", everything), ("/v1/jobs/{job}/events", of_the_job)):
        described = streams[path]["text/event-stream"]["x-events"]
        for event_type, data in seen:
            assert event_type in described, (path, event_type)
            assert data["type"] == event_type
            errors = [e.message for e in validator(described[event_type]).iter_errors(data)]
            assert not errors, (path, event_type, errors, data)
    assert {"snapshot", "state", "phase", "progress", "outcome", "shutdown"} <= {t for t, _ in everything}
    assert everything[0][0] == "snapshot" and everything[-1][0] == "shutdown"
    assert of_the_job[0][0] == "job" and of_the_job[-1][0] == "outcome"
    assert of_the_job[-1][1]["outcome"]["kind"] == "succeeded"
