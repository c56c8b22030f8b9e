"""``QueuePort``: the job queue and its journal as batches and rescue see them (the narrow
``BatchQueue`` of :mod:`batches` and ``RescueQueue`` of :mod:`rescue`): every answer is a job's JSON,
every refusal a :class:`~netota_daemon.daemon.batches.QueueRefused` with the queue's own code."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from netota_daemon.daemon.batch_policy import EarlierJob
from netota_daemon.daemon.batches import QueueRefused
from netota_daemon.daemon.jobs import JobError, JobQueue, UnknownJob
from netota_daemon.daemon.journal import JobRecord, JournalError
from netota_daemon.daemon.journal_thread import AsyncJournal

T = TypeVar("T")


async def _answer(d: Awaitable[T]) -> T:
    try:
        return await d
    except JobError as e:
        raise QueueRefused(e.code, e.message) from None
    except JournalError as e:
        raise QueueRefused("journal_unavailable", str(e)) from None


class QueuePort:
    def __init__(self, queue: JobQueue, journal: AsyncJournal) -> None:
        self.queue = queue
        self.journal = journal

    @property
    def max_parallel(self) -> int:
        return self.queue.max_parallel

    def _json(self, record: JobRecord | None) -> dict[str, Any] | None:
        return self.queue.job_json(record) if record is not None else None

    def start(
        self, device: str, firmware: str, options: dict[str, Any] | None = None, batch: str | None = None
    ) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(_answer(self.queue.start(device, firmware, options, batch=batch)))

    def resume(self, job_id: str, batch: str | None = None) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(_answer(self.queue.resume(job_id, batch=batch)))

    def cancel(self, job_id: str, reason: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(_answer(self.queue.cancel(job_id, reason)))

    async def _wait(self, job_id: str) -> dict[str, Any]:
        record = await _answer(self.queue.wait(job_id))
        return self.queue.job_json(record)

    def wait(self, job_id: str) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._wait(job_id))

    async def _get(self, job_id: str) -> dict[str, Any] | None:
        try:
            return await _answer(self.queue.get(job_id))
        except QueueRefused as e:
            if e.code == UnknownJob.kind.value:
                return None
            raise

    def get(self, job_id: str) -> Deferred[dict[str, Any] | None]:
        return Deferred.fromCoroutine(self._get(job_id))

    async def _batch_job(self, batch_id: str, device: str) -> dict[str, Any] | None:
        return self._json(await _answer(self.journal.batch_job(batch_id, device)))

    def batch_job(self, batch_id: str, device: str) -> Deferred[dict[str, Any] | None]:
        return Deferred.fromCoroutine(self._batch_job(batch_id, device))

    async def _earlier_jobs(self, image_sha256: str) -> list[EarlierJob]:
        records = await _answer(self.journal.image_jobs(image_sha256))
        return [
            EarlierJob(
                id=r.id,
                image_sha256=r.image_sha256,
                outcome=r.outcome.kind.value if r.outcome else None,
                firmware_version_after=r.outcome.firmware_version_after if r.outcome else None,
            )
            for r in records
        ]

    def earlier_jobs(self, image_sha256: str) -> Deferred[list[EarlierJob]]:
        return Deferred.fromCoroutine(self._earlier_jobs(image_sha256))

    async def _device_jobs(self, device: str, limit: int) -> list[dict[str, Any]]:
        records = await _answer(self.journal.device_jobs(device, limit))
        return [self.queue.job_json(r) for r in records]

    def device_jobs(self, device: str, limit: int) -> Deferred[list[dict[str, Any]]]:
        return Deferred.fromCoroutine(self._device_jobs(device, limit))
