"""``UpgradeJob`` on a MemoryReactorClock: the deadline, the connection window and cancellation,
with time driven by the test (no sockets, no real waiting)."""

from __future__ import annotations

import pytest
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from netota_daemon.engine.events import Finished, PhaseChanged
from netota_daemon.engine.job import UpgradeJob
from netota_daemon.engine.outcome import ADVICE_NOTHING_SENT, FailureClass, OutcomeKind, Phase
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage

pytestmark = pytest.mark.usefixtures("no_sockets_or_processes")  # the MemoryReactorClock is the only network

TARGET = DeviceTarget(name="dev-1", host="127.0.0.1", ctp_port=13333, http_port=18080, ota_port=13335)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "update.ufw"
    path.write_bytes(b"\x5a" * 1000)
    return FirmwareImage(path)


def start(image, **timeouts):
    reactor = MemoryReactorClock()
    job = UpgradeJob(reactor, TARGET, image, UpgradeTimeouts(**timeouts), "job-7")
    events = []
    job.events.subscribe(events.append)
    results = []
    job.run().addBoth(results.append)
    return reactor, job, events, results


def refuse_pending(reactor: MemoryReactorClock, handled: set) -> int:
    """Refuse every connection attempt not refused yet; returns how many were refused."""
    count = 0
    for index, (_host, _port, factory, _timeout, _bind) in enumerate(reactor.tcpClients):
        if index in handled:
            continue
        handled.add(index)
        connector = reactor.connectors[index]
        factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        count += 1
    return count


def test_refused_connections_are_retried_within_the_window_then_fail(image):
    reactor, job, events, results = start(image, connect_window=10.0, http=2.0, poll_interval=1.0)
    handled: set = set()
    assert reactor.tcpClients[0][:2] == ("127.0.0.1", 18080)  # the description document first
    attempts = 0
    for _ in range(200):
        attempts += refuse_pending(reactor, handled)
        if results:
            break
        reactor.advance(0.1)
    (outcome,) = results
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.failure is FailureClass.CONNECTION
    assert outcome.phase is Phase.DETECT
    assert outcome.advice == ADVICE_NOTHING_SENT
    assert "refused" in outcome.message
    # backoff 0.2, 0.3, 0.45, ... capped at poll_interval 1 s: about a dozen attempts in 10 s
    assert 8 <= attempts <= 14
    assert reactor.seconds() == pytest.approx(10.0, abs=1.1)
    assert reactor.getDelayedCalls() == []
    assert isinstance(events[-1], Finished)


def test_overall_deadline_cancels_the_running_step(image):
    reactor, job, events, results = start(image, deadline=30.0, connect_window=1000.0, http=1000.0)
    reactor.advance(29.9)
    assert results == [] and job.phase is Phase.DETECT
    reactor.advance(0.2)
    (outcome,) = results
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.failure is FailureClass.TIMEOUT
    assert "deadline of 30 s" in outcome.message
    assert reactor.getDelayedCalls() == []
    # the pending connection attempt was stopped, not left behind
    assert reactor.connectors[0].stoppedConnecting


def test_cancel_aborts_with_advice_and_is_idempotent(image):
    reactor, job, events, results = start(image, connect_window=1000.0, http=1000.0)
    reactor.advance(5)
    job.cancel("operator said so")
    job.cancel("twice")
    assert results == []  # the cancel happens from the reactor, not inside the caller
    reactor.advance(0)
    (outcome,) = results
    assert outcome.kind is OutcomeKind.ABORTED
    assert outcome.phase is Phase.DETECT
    assert "operator said so" in outcome.message
    assert outcome.advice == ADVICE_NOTHING_SENT
    assert reactor.getDelayedCalls() == []
    job.cancel("after the end")  # a no-op
    assert reactor.getDelayedCalls() == []
    assert job.run().result is outcome  # run() again just reports the outcome


def test_cancel_from_an_event_subscriber_while_starting(image):
    reactor = MemoryReactorClock()
    job = UpgradeJob(reactor, TARGET, image, UpgradeTimeouts(), "job-8")
    job.events.subscribe(lambda e: job.cancel("at once") if isinstance(e, PhaseChanged) else None)
    results = []
    job.run().addBoth(results.append)
    reactor.advance(0)
    assert results[0].kind is OutcomeKind.ABORTED
    assert reactor.getDelayedCalls() == []


def test_unknown_interface_fails_without_any_connection(image):
    reactor = MemoryReactorClock()
    target = DeviceTarget(name="dev-2", host="127.0.0.1", interface="netota-nope0")
    results = []
    UpgradeJob(reactor, target, image, UpgradeTimeouts(), "job-9").run().addBoth(results.append)
    (outcome,) = results
    assert outcome.kind is OutcomeKind.FAILED
    assert outcome.failure is FailureClass.CONNECTION
    assert "netota-nope0" in outcome.message
    assert reactor.tcpClients == []
    assert reactor.getDelayedCalls() == []


def test_cancelling_the_run_deferred_aborts_the_job(image):
    from twisted.internet.defer import CancelledError

    reactor = MemoryReactorClock()
    job = UpgradeJob(reactor, TARGET, image, UpgradeTimeouts(), "job-10")
    caller, other = [], []
    d = job.run()
    d.addBoth(caller.append)
    job.run().addBoth(other.append)
    d.cancel()
    reactor.advance(0)
    assert isinstance(caller[0].value, CancelledError)
    assert other[0].kind is OutcomeKind.ABORTED  # everyone else still gets the outcome
    assert job.outcome is other[0]
    assert reactor.getDelayedCalls() == []
