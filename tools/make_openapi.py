"""Writes the control API's OpenAPI 3.1 document: netota_daemon/control/openapi.json and the same
bytes in docs/openapi.json. Run it after changing the API: `python tools/make_openapi.py`
(tests/test_openapi.py checks that both files are what this writes, and that they name every route)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
J = "application/json"


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def error(*codes: str, description: str = "") -> dict:
    return {
        "description": description or "refused: " + ", ".join(codes),
        "content": {J: {"schema": ref("Error")}},
    }


def ok(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {J: {"schema": schema}}}


def body(schema: dict, required: bool = False) -> dict:
    return {"required": required, "content": {J: {"schema": schema}}}


def obj(properties: dict, required: tuple[str, ...] = (), extra: bool = True) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": extra}
    if required:
        schema["required"] = list(required)
    return schema


COMMON = {
    "400": error("bad_query", "bad_json", "unknown_field", "missing_field", "bad_field", "bad_request", "not_http"),
    "401": error("unauthorized", description="a token is configured and the request has no valid bearer token"),
    "503": error("shutting_down", "journal_unavailable", "too_many_connections", "too_many_streams"),
}


def responses(success: dict, *more: tuple[str, dict]) -> dict:
    out = dict(success)
    out.update(COMMON)
    for status, answer in more:
        out[status] = answer
    return out


NUMBER_OR_NULL = {"type": ["number", "null"]}
STRING_OR_NULL = {"type": ["string", "null"]}
INT_OR_NULL = {"type": ["integer", "null"]}
PHASE = {"type": "string", "enum": ["detect", "phase1", "reboot", "phase2", "upload", "verify", "done"]}

SCHEMAS = {
    "Error": obj(
        {
            "error": obj(
                {"code": {"type": "string"}, "message": {"type": "string"}, "status": {"type": "integer"}},
                ("code", "message", "status"),
                extra=False,
            )
        },
        ("error",),
        extra=False,
    ),
    "Status": obj(
        {
            "version": {"type": "string"},
            "api": {"type": "string", "const": "v1"},
            "max_parallel": {"type": "integer"},
            "running": {"type": "integer"},
            "queued": {"type": "integer"},
            "devices": {"type": "integer"},
            "batches_active": {"type": "integer"},
            "notifications": {
                "type": "object",
                "description": "each job-end hook's counters (on_job_end, webhook): sent, failed, dropped, "
                "attempts, pending",
                "additionalProperties": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        ("version", "api", "max_parallel", "running", "devices"),
    ),
    "Progress": obj(
        {
            "phase": PHASE,
            "percent": {"type": "number", "minimum": 0, "maximum": 100},
            "done_bytes": {"type": "integer"},
            "total_bytes": {"type": "integer"},
            "bytes_served": {"type": "integer"},
            "basis": {"type": "string"},
            "state": {"type": "string", "enum": ["transferring", "device_working", "done"]},
            "activity": {"type": "string"},
            "eta": NUMBER_OR_NULL,
            "rate": {"type": "number"},
            "device_percent": {"type": "integer"},
            "point_of_no_return": {"type": "boolean"},
        },
        ("phase", "percent"),
    ),
    "Waiting": obj(
        {"phase": PHASE, "message": {"type": "string"}, "attempt": {"type": "integer"}, "last_error": STRING_OR_NULL}
    ),
    "Outcome": obj(
        {
            "kind": {
                "type": "string",
                "enum": ["succeeded", "already_current", "unverified", "failed", "aborted", "not_applicable"],
            },
            "message": {"type": "string"},
            "phase": PHASE,
            "failure": STRING_OR_NULL,
            "advice": {"type": "string"},
            "point_of_no_return": {"type": "boolean"},
            "firmware_version_before": STRING_OR_NULL,
            "firmware_version_after": STRING_OR_NULL,
            "details": {"type": "object"},
        },
        ("kind", "message", "phase"),
    ),
    "Job": obj(
        {
            "id": {"type": "string"},
            "device": {"type": "string"},
            "firmware": {"type": "string"},
            "firmware_set": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
            "state": {"type": "string", "enum": ["queued", "running", "cancelling", "finished", "interrupted"]},
            "phase": PHASE,
            "point_of_no_return": {"type": "boolean"},
            "position": INT_OR_NULL,
            "progress": {"oneOf": [ref("Progress"), {"type": "null"}]},
            "waiting": {"oneOf": [ref("Waiting"), {"type": "null"}]},
            "created": {"type": "number"},
            "started": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "outcome": {"oneOf": [ref("Outcome"), {"type": "null"}]},
            "message": {"type": "string"},
            "advice": {"type": "string"},
            "resumable": {"type": "boolean"},
            "resumed_from": STRING_OR_NULL,
            "resumed_by": STRING_OR_NULL,
            "options": {"type": "object"},
            "batch": {"type": ["string", "null"], "description": "the batch the job belongs to"},
            "image_sha256": {"type": ["string", "null"], "description": "the SHA-256 of the image the job flashed"},
            "history": {
                "type": "array",
                "items": obj({"time": {"type": "number"}, "state": {"type": "string"}, "phase": {"type": "string"}}),
            },
        },
        ("id", "device", "firmware", "state", "phase"),
    ),
    "Device": obj(
        {
            "name": {"type": "string"},
            "host": {"type": "string"},
            "ctp_port": {"type": "integer"},
            "http_port": {"type": "integer"},
            "ota_port": {"type": "integer"},
            "interface": STRING_OR_NULL,
            "state": {"type": "string"},
            "job": STRING_OR_NULL,
            "phase": {"oneOf": [PHASE, {"type": "null"}]},
            "percent": NUMBER_OR_NULL,
            "rate": NUMBER_OR_NULL,
            "queue_position": INT_OR_NULL,
            "last_job": STRING_OR_NULL,
            "last_outcome": STRING_OR_NULL,
            "firmware_version": STRING_OR_NULL,
            "probe": {"type": ["object", "null"]},
        },
        ("name", "state"),
    ),
    "Firmware": obj(
        {
            "name": {"type": "string"},
            "size": {"type": "integer", "minimum": 1},
            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            "modified": {"type": "number"},
            "kind": {"type": ["string", "null"], "enum": ["single_backup", "double_backup", "unknown", None]},
            "description": STRING_OR_NULL,
            "version": STRING_OR_NULL,
        },
        ("name", "size", "sha256", "modified", "kind"),
    ),
    "BatchMember": obj(
        {
            "device": {"type": "string"},
            "state": {
                "type": "string",
                "enum": [
                    "pending",
                    "ready",
                    "starting",
                    "running",
                    "cancelling",
                    "succeeded",
                    "failed",
                    "cancelled",
                    "skipped",
                    "refused",
                ],
            },
            "canary": {"type": "boolean"},
            "reason": {
                "type": ["string", "null"],
                "enum": [
                    "already_current",
                    "max_failures",
                    "canary_failed",
                    "cancelled",
                    "unreachable",
                    "wrong_kind",
                    "busy",
                    "start_refused",
                    "image_changed",
                    None,
                ],
            },
            "message": {"type": "string"},
            "job": STRING_OR_NULL,
            "jobs": {"type": "array", "items": {"type": "string"}},
            "probe": {"type": ["object", "null"]},
            "firmware_version": STRING_OR_NULL,
            "outcome": {"type": ["object", "null"]},
            "started": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "duration": NUMBER_OR_NULL,
        },
        ("device", "state"),
    ),
    "Batch": obj(
        {
            "id": {"type": "string"},
            "created": {"type": "number"},
            "firmware": {"type": "string"},
            "image": obj({"sha256": {"type": "string"}, "kind": {"type": "string"}, "size": {"type": "integer"}}),
            "selection": {"type": "object"},
            "options": {"type": "object"},
            "state": {
                "type": "string",
                "enum": ["preflight", "running", "stopping", "cancelling", "finished", "cancelled"],
            },
            "result": {"type": ["string", "null"], "enum": ["succeeded", "failed", "cancelled", None]},
            "stop_reason": STRING_OR_NULL,
            "stop_message": {"type": "string"},
            "policy": {"type": "object"},
            "max_parallel": {"type": "integer"},
            "target": {"type": ["object", "null"]},
            "notes": {"type": "array", "items": {"type": "string"}},
            "counts": {"type": "object", "additionalProperties": {"type": "integer"}},
            "began": NUMBER_OR_NULL,
            "finished": NUMBER_OR_NULL,
            "duration": NUMBER_OR_NULL,
            "jobs": {"type": "array", "items": {"type": "string"}},
            "members": {"type": "array", "items": ref("BatchMember")},
            "journal_error": STRING_OR_NULL,
        },
        ("id", "firmware", "state", "counts"),
    ),
    "RescuePlan": obj(
        {
            "device": {"type": "string"},
            "action": {"type": "string", "enum": ["resume", "start", "none", "needs_firmware"]},
            "message": {"type": "string"},
            "job": STRING_OR_NULL,
            "firmware": STRING_OR_NULL,
            "started": STRING_OR_NULL,
        },
        ("device", "action", "message"),
    ),
}

JOB_ID = {"name": "job", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ID = {"name": "batch", "in": "path", "required": True, "schema": {"type": "string"}}
BATCH_ANSWER = obj({"batch": ref("Batch")}, ("batch",))
POLICY = obj(
    {
        "canary": {"type": "integer", "minimum": 0},
        "max_failures": {"type": ["integer", "null"], "minimum": 1},
        "preflight": {"type": "boolean"},
        "skip_current": {"type": "boolean"},
        "max_parallel": {"type": ["integer", "null"], "minimum": 1},
        "resume_interrupted": {"type": "boolean"},
    },
    extra=False,
)
FIRMWARE_NAME = {
    "name": "name",
    "in": "path",
    "required": True,
    "description": "a plain file name in firmware_dir (no '/', no '..', not starting with a dot)",
    "schema": {"type": "string"},
}
JOB_ANSWER = obj({"job": ref("Job")}, ("job",))
SSE = {
    "description": "server-sent events (`event: TYPE` / `data: JSON`): snapshot or job first, then state, phase, "
    "progress, waiting, outcome and shutdown events, and `:` keep-alive lines; see docs/control-api.md",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}

PATHS = {
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
            "responses": responses(
                {"200": ok(obj({"devices": {"type": "array", "items": ref("Device")}}, ("devices",)))}
            ),
        }
    },
    "/v1/devices/probe": {
        "post": {
            "summary": "read idle devices' description documents now (HTTP only)",
            "requestBody": body(
                obj({"devices": {"type": "array", "items": {"type": "string"}, "minItems": 1}}, extra=False)
            ),
            "responses": responses(
                {"200": ok(obj({"devices": {"type": "array", "items": ref("Device")}}, ("devices",)))},
                ("404", error("unknown_device")),
                ("413", error("too_large")),
            ),
        }
    },
    "/v1/jobs": {
        "get": {
            "summary": "a page of the job history, newest first",
            "parameters": [
                {"name": "device", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}},
                {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,19}$"}},
            ],
            "responses": responses(
                {
                    "200": ok(
                        obj({"jobs": {"type": "array", "items": ref("Job")}, "next_cursor": STRING_OR_NULL}, ("jobs",))
                    )
                },
                ("404", error("unknown_device")),
            ),
        },
        "post": {
            "summary": "start an upgrade",
            "requestBody": body(
                obj(
                    {
                        "device": {"type": "string"},
                        "firmware": {
                            "description": "one image, or one of each kind (the device is sent the one for its build)",
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                            ],
                        },
                        "options": {"type": "object"},
                    },
                    ("device", "firmware"),
                    extra=False,
                ),
                required=True,
            ),
            "responses": responses(
                {"201": ok(JOB_ANSWER, "accepted: running, or queued with its position")},
                ("403", error("firmware_outside")),
                ("404", error("unknown_device", "firmware_not_found")),
                ("409", error("busy")),
                ("413", error("too_large")),
            ),
        },
    },
    "/v1/jobs/{job}": {
        "get": {
            "summary": "one job, with its history",
            "parameters": [JOB_ID],
            "responses": responses({"200": ok(JOB_ANSWER)}, ("404", error("unknown_job"))),
        }
    },
    "/v1/jobs/{job}/cancel": {
        "post": {
            "summary": "cancel a queued or running job (STOP is sent to the device)",
            "parameters": [JOB_ID],
            "requestBody": body(obj({"reason": {"type": "string", "maxLength": 500}}, extra=False)),
            "responses": responses(
                {"200": ok(JOB_ANSWER)},
                ("404", error("unknown_job")),
                ("409", error("not_active")),
                ("413", error("too_large")),
            ),
        }
    },
    "/v1/jobs/{job}/resume": {
        "post": {
            "summary": "a new job for an interrupted, failed or aborted one",
            "parameters": [JOB_ID],
            "requestBody": body(obj({"force": {"type": "boolean"}}, extra=False)),
            "responses": responses(
                {"201": ok(JOB_ANSWER)},
                ("404", error("unknown_job")),
                ("409", error("not_resumable", "busy", "superseded")),
                ("413", error("too_large")),
            ),
        }
    },
    "/v1/jobs/{job}/events": {
        "get": {
            "summary": "one job's live events",
            "parameters": [JOB_ID],
            "responses": responses({"200": SSE}, ("404", error("unknown_job"))),
        }
    },
    "/v1/events": {"get": {"summary": "every job's live events", "responses": responses({"200": SSE})}},
    "/v1/firmware": {
        "get": {
            "summary": "the images in firmware_dir",
            "responses": responses(
                {"200": ok(obj({"firmware": {"type": "array", "items": ref("Firmware")}}, ("firmware",)))}
            ),
        }
    },
    "/v1/firmware/{name}": {
        "get": {
            "summary": "one image",
            "parameters": [FIRMWARE_NAME],
            "responses": responses(
                {"200": ok(obj({"firmware": ref("Firmware")}, ("firmware",)))},
                ("403", error("firmware_outside")),
                ("404", error("firmware_not_found")),
            ),
        },
        "put": {
            "summary": "upload an image (replaces one of the same name that no active job uses)",
            "parameters": [FIRMWARE_NAME],
            "requestBody": {
                "required": True,
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            "responses": responses(
                {"201": ok(obj({"firmware": ref("Firmware")}, ("firmware",)), "stored (fsynced, then renamed)")},
                ("403", error("firmware_outside")),
                ("409", error("firmware_in_use")),
                ("413", error("too_large", description="over daemon.firmware_max_upload")),
            ),
        },
        "delete": {
            "summary": "remove an image that no queued or running job uses",
            "parameters": [FIRMWARE_NAME],
            "responses": responses(
                {"200": ok(obj({"removed": ref("Firmware")}, ("removed",)))},
                ("403", error("firmware_outside")),
                ("404", error("firmware_not_found")),
                ("409", error("firmware_in_use")),
            ),
        },
    },
    "/v1/batches": {
        "get": {
            "summary": "a page of the batches, newest first (without their members)",
            "parameters": [
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                {"name": "cursor", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"}},
            ],
            "responses": responses(
                {
                    "200": ok(
                        obj(
                            {"batches": {"type": "array", "items": ref("Batch")}, "next_cursor": STRING_OR_NULL},
                            ("batches",),
                        )
                    )
                }
            ),
        },
        "post": {
            "summary": "start a batch: one firmware for a set of devices under a policy (docs/batches.md)",
            "requestBody": body(
                obj(
                    {
                        "firmware": {"type": "string"},
                        "devices": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "all": {"type": "boolean", "const": True},
                        "tag": {"type": "string", "minLength": 1},
                        "policy": POLICY,
                        "target_version": {"type": "string", "minLength": 1},
                        "options": {"type": "object"},
                    },
                    ("firmware",),
                    extra=False,
                ),
                required=True,
            ),
            "responses": responses(
                {"201": ok(BATCH_ANSWER, "accepted and journaled: probing its devices, or running")},
                ("400", error("bad_policy", "bad_options", "bad_field", "firmware_invalid")),
                ("403", error("firmware_outside")),
                ("404", error("unknown_device", "unknown_tag", "firmware_not_found")),
                ("409", error("busy", description="a device belongs to an unfinished batch")),
                ("413", error("too_large")),
            ),
        },
    },
    "/v1/batches/{batch}": {
        "get": {
            "summary": "one batch, with its members",
            "parameters": [BATCH_ID],
            "responses": responses({"200": ok(BATCH_ANSWER)}, ("404", error("unknown_batch"))),
        }
    },
    "/v1/batches/{batch}/cancel": {
        "post": {
            "summary": "cancel a batch: members not started are skipped, running jobs stopped (STOP)",
            "parameters": [BATCH_ID],
            "requestBody": body(obj({"reason": {"type": "string", "maxLength": 500}}, extra=False)),
            "responses": responses(
                {"200": ok(BATCH_ANSWER)},
                ("404", error("unknown_batch")),
                ("409", error("not_active")),
                ("413", error("too_large")),
            ),
        }
    },
    "/v1/batches/{batch}/events": {
        "get": {
            "summary": "a batch's live events: snapshot, member, batch, its jobs' events, batch_end",
            "parameters": [BATCH_ID],
            "responses": responses({"200": SSE}, ("404", error("unknown_batch"))),
        }
    },
    "/v1/rescue": {
        "post": {
            "summary": "finish devices left waiting in their phase-2 loader (never with a guessed image)",
            "requestBody": body(
                obj(
                    {
                        "devices": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                        "firmware": {"type": "string", "minLength": 1},
                    },
                    extra=False,
                )
            ),
            "responses": responses(
                {"200": ok(obj({"rescues": {"type": "array", "items": ref("RescuePlan")}}, ("rescues",)))},
                ("404", error("unknown_device")),
                ("413", error("too_large")),
            ),
        }
    },
    "/v1/openapi.json": {"get": {"summary": "this document", "responses": responses({"200": ok({"type": "object"})})}},
    "/metrics": {
        "get": {
            "summary": "the Prometheus exposition (docs/metrics.md)",
            "responses": {
                "200": {
                    "description": "Prometheus text format, or OpenMetrics when asked for",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                "401": COMMON["401"],
            },
        }
    },
}

for methods in PATHS.values():
    for operation in methods.values():
        operation["responses"].setdefault("405", error("method_not_allowed"))

DOCUMENT = {
    "openapi": "3.1.0",
    "info": {
        "title": "netota control API",
        "version": "v1",
        "description": "The HTTP+JSON API of the netota daemon (docs/control-api.md). Every refusal is an Error body.",
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
