"""What a running upgrade tells its listeners: phase changes and progress.

A job publishes these to any number of subscribers (the CLI's progress bar, the daemon's journal
and its control event stream) through :class:`EventPublisher`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Generic, TypeVar, Union

from twisted.logger import Logger

from netota_daemon.engine.outcome import Outcome, Phase

log = Logger()


@dataclass(frozen=True)
class PhaseChanged:
    phase: Phase
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"type": "phase", "phase": self.phase.value, "message": self.message}


@dataclass(frozen=True)
class Progress:
    """One step of an OTA stream.

    ``percent`` is ours (bytes served against the image length, or against all_size once known);
    ``device_percent`` is the device's own ``download_percent``; ``rate`` is bytes per second
    averaged over the last few seconds.
    """

    phase: Phase
    bytes_served: int
    total_bytes: int
    percent: float
    device_percent: int
    rate: float
    point_of_no_return: bool = False

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["type"] = "progress"
        data["phase"] = self.phase.value
        return data


@dataclass(frozen=True)
class Finished:
    outcome: Outcome

    def to_json(self) -> dict[str, Any]:
        return {"type": "outcome", "outcome": self.outcome.to_json()}


JobEvent = Union[PhaseChanged, Progress, Finished]
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
