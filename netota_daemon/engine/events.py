"""What a running upgrade tells its listeners: phase changes and progress.

A job publishes these to any number of subscribers (the CLI's progress bar, the daemon's journal
and its control event stream) through :class:`EventPublisher`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

from netota_daemon.engine.outcome import Outcome, Phase

log = Logger()


@dataclass(frozen=True)
class PhaseChanged:
    phase: Phase
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": "phase", "phase": self.phase.value, "message": self.message}


class TransferState(str, enum.Enum):
    """What an OTA stream (or an upload) is doing, as a progress event says it."""

    TRANSFERRING = "transferring"  # the device asks for bytes and netota sends them
    DEVICE_WORKING = "device_working"  # netota has answered; the device is busy (erasing, writing, checking)
    DONE = "done"  # the device said OK


@dataclass(frozen=True)
class Progress:
    """One step of an OTA stream or upload (``docs/engine.md`` says how each field is computed).

    - ``percent``: 0..100, never lower than the phase's previous event, 100 only once the device
      said OK. It is ``done_bytes`` against ``total_bytes``: in phase 1 the furthest byte the device
      asked for against the image's length; in phase 2, before the all_size notice, 0 (the loader
      reads the image's header first); after it, the bytes the device asked for since against all_size.
    - ``done_bytes`` / ``total_bytes``: the numbers ``percent`` is based on (``basis`` names them).
    - ``bytes_served``: every byte netota sent in this phase (re-reads included).
    - ``device_percent``: the device's own ``download_percent``.
    - ``rate``: bytes per second served over the last few seconds (0 when not known yet).
    - ``eta``: seconds left, only while transferring and with a rate measured long enough; else None.
    - ``state`` and ``activity``: transferring, or the device working (``activity`` says on what:
      "erasing flash", "writing and checking the image"), or done.
    - ``point_of_no_return``: the phase-2 all_size notice was seen.
    """

    phase: Phase
    bytes_served: int
    total_bytes: int
    percent: float
    device_percent: int
    rate: float
    point_of_no_return: bool = False
    done_bytes: int = 0
    basis: str = "offset"  # offset | header | all_size | upload | done
    state: TransferState = TransferState.TRANSFERRING
    activity: str = ""
    eta: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["type"] = "progress"
        data["phase"] = self.phase.value
        data["state"] = self.state.value
        return data


@dataclass(frozen=True)
class Waiting:
    """The job waits for the device: connecting (``attempt`` N, ``last_error`` the previous attempt's
    error), or polling while it reboots. Published on each failed attempt, so a dead device is never
    silent."""

    phase: Phase
    message: str
    attempt: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "waiting",
            "phase": self.phase.value,
            "message": self.message,
            "attempt": self.attempt,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class Finished:
    outcome: Outcome

    def to_json(self) -> dict[str, Any]:
        return {"type": "outcome", "outcome": self.outcome.to_json()}


JobEvent = PhaseChanged | Progress | Waiting | Finished
Subscriber = Callable[[JobEvent], None]
E = TypeVar("E")


class EventPublisher(Generic[E]):
    """Delivers each event to every subscriber; a failing subscriber is logged, never fatal.

    A job publishes :data:`JobEvent` objects; the daemon's queue reuses it for its own events."""

    def __init__(self) -> None:
        self._subscribers: list[Callable[[E], None]] = []

    def subscribe(self, subscriber: Callable[[E], None]) -> Callable[[], None]:
        """Add ``subscriber``; returns a function that removes it."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, event: E) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                log.failure("event subscriber {subscriber!r} failed", subscriber=subscriber)
