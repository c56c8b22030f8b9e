"""``GET /v1/devices`` (every configured device and what it is doing) and ``POST /v1/devices/probe``
(read idle devices' description documents now)."""

from __future__ import annotations

from typing import Any

from netota_daemon.control.errors import ApiError
from netota_daemon.control.routing import Answer, ApiRequest, Route
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
        results = await self.prober.probe(names)
        devices: list[dict[str, Any]] = []
        for name, result in results.items():
            device = self.registry.get(name).to_json()
            device["probe"] = result.to_json()  # also a busy answer, which the registry does not keep
            devices.append(device)
        return Answer({"devices": devices})
