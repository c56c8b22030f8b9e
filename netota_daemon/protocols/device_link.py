"""``TwistedDeviceLink``: the engine's link to a real device (or the simulator), over sockets.

It implements :class:`netota_daemon.engine.link.DeviceLink` with the protocols of this package:
every connection through the device's :class:`~netota_daemon.protocols.endpoints.DeviceConnector`
(its interface and source address), the description document with treq, CTP and the OTA stream as
Twisted protocols, the reconnect command as a process. Each method is one attempt.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ctp_client import CtpClientFactory, CtpClientProtocol
from netota_daemon.protocols.description_fetch import fetch_description
from netota_daemon.protocols.endpoints import DeviceConnector
from netota_daemon.protocols.ftp_upload import FtpUploadSettings, UploadProgress, UploadResult, upload_image
from netota_daemon.protocols.ota_stream import OtaStreamFactory, OtaStreamProtocol, StreamProgress, StreamSettings
from netota_daemon.protocols.reconnect_hook import HookResult, run_hook
from netota_daemon.protocols.sessions import CtpSession, OtaSession
from netota_daemon.wire.description import DeviceDescription


def _ctp_session(protocol: CtpClientProtocol) -> CtpSession:
    return protocol  # the type checker checks that the protocol is a CtpSession


def _ota_session(protocol: OtaStreamProtocol) -> OtaSession:
    return protocol


@dataclass(frozen=True)
class DevicePorts:
    """The device's TCP ports."""

    ctp: int = 3333
    http: int = 8080
    ota: int = 3335
    ftp: int = 21


class TwistedDeviceLink:
    """One device, reached with ``reactor`` (it provides ``IReactorTCP``, ``IReactorTime`` and
    ``IReactorProcess``, as Twisted's reactors do) through ``connector``."""

    def __init__(
        self,
        reactor: Any,
        connector: DeviceConnector,
        ports: DevicePorts,
        log_context: dict[str, Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.connector = connector
        self.ports = ports
        self.log_context = dict(log_context or {})

    @property
    def _clock(self) -> IReactorTime:
        clock: IReactorTime = self.reactor
        return clock

    def describe(self) -> str:
        return self.connector.describe()

    def check(self) -> None:
        self.connector.check()

    def fetch_description(self, timeout: float) -> defer.Deferred[DeviceDescription]:
        return defer.Deferred.fromCoroutine(fetch_description(self.connector, self.ports.http, timeout, self._clock))

    def connect_ctp(self, timeout: float) -> defer.Deferred[CtpSession]:
        factory = CtpClientFactory(self._clock, self.log_context)
        connected = cast(
            defer.Deferred[CtpClientProtocol], self.connector.endpoint(self.ports.ctp, timeout).connect(factory)
        )
        return connected.addCallback(_ctp_session)

    def connect_ota(
        self,
        timeout: float,
        image: FirmwareImage,
        settings: StreamSettings,
        on_progress: Callable[[StreamProgress], None],
        on_all_size: Callable[[int], None],
    ) -> defer.Deferred[OtaSession]:
        factory = OtaStreamFactory(
            image=image,
            clock=self._clock,
            settings=settings,
            on_progress=on_progress,
            on_all_size=on_all_size,
            log_context=self.log_context,
        )
        connected = cast(
            defer.Deferred[OtaStreamProtocol], self.connector.endpoint(self.ports.ota, timeout).connect(factory)
        )
        return connected.addCallback(_ota_session)

    def run_hook(self, command: str, env: Mapping[str, str], timeout: float) -> defer.Deferred[HookResult]:
        return run_hook(self.reactor, self._clock, command, env, timeout)

    def upload(
        self, image: FirmwareImage, settings: FtpUploadSettings, on_progress: Callable[[UploadProgress], None]
    ) -> defer.Deferred[UploadResult]:
        return upload_image(self.connector, self.ports.ftp, image, settings, self._clock, on_progress, self.log_context)
