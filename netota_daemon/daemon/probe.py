"""``DeviceProber``: read the description document of idle devices on demand (``POST /v1/devices/probe``).

A probe is one HTTP GET of the description document (port ``http_port``, 8080 on a real device):
never CTP, never the OTA port, so it can't disturb a device and needs no CTP session. It goes
through a :class:`~netota_daemon.protocols.endpoints.DeviceConnector` built from the device's
target (its interface and source address apply, as for a job) and is bounded by the device's
``timeouts.http``. A device with a queued or running job is not contacted at all: the answer says
it is busy (``busy_job`` names the job, ``error`` says it in words). Every other device named is
probed at the same time; the registry keeps the last probe of each, and a firmware version read from
the main firmware becomes the device's known version.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from netota_daemon.daemon.config import DeviceConfig
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.protocols.description_fetch import DescriptionFetchError, description_url, fetch_description
from netota_daemon.protocols.endpoints import DeviceConnector, EndpointError, bounded, connection_error_message
from netota_daemon.wire.description import DeviceDescription
from netota_daemon.wire.firmware_kind import FirmwareKind

log = Logger()

#: ``fetch(connector, port, timeout, clock)``: :func:`fetch_description`, or a test's fake.
DescriptionFetcher = Callable[[DeviceConnector, int, float, Any], Awaitable[DeviceDescription]]

#: The kind of image each build takes, by the ``mode`` a probe reports (:func:`description_mode`):
#: the main firmware and the phase-2 loader of a single-backup build take a single-backup image, a
#: double-backup build a double-backup image. Single- and double-backup images can't cross-upgrade.
BUILD_OF_MODE = {
    "main": FirmwareKind.SINGLE_BACKUP,
    "loader": FirmwareKind.SINGLE_BACKUP,
    "double_backup": FirmwareKind.DOUBLE_BACKUP,
}


@dataclass(frozen=True)
class ProbeResult:
    """What one probe found; ``ok`` False carries ``error`` instead of the document's fields. A
    device that was not contacted because a job holds it has ``busy_job`` (that job's id)."""

    ok: bool
    time: float
    firmware_version: str | None = None
    ota_type: str | None = None
    ota_step: str | None = None
    mode: str | None = None  # main | loader | double_backup
    error: str | None = None  # for people
    busy_job: str | None = None  # for programs: the job that holds the device (it was not contacted)

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error, "busy_job": self.busy_job, "time": self.time}
        return {
            "ok": True,
            "firmware_version": self.firmware_version,
            "ota_type": self.ota_type,
            "ota_step": self.ota_step,
            "mode": self.mode,
            "time": self.time,
        }


def description_mode(description: DeviceDescription) -> str:
    """``loader`` (the phase-2 update loader runs), ``main`` (single-backup main firmware) or
    ``double_backup`` (``ota_type`` not "1": a double-backup build, upgraded over FTP)."""
    if description.in_loader:
        return "loader"
    return "main" if description.single_backup else "double_backup"


def result_from_description(description: DeviceDescription, time: float) -> ProbeResult:
    mode = description_mode(description)
    # The loader's fixed document always says 1.0.1: it tells nothing of the installed firmware.
    version = None if mode == "loader" else description.firmware_version
    return ProbeResult(
        ok=True,
        time=time,
        firmware_version=version,
        ota_type=description.ota_type,
        ota_step=description.ota_step,
        mode=mode,
    )


def probe_error_message(exc: BaseException, url: str, via: str) -> str:
    """A message that says what was tried and what went wrong."""
    if isinstance(exc, DescriptionFetchError) and str(exc).startswith(f"GET {url} "):
        return f"{exc}{via}"  # it names the request already
    if isinstance(exc, (EndpointError, DescriptionFetchError)):
        return f"GET {url}{via}: {exc}"
    return f"GET {url}{via}: {connection_error_message(exc)}"


async def _awaited(awaitable: Awaitable[DeviceDescription]) -> DeviceDescription:
    return await awaitable


class DeviceProber:
    """Probes configured devices; ``fetch`` and ``clock`` are replaceable for tests."""

    def __init__(
        self,
        registry: DeviceRegistry,
        reactor: Any,
        fetch: DescriptionFetcher = fetch_description,
        clock: IReactorTime | None = None,
    ) -> None:
        self.registry = registry
        self.reactor = reactor
        self.clock = clock or reactor
        self.fetch = fetch

    async def probe(self, names: Iterable[str] | None = None) -> dict[str, ProbeResult]:
        """Probe ``names`` (default: every device) in parallel; each name's result, in order.

        Never raises for a device's failure: that is the device's result. Unknown names raise KeyError
        (the caller checks them first)."""
        wanted = list(dict.fromkeys(self.registry.names() if names is None else names))
        for name in wanted:
            self.registry.get(name)  # KeyError for an unknown name, before anything is contacted
        probes = [defer.ensureDeferred(self._probe_one(name)) for name in wanted]
        results = await defer.gatherResults(probes, consumeErrors=True)
        return dict(zip(wanted, results, strict=False))

    async def _probe_one(self, name: str) -> ProbeResult:
        status = self.registry.get(name)
        if status.state in ("queued", "running"):
            # Not contacted, and not remembered: the last real probe stays the device's last probe.
            return ProbeResult(
                ok=False, time=self.clock.seconds(), error=f"busy with job {status.job}", busy_job=status.job
            )
        result = await self._fetch(status.config)
        self.registry.probed(name, result.to_json(), result.firmware_version)
        log.info("probe of {device}: {result}", device=name, result=result.to_json())
        return result

    async def _fetch(self, config: DeviceConfig) -> ProbeResult:
        target, timeout = config.target, config.timeouts.http
        connector = DeviceConnector(self.reactor, target.host, target.interface, target.source_address)
        url = description_url(target.host, target.http_port)
        via = f" (via {target.interface})" if target.interface else ""
        try:
            fetched: defer.Deferred[DeviceDescription] = defer.Deferred.fromCoroutine(
                _awaited(self.fetch(connector, target.http_port, timeout, self.clock))
            )
            description = await bounded(self.clock, fetched, timeout, "the description document")
        except defer.CancelledError:
            raise
        except Exception as e:  # every failure is this device's answer, with a message that says what
            if not isinstance(e, (EndpointError, DescriptionFetchError, defer.TimeoutError)):
                log.debug("probe of {device} failed: {error!r}", device=config.name, error=e)
            return ProbeResult(ok=False, time=self.clock.seconds(), error=probe_error_message(e, url, via))
        return result_from_description(description, self.clock.seconds())
