"""``ControlApi``: the control API put together, the resource with every endpoint group and the site
that serves it with its connection bounds. New endpoint groups (metrics, firmware, batches, the
OpenAPI document, a dashboard page) are modules of their own, added to the resource here."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime

from netota_daemon.control.batches import BatchEndpoints
from netota_daemon.control.channel import STREAM_RESERVE, ControlSite
from netota_daemon.control.devices import DeviceEndpoints
from netota_daemon.control.events import EventStreams
from netota_daemon.control.firmware import FirmwareEndpoints, is_upload
from netota_daemon.control.jobs import JobEndpoints
from netota_daemon.control.metrics_page import MetricsPage
from netota_daemon.control.openapi import OpenApiEndpoints
from netota_daemon.control.routing import ControlResource
from netota_daemon.control.status import StatusEndpoints
from netota_daemon.control.web import HttpRoot, load_assets
from netota_daemon.daemon.batches import BatchManager
from netota_daemon.daemon.jobs import JobQueue
from netota_daemon.daemon.metrics import DaemonMetrics
from netota_daemon.daemon.notify import JobNotifier
from netota_daemon.daemon.probe import DeviceProber
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.daemon.rescue import Rescuer


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
        firmware: FirmwareEndpoints | None = None,
        metrics: DaemonMetrics | None = None,
        batches: BatchManager | None = None,
        rescuer: Rescuer | None = None,
        notifier: JobNotifier | None = None,
    ) -> None:
        self.clock = clock
        self.token = token
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.streams = EventStreams(queue, registry, clock, max_streams=max(1, max_connections - STREAM_RESERVE))
        self.resource = ControlResource(token)
        groups: list[Any] = [
            StatusEndpoints(queue, registry, notifier, batches),
            DeviceEndpoints(registry, prober),
            JobEndpoints(queue),
        ]
        groups += [self.streams, OpenApiEndpoints()]
        if firmware is not None:
            groups.append(firmware)
        if batches is not None and rescuer is not None:
            groups.append(BatchEndpoints(batches, queue, self.streams, rescuer, registry))
        for group in groups:
            self.resource.add(group.routes())
        self.upload_limit = firmware.catalog.max_upload if firmware is not None else None
        self.metrics = metrics
        self.metrics_page = MetricsPage(metrics, token) if metrics is not None else None
        self.site = self.make_site(dashboard=False)

    def make_site(self, dashboard: bool) -> ControlSite:
        """A site for one endpoint: the API and ``/metrics``, and the dashboard's page if asked
        (``daemon.web``). Every site shares the API, its streams and its bounds."""
        root = HttpRoot(self.resource, self.metrics_page, load_assets() if dashboard else None)
        return ControlSite(root, self.clock, self.idle_timeout, self.max_connections, self._upload_limit)

    def make_metrics_site(self, token: str | None) -> ControlSite:
        """A site for ``daemon.metrics``: ``/metrics`` alone, with the same connection bounds as the
        control endpoint. ``token``: asked for on every scrape (None: no token needed)."""
        if self.metrics is None:
            raise ValueError("the control API was made without metrics")
        root = HttpRoot(None, MetricsPage(self.metrics, token))
        return ControlSite(root, self.clock, self.idle_timeout, self.max_connections)

    def _upload_limit(self, method: bytes, path: bytes) -> int | None:
        return self.upload_limit if self.upload_limit is not None and is_upload(method, path) else None

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
