"""``SimConfig``: everything that shapes one simulated device, its timings and its injected faults.

Every duration here is in *device* seconds (what the real device does); the simulator multiplies
each by ``time_scale`` before it waits, so tests can run a whole upgrade in a fraction of a second.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from pathlib import Path


class DeviceMode(str, enum.Enum):
    """What the device runs. ``str`` so that events and comparisons read ``"main"``."""

    MAIN = "main"  # the main firmware (CTP, HTTP; OTA 3335 after NET_OTA_SINGLE; FTP when double backup)
    LOADER = "loader"  # the phase-2 update loader (single backup only)
    DOWN = "down"  # rebooting: nothing listens


class SimConfigError(ValueError):
    """An option value the simulator can't use."""


@dataclass(frozen=True)
class StallFault:
    """``--stall-after-reads N:SECONDS`` (and ``--ftp-stall-after-bytes N:SECONDS``): after the Nth
    reply (byte), wait SECONDS before going on."""

    after: int  # replies (OTA) or bytes (FTP)
    seconds: float

    @classmethod
    def parse(cls, text: str, option: str = "--stall-after-reads", example: str = "3:70") -> StallFault:
        try:
            reads, seconds = text.split(":", 1)
            fault = cls(int(reads), float(seconds))
        except ValueError:
            raise SimConfigError(f"{option} wants N:SECONDS (e.g. {example}), got {text!r}") from None
        if fault.after < 1 or not 0 <= fault.seconds < math.inf:
            raise SimConfigError(f"{option} wants N >= 1 and finite SECONDS >= 0, got {text!r}")
        return fault


#: The lwIP ftpd's PASV counter: it starts here and is incremented before use (first port 4097).
PASV_COUNTER_START = 4096
#: ... and wraps back to its start after this port.
PASV_COUNTER_LAST = 0x7FFF


@dataclass(frozen=True)
class SimConfig:
    """One device. Ports 0 mean "any free port"; the ports found at start are kept across reboots."""

    state_dir: Path | str | None = None
    listen: str = "127.0.0.1"
    ctp_port: int = 3333
    http_port: int = 8080
    ota_port: int = 3335
    mode: DeviceMode | str = DeviceMode.MAIN  # what runs at start: main or loader
    ota_listen_at_start: bool = False  # main firmware opens 3335 without NET_OTA_SINGLE
    time_scale: float = 1.0
    double_backup: bool = False  # ota_type "0"; NET_OTA_SINGLE answers status "0"; FTP on ftp_port
    firmware_version: str = "1.0.0"
    phase1_all_size: bool = False  # phase 1 also sends an all_size notice (the hook exists there too)
    image_size: int | None = None  # image length for images without a simulator head/trailer
    uuid: str = "xxxxxx"

    # Double backup (docs/research/ftp.md).
    ftp_port: int = 21
    ota_type_in_description: bool = True  # False: the document has no ota_type (nor ota_step)
    stupid_ftpd: bool = False  # the other build's FTP server: its greeting, REST and SIZE
    pasv_base: int = PASV_COUNTER_START  # PASV ports are pasv_base+1, +2, ... up to 32767, then wrap
    fixed_version: bool = False  # the reported version stays the same after an upgrade (fixed dev_desc)
    ftp_user: str = "FTPX"
    ftp_password: str = "12345678"
    burn_seconds: float = 1.0  # net_fclose: writing the boot info (the device allows up to ~5 s)
    db_reset_seconds: float = 2.0  # from the 226 of a good upload to the reset (net_update_system_reset)
    flash_kbps: float | None = None  # flash write speed in KiB/s (both routes); None: writes cost nothing

    # Outcomes chosen by the operator.
    reject_image: bool = False  # every session ends ERR after the transfer
    same_as_installed: bool = False  # phase 1 ends early with SAME (or ERR, see same_status)
    same_status: str = "same"  # "same": SDK-1.1 sends SAME (16); "err": V1.2 sends ERR (2)

    # Faults (applied in both phases unless fault_phase is set).
    drop_after_reads: int | None = None  # abort the OTA connection after N replies (once overall)
    stall_after_reads: StallFault | str | None = None  # pause before the next request (once overall)
    corrupt_header_every: int | None = None  # every Nth READ header of a session goes out with a wrong sum
    corrupt_header_once: int | None = None  # the Nth READ header of the device's life, once overall
    corrupt_reply_check: bool = False  # treat the next reply as corrupt (once overall)
    fault_phase: int | None = None  # 1 or 2: faults apply only in that phase

    # FTP faults (double backup; each once overall).
    ftp_drop_after_bytes: int | None = None  # reset the data connection after N bytes of an upload
    ftp_stall_after_bytes: StallFault | str | None = None  # stop reading the upload for SECONDS after N bytes
    ftp_busy_once: bool = False  # the first STOR of the OTA name gets 550 (an earlier upgrade timing out)
    ftp_reject_login_once: bool = False  # the first login gets 503 and the close, whatever it says

    # Reboots.
    reboot_seconds: float = 2.0  # after phase-1 OK (and a double-backup reset): down this long ...
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
        try:
            object.__setattr__(self, "mode", DeviceMode(self.mode))
        except ValueError:
            raise SimConfigError(f"mode must be main or loader, got {self.mode!r}") from None
        if self.mode is DeviceMode.DOWN:
            raise SimConfigError("mode must be main or loader, got 'down'")
        if self.double_backup and self.mode is DeviceMode.LOADER:
            raise SimConfigError("a double-backup device has no update loader: mode must be main")
        if not self.ota_type_in_description and not self.double_backup:
            raise SimConfigError("a description without ota_type reads as double backup: it needs double_backup")
        if not 0 < self.time_scale < math.inf:
            raise SimConfigError(f"time_scale must be > 0, got {self.time_scale}")
        if self.same_status not in ("same", "err"):
            raise SimConfigError(f"same_status must be 'same' or 'err', got {self.same_status!r}")
        if self.fault_phase not in (None, 1, 2):
            raise SimConfigError(f"fault_phase must be 1 or 2, got {self.fault_phase!r}")
        for name in (
            "drop_after_reads",
            "corrupt_header_every",
            "corrupt_header_once",
            "image_size",
            "ftp_drop_after_bytes",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise SimConfigError(f"{name} must be >= 1, got {value}")
        if isinstance(self.stall_after_reads, str):
            object.__setattr__(self, "stall_after_reads", StallFault.parse(self.stall_after_reads))
        if isinstance(self.ftp_stall_after_bytes, str):
            stall = StallFault.parse(self.ftp_stall_after_bytes, "--ftp-stall-after-bytes", "100000:30")
            object.__setattr__(self, "ftp_stall_after_bytes", stall)
        for name in ("ctp_port", "http_port", "ota_port", "ftp_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise SimConfigError(f"{name} must be 0..65535, got {port}")
        if not 0 <= self.pasv_base < PASV_COUNTER_LAST:
            raise SimConfigError(f"pasv_base must be 0..{PASV_COUNTER_LAST - 1}, got {self.pasv_base}")
        if self.flash_kbps is not None and not 0 < self.flash_kbps < math.inf:
            raise SimConfigError(f"flash_kbps must be > 0, got {self.flash_kbps}")
        for name in ("burn_seconds", "db_reset_seconds"):
            if not 0 <= getattr(self, name) < math.inf:
                raise SimConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")

    @property
    def start_mode(self) -> DeviceMode:
        """``mode`` as the enum it is after validation."""
        return DeviceMode(self.mode)

    @property
    def stall(self) -> StallFault | None:
        """``stall_after_reads``, parsed."""
        value = self.stall_after_reads
        return value if isinstance(value, StallFault) else None

    @property
    def ftp_stall(self) -> StallFault | None:
        """``ftp_stall_after_bytes``, parsed."""
        value = self.ftp_stall_after_bytes
        return value if isinstance(value, StallFault) else None

    def scaled(self, seconds: float) -> float:
        """A device duration in real seconds."""
        return seconds * self.time_scale

    def faults_apply(self, phase: int) -> bool:
        return self.fault_phase is None or self.fault_phase == phase

    @property
    def state_path(self) -> Path | None:
        return Path(self.state_dir) if self.state_dir is not None else None
