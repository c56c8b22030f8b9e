"""``JobLifecycle``: the transitions, the stop rules and the guard every wait of the engine goes through."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from netota_daemon.engine.lifecycle import JobLifecycle, JobStopped, LifecycleState, StopKind

pytestmark = pytest.mark.usefixtures("no_sockets_or_processes")


def running() -> tuple[Clock, JobLifecycle, list[LifecycleState]]:
    clock = Clock()
    states: list[LifecycleState] = []
    lifecycle = JobLifecycle(clock, on_change=states.append)
    lifecycle.start()
    return clock, lifecycle, states


def test_the_states_follow_the_drawn_machine_and_nothing_else():
    clock, lifecycle, states = running()
    assert lifecycle.request_stop(StopKind.CANCEL, "operator")
    lifecycle.finishing()
    lifecycle.finished()
    assert states == [
        LifecycleState.RUNNING,
        LifecycleState.STOPPING,
        LifecycleState.FINISHING,
        LifecycleState.FINISHED,
    ]
    with pytest.raises(RuntimeError, match="finished -> running"):
        lifecycle.start()


def test_a_stop_before_the_job_runs_or_once_it_finishes_counts_for_nothing():
    clock = Clock()
    lifecycle = JobLifecycle(clock)
    assert not lifecycle.request_stop(StopKind.CANCEL, "early")
    lifecycle.start()
    lifecycle.finishing()
    assert not lifecycle.request_stop(StopKind.DEADLINE, "late")
    assert lifecycle.stop is None and clock.getDelayedCalls() == []


def test_a_second_stop_of_the_same_kind_is_ignored_but_a_cancel_replaces_a_deadline():
    clock, lifecycle, _ = running()
    assert lifecycle.request_stop(StopKind.DEADLINE, "the deadline passed")
    assert not lifecycle.request_stop(StopKind.DEADLINE, "again")
    assert lifecycle.request_stop(StopKind.CANCEL, "operator")
    assert not lifecycle.request_stop(StopKind.DEADLINE, "the deadline cannot take it back")
    assert lifecycle.stop is not None and (lifecycle.stop.kind, lifecycle.stop.reason) == (StopKind.CANCEL, "operator")


def test_a_guarded_wait_passes_its_result_through():
    clock, lifecycle, _ = running()
    waited: defer.Deferred[str] = defer.Deferred()
    results: list = []
    lifecycle.guard(waited).addBoth(results.append)
    waited.callback("answer")
    assert results == ["answer"]


def test_a_stop_ends_a_guarded_wait_in_the_next_turn_whatever_the_waited_deferred_does_on_cancel():
    clock, lifecycle, _ = running()
    # a connection attempt that, asked to stop, completes anyway (its result must not be lost)
    attempt: defer.Deferred[str] = defer.Deferred(lambda d: d.callback("late connection"))
    late: list = []
    results: list = []
    lifecycle.guard(attempt, on_late=late.append).addBoth(results.append)
    lifecycle.request_stop(StopKind.DEADLINE, "the deadline passed")
    assert results == []  # not from inside the caller of request_stop
    clock.advance(0)
    (failure,) = results
    assert failure.check(JobStopped) and failure.value.stop.kind is StopKind.DEADLINE
    assert late == ["late connection"]  # handed over, so the job can close it


def test_a_stop_ends_a_wait_whose_deferred_never_fires():
    clock, lifecycle, _ = running()
    silent: defer.Deferred[str] = defer.Deferred(lambda d: None)  # its canceller does nothing
    results: list = []
    lifecycle.guard(silent).addBoth(results.append)
    lifecycle.request_stop(StopKind.CANCEL, "operator")
    clock.advance(0)
    assert results[0].check(JobStopped)


def test_a_wait_started_while_stopping_fails_at_once_but_waits_while_finishing_work():
    clock, lifecycle, _ = running()
    lifecycle.request_stop(StopKind.CANCEL, "operator")
    waited: defer.Deferred[str] = defer.Deferred()
    results: list = []
    lifecycle.guard(waited).addBoth(results.append)
    assert results[0].check(JobStopped)
    lifecycle.finishing()
    cleanup: defer.Deferred[str] = defer.Deferred()
    lifecycle.guard(cleanup).addBoth(results.append)
    cleanup.callback("closed")
    assert results[-1] == "closed"
    assert clock.getDelayedCalls() == []  # finishing cancelled the pending release


def test_cancelling_a_guarded_wait_cancels_what_it_waits_on():
    clock, lifecycle, _ = running()
    waited: defer.Deferred[str] = defer.Deferred()
    guarded = lifecycle.guard(waited)
    guarded.addErrback(lambda f: None)
    guarded.cancel()
    assert waited.called
