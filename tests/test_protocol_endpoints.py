"""Endpoints: interface and source binding, and the messages of connection errors."""

from __future__ import annotations

import errno
import os
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol

from netota_daemon.protocols.endpoints import DeviceConnector, EndpointError, check_interface


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
