"""The engine's retries: backoff inside a window, the error that tells what went wrong, and a stop
of the job that always ends them (never turned into another attempt). On a Clock, no sockets."""

from __future__ import annotations

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock

from netota_daemon.engine.lifecycle import JobStopped, StopKind, StopRequest
from netota_daemon.engine.retry import RetriesExhausted, retry_until_deadline
from netota_daemon.protocols.endpoints import EndpointError


class Attempts:
    """An attempt function whose results the test controls."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []
        self.times: list[float] = []

    def __call__(self, clock: Clock):
        def attempt():
            self.times.append(clock.seconds())
            d = defer.Deferred()
            self.pending.append(d)
            return d

        return attempt


def run(clock, attempts, **kwargs):
    results = []
    d = defer.ensureDeferred(
        retry_until_deadline(
            clock,
            attempts(clock),
            kwargs.pop("deadline", 10.0),
            kwargs.pop("attempt_timeout", 2.0),
            "test",
            policy=kwargs.pop("policy", lambda n: 1.0),
            **kwargs,
        )
    )
    d.addBoth(results.append)
    return d, results


def test_retries_after_refusals_then_succeeds():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts)
    attempts.pending[0].errback(error.ConnectionRefusedError())
    clock.advance(1.0)
    attempts.pending[1].errback(error.ConnectionRefusedError())
    clock.advance(1.0)
    attempts.pending[2].callback("connected")
    assert results == ["connected"]
    assert attempts.times == [0.0, 1.0, 2.0]
    assert clock.getDelayedCalls() == []


def test_each_attempt_is_bounded_and_the_deadline_ends_it():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts, deadline=10.0, attempt_timeout=3.0)
    # every attempt hangs: 3 s timeout + 1 s wait each -> attempts at 0, 4, 8; the one at 8 is cut at 10
    clock.pump([0.5] * 30)
    assert attempts.times == [0.0, 4.0, 8.0]
    (failure,) = results
    assert failure.check(RetriesExhausted)
    assert failure.value.attempts == 3
    assert "timed out" in str(failure.value)
    assert clock.getDelayedCalls() == []


def test_no_attempt_starts_when_the_wait_would_pass_the_deadline():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts, deadline=2.5, policy=lambda n: 2.0)
    attempts.pending[0].errback(error.ConnectionRefusedError())
    clock.advance(2.0)
    attempts.pending[1].errback(error.ConnectionRefusedError())
    assert results[0].check(RetriesExhausted)
    assert len(attempts.times) == 2


def test_an_attempt_cut_short_by_the_deadline_does_not_hide_the_real_error():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts, deadline=2.5, attempt_timeout=2.0, policy=lambda n: 1.0)
    attempts.pending[0].errback(error.ConnectionRefusedError())
    clock.advance(1.0)  # the second attempt starts at 1.0 with only 1.5 s left of the window...
    clock.advance(1.5)  # ...and the window's end cuts it: that says nothing about the device
    (failure,) = results
    assert failure.check(RetriesExhausted)
    assert failure.value.attempts == 2
    assert isinstance(failure.value.last_error, error.ConnectionRefusedError)
    assert "connection refused" in str(failure.value)


def test_an_attempt_that_times_out_with_its_whole_budget_is_the_last_error():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts, deadline=3.5, attempt_timeout=2.0, policy=lambda n: 1.0)
    attempts.pending[0].errback(error.ConnectionRefusedError())
    clock.advance(1.0)
    clock.advance(2.0)  # the second attempt had its full 2 s: the device really went silent
    (failure,) = results
    assert isinstance(failure.value.last_error, defer.TimeoutError)


def test_non_retryable_error_ends_at_once():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts)
    attempts.pending[0].errback(EndpointError("network interface 'nope0' does not exist"))
    assert results[0].check(EndpointError)
    assert len(attempts.times) == 1


def test_cancel_cancels_the_running_attempt_and_the_wait():
    clock, attempts = Clock(), Attempts()
    d, results = run(clock, attempts)
    attempts.pending[0].errback(error.ConnectionRefusedError())
    assert clock.getDelayedCalls()  # the backoff wait
    d.cancel()
    assert results[0].check(defer.CancelledError)
    assert clock.getDelayedCalls() == []
    clock2, attempts2 = Clock(), Attempts()
    d2, results2 = run(clock2, attempts2)
    d2.cancel()
    assert attempts2.pending[0].called  # the attempt itself was cancelled
    assert results2[0].check(defer.CancelledError)


class Stopping:
    """A stop_check that raises once ``stop()`` was called (what the job's lifecycle does)."""

    def __init__(self) -> None:
        self.request: StopRequest | None = None

    def stop(self) -> None:
        self.request = StopRequest(StopKind.DEADLINE, "the job's deadline of 10 s passed")

    def __call__(self) -> None:
        if self.request is not None:
            raise JobStopped(self.request)


@pytest.mark.parametrize("order", ["stop first", "attempt timeout first"])
def test_a_stop_in_the_same_pass_as_an_attempt_timeout_is_never_a_retry(order):
    clock, attempts, stopping = Clock(), Attempts(), Stopping()
    d, results = run(clock, attempts, deadline=100.0, attempt_timeout=2.0, stop_check=stopping)
    # the attempt's own timeout fires at 2.0; the job's stop is requested at the same moment
    if order == "stop first":
        stopping.stop()
    else:
        clock.callLater(2.0, stopping.stop)  # scheduled after the attempt's timer: runs after it
    clock.advance(2.0)
    clock.advance(1.0)  # past the backoff: no new attempt starts either
    (failure,) = results
    assert failure.check(JobStopped), failure
    assert len(attempts.times) == 1  # no second attempt
    assert clock.getDelayedCalls() == []


def test_a_stop_between_attempts_ends_at_the_next_failure():
    clock, attempts, stopping = Clock(), Attempts(), Stopping()
    d, results = run(clock, attempts, stop_check=stopping)
    stopping.stop()
    attempts.pending[0].errback(error.ConnectionRefusedError())
    assert results[0].check(JobStopped)
    assert clock.getDelayedCalls() == []


def test_each_failed_attempt_is_reported_with_its_error():
    clock, attempts = Clock(), Attempts()
    seen = []
    d, results = run(clock, attempts, on_attempt_failed=lambda n, e: seen.append((n, type(e).__name__)))
    attempts.pending[0].errback(error.ConnectionRefusedError())
    clock.advance(1.0)
    attempts.pending[1].errback(error.ConnectionRefusedError())
    clock.advance(1.0)
    attempts.pending[2].callback("connected")
    assert seen == [(1, "ConnectionRefusedError"), (2, "ConnectionRefusedError")]
    assert results == ["connected"]
