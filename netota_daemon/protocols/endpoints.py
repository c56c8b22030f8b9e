"""Reaching a device: client endpoints that can carry a local interface and source address, and
a bound on how long one attempt may take.

Every device of a test rack lives at 192.168.1.1, one per WiFi interface, so every connection to a
device (CTP, HTTP, OTA) is made through :class:`DeviceConnector`, which binds the socket to the
device's interface (``SO_BINDTODEVICE``, set before ``connect()``) and optionally to a source address.
It does so inside Twisted's own endpoint machinery: a :class:`TCP4ClientEndpoint` whose reactor is
wrapped so that ``connectTCP`` builds a connector whose transport sets the socket option.
"""

from __future__ import annotations

import errno
import socket
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet import defer, error, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.client import ResponseFailed, ResponseNeverReceived

log = Logger()

T = TypeVar("T")

#: Linux's SO_BINDTODEVICE (25); the socket module exposes it on Linux only.
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


class EndpointError(Exception):
    """A connection can't even be attempted: unknown interface, missing privilege. Not retried."""


def check_interface(interface: str, sysfs: Path = Path("/sys/class/net")) -> None:
    """Raise :class:`EndpointError` unless ``interface`` exists, is up with a link, and this process
    may bind to it: a job for a device whose interface is down fails at once, with that reason."""
    try:
        socket.if_nametoindex(interface)
    except OSError:
        raise EndpointError(f"network interface {interface!r} does not exist") from None
    problem = interface_state_problem(interface, *_read_interface_state(sysfs / interface))
    if problem:
        raise EndpointError(problem)
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        bind_to_device(probe, interface)
    finally:
        probe.close()


#: ``IFF_UP`` in /sys/class/net/IF/flags: the interface is administratively up.
IFF_UP = 0x1


def _read_interface_state(directory: Path) -> tuple[int | None, str | None]:
    """The interface's flags and operstate from sysfs; None for what can't be read."""
    try:
        flags: int | None = int((directory / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        flags = None
    try:
        operstate: str | None = (directory / "operstate").read_text().strip()
    except OSError:
        operstate = None
    return flags, operstate


def interface_state_problem(interface: str, flags: int | None, operstate: str | None) -> str | None:
    """Why connections over ``interface`` can't work now, or None. Unknown state is no problem
    (some interfaces, like ``lo``, report operstate "unknown")."""
    if flags is not None and not flags & IFF_UP:
        return f"network interface {interface!r} is down (bring it up: ip link set {interface} up)"
    if operstate in ("down", "lowerlayerdown", "notpresent"):
        return f"network interface {interface!r} has no link (operstate {operstate}): is it connected to the device's WiFi?"
    if operstate == "dormant":
        return f"network interface {interface!r} is not associated with the device's WiFi (operstate dormant)"
    return None


def bind_to_device(sock: socket.socket, interface: str) -> None:
    """Set SO_BINDTODEVICE on ``sock``, turning the kernel's errors into clear ones."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode() + b"\0")
    except OSError as e:
        raise EndpointError(_bind_error_message(interface, e.errno)) from None


def _bind_error_message(interface: str, code: int | None) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return (
            f"binding to interface {interface!r} needs the CAP_NET_RAW capability "
            "(run as root or grant it, e.g. AmbientCapabilities=CAP_NET_RAW)"
        )
    if code == errno.ENODEV:
        return f"network interface {interface!r} does not exist"
    return f"can't bind to interface {interface!r}: {errno.errorcode.get(code or 0, code)}"


class _InterfaceBoundClient(tcp.Client):
    """A TCP client transport whose socket is bound to one network interface before connecting."""

    def __init__(self, host: str, port: int, bindAddress: Any, connector: Any, reactor: Any, interface: str) -> None:
        self._interface = interface
        super().__init__(host, port, bindAddress, connector, reactor)  # type: ignore[no-untyped-call]

    def createInternetSocket(self) -> socket.socket:
        sock: socket.socket = super().createInternetSocket()  # type: ignore[no-untyped-call]
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, self._interface.encode() + b"\0")
        except OSError:
            sock.close()
            raise  # Twisted reports it as ConnectBindError through clientConnectionFailed
        return sock


class _InterfaceBoundConnector(tcp.Connector):
    def __init__(self, *args: Any, interface: str, **kwargs: Any) -> None:
        self._interface = interface
        super().__init__(*args, **kwargs)

    def _makeTransport(self) -> tcp.Client:
        return _InterfaceBoundClient(self.host, self.port, self.bindAddress, self, self.reactor, self._interface)


class _InterfaceBindingReactor:
    """Stands in for the reactor inside a :class:`TCP4ClientEndpoint`: its ``connectTCP`` makes
    an interface-bound connection; everything else is the real reactor."""

    def __init__(self, reactor: Any, interface: str) -> None:
        self._reactor = reactor
        self._interface = interface

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        connector = _InterfaceBoundConnector(
            host, port, factory, timeout, bindAddress, self._reactor, interface=self._interface
        )
        connector.connect()
        return connector

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class DeviceConnector:
    """Makes client endpoints to one device's ports, on its interface and source address."""

    def __init__(
        self,
        reactor: Any,
        host: str,
        interface: str | None = None,
        source_address: str | None = None,
    ) -> None:
        self.reactor = reactor
        self.host = host
        self.interface = interface
        self.source_address = source_address
        self._checked = False

    def check(self) -> None:
        """Verify the interface once (exists, may be bound); raises :class:`EndpointError`."""
        if self.interface and not self._checked:
            check_interface(self.interface)
        self._checked = True

    def endpoint(self, port: int, timeout: float) -> IStreamClientEndpoint:
        """A client endpoint to ``port`` of the device; ``timeout`` bounds the TCP connect."""
        self.check()
        bind = (self.source_address, 0) if self.source_address else None
        reactor = _InterfaceBindingReactor(self.reactor, self.interface) if self.interface else self.reactor
        return TCP4ClientEndpoint(reactor, self.host, port, timeout=max(timeout, 0.001), bindAddress=bind)

    def describe(self) -> str:
        via = f" via {self.interface}" if self.interface else ""
        source = f" from {self.source_address}" if self.source_address else ""
        return f"{self.host}{via}{source}"


#: Errors worth another connection attempt (the device may be rebooting or not listening yet).
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (
    error.ConnectError,  # refused, timed out, no route, ...
    error.ConnectionLost,
    error.ConnectionDone,
    defer.TimeoutError,
    error.TimeoutError,
)


def connection_error_message(exc: BaseException) -> str:
    """A short human message for a failed connection attempt."""
    if isinstance(exc, error.ConnectBindError) and exc.osError is not None:
        return str(exc)
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, defer.TimeoutError) and str(exc):
        return str(exc)  # from bounded(): says what timed out
    if isinstance(exc, (error.TCPTimedOutError, error.TimeoutError, defer.TimeoutError)):
        return "connection timed out"
    if isinstance(exc, error.NoRouteError):
        return "no route to host"
    reasons = getattr(exc, "reasons", None)  # twisted.web's ResponseFailed & co. wrap failures
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(connection_error_message(r.value) if hasattr(r, "value") else str(r) for r in reasons)
        if isinstance(exc, ResponseNeverReceived):
            return f"no HTTP answer ({inner})"
        if isinstance(exc, ResponseFailed):
            return f"the HTTP answer was cut off or is not HTTP ({inner})"
        return f"{type(exc).__name__}: {inner}"
    if isinstance(exc, error.ConnectionDone):
        return "the device closed the connection"
    if isinstance(exc, error.ConnectionLost):
        return "connection lost"
    text = str(exc).strip()
    return text or type(exc).__name__


def is_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is what a cancelled Deferred turned into: CancelledError itself, a cancelled
    connection attempt, or an HTTP client error wrapping a CancelledError."""
    if isinstance(exc, (defer.CancelledError, error.ConnectingCancelledError)):
        return True
    reasons = getattr(exc, "reasons", None)  # twisted.web's ResponseFailed & co.
    if isinstance(reasons, list):
        return any(getattr(r, "check", lambda *_: False)(defer.CancelledError) for r in reasons)
    return False


#: Errors that say the device's own network stack turned the connection down (or the path to it is
#: gone), as opposed to no answer at all.
_TURNED_DOWN = (
    error.ConnectionRefusedError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.NoRouteError,
)


def is_turned_down(exc: BaseException) -> bool:
    """Whether ``exc`` says the device refused or reset the connection, or that there is no route
    to it (an HTTP client error wrapping one counts), rather than that nothing answered in time."""
    if isinstance(exc, _TURNED_DOWN):
        return True
    reasons = getattr(exc, "reasons", None)  # twisted.web's ResponseFailed & co.
    if isinstance(reasons, list):
        return any(getattr(r, "check", lambda *_: False)(*_TURNED_DOWN) for r in reasons)
    return False


async def bounded(clock: IReactorTime, d: defer.Deferred[T], seconds: float, what: str) -> T:
    """Await ``d`` for at most ``seconds``: then cancel it and raise ``defer.TimeoutError``.

    Unlike ``Deferred.addTimeout`` this also recognises cancellations that the cancelled Deferred
    reports as another error (a connection attempt, treq); a cancellation from outside (the caller's
    own Deferred cancelled) is raised as ``CancelledError``.
    """
    timed_out = False

    def expire() -> None:
        nonlocal timed_out
        timed_out = True
        d.cancel()

    call = clock.callLater(max(seconds, 0.0), expire)
    try:
        return await d
    except BaseException as e:
        if timed_out:
            raise defer.TimeoutError(f"{what}: timed out after {seconds:g} s") from None
        if is_cancellation(e) and not isinstance(e, defer.CancelledError):
            raise defer.CancelledError(str(e)) from e
        raise
    finally:
        if call.active():
            call.cancel()
