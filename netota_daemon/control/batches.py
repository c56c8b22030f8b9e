"""The batch and rescue endpoints: ``POST /v1/batches`` (start a batch), ``GET /v1/batches`` (a page,
newest first), ``GET /v1/batches/ID``, ``POST /v1/batches/ID/cancel``, ``GET /v1/batches/ID/events``
(the batch's own event stream) and ``POST /v1/rescue``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from netota_daemon.control.errors import ApiError
from netota_daemon.control.events import EventStreams
from netota_daemon.control.routing import API_PREFIX, STREAMING, Answer, ApiRequest, Route, Streaming, field_of
from netota_daemon.daemon.batch_store import DEFAULT_PAGE, MAX_PAGE
from netota_daemon.daemon.batches import BATCH_FIELDS, BatchError, BatchManager, BatchRefusal
from netota_daemon.daemon.jobs import JobQueue, QueueEvent
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.daemon.rescue import Rescuer

CANCEL_FIELDS = {"reason"}
RESCUE_FIELDS = {"devices", "firmware"}
MAX_REASON = 500
MAX_BATCH_ID = 64
#: The job events a batch's stream carries for its members' jobs.
JOB_EVENTS = ("state", "phase", "progress", "waiting", "outcome")


def _digits(text: str, longest: int) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= longest


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
        limit = DEFAULT_PAGE
        if "limit" in query:
            text = query["limit"]
            if not _digits(text, 8) or not 1 <= int(text) <= MAX_PAGE:
                raise ApiError(400, "bad_query", f"limit must be an integer from 1 to {MAX_PAGE}, not {text[:20]!r}")
            limit = int(text)
        return Answer(await self.manager.page(limit, query.get("cursor")))

    async def show(self, request: ApiRequest) -> Answer:
        request.query(())
        return Answer({"batch": await self.manager.get(self._batch_id(request))})

    async def cancel(self, request: ApiRequest) -> Answer:
        request.query(())
        body = request.body(CANCEL_FIELDS)
        reason = field_of(body, "reason", str, "a string", "batch cancelled")
        if len(reason) > MAX_REASON or not reason.strip():
            raise ApiError(400, "bad_field", f"reason must be a non-empty text of at most {MAX_REASON} characters")
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
        names = body.get("devices")
        if "devices" in body:  # given, it names devices: null is not "all of them" (leave the field out)
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ApiError(400, "bad_field", "devices must be a non-empty list of device names")
            unknown = [n for n in dict.fromkeys(names) if n not in self.registry]
            if unknown:
                raise ApiError(
                    404,
                    "unknown_device",
                    f"no such device(s) {', '.join(repr(n) for n in unknown[:10])} "
                    f"(known: {', '.join(self.registry.names())})",
                )
        firmware = field_of(body, "firmware", str, "a string")
        if firmware is not None and not firmware.strip():
            raise ApiError(400, "bad_field", "firmware must be a file name in firmware_dir")
        plans = await self.rescuer.rescue(names, firmware)
        answer: dict[str, Any] = {"rescues": [plan.to_json() for plan in plans]}
        return Answer(answer)
