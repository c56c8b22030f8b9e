"""The sessions a device link opens, as the engine uses them: a CTP session and an OTA stream.

:class:`~netota_daemon.protocols.ctp_client.CtpClientProtocol` and
:class:`~netota_daemon.protocols.ota_stream.OtaStreamProtocol` are the real ones; tests' fakes
provide the same methods.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet import defer

from netota_daemon.protocols.ota_stream import StreamEnd, StreamResult
from netota_daemon.wire.ctp import CtpFrame


class CtpSession(Protocol):
    """One open CTP session (TCP 3333)."""

    def app_access(self, timeout: float) -> defer.Deferred[CtpFrame]:
        """APP_ACCESS, the session's first frame; fires with the device's echo."""
        ...

    def net_ota_single(self, timeout: float) -> defer.Deferred[str]:
        """NET_OTA_SINGLE ``{"status":"1"}``; fires with the device's status ("1": 3335 is open)."""
        ...

    def start_keepalive(self, interval: float) -> None:
        """Send keep-alives every ``interval`` seconds (shorter when the device asks for it)."""
        ...

    def close(self, grace: float) -> defer.Deferred[None]:
        """End the session; fires once it is closed (aborted if that takes longer than ``grace``)."""
        ...


class OtaSession(Protocol):
    """One open OTA stream (TCP 3335): the device asks, the stream answers."""

    @property
    def done(self) -> defer.Deferred[StreamResult]:
        """Fires with the result once the connection is closed; cancelling it sends STOP."""
        ...

    @property
    def closed(self) -> defer.Deferred[None]:
        """Fires when the connection is gone."""
        ...

    def abort(self, end: StreamEnd, message: str) -> None:
        """End the session from the app side: STOP on the wire, then close."""
        ...
