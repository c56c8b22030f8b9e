"""``DeviceLink``: the one narrow interface between an upgrade job and its device.

The job decides; the link does the talking. Each method makes one attempt (connect once, fetch
once, run the hook once): retries, timeouts above one attempt, and what an answer means are the
job's. :class:`~netota_daemon.protocols.device_link.TwistedDeviceLink` is the real link (sockets
through the device's interface, treq, processes); tests pass a scripted fake and a ``Clock``.

Errors a link raises are the protocols' own (``CtpErrorReply``, ``CtpReplyTimeout``,
``CtpConnectionLost``, ``CtpProtocolError``, ``DescriptionFetchError``, ``EndpointError``, Twisted's
connection errors, ``defer.TimeoutError``), so the job maps one set of errors whichever link it has.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.internet import defer

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ftp_upload import FtpUploadSettings, UploadProgress, UploadResult
from netota_daemon.protocols.ota_stream import StreamProgress, StreamSettings
from netota_daemon.protocols.reconnect_hook import HookResult
from netota_daemon.protocols.sessions import CtpSession, OtaSession
from netota_daemon.wire.description import DeviceDescription

__all__ = ["CtpSession", "DeviceLink", "OtaSession"]


class DeviceLink(Protocol):
    """Everything an upgrade job does to its device."""

    def describe(self) -> str:
        """How the device is reached, for messages: ``192.168.1.1 via wlan1``."""
        ...

    def check(self) -> None:
        """Raise ``EndpointError`` when no connection can even be attempted (unknown interface, down,
        missing privilege)."""
        ...

    def fetch_description(self, timeout: float) -> defer.Deferred[DeviceDescription]:
        """One GET of the description document (HTTP 8080)."""
        ...

    def connect_ctp(self, timeout: float) -> defer.Deferred[CtpSession]:
        """One connection attempt to CTP (3333)."""
        ...

    def connect_ota(
        self,
        timeout: float,
        image: FirmwareImage,
        settings: StreamSettings,
        on_progress: Callable[[StreamProgress], None],
        on_all_size: Callable[[int], None],
    ) -> defer.Deferred[OtaSession]:
        """One connection attempt to the OTA port (3335); the stream then serves ``image``."""
        ...

    def run_hook(self, command: str, env: Mapping[str, str], timeout: float) -> defer.Deferred[HookResult]:
        """Run the reconnect command (``sh -c``) with ``env``; killed after ``timeout`` seconds."""
        ...

    def upload(
        self, image: FirmwareImage, settings: FtpUploadSettings, on_progress: Callable[[UploadProgress], None]
    ) -> defer.Deferred[UploadResult]:
        """Double backup: one FTP upload of ``image`` to the device's FTP port; cancelling it
        resets the data connection (an RST burns nothing) and never sends ABOR."""
        ...
