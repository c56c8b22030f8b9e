"""The job endpoints: ``GET /v1/jobs`` (a page of the history), ``POST /v1/jobs`` (start),
``GET /v1/jobs/ID``, ``POST /v1/jobs/ID/cancel`` and ``POST /v1/jobs/ID/resume``."""

from __future__ import annotations

from typing import Any

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import API_PREFIX, Answer, ApiRequest, Route, digits, field_of, page_limit, reason_of
from netota_daemon.daemon.jobs import JobQueue, UnknownJob
from netota_daemon.daemon.journal import DEFAULT_PAGE, MAX_PAGE

START_FIELDS = {"device", "firmware", "options"}
CANCEL_FIELDS = {"reason"}
RESUME_FIELDS = {"force"}
MAX_JOB_ID = 64


class JobEndpoints:
    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def routes(self) -> list[Route]:
        return [
            Route(("jobs",), {"GET": self.list_jobs, "POST": self.start}),
            Route(("jobs", "{job}"), {"GET": self.show}),
            Route(("jobs", "{job}", "cancel"), {"POST": self.cancel}),
            Route(("jobs", "{job}", "resume"), {"POST": self.resume}),
        ]

    async def list_jobs(self, request: ApiRequest) -> Answer:
        query = request.query(("device", "limit", "cursor"))
        limit = page_limit(query, DEFAULT_PAGE, MAX_PAGE)
        cursor = query.get("cursor")
        if cursor is not None and not digits(cursor, 19):
            raise ApiError(400, "bad_query", f"cursor {cursor[:20]!r} is not a cursor this daemon gave (next_cursor)")
        jobs, next_cursor = await self.queue.page(query.get("device"), limit, cursor)
        return Answer({"jobs": jobs, "next_cursor": next_cursor})

    async def start(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(START_FIELDS, {"device", "firmware"})
        field_of(body, "device", str, "a string")
        field_of(body, "firmware", (str, list), "a file name, or a list of file names (one image of each kind)")
        job = await self.queue.start(body["device"], body["firmware"], body.get("options"))
        return Answer({"job": job}, 201, {"location": f"/{API_PREFIX}/jobs/{job['id']}"})

    def _job_id(self, request: ApiRequest) -> str:
        job_id = request.params["job"]
        if len(job_id) > MAX_JOB_ID:
            raise UnknownJob(f"no job {job_id[:MAX_JOB_ID]!r}...")
        return job_id

    async def show(self, request: ApiRequest) -> Answer:
        request.query(())
        return Answer({"job": await self.queue.get(self._job_id(request))})

    async def cancel(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(CANCEL_FIELDS)
        reason = reason_of(body, "cancelled by user")
        job: dict[str, Any] = await self.queue.cancel(self._job_id(request), reason)
        return Answer({"job": job})

    async def resume(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(RESUME_FIELDS)
        force = field_of(body, "force", bool, "true or false", False)
        job = await self.queue.resume(self._job_id(request), force=force)
        return Answer({"job": job}, 201, {"location": f"/{API_PREFIX}/jobs/{job['id']}"})
