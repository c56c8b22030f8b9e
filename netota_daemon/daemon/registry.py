"""``DeviceRegistry``: the configured devices and what each is doing now.

The job queue keeps it current (queued, running with its phase, latest progress and connection
attempts, idle with the last outcome and firmware version), the prober adds each device's last
probe; the control API shows it (``GET /v1/devices``, ``netota devices``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from netota_daemon.daemon.config import DeviceConfig
from netota_daemon.engine.events import Progress, Waiting
from netota_daemon.engine.outcome import Outcome, Phase


@dataclass
class DeviceStatus:
    """What one device is doing; mutable, owned by the registry."""

    config: DeviceConfig
    state: str = "idle"  # idle | queued | running
    job: str | None = None
    phase: Phase | None = None
    percent: float | None = None  # of the current phase (None right after a phase change)
    rate: float | None = None
    progress: dict[str, Any] | None = None  # the running job's latest progress object in its current phase
    waiting: dict[str, Any] | None = None  # the running job's latest connection attempt, until it connects
    queue_position: int | None = None
    last_job: str | None = None
    last_outcome: str | None = None
    firmware_version: str | None = None
    probe: dict[str, Any] | None = None  # the last probe's answer (POST /v1/devices/probe)

    def to_json(self) -> dict[str, Any]:
        target = self.config.target
        return {
            "name": target.name,
            "host": target.host,
            "ctp_port": target.ctp_port,
            "http_port": target.http_port,
            "ota_port": target.ota_port,
            "interface": target.interface,
            "state": self.state,
            "job": self.job,
            "phase": self.phase.value if self.phase else None,
            "percent": self.percent,
            "rate": self.rate,
            "progress": dict(self.progress) if self.progress is not None else None,
            "waiting": dict(self.waiting) if self.waiting is not None else None,
            "queue_position": self.queue_position,
            "last_job": self.last_job,
            "last_outcome": self.last_outcome,
            "firmware_version": self.firmware_version,
            "probe": self.probe,
        }


class DeviceRegistry:
    def __init__(self, devices: Iterable[DeviceConfig]) -> None:
        self._devices = {d.name: DeviceStatus(d) for d in devices}

    def __contains__(self, name: object) -> bool:
        return name in self._devices

    def names(self) -> list[str]:
        return list(self._devices)

    def get(self, name: str) -> DeviceStatus:
        return self._devices[name]

    def to_json(self) -> list[dict[str, Any]]:
        return [status.to_json() for status in self._devices.values()]

    # Changes, called by the job queue.

    def _clear(self, status: DeviceStatus) -> None:
        status.phase = status.percent = status.rate = None
        status.progress = status.waiting = None

    def queued(self, name: str, job_id: str, position: int) -> None:
        status = self._devices[name]
        status.state, status.job, status.queue_position = "queued", job_id, position
        self._clear(status)

    def running(self, name: str, job_id: str) -> None:
        status = self._devices[name]
        status.state, status.job, status.queue_position = "running", job_id, None
        self._clear(status)
        status.phase = Phase.DETECT

    def phase(self, name: str, phase: Phase) -> None:
        status = self._devices[name]
        status.phase = phase
        status.percent = status.rate = None
        status.progress = status.waiting = None

    def progress(self, name: str, event: Progress) -> None:
        status = self._devices[name]
        status.phase, status.percent, status.rate = event.phase, event.percent, event.rate
        data = event.to_json()
        del data["type"]
        status.progress, status.waiting = data, None

    def waiting(self, name: str, event: Waiting) -> None:
        data = event.to_json()
        del data["type"]
        self._devices[name].waiting = data

    def idle(self, name: str, job_id: str, outcome: Outcome | None) -> None:
        """The device's job ended (``outcome`` None: it was interrupted without one)."""
        status = self._devices[name]
        status.state, status.job, status.queue_position = "idle", None, None
        self._clear(status)
        status.last_job = job_id
        if outcome is not None:
            status.last_outcome = outcome.kind.value
            version = outcome.firmware_version_after or outcome.firmware_version_before
            if version:
                status.firmware_version = version
        else:
            status.last_outcome = "interrupted"

    def probed(self, name: str, probe: dict[str, Any], firmware_version: str | None) -> None:
        """Keep a probe's answer; the firmware version it read (None: none, or the loader's) becomes
        the device's known version."""
        status = self._devices[name]
        status.probe = probe
        if firmware_version:
            status.firmware_version = firmware_version

    def remember(self, name: str, job_id: str, outcome: Outcome | None, firmware_version: str | None) -> None:
        """Load the device's last job (``outcome`` None: it was interrupted) and its last known
        firmware version from the journal at start-up."""
        if name in self._devices:
            self.idle(name, job_id, outcome)
            if firmware_version:
                self._devices[name].firmware_version = firmware_version
