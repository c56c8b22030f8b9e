"""``CommitOrder``: the queue's "journal before acting" rule as one mechanism.

Every action of the job queue (start an engine, cancel one, tell the event streams, answer a client)
is handed to :meth:`CommitOrder.after` with the journal write it depends on, or with none. Actions
run in the order they were handed over, each only once its own write has committed and every
earlier action has run: an event never overtakes the journal row it reports, and a progress event
(which writes nothing) never overtakes the phase change before it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure


@dataclass
class _Step:
    gate: Deferred[Any]
    done: bool = False
    result: Any = None
    failure: Failure | None = None
    _order: CommitOrder | None = field(default=None, repr=False)

    def finish(self, result: Any) -> None:
        self.done = True
        if isinstance(result, Failure):
            self.failure = result
        else:
            self.result = result
        assert self._order is not None
        self._order._drain()


class CommitOrder:
    def __init__(self) -> None:
        self._steps: deque[_Step] = deque()
        self._draining = False

    @property
    def pending(self) -> int:
        """Steps handed over and not yet run."""
        return len(self._steps)

    def after(self, write: Deferred[Any] | None = None) -> Deferred[Any]:
        """A Deferred that fires, in turn, with ``write``'s result once it committed (or fails with
        its failure); at once (with None) if ``write`` is None and nothing is waiting before it."""
        step = _Step(gate=Deferred(), done=write is None, _order=self)
        self._steps.append(step)
        if write is not None:
            write.addBoth(step.finish)
        self._drain()
        return step.gate

    def _drain(self) -> None:
        if self._draining:
            return  # an action that hands over more steps: the loop below runs them in turn
        self._draining = True
        try:
            while self._steps and self._steps[0].done:
                step = self._steps.popleft()
                if step.failure is not None:
                    step.gate.errback(step.failure)
                else:
                    step.gate.callback(step.result)
        finally:
            self._draining = False
