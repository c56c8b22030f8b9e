"""``DeviceTimers``: every delay of the simulated device goes through here, scaled and cancellable."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from zope.interface import implementer


@implementer(IDelayedCall)
class _NoCall:
    """What :meth:`DeviceTimers.later` returns once closed: a call that never runs."""

    def getTime(self) -> float:
        return float("inf")

    def active(self) -> bool:
        return False

    def cancel(self) -> None:
        pass

    def delay(self, secondsLater: float) -> None:
        pass

    def reset(self, secondsFromNow: float) -> None:
        pass


class DeviceTimers:
    """``callLater`` in device seconds (multiplied by ``time_scale``), remembering each pending call
    so that a reboot or a stop can cancel them all at once.

    After :meth:`close` nothing new is scheduled: code that was already running when its owner was
    stopped (an event waiter may stop the device from inside ``record``) can't leave a timer behind.
    """

    def __init__(self, clock: IReactorTime, time_scale: float) -> None:
        self.clock = clock
        self.time_scale = time_scale
        self._pending: set[IDelayedCall] = set()
        self.closed = False

    def close(self) -> None:
        """Cancel everything and refuse new calls."""
        self.closed = True
        self.cancel_all()

    def later(self, device_seconds: float, function: Callable[..., Any], *args: Any) -> IDelayedCall:
        if self.closed:
            return _NoCall()
        call: IDelayedCall

        def run() -> None:
            self._pending.discard(call)
            function(*args)

        call = self.clock.callLater(max(0.0, device_seconds * self.time_scale), run)
        self._pending.add(call)
        return call

    def cancel(self, call: IDelayedCall | None) -> None:
        if call is None:
            return
        if call.active():
            call.cancel()
        self._pending.discard(call)

    def cancel_all(self) -> None:
        for call in list(self._pending):
            if call.active():
                call.cancel()
        self._pending.clear()

    @property
    def pending(self) -> int:
        return sum(1 for call in self._pending if call.active())
