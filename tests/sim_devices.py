"""In-process simulated devices (``netota_daemon.sim``) on free loopback ports, for the end-to-end
tests that run the engine or ``netota flash`` against one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.device import SimulatedDevice

#: Device seconds -> real seconds: the device's 5 s reply wait becomes 100 ms, enough on 2 loaded
#: cores (for a ``netota flash`` subprocess too).
TIME_SCALE = 0.02


async def start_device(reactor: Any, tmp_path: Path, **overrides: Any) -> SimulatedDevice:
    """A started device running firmware 1.0.0 at :data:`TIME_SCALE`, its state (events.jsonl,
    ports.json, what it received) in ``tmp_path / "state"``; ``overrides``: further SimConfig fields."""
    settings: dict[str, Any] = dict(
        state_dir=tmp_path / "state",
        ctp_port=0,
        http_port=0,
        ota_port=0,
        time_scale=TIME_SCALE,
        firmware_version="1.0.0",
    )
    settings.update(overrides)
    device = SimulatedDevice(reactor, SimConfig(**settings))
    await device.start()
    return device
