"""The description document over real loopback HTTP: the loader's raw answer (``Content-Type:text``,
no spaces, the socket never closed by the server) and the main firmware's ordinary one."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, capturedLogs

from netota_daemon.protocols.description_fetch import DescriptionFetchError, fetch_description
from netota_daemon.protocols.endpoints import DeviceConnector
from netota_daemon.wire.description import DESCRIPTION_PATH, LOADER_DOCUMENT, main_firmware_document

LOADER_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type:text\r\nContent-Length:454\r\nAccept-Ranges:bytes\r\nConnection:close\r\n\r\n"
    + LOADER_DOCUMENT
)


class RawServer(Protocol):
    """Answers every received chunk with ``factory.answer`` and never closes (as the loader does)."""

    def connectionMade(self):
        self.factory.connections += 1
        self.request = b""
        if self.factory.reset_on_connect:
            self.transport.abortConnection()

    def dataReceived(self, data):
        self.request += data
        self.factory.requests.append(data)
        if self.factory.answer is not None:
            self.transport.write(self.factory.answer)
            if self.factory.close_after:
                self.transport.loseConnection()

    def connectionLost(self, reason):
        self.factory.closed.append(True)
        if self.factory.all_closed is not None and len(self.factory.closed) == self.factory.connections:
            d, self.factory.all_closed = self.factory.all_closed, None
            d.callback(None)


@pytest.fixture
def raw_server(reactor):
    factory = Factory.forProtocol(RawServer)
    factory.answer = LOADER_ANSWER
    factory.close_after = False
    factory.reset_on_connect = False
    factory.requests = []
    factory.connections = 0
    factory.closed = []
    factory.all_closed = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port_number = port.getHost().port
    yield factory
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_loader_answer_without_spaces_is_accepted(reactor, raw_server):
    connector = DeviceConnector(reactor, "127.0.0.1")
    description = await fetch_description(connector, raw_server.port_number, 5.0)
    assert description.in_loader
    assert description.firmware_version == "1.0.1"
    assert raw_server.requests[0].startswith(b"GET " + DESCRIPTION_PATH.encode() + b" HTTP/1.1\r\n")
    # the loader never closes: the client does, so nothing is left open
    await raw_server.all_closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_main_firmware_document(reactor, raw_server):
    body = main_firmware_document("2.3.4")
    raw_server.answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\nContent-Length: %d\r\n"
        b"Accept-Ranges: bytes\r\nConnection: close\r\n\r\n" % len(body)
    ) + body
    raw_server.close_after = True
    description = await fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 5.0)
    assert (description.ota_type, description.ota_step, description.firmware_version) == ("1", "0", "2.3.4")


@pytest_twisted.ensureDeferred
async def test_not_json_is_a_clear_error(reactor, raw_server):
    raw_server.answer = b"HTTP/1.1 200 OK\r\nContent-Length:5\r\n\r\nhello"
    with pytest.raises(DescriptionFetchError, match="not valid JSON"):
        await fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 5.0)


@pytest_twisted.ensureDeferred
async def test_http_error_status(reactor, raw_server):
    raw_server.answer = b"HTTP/1.1 404 Not Found\r\nContent-Length:0\r\n\r\n"
    with pytest.raises(DescriptionFetchError, match="404"):
        await fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 5.0)


@pytest_twisted.ensureDeferred
async def test_silent_server_times_out_and_the_connection_is_closed(reactor, raw_server):
    raw_server.answer = None
    with pytest.raises(defer.TimeoutError):
        await fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 0.3)
    await raw_server.all_closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_reset_connection_fails_at_once_not_at_the_timeout(reactor, raw_server):
    # a device that reboots under the request: the fetch fails with the connection, right away
    from twisted.web._newclient import ResponseFailed

    raw_server.reset_on_connect = True
    d = defer.ensureDeferred(fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 60.0))
    d.addTimeout(10, reactor)  # the test's own bound: far below the fetch's 60 s
    with pytest.raises(ResponseFailed):
        await d


@pytest_twisted.ensureDeferred
async def test_endless_body_is_refused_once_it_passes_the_bound(reactor, raw_server):
    # a device announcing 1 GB and sending garbage: refused as it arrives, not buffered until the timeout
    raw_server.answer = b"HTTP/1.1 200 OK\r\nContent-Length:1000000000\r\n\r\n" + b"x" * 200_000
    d = defer.ensureDeferred(fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 60.0))
    d.addTimeout(10, reactor)  # the test's own bound: far below the fetch's 60 s
    with pytest.raises(DescriptionFetchError, match="over 65536 bytes"):
        await d
    await raw_server.all_closed.addTimeout(10, reactor)


@pytest_twisted.ensureDeferred
async def test_http_error_status_with_a_body_leaves_nothing_open(reactor, raw_server):
    raw_server.answer = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length:1000\r\n\r\n" + b"e" * 10
    with pytest.raises(DescriptionFetchError, match="500"):
        await fetch_description(DeviceConnector(reactor, "127.0.0.1"), raw_server.port_number, 5.0)
    await raw_server.all_closed.addTimeout(10, reactor)


class EndlessBody(Protocol):
    """Answers with a body delimited by the connection's end, and never ends it."""

    def dataReceived(self, data):
        self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        self.writer = task.LoopingCall(lambda: self.transport.write(b"x" * 8192))
        self.writer.clock = self.factory.reactor
        self.writer.start(0.01)

    def connectionLost(self, reason):
        if getattr(self, "writer", None) is not None and self.writer.running:
            self.writer.stop()
        self.factory.lost.callback(None)


@pytest_twisted.ensureDeferred
async def test_an_endless_body_is_refused_without_twisteds_critical_errors(reactor):
    factory = Factory.forProtocol(EndlessBody)
    factory.reactor = reactor
    factory.lost = defer.Deferred()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        with capturedLogs() as events:
            d = defer.ensureDeferred(
                fetch_description(DeviceConnector(reactor, "127.0.0.1"), port.getHost().port, 60.0)
            )
            with pytest.raises(DescriptionFetchError, match="over 65536 bytes"):
                await d.addTimeout(30, reactor)  # the test's own bound: the fetch ends at the 64 KiB bound
            await factory.lost.addTimeout(30, reactor)  # and its connection is gone
        noisy = [e for e in events if e.get("log_level") in (LogLevel.critical, LogLevel.error)]
        assert noisy == []
    finally:
        await port.stopListening()
