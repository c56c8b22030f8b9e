"""Endpoints (interface and source binding) and the retry-until-deadline arithmetic."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock

from netota_daemon.protocols.endpoints import (
    DeviceConnector,
    EndpointError,
    RetriesExhausted,
    check_interface,
    retry_until_deadline,
)


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


def test_unknown_interface_is_a_clear_error(reactor):
    with pytest.raises(EndpointError, match="does not exist"):
        check_interface("netota-nope0")
    connector = DeviceConnector(reactor, "127.0.0.1", interface="netota-nope0")
    with pytest.raises(EndpointError, match="netota-nope0"):
        connector.endpoint(3333, 1.0)


def _can_bind_to_lo() -> bool:
    try:
        check_interface("lo")
        return True
    except EndpointError:
        return False


class _Recorder(Protocol):
    def connectionMade(self):
        self.factory.peer.callback(self.transport.getPeer())
        self.transport.loseConnection()


@pytest.mark.skipif(not _can_bind_to_lo(), reason="needs CAP_NET_RAW to bind to an interface")
@pytest_twisted.ensureDeferred
async def test_connection_leaves_on_the_interface_from_the_source_address(reactor):
    factory = Factory.forProtocol(_Recorder)
    factory.peer = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        connector = DeviceConnector(reactor, "127.0.0.1", interface="lo", source_address="127.0.0.2")
        client = await connector.endpoint(port.getHost().port, 5).connect(Factory.forProtocol(Protocol))
        sock = client.transport.getHandle()
        bound = sock.getsockopt(socket.SOL_SOCKET, 25, 16).rstrip(b"\0")
        assert bound == b"lo"
        client.transport.loseConnection()
        peer = await factory.peer.addTimeout(10, reactor)
        assert peer.host == "127.0.0.2"
    finally:
        await port.stopListening()


class _RefusingSocket:
    def __init__(self, code: int) -> None:
        self.code = code

    def setsockopt(self, *args):
        raise OSError(self.code, os.strerror(self.code))


@pytest.mark.parametrize(
    "code,words", [(errno.EPERM, "CAP_NET_RAW"), (errno.ENODEV, "does not exist"), (errno.EINVAL, "EINVAL")]
)
def test_bind_errors_are_explained(code, words):
    from netota_daemon.protocols.endpoints import bind_to_device

    with pytest.raises(EndpointError, match=words):
        bind_to_device(_RefusingSocket(code), "wlan7")


@pytest.mark.parametrize(
    "flags,operstate,words",
    [
        (0x1002, "down", "is down"),  # administratively down
        (0x1003, "down", "has no link"),
        (0x1003, "lowerlayerdown", "has no link"),
        (0x1003, "dormant", "not associated"),
    ],
)
def test_interface_state_problems_are_explained(flags, operstate, words):
    from netota_daemon.protocols.endpoints import interface_state_problem

    problem = interface_state_problem("wlan3", flags, operstate)
    assert problem is not None and words in problem and "wlan3" in problem


@pytest.mark.parametrize("flags,operstate", [(0x1003, "up"), (0x9, "unknown"), (None, None)])
def test_usable_interface_states(flags, operstate):
    from netota_daemon.protocols.endpoints import interface_state_problem

    assert interface_state_problem("wlan3", flags, operstate) is None


def _netns_unavailable() -> str | None:
    from netota_daemon.sim.rack import namespaces_available

    return namespaces_available()


@pytest.mark.skipif(_netns_unavailable() is not None, reason="needs network namespaces (root, iproute2)")
def test_job_check_fails_fast_on_a_real_interface_that_is_down(tmp_path):
    """In a namespace this test makes and removes: a veth whose peer is down has no link."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    ns = f"nrkep{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip = ["ip", "-n", ns]
        subprocess.run([*ip, "link", "add", "rackside", "type", "veth", "peer", "name", "deviceside"], check=True)
        subprocess.run([*ip, "link", "set", "rackside", "up"], check=True)
        script = (
            "from netota_daemon.protocols.endpoints import check_interface, EndpointError\n"
            "try:\n    check_interface('rackside')\nexcept EndpointError as e:\n    print(e)\n"
            "else:\n    print('usable')\n"
        )
        run = lambda: subprocess.run(  # noqa: E731
            ["ip", "netns", "exec", ns, sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=subprocess_env(),
            timeout=60,
        ).stdout.strip()
        assert "has no link" in run()  # the device side (its WiFi) is down
        subprocess.run([*ip, "link", "set", "deviceside", "up"], check=True)
        # The carrier reaches the other end of the veth asynchronously: wait for it, bounded (each
        # look is one `ip` process).
        deadline = time.monotonic() + 10
        while (
            "state UP"
            not in subprocess.run([*ip, "-o", "link", "show", "rackside"], capture_output=True, text=True).stdout
        ):
            assert time.monotonic() < deadline, "the veth never came up"
        assert run() == "usable"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_http_failures_get_plain_messages():
    from twisted.python.failure import Failure
    from twisted.web.client import ResponseFailed, ResponseNeverReceived

    from netota_daemon.protocols.endpoints import connection_error_message

    cut = ResponseFailed([Failure(error.ConnectionDone())])
    assert (
        connection_error_message(cut) == "the HTTP answer was cut off or is not HTTP (the device closed the connection)"
    )
    never = ResponseNeverReceived([Failure(error.ConnectionLost())])
    assert connection_error_message(never) == "no HTTP answer (connection lost)"
