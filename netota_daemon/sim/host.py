"""What the simulator's servers see of the device that owns them: narrow host interfaces.

Each server (CTP, HTTP, the OTA session, FTP) keeps its own state and reaches the device only
through one of these; :class:`~netota_daemon.sim.device.SimulatedDevice` implements them all, and
tests pass small fakes. The device keeps what is the device's: its mode, reboots, the watchdog,
the faults that fire once over its life, and the event log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.interfaces import IReactorTime

from netota_daemon.sim.config import SimConfig


@dataclass
class FaultState:
    """Faults that fire once over the device's life (so a retry can succeed)."""

    drop_used: bool = False
    stall_used: bool = False
    corrupt_reply_used: bool = False
    corrupt_header_used: bool = False
    read_headers_sent: int = 0  # READ headers over the device's life (for --corrupt-header-once)
    ftp_drop_used: bool = False
    ftp_stall_used: bool = False
    ftp_busy_used: bool = False
    ftp_reject_login_used: bool = False


class EventHost(Protocol):
    """The least a server needs: the options, the clock, the once-faults and the event log."""

    config: SimConfig
    reactor: IReactorTime
    faults: FaultState

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event to the device's log (``events.jsonl``)."""
        ...


class CtpHost(EventHost, Protocol):
    """The main firmware's CTP server: it can open the phase-1 OTA port."""

    def open_ota_for_phase1(self) -> bool:
        """NET_OTA_SINGLE: open 3335 (True when listening, harmless when already open)."""
        ...


class HttpHost(EventHost, Protocol):
    """The main firmware's HTTP server: the document shows the running version."""

    @property
    def firmware_version(self) -> str: ...
