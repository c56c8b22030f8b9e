"""The JSON log format (``twistd netota --log-format json``, ``netota flash --log-file``): one object
per event with time, level, a rendered message, job, device, phase and the event's own fields."""

from __future__ import annotations

import enum
import io
import json
from datetime import datetime

from twisted.logger import Logger, globalLogPublisher
from twisted.python import log as legacy
from twisted.python.reflect import namedAny

from netota_daemon.engine.outcome import Phase
from netota_daemon.logs import RESERVED, json_file_log_observer, json_log_observer
from netota_daemon.tap import JSON_LOGGER


class Colour(enum.Enum):
    RED = "red"


class Opaque:
    def __str__(self) -> str:
        return "an opaque thing"


def logged(emit) -> list[dict]:
    out = io.StringIO()
    emit(Logger(namespace="netota_daemon.daemon.jobs", observer=json_file_log_observer(out)))
    text = out.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def test_an_event_is_one_object_with_time_level_message_and_its_fields():
    (line,) = logged(
        lambda log: log.info(
            "job {job} on {device}: finished with outcome {kind}: {message}",
            job="3f2a",
            device="shelf1",
            phase=Phase.PHASE2,
            kind="succeeded",
            message="upgraded",
            size=1024,
            colour=Colour.RED,
            thing=Opaque(),
        )
    )
    assert list(line)[: len(RESERVED)] == list(RESERVED)
    assert line["level"] == "info"
    assert line["message"] == "job 3f2a on shelf1: finished with outcome succeeded: upgraded"
    assert line["namespace"] == "netota_daemon.daemon.jobs"
    assert (line["job"], line["device"], line["phase"]) == ("3f2a", "shelf1", "phase2")
    assert line["kind"] == "succeeded" and line["size"] == 1024 and line["colour"] == "red"
    assert line["thing"] == "an opaque thing"
    assert line["field_message"] == "upgraded"  # the event's own "message", beside the rendered one
    moment = datetime.fromisoformat(line["time"])
    assert moment.utcoffset() is not None and abs(moment.timestamp() - datetime.now().timestamp()) < 3600
    assert not [key for key in line if key.startswith("log_") or key in ("format", "isError", "system")]


def test_every_line_names_job_device_and_phase_even_when_empty():
    (line,) = logged(lambda log: log.warn("netota stopping"))
    assert line["level"] == "warning"
    assert (line["job"], line["device"], line["phase"]) == (None, None, None)
    assert line["message"] == "netota stopping"


def test_a_failure_is_its_message_type_and_traceback_not_an_object_dump():
    def emit(log: Logger) -> None:
        try:
            raise ValueError("the journal is read-only")
        except ValueError:
            log.failure("job {job}: can't record it", job="3f2a", device="shelf1")

    (line,) = logged(emit)
    assert line["level"] == "critical" and line["message"] == "job 3f2a: can't record it"
    assert line["error"] == "the journal is read-only" and line["error_type"] == "ValueError"
    assert "Traceback" in line["traceback"] and "the journal is read-only" in line["traceback"]
    assert "<twisted.python.failure.Failure" not in json.dumps(line)


def test_a_bad_format_string_still_gives_a_line():
    (line,) = logged(lambda log: log.info("half a {field", job="j"))
    assert line["job"] == "j" and "Unable to format event" in line["message"]


def test_twistd_is_pointed_at_this_observer():
    assert namedAny(JSON_LOGGER) is json_log_observer


def test_a_legacy_event_is_written_without_twisteds_bookkeeping():
    out = io.StringIO()
    observer = json_file_log_observer(out)
    globalLogPublisher.addObserver(observer)
    try:
        legacy.msg("Starting factory", system="-")
    finally:
        globalLogPublisher.removeObserver(observer)
    (line,) = [json.loads(text) for text in out.getvalue().splitlines() if "Starting factory" in text]
    assert line["message"] == "Starting factory" and line["level"] == "info"
    assert not {"isError", "system", "format", "field_message", "field_time"} & set(line)
