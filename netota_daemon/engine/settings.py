"""What the engine needs to know about a device, how long each step may take, and how it behaves.

- :class:`DeviceTarget`: where a device is reached.
- :class:`UpgradeTimeouts`: every wait, in seconds (durations only).
- :class:`UpgradeBehaviour`: the switches that change what the engine does (not how long it waits).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True)
class DeviceTarget:
    """Where a device is reached. Every device is 192.168.1.1 on a real rack; ``interface`` (bound
    with SO_BINDTODEVICE) and ``source_address`` tell the connections apart."""

    name: str
    host: str = "192.168.1.1"
    ctp_port: int = 3333
    http_port: int = 8080
    ota_port: int = 3335
    interface: str | None = None
    source_address: str | None = None
    reconnect_command: str | None = None  # run after each reboot with NETOTA_DEVICE/INTERFACE/SSID/PHASE
    expected_ssid: str | None = None  # the SSID to rejoin, passed to reconnect_command
    ftp_port: int = 21  # double backup: the device's FTP server
    ftp_user: str = "FTPX"  # the SDK's defaults (ftpd_server_init("FTPX", "12345678", ...))
    ftp_password: str = "12345678"


@dataclass(frozen=True)
class UpgradeTimeouts:
    """Every wait of an upgrade, in seconds (counts of waits too). Defaults fit the real device
    (protocol-research §4.2)."""

    deadline: float = 900.0  # the whole job
    connect: float = 10.0  # one TCP connection attempt
    ctp_reply: float = 10.0  # a CTP request's reply
    http: float = 10.0  # the description document
    ota_accept: float = 30.0  # the device's first header after connecting to 3335
    receive: float = 5.0  # one receive timeout on the OTA stream
    max_receive_timeouts: int = 10  # give up after more than this many in a row
    reboot: float = 120.0  # after phase 1 (or the upload), until the device answers again
    verify: float = 120.0  # after phase 2, until the new firmware answers
    poll_interval: float = 1.0  # longest wait between polls during a reboot, and between attempts
    keepalive_interval: float = 10.0  # CTP keep-alive while a session is held (shorter if the device asks)
    connect_window: float = 30.0  # connection attempts to a present device are retried this long
    hook: float = 60.0  # the reconnect command may run this long before it is killed
    ftp_reply: float = 10.0  # double backup: one FTP control reply (and one connection attempt)
    ftp_stall: float = 30.0  # double backup: the device takes no upload bytes for this long
    ftp_final_reply: float = 15.0  # double backup: the 226 after the upload's clean close (the device burns first)
    upload_reboot: float = 20.0  # double backup: after the 226, how long the device may take to reboot

    def replaced(self, **changes: Any) -> UpgradeTimeouts:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass(frozen=True)
class UpgradeBehaviour:
    """Switches that change what the engine does."""

    echo_final_notice: bool = False  # answer the final 100 % notice (PROTOCOL.md decision)
    phase2_error_retries: int = 1  # phase 2 starts again this many times after the loader's ERR

    def replaced(self, **changes: Any) -> UpgradeBehaviour:
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
