"""``GET /v1/devices`` (every configured device and what it is doing) and ``POST /v1/devices/probe``
(read idle devices' description documents now)."""

from __future__ import annotations

from typing import Any

from netota_daemon.control.routing import Answer, ApiRequest, Route, device_names
from netota_daemon.daemon.probe import DeviceProber
from netota_daemon.daemon.registry import DeviceRegistry

PROBE_FIELDS = {"devices"}


class DeviceEndpoints:
    def __init__(self, registry: DeviceRegistry, prober: DeviceProber) -> None:
        self.registry = registry
        self.prober = prober

    def routes(self) -> list[Route]:
        return [
            Route(("devices",), {"GET": self.list_devices}),
            Route(("devices", "probe"), {"POST": self.probe}),
        ]

    def list_devices(self, request: ApiRequest) -> Answer:
        request.query(())
        return Answer({"devices": self.registry.to_json()})

    async def probe(self, request: ApiRequest) -> Answer:
        """Answer once every named device's probe has ended (each is bounded by its http timeout)."""
        request.query(())
        body = request.body(PROBE_FIELDS)
        names = device_names(body, self.registry)
        results = await self.prober.probe(names)
        devices: list[dict[str, Any]] = []
        for name, result in results.items():
            device = self.registry.get(name).to_json()
            device["probe"] = result.to_json()  # also a busy answer, which the registry does not keep
            devices.append(device)
        return Answer({"devices": devices})
