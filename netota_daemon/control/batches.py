"""The batch and rescue endpoints: ``POST /v1/batches`` (start a batch), ``GET /v1/batches`` (a page,
newest first), ``GET /v1/batches/ID``, ``POST /v1/batches/ID/cancel``, ``GET /v1/batches/ID/events``
(the batch's own event stream) and ``POST /v1/rescue``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from netota_daemon.control.errors import ApiError
from netota_daemon.control.events import EventStreams
from netota_daemon.control.routing import (
    API_PREFIX,
    STREAMING,
    Answer,
    ApiRequest,
    Route,
    Streaming,
    device_names,
    field_of,
    page_limit,
    reason_of,
)
from netota_daemon.daemon.batch_store import DEFAULT_PAGE, MAX_PAGE
from netota_daemon.daemon.batches import BATCH_FIELDS, BatchError, BatchManager, BatchRefusal
from netota_daemon.daemon.jobs import JobQueue, QueueEvent
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.daemon.rescue import Rescuer

CANCEL_FIELDS = {"reason"}
RESCUE_FIELDS = {"devices", "firmware"}
MAX_BATCH_ID = 64
#: The job events a batch's stream carries for its members' jobs.
JOB_EVENTS = ("state", "phase", "progress", "waiting", "outcome")


class BatchEndpoints:
    def __init__(
        self,
        manager: BatchManager,
        queue: JobQueue,
        streams: EventStreams,
        rescuer: Rescuer,
        registry: DeviceRegistry,
    ) -> None:
        self.manager = manager
        self.queue = queue
        self.streams = streams
        self.rescuer = rescuer
        self.registry = registry

    def routes(self) -> list[Route]:
        return [
            Route(("batches",), {"GET": self.list, "POST": self.start}),
            Route(("batches", "{batch}"), {"GET": self.show}),
            Route(("batches", "{batch}", "cancel"), {"POST": self.cancel}),
            Route(("batches", "{batch}", "events"), {"GET": self.events}),
            Route(("rescue",), {"POST": self.rescue}),
        ]

    def _batch_id(self, request: ApiRequest) -> str:
        batch_id = request.params["batch"]
        if len(batch_id) > MAX_BATCH_ID:
            raise BatchError(BatchRefusal.UNKNOWN_BATCH, f"no batch {batch_id[:MAX_BATCH_ID]!r}...")
        return batch_id

    async def start(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(BATCH_FIELDS, {"firmware"})
        batch = await self.manager.create(body)
        return Answer({"batch": batch}, 201, {"location": f"/{API_PREFIX}/batches/{batch['id']}"})

    async def list(self, request: ApiRequest) -> Answer:
        query = request.query(("limit", "cursor"))
        return Answer(await self.manager.page(page_limit(query, DEFAULT_PAGE, MAX_PAGE), query.get("cursor")))

    async def show(self, request: ApiRequest) -> Answer:
        request.query(())
        return Answer({"batch": await self.manager.get(self._batch_id(request))})

    async def cancel(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(CANCEL_FIELDS)
        reason = reason_of(body, "batch cancelled")
        return Answer({"batch": await self.manager.cancel(self._batch_id(request), reason)})

    async def events(self, request: ApiRequest) -> Streaming:
        request.query(())
        batch_id = self._batch_id(request)
        snapshot = await self.manager.get(batch_id)  # 404 before the stream opens
        manager, queue = self.manager, self.queue

        def subscribe(deliver: Callable[[QueueEvent], None]) -> Callable[[], None]:
            stop_jobs = queue.subscribe(deliver)
            stop_batches = manager.subscribe(deliver)

            def unsubscribe() -> None:
                stop_jobs()
                stop_batches()

            return unsubscribe

        def accept(event: QueueEvent) -> bool:
            if event.get("batch") == batch_id:
                return True
            return event.get("type") in JOB_EVENTS and event.get("job") in manager.job_ids(batch_id)

        def last(event: QueueEvent) -> bool:
            return event.get("type") == "batch_end" and event.get("batch") == batch_id

        # The snapshot was read from memory as its Deferred fired, and this continues in the same
        # call: no event can fall between the snapshot and the subscription.
        stream = self.streams.open_stream(request.request, accept, last, subscribe)
        stream.send("snapshot", {"type": "snapshot", "batch": batch_id, "snapshot": snapshot})
        if not manager.is_active(batch_id):
            stream.close()
        return STREAMING

    async def rescue(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(RESCUE_FIELDS)
        names = device_names(body, self.registry)
        firmware = field_of(body, "firmware", str, "a string")
        if firmware is not None and not firmware.strip():
            raise ApiError(400, "bad_field", "firmware must be a file name in firmware_dir")
        plans = await self.rescuer.rescue(names, firmware)
        answer: dict[str, Any] = {"rescues": [plan.to_json() for plan in plans]}
        return Answer(answer)
