"""``GET /v1/status`` (and ``GET /v1``): the daemon's version and how busy it is."""

from __future__ import annotations

from netota_daemon import __version__
from netota_daemon.control.routing import API_PREFIX, Answer, ApiRequest, Route
from netota_daemon.daemon.batches import BatchManager
from netota_daemon.daemon.jobs import JobQueue
from netota_daemon.daemon.notify import JobNotifier
from netota_daemon.daemon.registry import DeviceRegistry


class StatusEndpoints:
    def __init__(
        self,
        queue: JobQueue,
        registry: DeviceRegistry,
        notifier: JobNotifier | None = None,
        batches: BatchManager | None = None,
    ) -> None:
        self.queue = queue
        self.registry = registry
        self.notifier = notifier
        self.batches = batches

    def routes(self) -> list[Route]:
        return [Route((), {"GET": self.status}), Route(("status",), {"GET": self.status})]

    def status(self, request: ApiRequest) -> Answer:
        request.query(())
        return Answer(
            {
                "version": __version__,
                "api": API_PREFIX,
                "max_parallel": self.queue.max_parallel,
                "running": self.queue.running_count(),
                "queued": self.queue.queued_count(),
                "devices": len(self.registry.names()),
                "batches_active": len(self.batches.batches) if self.batches is not None else 0,
                "notifications": self.notifier.stats() if self.notifier is not None else {},
            }
        )
