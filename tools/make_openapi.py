"""Writes the control API's OpenAPI 3.1 document: netota_daemon/control/openapi.json and the same
bytes in docs/openapi.json. Run it after changing the API: `python tools/make_openapi.py`
(tests/test_openapi.py checks that both files are what this writes, and that they name every route)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the enums below are the daemon's own: the document can't drift from them

from netota_daemon.control.firmware import REFUSALS as FIRMWARE_REFUSALS  # noqa: E402
from netota_daemon.control.routing import MAX_REASON  # noqa: E402
from netota_daemon.daemon.batch_policy import BatchState, MemberState, Reason  # noqa: E402
from netota_daemon.daemon.batch_store import MAX_PAGE as MAX_BATCH_PAGE  # noqa: E402
from netota_daemon.daemon.config import MAX_COUNT, MAX_SECONDS, MAY_BE_ZERO, TIMEOUT_KEYS  # noqa: E402
from netota_daemon.daemon.firmware_catalog import MAX_NAME_BYTES  # noqa: E402
from netota_daemon.daemon.jobs import MAX_FIRMWARE_SET  # noqa: E402
from netota_daemon.daemon.journal import MAX_PAGE, JobState  # noqa: E402
from netota_daemon.daemon.rescue import RescueAction  # noqa: E402
from netota_daemon.engine.events import TransferState  # noqa: E402
from netota_daemon.engine.outcome import FailureClass, OutcomeKind, Phase, Route  # noqa: E402
from netota_daemon.wire.firmware_kind import FirmwareKind  # noqa: E402

J = "application/json"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def values(enum: type[Enum]) -> list[str]:
    return [str(member.value) for member in enum]


def nullable(schema: Schema) -> Schema:
    return {"oneOf": [schema, {"type": "null"}]}


def obj(properties: Schema, required: tuple[str, ...] | None = None, extra: bool = False) -> Schema:
    """An object with exactly ``properties`` (``extra``: and any others); ``required`` defaults to all."""
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    names = list(properties) if required is None else list(required)
    if names:
        schema["required"] = names
    return schema


def error(status: int, *codes: str, description: str = "", headers: Schema | None = None) -> Schema:
    """An Error body whose ``status`` is ``status`` and whose ``code`` is one of ``codes``."""
    answer: Schema = {
        "description": description or "refused: " + ", ".join(codes),
        "content": {
            J: {
                "schema": {
                    "allOf": [
                        ref("Error"),
                        {
                            "properties": {
                                "error": {"properties": {"code": {"enum": list(codes)}, "status": {"const": status}}}
                            }
                        },
                    ]
                }
            }
        },
    }
    if headers:
        answer["headers"] = headers
    return answer


def header(description: str) -> Schema:
    return {"description": description, "required": True, "schema": {"type": "string", "minLength": 1}}


def ok(schema: Schema, description: str = "OK", headers: Schema | None = None) -> Schema:
    answer: Schema = {"description": description, "content": {J: {"schema": schema}}}
    if headers:
        answer["headers"] = headers
    return answer


def body(schema: Schema, required: bool = False) -> Schema:
    return {"required": required, "content": {J: {"schema": schema}}}


#: Refusals any request can get: its query (every endpoint checks it), the connection's bounds
#: (control/channel.py: malformed or oversized requests, slow ones, a body over 64 KiB on any path),
#: the token, and a daemon that stops or is full.
COMMON_CODES: dict[int, tuple[str, ...]] = {
    400: ("bad_query", "bad_request", "not_http"),
    408: ("request_timeout",),
    413: ("too_large",),
    503: ("shutting_down", "journal_unavailable", "too_many_connections", "too_many_streams"),
}
#: What a JSON body adds (routing.ApiRequest.body and field_of).
BODY_CODES = ("bad_json", "unknown_field", "bad_field")
#: A cancel's body, of a job or a batch (routing.reason_of).
CANCEL_BODY = body(
    obj({"reason": {"type": "string", "minLength": 1, "maxLength": MAX_REASON, "pattern": "\\S"}}, required=())
)
UNAUTHORIZED = error(
    401,
    "unauthorized",
    description="a token is configured and the request has no valid bearer token",
    headers={"WWW-Authenticate": header('Bearer realm="netota"')},
)


def responses(success: Schema, codes: dict[int, tuple[str, ...]] | None = None, **described: Schema) -> Schema:
    """The success answers, then every refusal: the common ones merged with ``codes`` per status,
    and ``described`` ones (status -> answer) as given."""
    out = dict(success)
    merged = {status: list(found) for status, found in COMMON_CODES.items()}
    for status, more in (codes or {}).items():
        merged.setdefault(status, []).extend(c for c in more if c not in merged.get(status, []))
    for status in sorted(merged):
        out[str(status)] = error(status, *merged[status])
    out["401"] = UNAUTHORIZED
    out.update(described)
    return dict(sorted(out.items()))


NUMBER_OR_NULL = {"type": ["number", "null"]}
STRING_OR_NULL = {"type": ["string", "null"]}
INT_OR_NULL = {"type": ["integer", "null"]}
PHASE = {"type": "string", "enum": values(Phase)}
NAME = {"type": "string", "minLength": 1}


def option_schema(name: str, types: tuple[type, ...]) -> Schema:
    if bool in types:
        return {"type": "boolean"}
    if int in types and float not in types:
        return {"type": "integer", "minimum": 0, "maximum": MAX_COUNT}
    bound = {"minimum": 0} if name in MAY_BE_ZERO else {"exclusiveMinimum": 0}
    return {"type": "number", **bound, "maximum": MAX_SECONDS}


OPTIONS = {
    "type": "object",
    "description": "engine timeouts and behaviour switches for this job, as the config's [timeouts] takes them "
    "(durations in seconds, at most a week; counts at most 1 000 000)",
    "properties": {name: option_schema(name, types) for name, (types, _) in sorted(TIMEOUT_KEYS.items())},
    "additionalProperties": False,
}

PROGRESS_FIELDS = {
    "phase": PHASE,
    "percent": {"type": "number", "minimum": 0, "maximum": 100},
    "done_bytes": {"type": "integer", "minimum": 0},
    "total_bytes": {"type": "integer", "minimum": 0},
    "bytes_served": {"type": "integer", "minimum": 0},
    "basis": {"type": "string", "enum": ["offset", "header", "all_size", "upload", "done"]},
    "state": {"type": "string", "enum": values(TransferState)},
    "activity": {"type": "string"},
    "eta": NUMBER_OR_NULL,
    "rate": {"type": "number", "minimum": 0},
    "device_percent": {"type": "integer"},
    "point_of_no_return": {"type": "boolean"},
}
WAITING_FIELDS = {
    "phase": PHASE,
    "message": {"type": "string"},
    "attempt": {"type": "integer"},
    "last_error": STRING_OR_NULL,
}
JOB_STATE = {"type": "string", "enum": values(JobState)}
OF_A_JOB = {"job": {"type": "string"}, "device": {"type": "string"}}

SCHEMAS: Schema = {
    "Error": obj(
        {
            "error": obj(
                {
                    "code": {"type": "string", "pattern": "^[a-z_]+$"},
                    "message": {"type": "string", "minLength": 1},
                    "status": {"type": "integer", "minimum": 400, "maximum": 599},
                }
            )
        }
    ),
    "Status": obj(
        {
            "version": {"type": "string"},
            "api": {"type": "string", "const": "v1"},
            "max_parallel": {"type": "integer", "minimum": 1},
            "running": {"type": "integer", "minimum": 0},
            "queued": {"type": "integer", "minimum": 0},
            "devices": {"type": "integer", "minimum": 0},
            "batches_active": {"type": "integer", "minimum": 0},
            "notifications": {
                "type": "object",
                "description": "each configured job-end hook (on_job_end, webhook) -> its counters: sent, failed, "
                "dropped, attempts, pending",
                "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
            },
        }
    ),
    "Progress": obj(PROGRESS_FIELDS),
    "Waiting": obj(WAITING_FIELDS),
    "Outcome": obj(
        {
            "kind": {"type": "string", "enum": values(OutcomeKind)},
            "message": {"type": "string"},
            "phase": PHASE,
            "failure": {"type": ["string", "null"], "enum": [*values(FailureClass), None]},
            "advice": {"type": "string"},
            "point_of_no_return": {"type": "boolean"},
            "firmware_version_before": STRING_OR_NULL,
            "firmware_version_after": STRING_OR_NULL,
            "details": {
                "type": "object",
                "description": "what the engine measured on the way (per stream or upload: bytes, timeouts, whether "
                "STOP was sent); diagnostic, its keys vary with the route",
            },
        }
    ),
    "HistoryEntry": obj({"time": {"type": "number"}, "state": JOB_STATE, "phase": PHASE, "note": STRING_OR_NULL}),
    "Job": obj(
        {
            "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
            "device": {"type": "string"},
            "firmware": {"type": "string"},
            "firmware_set": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 1,
                "maxItems": MAX_FIRMWARE_SET,
                "description": "every image the job was given, firmware first",
            },
            "state": JOB_STATE,
            "phase": PHASE,
            "point_of_no_return": {"type": "boolean"},
            "position": {"type": ["integer", "null"], "minimum": 1},
            "progress": nullable(ref("Progress")),
            "waiting": nullable(ref("Waiting")),
            "created": {"type": "number"},
            "started": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "outcome": nullable(ref("Outcome")),
            "message": {"type": "string"},
            "advice": {"type": "string"},
            "resumable": {"type": "boolean"},
            "resumed_from": STRING_OR_NULL,
            "resumed_by": STRING_OR_NULL,
            "options": OPTIONS,
            "batch": {"type": ["string", "null"], "description": "the batch the job belongs to"},
            "image_sha256": {
                "type": ["string", "null"],
                "pattern": "^[0-9a-f]{64}$",
                "description": "the SHA-256 of the image the job flashed (a job given a single image)",
            },
            "route": {
                "type": ["string", "null"],
                "enum": [*values(Route), None],
                "description": "the device's build, once the job has seen it (null before, or for an older job)",
            },
            "history": {"type": "array", "items": ref("HistoryEntry"), "description": "only in GET /v1/jobs/ID"},
        },
        required=(
            "id",
            "device",
            "firmware",
            "firmware_set",
            "state",
            "phase",
            "point_of_no_return",
            "position",
            "progress",
            "waiting",
            "created",
            "started",
            "finished",
            "outcome",
            "message",
            "advice",
            "resumable",
            "resumed_from",
            "resumed_by",
            "options",
            "batch",
            "image_sha256",
            "route",
        ),
    ),
    "Probe": {
        "oneOf": [
            obj(
                {
                    "ok": {"const": True},
                    "firmware_version": STRING_OR_NULL,
                    "ota_type": STRING_OR_NULL,
                    "ota_step": STRING_OR_NULL,
                    "mode": {"type": "string", "enum": ["main", "loader", "double_backup"]},
                    "time": {"type": "number"},
                }
            ),
            obj(
                {
                    "ok": {"const": False},
                    "error": {"type": "string"},
                    "busy_job": STRING_OR_NULL,
                    "time": {"type": "number"},
                }
            ),
        ]
    },
    "Device": obj(
        {
            "name": {"type": "string"},
            "host": {"type": "string"},
            "ctp_port": {"type": "integer"},
            "http_port": {"type": "integer"},
            "ota_port": {"type": "integer"},
            "interface": STRING_OR_NULL,
            "state": {"type": "string", "enum": ["idle", "queued", "running"]},
            "job": STRING_OR_NULL,
            "phase": nullable(PHASE),
            "percent": NUMBER_OR_NULL,
            "rate": NUMBER_OR_NULL,
            "progress": nullable(ref("Progress")),
            "waiting": nullable(ref("Waiting")),
            "queue_position": INT_OR_NULL,
            "last_job": STRING_OR_NULL,
            "last_outcome": {"type": ["string", "null"], "enum": [*values(OutcomeKind), "interrupted", None]},
            "firmware_version": STRING_OR_NULL,
            "probe": nullable(ref("Probe")),
        }
    ),
    "Firmware": obj(
        {
            "name": {"type": "string", "minLength": 1},
            "size": {"type": "integer", "minimum": 1},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "modified": {"type": "number"},
            "kind": {"type": "string", "enum": values(FirmwareKind)},
            "description": {"type": "string"},
            "version": STRING_OR_NULL,
        }
    ),
    "BatchMember": obj(
        {
            "device": {"type": "string"},
            "state": {"type": "string", "enum": values(MemberState)},
            "canary": {"type": "boolean"},
            "reason": {"type": ["string", "null"], "enum": [*values(Reason), None]},
            "message": {"type": "string"},
            "job": STRING_OR_NULL,
            "jobs": {"type": "array", "items": {"type": "string"}},
            "probe": nullable(
                obj(
                    {
                        "reachable": {"type": "boolean"},
                        "mode": {"type": ["string", "null"], "enum": ["main", "loader", "double_backup", None]},
                        "firmware_version": STRING_OR_NULL,
                        "error": STRING_OR_NULL,
                        "busy_job": STRING_OR_NULL,
                    }
                )
            ),
            "firmware_version": STRING_OR_NULL,
            "outcome": nullable(
                obj(
                    {
                        "kind": {"type": "string", "enum": [*values(OutcomeKind), "interrupted"]},
                        "message": {"type": "string"},
                        "failure": {"type": ["string", "null"], "enum": [*values(FailureClass), None]},
                        "advice": {"type": "string"},
                        "phase": nullable(PHASE),
                        "firmware_version_after": STRING_OR_NULL,
                    }
                )
            ),
            "started": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "duration": NUMBER_OR_NULL,
            "cancel_requested": {"type": "boolean"},
        }
    ),
    "BatchPolicy": obj(
        {
            "canary": {"type": "integer", "minimum": 0},
            "max_failures": {"type": ["integer", "null"], "minimum": 1},
            "preflight": {"type": "boolean"},
            "skip_current": {"type": "boolean"},
            "max_parallel": {"type": ["integer", "null"], "minimum": 1},
            "resume_interrupted": {"type": "boolean"},
        }
    ),
    "Batch": obj(
        {
            "id": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
            "created": {"type": "number"},
            "firmware": {"type": "string"},
            "image": obj(
                {
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "kind": {"type": "string", "enum": values(FirmwareKind)},
                    "size": {"type": "integer", "minimum": 1},
                }
            ),
            "selection": {
                "oneOf": [
                    obj({"devices": {"type": "array", "items": {"type": "string"}, "minItems": 1}}),
                    obj({"all": {"const": True}}),
                    obj({"tag": {"type": "string", "minLength": 1}}),
                ]
            },
            "options": OPTIONS,
            "state": {"type": "string", "enum": values(BatchState)},
            "policy": ref("BatchPolicy"),
            "image_kind": {"type": "string", "enum": values(FirmwareKind)},
            "max_parallel": {"type": "integer", "minimum": 1},
            "target": nullable(
                obj(
                    {
                        "version": {"type": "string"},
                        "source": {"type": "string", "enum": ["request", "job"]},
                        "job": STRING_OR_NULL,
                    }
                )
            ),
            "stop_reason": {"type": ["string", "null"], "enum": [*values(Reason), None]},
            "stop_message": {"type": "string"},
            "began": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "notes": {"type": "array", "items": {"type": "string"}},
            "members": {"type": "array", "items": ref("BatchMember"), "description": "not in GET /v1/batches"},
            "result": {"type": ["string", "null"], "enum": ["succeeded", "failed", "cancelled", None]},
            "counts": {
                "type": "object",
                "description": "members by state",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "duration": NUMBER_OR_NULL,
            "jobs": {"type": "array", "items": {"type": "string"}, "description": "not in GET /v1/batches"},
            "journal_error": STRING_OR_NULL,
        },
        required=(
            "id",
            "created",
            "firmware",
            "image",
            "selection",
            "options",
            "state",
            "policy",
            "image_kind",
            "max_parallel",
            "target",
            "stop_reason",
            "stop_message",
            "began",
            "finished",
            "notes",
            "result",
            "counts",
            "duration",
            "journal_error",
        ),
    ),
    "RescuePlan": obj(
        {
            "device": {"type": "string"},
            "action": {"type": "string", "enum": values(RescueAction)},
            "message": {"type": "string"},
            "job": STRING_OR_NULL,
            "firmware": STRING_OR_NULL,
            "started": STRING_OR_NULL,
        }
    ),
    # The data of each server-sent event, by its type (the `event:` line says the same).
    "SnapshotEvent": obj(
        {
            "type": {"const": "snapshot"},
            "jobs": {"type": "array", "items": ref("Job")},
            "devices": {"type": "array", "items": ref("Device")},
        }
    ),
    "JobEvent": obj({"type": {"const": "job"}, **OF_A_JOB, "snapshot": ref("Job")}),
    "StateEvent": obj(
        {
            "type": {"const": "state"},
            **OF_A_JOB,
            "state": JOB_STATE,
            "phase": PHASE,
            "position": {"type": ["integer", "null"], "minimum": 1},
        }
    ),
    "PhaseEvent": obj({"type": {"const": "phase"}, **OF_A_JOB, "phase": PHASE, "message": {"type": "string"}}),
    "ProgressEvent": obj({"type": {"const": "progress"}, **OF_A_JOB, **PROGRESS_FIELDS}),
    "WaitingEvent": obj({"type": {"const": "waiting"}, **OF_A_JOB, **WAITING_FIELDS}),
    "OutcomeEvent": obj(
        {
            "type": {"const": "outcome"},
            **OF_A_JOB,
            "state": JOB_STATE,
            "outcome": nullable(ref("Outcome")),
            "advice": {"type": "string"},
        }
    ),
    "ShutdownEvent": obj({"type": {"const": "shutdown"}, "message": {"type": "string"}}),
    "BatchSnapshotEvent": obj({"type": {"const": "snapshot"}, "batch": {"type": "string"}, "snapshot": ref("Batch")}),
    "MemberEvent": obj(
        {
            "type": {"const": "member"},
            "batch": {"type": "string"},
            "device": {"type": "string"},
            "member": ref("BatchMember"),
        }
    ),
    "BatchEvent": obj(
        {
            "type": {"const": "batch"},
            "batch": {"type": "string"},
            "state": {"type": "string", "enum": values(BatchState)},
            "summary": obj(
                {
                    "state": {"type": "string", "enum": values(BatchState)},
                    "result": {"type": ["string", "null"], "enum": ["succeeded", "failed", "cancelled", None]},
                    "stop_reason": {"type": ["string", "null"], "enum": [*values(Reason), None]},
                    "stop_message": {"type": "string"},
                    "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
                    "began": NUMBER_OR_NULL,
                    "finished": NUMBER_OR_NULL,
                    "duration": NUMBER_OR_NULL,
                }
            ),
        }
    ),
    "BatchEndEvent": obj({"type": {"const": "batch_end"}, "batch": {"type": "string"}, "snapshot": ref("Batch")}),
}

#: ``event: TYPE`` -> the schema of its ``data:`` line, per stream.
JOB_STREAM_EVENTS = {
    "job": ref("JobEvent"),
    "state": ref("StateEvent"),
    "phase": ref("PhaseEvent"),
    "progress": ref("ProgressEvent"),
    "waiting": ref("WaitingEvent"),
    "outcome": ref("OutcomeEvent"),
    "shutdown": ref("ShutdownEvent"),
}
BATCH_STREAM_EVENTS = {
    "snapshot": ref("BatchSnapshotEvent"),
    "member": ref("MemberEvent"),
    "batch": ref("BatchEvent"),
    **{k: v for k, v in JOB_STREAM_EVENTS.items() if k not in ("job", "shutdown")},
    "batch_end": ref("BatchEndEvent"),
    "shutdown": ref("ShutdownEvent"),
}
ALL_EVENTS = {"snapshot": ref("SnapshotEvent"), **{k: v for k, v in JOB_STREAM_EVENTS.items() if k != "job"}}


def sse(first: str, events: Schema) -> Schema:
    return {
        "description": f"server-sent events (`event: TYPE` / `data: JSON`): {first} first, then the others as they "
        "happen, and `:` keep-alive lines. `x-events` gives the schema of each type's data (docs/control-api.md)",
        "content": {"text/event-stream": {"schema": {"type": "string"}, "x-events": events}},
    }


JOB_ID = {
    "name": "job",
    "in": "path",
    "required": True,
    "description": "a job's id (12 hexadecimal digits)",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
}
FIRMWARE_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": f"a plain file name in firmware_dir: no '/' or '\\', not starting with a dot, no control "
    f"characters, at most {MAX_NAME_BYTES} bytes of UTF-8",
    "schema": {
        "type": "string",
        "pattern": "^[^./\\\\\\x00-\\x1f\\x7f][^/\\\\\\x00-\\x1f\\x7f]*$",
        "maxLength": MAX_NAME_BYTES,
    },
}
JOB_ANSWER = obj({"job": ref("Job")})
BATCH_ID = {
    "name": "batch",
    "in": "path",
    "required": True,
    "description": "a batch's id (12 hexadecimal digits)",
    "schema": {"type": "string", "pattern": "^[0-9a-f]{12}$"},
}
BATCH_ANSWER = obj({"batch": ref("Batch")})
POLICY_REQUEST = {
    "type": "object",
    "properties": {
        "canary": {"type": "integer", "minimum": 0},
        "max_failures": {"type": ["integer", "null"], "minimum": 1},
        "preflight": {"type": "boolean"},
        "skip_current": {"type": "boolean"},
        "max_parallel": {"type": ["integer", "null"], "minimum": 1},
        "resume_interrupted": {"type": "boolean"},
    },
    "additionalProperties": False,
}
LOCATION = {"Location": header("the new resource's path")}
DEVICES_ANSWER = obj({"devices": {"type": "array", "items": ref("Device")}})
FIRMWARE_ANSWER = obj({"firmware": ref("Firmware")})


def firmware_codes(*reasons: str) -> dict[int, tuple[str, ...]]:
    """The statuses and codes of the catalogue's refusals ``reasons`` (control/firmware.py's table)."""
    out: dict[int, tuple[str, ...]] = {}
    for reason in reasons:
        status, code = FIRMWARE_REFUSALS[reason]
        out[status] = (*out.get(status, ()), code)
    return out


def merged(*tables: dict[int, tuple[str, ...]]) -> dict[int, tuple[str, ...]]:
    out: dict[int, tuple[str, ...]] = {}
    for table in tables:
        for status, codes in table.items():
            out[status] = (*out.get(status, ()), *codes)
    return out


PATHS: Schema = {
    "/v1": {
        "get": {
            "summary": "the daemon's version and load (as /v1/status)",
            "responses": responses({"200": ok(ref("Status"))}),
        }
    },
    "/v1/status": {
        "get": {"summary": "the daemon's version and load", "responses": responses({"200": ok(ref("Status"))})}
    },
    "/v1/devices": {
        "get": {
            "summary": "every configured device and what it is doing",
            "responses": responses({"200": ok(DEVICES_ANSWER)}),
        }
    },
    "/v1/devices/probe": {
        "post": {
            "summary": "read idle devices' description documents now (HTTP only); without a body, every device's",
            "requestBody": body(obj({"devices": {"type": "array", "items": NAME, "minItems": 1}}, required=())),
            "responses": responses({"200": ok(DEVICES_ANSWER)}, {400: BODY_CODES, 404: ("unknown_device",)}),
        }
    },
    "/v1/jobs": {
        "get": {
            "summary": "a page of the job history, newest first",
            "parameters": [
                {"name": "device", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE}},
                {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
            ],
            "responses": responses(
                {"200": ok(obj({"jobs": {"type": "array", "items": ref("Job")}, "next_cursor": STRING_OR_NULL}))},
                {404: ("unknown_device",)},
            ),
        },
        "post": {
            "summary": "start an upgrade",
            "requestBody": body(
                obj(
                    {
                        "device": NAME,
                        "firmware": {
                            "description": "one image, or one of each kind (the device is sent the one for its build)",
                            "oneOf": [
                                NAME,
                                {"type": "array", "items": NAME, "minItems": 1, "maxItems": MAX_FIRMWARE_SET},
                            ],
                        },
                        "options": OPTIONS,
                    },
                    required=("device", "firmware"),
                ),
                required=True,
            ),
            "responses": responses(
                {"201": ok(JOB_ANSWER, "accepted: running, or queued with its position", LOCATION)},
                {
                    400: (*BODY_CODES, "missing_field", "bad_options", "firmware_invalid", "wrong_image_kind"),
                    403: ("firmware_outside",),
                    404: ("unknown_device", "firmware_not_found"),
                    409: ("busy",),
                },
            ),
        },
    },
    "/v1/jobs/{job}": {
        "get": {
            "summary": "one job, with its history",
            "parameters": [JOB_ID],
            "responses": responses({"200": ok(JOB_ANSWER)}, {404: ("unknown_job",)}),
        }
    },
    "/v1/jobs/{job}/cancel": {
        "post": {
            "summary": "cancel a queued or running job (STOP is sent to the device)",
            "parameters": [JOB_ID],
            "requestBody": CANCEL_BODY,
            "responses": responses(
                {"200": ok(JOB_ANSWER)}, {400: BODY_CODES, 404: ("unknown_job",), 409: ("not_active",)}
            ),
        }
    },
    "/v1/jobs/{job}/resume": {
        "post": {
            "summary": "a new job for an interrupted, failed or aborted one",
            "parameters": [JOB_ID],
            "requestBody": body(obj({"force": {"type": "boolean"}}, required=())),
            "responses": responses(
                {"201": ok(JOB_ANSWER, "the new job", LOCATION)},
                {
                    400: (*BODY_CODES, "firmware_invalid", "wrong_image_kind"),
                    403: ("firmware_outside",),
                    404: ("unknown_job", "unknown_device", "firmware_not_found"),
                    409: ("not_resumable", "busy", "superseded"),
                },
            ),
        }
    },
    "/v1/jobs/{job}/events": {
        "get": {
            "summary": "one job's live events; the stream ends after its outcome",
            "parameters": [JOB_ID],
            "responses": responses({"200": sse("`job` (a snapshot)", JOB_STREAM_EVENTS)}, {404: ("unknown_job",)}),
        }
    },
    "/v1/events": {
        "get": {
            "summary": "every job's live events, until the client goes or the daemon stops",
            "responses": responses({"200": sse("`snapshot` (the active jobs and every device)", ALL_EVENTS)}),
        }
    },
    "/v1/firmware": {
        "get": {
            "summary": "the images in firmware_dir",
            "responses": responses(
                {"200": ok(obj({"firmware": {"type": "array", "items": ref("Firmware")}}))},
                firmware_codes("unavailable"),
            ),
        }
    },
    "/v1/firmware/{name}": {
        "get": {
            "summary": "one image",
            "parameters": [FIRMWARE_NAME],
            "responses": responses(
                {"200": ok(FIRMWARE_ANSWER)}, firmware_codes("bad_name", "outside", "not_found", "unavailable")
            ),
        },
        "put": {
            "summary": "upload an image (replaces one of the same name that no active job uses, unless If-None-Match: *)",
            "parameters": [
                FIRMWARE_NAME,
                {
                    "name": "If-None-Match",
                    "in": "header",
                    "description": "`*`: store it only if no image has this name yet (else 409 firmware_exists); "
                    "other values are ignored",
                    "schema": {"type": "string"},
                },
            ],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": responses(
                {"201": ok(FIRMWARE_ANSWER, "stored (fsynced, then renamed)", LOCATION)},
                firmware_codes("bad_name", "outside", "in_use", "exists", "empty", "too_large", "unavailable"),
            ),
        },
        "delete": {
            "summary": "remove an image that no queued or running job uses",
            "parameters": [FIRMWARE_NAME],
            "responses": responses(
                {"200": ok(obj({"removed": ref("Firmware")}))},
                firmware_codes("bad_name", "outside", "not_found", "in_use", "unavailable"),
            ),
        },
    },
    "/v1/batches": {
        "get": {
            "summary": "a page of the batches, newest first (without their members and jobs)",
            "parameters": [
                {
                    "name": "limit",
                    "in": "query",
                    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_PAGE},
                },
                {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
            ],
            "responses": responses(
                {"200": ok(obj({"batches": {"type": "array", "items": ref("Batch")}, "next_cursor": STRING_OR_NULL}))}
            ),
        },
        "post": {
            "summary": "start a batch: one firmware for a set of devices under a policy (docs/batches.md)",
            "requestBody": body(
                obj(
                    {
                        "firmware": NAME,
                        "devices": {"type": "array", "items": NAME, "minItems": 1},
                        "all": {"const": True},
                        "tag": {"type": "string", "minLength": 1},
                        "policy": POLICY_REQUEST,
                        "target_version": {"type": "string", "minLength": 1},
                        "options": OPTIONS,
                    },
                    required=("firmware",),
                ),
                required=True,
            ),
            "responses": responses(
                {"201": ok(BATCH_ANSWER, "accepted and journaled: probing its devices, or running", LOCATION)},
                {
                    400: (*BODY_CODES, "missing_field", "bad_policy", "bad_options", "firmware_invalid"),
                    403: ("firmware_outside",),
                    404: ("unknown_device", "unknown_tag", "firmware_not_found"),
                    409: ("busy",),
                },
            ),
        },
    },
    "/v1/batches/{batch}": {
        "get": {
            "summary": "one batch, with its members",
            "parameters": [BATCH_ID],
            "responses": responses({"200": ok(BATCH_ANSWER)}, {404: ("unknown_batch",)}),
        }
    },
    "/v1/batches/{batch}/cancel": {
        "post": {
            "summary": "cancel a batch: members not started are skipped, running jobs stopped (STOP)",
            "parameters": [BATCH_ID],
            "requestBody": CANCEL_BODY,
            "responses": responses(
                {"200": ok(BATCH_ANSWER)}, {400: BODY_CODES, 404: ("unknown_batch",), 409: ("not_active",)}
            ),
        }
    },
    "/v1/batches/{batch}/events": {
        "get": {
            "summary": "a batch's live events; the stream ends after batch_end",
            "parameters": [BATCH_ID],
            "responses": responses(
                {"200": sse("`snapshot` (the batch)", BATCH_STREAM_EVENTS)}, {404: ("unknown_batch",)}
            ),
        }
    },
    "/v1/rescue": {
        "post": {
            "summary": "finish devices left waiting in their phase-2 loader (never with a guessed image)",
            "requestBody": body(
                obj(
                    {
                        "devices": {"type": "array", "items": NAME, "minItems": 1},
                        "firmware": {"type": "string", "pattern": "\\S"},
                    },
                    required=(),
                )
            ),
            "responses": responses(
                {"200": ok(obj({"rescues": {"type": "array", "items": ref("RescuePlan")}}))},
                {400: BODY_CODES, 404: ("unknown_device",)},
            ),
        }
    },
    "/v1/openapi.json": {
        "get": {
            "summary": "this document",
            "responses": responses(
                {"200": ok({"type": "object", "required": ["openapi", "info", "paths", "components"]})}
            ),
        }
    },
    "/metrics": {
        "get": {
            "summary": "the Prometheus exposition (docs/metrics.md)",
            "responses": {
                "200": {
                    "description": "Prometheus text format, or OpenMetrics when the Accept header asks for it",
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/openmetrics-text": {"schema": {"type": "string"}},
                    },
                },
                "401": UNAUTHORIZED,
            },
        }
    },
}

for methods in PATHS.values():
    for operation in methods.values():
        operation["responses"].setdefault(
            "405",
            error(405, "method_not_allowed", headers={"Allow": header("the methods this path takes")}),
        )

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "netota control API",
        "version": "v1",
        "description": "The HTTP+JSON API of the netota daemon (docs/control-api.md). Every refusal is an Error body; "
        "each response lists the codes it can carry.",
    },
    "servers": [{"url": "http://127.0.0.1:8780", "description": "daemon.web, or daemon.control over TCP"}],
    "security": [{}, {"bearer": []}],
    "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": PATHS,
}


def main() -> None:
    text = json.dumps(DOCUMENT, indent=2, sort_keys=False) + "\n"
    for path in (ROOT / "netota_daemon" / "control" / "openapi.json", ROOT / "docs" / "openapi.json"):
        path.write_text(text)


if __name__ == "__main__":
    main()
