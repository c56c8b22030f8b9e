"""systemd's notify protocol: READY, WATCHDOG and STOPPING datagrams to ``$NOTIFY_SOCKET``.

A few lines of our own rather than a dependency: one ``AF_UNIX``/``SOCK_DGRAM`` send per message
(an ``@`` prefix means the abstract namespace). Without ``$NOTIFY_SOCKET`` every call is a no-op, so
the daemon runs the same outside systemd. :class:`WatchdogService` pings from a ``LoopingCall`` at
half of ``$WATCHDOG_USEC`` while the reactor is alive.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


class SystemdNotifier:
    """Sends ``KEY=VALUE`` lines to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send ``message`` (newline-separated ``KEY=VALUE``); True if it was sent."""
        if self.address is None:
            return False
        try:
            if self._socket is None:
                # Non-blocking: a service manager that stops reading must never stall the reactor
                # (a full receive queue would block sendto); the message is dropped and logged.
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._socket.sendto(message.encode("utf-8"), self.address)
            return True
        except BlockingIOError:
            log.warn(
                "systemd notify {message!r} dropped: {address!r} is not reading", message=message, address=self.address
            )
            return False
        except OSError as e:
            log.warn(
                "systemd notify {message!r} to {address!r} failed: {error}",
                message=message,
                address=self.address,
                error=e,
            )
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, status: str) -> bool:
        return self.notify(f"STATUS={status}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval(environ: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None when systemd asked for
    none (unset, not a number, or ``$WATCHDOG_PID`` names another process)."""
    environ = os.environ if environ is None else environ
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid if pid is not None else os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2_000_000


class WatchdogService(Service):
    """Pings the systemd watchdog every ``interval`` seconds from the reactor: if the reactor hangs,
    the pings stop and systemd restarts the daemon."""

    def __init__(self, notifier: SystemdNotifier, interval: float, clock: IReactorTime) -> None:
        self.notifier = notifier
        self.interval = interval
        self._loop = LoopingCall(notifier.watchdog)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        log.info("systemd watchdog: pinging every {interval} s", interval=self.interval)
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
