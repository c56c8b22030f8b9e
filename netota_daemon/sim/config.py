"""``SimConfig``: everything that shapes one simulated device, its timings and its injected faults.

Every duration here is in *device* seconds (what the real device does); the simulator multiplies
each by ``time_scale`` before it waits, so tests can run a whole upgrade in a fraction of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

MODES = ("main", "loader")


class SimConfigError(ValueError):
    """An option value the simulator can't use."""


@dataclass(frozen=True)
class StallFault:
    """``--stall-after-reads N:SECONDS``: after the Nth reply, wait SECONDS before the next request."""

    after_reads: int
    seconds: float

    @classmethod
    def parse(cls, text: str) -> StallFault:
        try:
            reads, seconds = text.split(":", 1)
            fault = cls(int(reads), float(seconds))
        except ValueError:
            raise SimConfigError(f"--stall-after-reads wants N:SECONDS (e.g. 3:70), got {text!r}") from None
        if fault.after_reads < 1 or not 0 <= fault.seconds < math.inf:
            raise SimConfigError(f"--stall-after-reads wants N >= 1 and finite SECONDS >= 0, got {text!r}")
        return fault


@dataclass(frozen=True)
class SimConfig:
    """One device. Ports 0 mean "any free port"; the ports found at start are kept across reboots."""

    state_dir: Path | str | None = None
    listen: str = "127.0.0.1"
    ctp_port: int = 3333
    http_port: int = 8080
    ota_port: int = 3335
    mode: str = "main"  # "main" | "loader": what runs at start
    ota_listen_at_start: bool = False  # main firmware opens 3335 without NET_OTA_SINGLE
    time_scale: float = 1.0
    double_backup: bool = False  # ota_type "0"; NET_OTA_SINGLE answers status "0"
    firmware_version: str = "1.0.0"
    phase1_all_size: bool = False  # phase 1 also sends an all_size notice (the hook exists there too)
    image_size: int | None = None  # image length for images without a simulator head/trailer
    uuid: str = "xxxxxx"

    # Outcomes chosen by the operator.
    reject_image: bool = False  # every session ends ERR after the transfer
    same_as_installed: bool = False  # phase 1 ends early with SAME (or ERR, see same_status)
    same_status: str = "same"  # "same": SDK-1.1 sends SAME (16); "err": V1.2 sends ERR (2)

    # Faults (applied in both phases unless fault_phase is set).
    drop_after_reads: int | None = None  # abort the OTA connection after N replies (once overall)
    stall_after_reads: StallFault | None = None  # pause before the next request (once overall)
    corrupt_header_every: int | None = None  # every Nth READ header goes out with a wrong sum
    corrupt_reply_check: bool = False  # treat the next reply as corrupt (once overall)
    fault_phase: int | None = None  # 1 or 2: faults apply only in that phase

    # Reboots.
    reboot_seconds: float = 2.0  # after phase-1 OK: down this long ...
    loader_start_seconds: float = 3.0  # ... then the loader needs this long before it listens
    phase2_reboot_seconds: float = 1.0  # after phase-2 OK (and a watchdog reset): down this long
    main_start_seconds: float = 0.0  # ... then the new main firmware needs this long to listen
    no_reboot: bool = False  # after phase-1 OK the device goes down and stays down
    reboot_command: str | None = None  # run with NETOTA_SIM_REBOOT=down|up around each reboot

    # Device timings (research §2, §4.2).
    ota_start_delay: float = 0.1  # device speaks first, 100 ms after accepting on 3335
    reply_timeout: float = 5.0  # wait for the reply to one READ
    notice_wait: float = 5.0  # wait after a non-READ notice (all_size, final 100 %)
    end_gap: float = 0.5  # between the 100 % notice, OK/ERR, and the close
    ctp_idle_timeout: float = 60.0  # CTP session dropped after this long without a frame
    watchdog_seconds: float = 60.0  # loader: no read progress this long in an attempt -> reset

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SimConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0 < self.time_scale < math.inf:
            raise SimConfigError(f"time_scale must be > 0, got {self.time_scale}")
        if self.same_status not in ("same", "err"):
            raise SimConfigError(f"same_status must be 'same' or 'err', got {self.same_status!r}")
        if self.fault_phase not in (None, 1, 2):
            raise SimConfigError(f"fault_phase must be 1 or 2, got {self.fault_phase!r}")
        for name in ("drop_after_reads", "corrupt_header_every", "image_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SimConfigError(f"{name} must be >= 1, got {value}")
        if isinstance(self.stall_after_reads, str):
            object.__setattr__(self, "stall_after_reads", StallFault.parse(self.stall_after_reads))
        for name in ("ctp_port", "http_port", "ota_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SimConfigError(f"{name} must be 0..65535, got {port}")

    def scaled(self, seconds: float) -> float:
        """A device duration in real seconds."""
        return seconds * self.time_scale

    def faults_apply(self, phase: int) -> bool:
        return self.fault_phase is None or self.fault_phase == phase

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) if self.state_dir is not None else None
