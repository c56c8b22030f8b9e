"""Retrying a step that is safe to repeat, with backoff, inside a window of time.

The engine retries only what the device allows (connections, description-document polls, whole
phase-2 attempts). :func:`retry_until_deadline` runs the attempts; before it turns any failure into
"try again" it asks ``stop_check``, so a job that is being cancelled, or whose deadline passed, stops
there instead of retrying, whatever order the timers fired in (:mod:`netota_daemon.engine.lifecycle`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from netota_daemon.protocols.endpoints import RETRYABLE_ERRORS, bounded, connection_error_message

log = Logger()

T = TypeVar("T")


class RetriesExhausted(Exception):
    """Every attempt failed before the window closed; ``last_error`` is the one that tells what went wrong."""

    def __init__(self, what: str, attempts: int, last_error: BaseException) -> None:
        super().__init__(f"{what}: {attempts} attempt(s) failed, last: {connection_error_message(last_error)}")
        self.what = what
        self.attempts = attempts
        self.last_error = last_error


def default_backoff() -> Callable[[int], float]:
    """0.2 s, then growing by 1.5 up to 5 s (no jitter: one app talks to one device)."""
    return backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=1.5, jitter=lambda: 0.0)


#: ``on_attempt_failed(attempt, error)``: an attempt failed and another will follow.
AttemptFailed = Callable[[int, BaseException], None]


async def retry_until_deadline(
    clock: IReactorTime,
    attempt: Callable[[], Coroutine[Any, Any, T] | defer.Deferred[T]],
    deadline: float,
    attempt_timeout: float,
    what: str,
    policy: Callable[[int], float] | None = None,
    retryable: tuple[type[BaseException], ...] = RETRYABLE_ERRORS,
    log_context: dict[str, Any] | None = None,
    stop_check: Callable[[], None] | None = None,
    on_attempt_failed: AttemptFailed | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, with backoff between attempts, for at most ``deadline``
    seconds from now; each attempt gets ``attempt_timeout`` seconds (less near the deadline).

    Errors that are not ``retryable`` end it at once. When time runs out, raises
    :class:`RetriesExhausted` carrying the last error; an attempt that the window's end cut short
    (it had less than ``attempt_timeout``) and then timed out says only that time ran out, so the
    error of the attempt before it is kept. ``stop_check()`` is called before every attempt and after
    every failed one: it raises when the caller is stopping, and that ends the retries. Cancelling
    the returned coroutine's Deferred cancels the running attempt or the wait (CancelledError).
    """
    policy = policy or default_backoff()
    end = clock.seconds() + deadline
    attempts = 0
    last_error: BaseException | None = None
    while True:
        if stop_check is not None:
            stop_check()
        remaining = end - clock.seconds()
        budget = min(attempt_timeout, remaining)
        attempts += 1
        try:
            return await bounded(clock, defer.ensureDeferred(attempt()), budget, what)
        except defer.CancelledError:
            raise
        except retryable as e:
            if stop_check is not None:
                stop_check()
            cut_short = budget < attempt_timeout and isinstance(e, defer.TimeoutError)
            if not (cut_short and last_error is not None):
                last_error = e
            log.debug(
                "{what}: attempt {attempts} failed: {error}",
                what=what,
                attempts=attempts,
                error=connection_error_message(e),
                **(log_context or {}),
            )
        delay = policy(attempts - 1)
        if clock.seconds() + delay >= end:
            assert last_error is not None
            raise RetriesExhausted(what, attempts, last_error)
        if on_attempt_failed is not None:
            on_attempt_failed(attempts, last_error)
        await deferLater(clock, delay, lambda: None)
