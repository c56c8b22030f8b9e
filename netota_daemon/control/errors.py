"""Errors of the control API: :class:`ApiError` (a status, a code, a message) and the mapping from
the job queue's refusal kinds to HTTP statuses. HTTP status codes live here, not in the daemon."""

from __future__ import annotations

import json
from typing import Any

from netota_daemon.daemon.batches import BatchError, BatchRefusal
from netota_daemon.daemon.jobs import JobError, RefusalKind

#: The HTTP status of each refusal the job queue can give.
STATUS_OF_REFUSAL: dict[RefusalKind, int] = {
    RefusalKind.UNKNOWN_DEVICE: 404,
    RefusalKind.UNKNOWN_JOB: 404,
    RefusalKind.BUSY: 409,
    RefusalKind.NOT_ACTIVE: 409,
    RefusalKind.NOT_RESUMABLE: 409,
    RefusalKind.SUPERSEDED: 409,
    RefusalKind.SHUTTING_DOWN: 503,
    RefusalKind.BAD_OPTIONS: 400,
    RefusalKind.FIRMWARE_OUTSIDE: 403,
    RefusalKind.FIRMWARE_NOT_FOUND: 404,
    RefusalKind.FIRMWARE_INVALID: 400,
    RefusalKind.WRONG_IMAGE_KIND: 400,
    RefusalKind.JOURNAL_UNAVAILABLE: 503,
}

#: The HTTP status of each refusal of a batch request.
STATUS_OF_BATCH_REFUSAL: dict[BatchRefusal, int] = {
    BatchRefusal.BAD_FIELD: 400,
    BatchRefusal.MISSING_FIELD: 400,
    BatchRefusal.UNKNOWN_FIELD: 400,
    BatchRefusal.BAD_QUERY: 400,
    BatchRefusal.BAD_POLICY: 400,
    BatchRefusal.BAD_OPTIONS: 400,
    BatchRefusal.UNKNOWN_DEVICE: 404,
    BatchRefusal.UNKNOWN_TAG: 404,
    BatchRefusal.BUSY: 409,
    BatchRefusal.FIRMWARE_OUTSIDE: 403,
    BatchRefusal.FIRMWARE_NOT_FOUND: 404,
    BatchRefusal.FIRMWARE_INVALID: 400,
    BatchRefusal.UNKNOWN_BATCH: 404,
    BatchRefusal.NOT_ACTIVE: 409,
    BatchRefusal.SHUTTING_DOWN: 503,
    BatchRefusal.JOURNAL_UNAVAILABLE: 503,
}

REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class ApiError(Exception):
    """A refusal as the API answers it."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> bytes:
        return json_bytes({"error": {"code": self.code, "message": self.message, "status": self.status}})


def from_refusal(error: JobError | BatchError) -> ApiError:
    if isinstance(error, BatchError):
        return ApiError(STATUS_OF_BATCH_REFUSAL[error.kind], error.code, error.message)
    return ApiError(STATUS_OF_REFUSAL[error.kind], error.code, error.message)


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, sort_keys=True) + "\n").encode("utf-8")


def raw_response(error: ApiError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error``, for a connection that is closed after it (the
    request could not be parsed, or never came whole)."""
    body = error.body()
    head = (
        f"HTTP/1.1 {error.status} {REASONS.get(error.status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body
