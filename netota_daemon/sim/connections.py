"""The device's open connections: a wrapping factory that tracks every connection it builds, so a
reboot or a stop can close them all and wait until each one is gone.

Servers never see the tracking: :class:`TrackingFactory` wraps their factory (Twisted's
:class:`~twisted.protocols.policies.WrappingFactory`), and each connection's wrapper reports to
the :class:`ConnectionRegistry` once the server's own ``connectionLost`` has run.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory, ITransport
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure


class Connection(Protocol):
    """What the servers use of a TCP transport (a real one, a wrapper, or a test's StringTransport)."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def getPeer(self) -> IAddress: ...

    def getHost(self) -> IAddress: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


def connection(transport: ITransport | None) -> Connection:
    """A protocol's transport as the TCP connection it is (it must be connected)."""
    if transport is None:
        raise RuntimeError("the protocol is not connected")
    return cast(Connection, transport)


def address_host(address: IAddress) -> str:
    """The IP of a TCP address ("" for any other kind)."""
    return str(getattr(address, "host", ""))


class ConnectionRegistry:
    """Every open connection of one device, each with a Deferred that fires once it is gone."""

    def __init__(self) -> None:
        self._open: dict[TrackedConnection, Deferred[None]] = {}

    def opened(self, wrapper: TrackedConnection) -> None:
        self._open[wrapper] = Deferred()

    def closed(self, wrapper: TrackedConnection) -> None:
        lost = self._open.pop(wrapper, None)
        if lost is not None:
            lost.callback(None)

    def abort_all(self) -> None:
        """Reset every open connection (their ``connectionLost`` follows, from the reactor)."""
        for wrapper in list(self._open):
            if wrapper.transport is not None:
                connection(wrapper.transport).abortConnection()

    def waiting(self) -> list[Deferred[None]]:
        """One Deferred per open connection, firing when it is gone."""
        return list(self._open.values())

    def __len__(self) -> int:
        return len(self._open)


class TrackedConnection(ProtocolWrapper):
    """A connection's wrapper: reports to the registry after the server's ``connectionLost``."""

    factory: TrackingFactory

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The wrapped protocol stays reachable (tests read a session's result after the close).
        try:
            self.wrappedProtocol.connectionLost(reason)
        finally:
            self.factory.unregisterProtocol(self)


class TrackingFactory(WrappingFactory):
    """Wraps a server's factory; every connection it builds is in ``registry`` until it is lost."""

    protocol = TrackedConnection

    def __init__(self, wrapped: IProtocolFactory, registry: ConnectionRegistry) -> None:
        super().__init__(wrapped)  # type: ignore[no-untyped-call]
        self.registry = registry

    def registerProtocol(self, p: Any) -> None:
        self.protocols[p] = 1
        self.registry.opened(p)

    def unregisterProtocol(self, p: Any) -> None:
        self.protocols.pop(p, None)
        self.registry.closed(p)
