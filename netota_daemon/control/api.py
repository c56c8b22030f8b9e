"""``ControlApi``: the control API put together, the resource with every endpoint group and the site
that serves it with its connection bounds. New endpoint groups (metrics, firmware, batches, the
OpenAPI document, a dashboard page) are modules of their own, added to the resource here."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from netota_daemon.control.channel import STREAM_RESERVE, ControlSite
from netota_daemon.control.devices import DeviceEndpoints
from netota_daemon.control.events import EventStreams
from netota_daemon.control.jobs import JobEndpoints
from netota_daemon.control.routing import ControlResource
from netota_daemon.control.status import StatusEndpoints
from netota_daemon.daemon.jobs import JobQueue
from netota_daemon.daemon.probe import DeviceProber
from netota_daemon.daemon.registry import DeviceRegistry


class ControlApi:
    def __init__(
        self,
        queue: JobQueue,
        registry: DeviceRegistry,
        prober: DeviceProber,
        clock: IReactorTime,
        token: str | None = None,
        idle_timeout: float = 60.0,
        max_connections: int = 256,
    ) -> None:
        self.streams = EventStreams(queue, registry, clock, max_streams=max(1, max_connections - STREAM_RESERVE))
        self.resource = ControlResource(token)
        for group in (
            StatusEndpoints(queue, registry),
            DeviceEndpoints(registry, prober),
            JobEndpoints(queue),
            self.streams,
        ):
            self.resource.add(group.routes())
        self.site = ControlSite(self.resource, clock, idle_timeout, max_connections)

    @property
    def stopped(self) -> bool:
        return self.resource.stopped

    @stopped.setter
    def stopped(self, value: bool) -> None:
        self.resource.stopped = value

    def render(self, request: object) -> object:
        """Render one request (tests drive the resource in memory with this)."""
        return self.resource.render(request)

    def close_streams(self, reason: str) -> None:
        self.streams.close_all(reason)
