"""``JobLifecycle``: the one explicit state of an upgrade job, and the one mechanism that stops it.

::

    CREATED --run()--> RUNNING --cancel() / deadline--> STOPPING
                          |                                |
                          +--- outcome known --------------+--> FINISHING --connections closed--> FINISHED

The phase a job is in (detect, phase 1, ...) is separate: it says where the upgrade is, this says
whether the job runs, is being stopped, or is done. ``docs/engine.md`` draws both.

A stop (a person's cancel or the job's deadline) is recorded here first, synchronously, and every
decision point of the engine asks :attr:`JobLifecycle.stop` before it turns an error into "retry":
so a stop is never mistaken for a retryable timeout, whatever order the timers fire in. Every wait
of the engine goes through :meth:`JobLifecycle.guard`, which ends the wait as soon as a stop is
requested (in the next reactor turn), even when the Deferred waited on swallows its cancellation.
A cancel that comes while a deadline stop is in progress still wins: the job ends aborted.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")


class LifecycleState(str, enum.Enum):
    CREATED = "created"  # made, not run yet
    RUNNING = "running"  # running its phases
    STOPPING = "stopping"  # a cancel or the deadline asked it to stop; the running step is being stopped
    FINISHING = "finishing"  # the outcome is known; it closes what it still holds
    FINISHED = "finished"  # the outcome is delivered


#: The transitions :class:`JobLifecycle` allows; anything else is a bug.
TRANSITIONS: dict[LifecycleState, frozenset[LifecycleState]] = {
    LifecycleState.CREATED: frozenset({LifecycleState.RUNNING}),
    LifecycleState.RUNNING: frozenset({LifecycleState.STOPPING, LifecycleState.FINISHING}),
    LifecycleState.STOPPING: frozenset({LifecycleState.FINISHING}),
    LifecycleState.FINISHING: frozenset({LifecycleState.FINISHED}),
    LifecycleState.FINISHED: frozenset(),
}


class StopKind(str, enum.Enum):
    CANCEL = "cancel"  # a person (or the daemon's shutdown) cancelled the job: it ends aborted
    DEADLINE = "deadline"  # the job's deadline passed: it ends failed (timeout), or unverified


@dataclass(frozen=True)
class StopRequest:
    kind: StopKind
    reason: str


class JobStopped(Exception):
    """Raised out of a guarded wait when the job was asked to stop."""

    def __init__(self, stop: StopRequest) -> None:
        super().__init__(stop.reason)
        self.stop = stop


class JobLifecycle:
    """The state of one job; ``clock`` schedules the guards' release after a stop."""

    def __init__(self, clock: IReactorTime, on_change: Callable[[LifecycleState], None] | None = None) -> None:
        self._clock = clock
        self._on_change = on_change
        self.state = LifecycleState.CREATED
        self.stop: StopRequest | None = None
        self._guards: dict[defer.Deferred[Any], defer.Deferred[Any]] = {}  # the wait -> what it waits on
        self._release: IDelayedCall | None = None

    # -- transitions -----------------------------------------------------------------------------
    def _enter(self, state: LifecycleState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"job lifecycle: {self.state.value} -> {state.value} is not a transition")
        self.state = state
        if self._on_change is not None:
            self._on_change(state)

    def start(self) -> None:
        self._enter(LifecycleState.RUNNING)

    def request_stop(self, kind: StopKind, reason: str) -> bool:
        """Ask the job to stop. Returns whether this request counts: False before the job runs, once
        its outcome is known, or when it is already stopping for the same kind. A cancel while a
        deadline stop is in progress replaces it (the job then ends aborted)."""
        if self.state is LifecycleState.RUNNING:
            self.stop = StopRequest(kind, reason)
            self._enter(LifecycleState.STOPPING)
        elif self.state is LifecycleState.STOPPING and self.stop is not None:
            if not (self.stop.kind is StopKind.DEADLINE and kind is StopKind.CANCEL):
                return False
            self.stop = StopRequest(kind, reason)
        else:
            return False
        if self._release is None:
            # Not from inside the caller (often an event subscriber while the job's code runs).
            self._release = self._clock.callLater(0, self._release_guards)
        return True

    def finishing(self) -> None:
        """The outcome is known: stops from now on change nothing."""
        self._enter(LifecycleState.FINISHING)
        self._cancel_release()

    def finished(self) -> None:
        self._enter(LifecycleState.FINISHED)

    @property
    def stopping(self) -> bool:
        return self.stop is not None and self.state in (LifecycleState.STOPPING, LifecycleState.RUNNING)

    # -- waits -----------------------------------------------------------------------------------
    def guard(self, waited: defer.Deferred[T], on_late: Callable[[T], object] | None = None) -> defer.Deferred[T]:
        """A Deferred with ``waited``'s result, that fails with :class:`JobStopped` as soon as a stop is
        requested (``waited`` is then cancelled; a result it still delivers later goes to ``on_late``,
        so a connection that completes after the stop can be closed). Cancelling the returned
        Deferred cancels ``waited``."""
        if self.stop is not None and self.state is not LifecycleState.FINISHING:
            self._discard(waited, on_late)
            return defer.fail(JobStopped(self.stop))
        out: defer.Deferred[T] = defer.Deferred(lambda _: waited.cancel())

        def relay(result: T | Failure) -> None:
            if self._guards.pop(out, None) is None:  # released already: a late result
                if on_late is not None and not isinstance(result, Failure):
                    on_late(result)
                return None
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
            return None

        self._guards[out] = waited
        waited.addBoth(relay)
        return out

    def _release_guards(self) -> None:
        self._release = None
        if self.stop is None or self.state is not LifecycleState.STOPPING:
            return
        guards, self._guards = self._guards, {}
        for out, waited in guards.items():
            if not out.called:
                out.errback(JobStopped(self.stop))
            waited.cancel()

    def _cancel_release(self) -> None:
        if self._release is not None and self._release.active():
            self._release.cancel()
        self._release = None

    @staticmethod
    def _discard(waited: defer.Deferred[T], on_late: Callable[[T], object] | None) -> None:
        def late(result: T | Failure) -> None:
            if on_late is not None and not isinstance(result, Failure):
                on_late(result)
            return None

        waited.addBoth(late)
        waited.cancel()
