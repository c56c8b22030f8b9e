"""Fetching the device description document (``dev_desc.txt``, HTTP 8080) with treq.

The phase-2 loader answers with non-standard headers (``Content-Type:text``, no spaces) and never
closes its socket. Twisted's HTTP/1.1 client splits each header line at the first colon and strips
the value, and reads exactly ``Content-Length`` bytes, so the loader's answer parses as it is (this
is tested against a raw server that answers byte for byte like the loader). The request goes through
:class:`~netota_daemon.protocols.endpoints.DeviceConnector`, so it leaves on the device's interface,
and the connection pool is not persistent: nothing stays open after a fetch.
"""

from __future__ import annotations

from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from netota_daemon.protocols.endpoints import DeviceConnector, bounded
from netota_daemon.wire.description import DESCRIPTION_PATH, DescriptionError, DeviceDescription, parse_description

#: The document is small (454 bytes from the loader, about 600 from the main firmware).
MAX_DOCUMENT_SIZE = 64 * 1024


class DescriptionFetchError(Exception):
    """The device answered, but not with a usable description document."""


class _TrackingEndpoint:
    """Connects through the device's endpoint and remembers each connection's protocol, so that a
    fetch can wait until its connection is really closed. Its factory is made quiet: no "Starting
    factory" / "Stopping factory" lines while a reboot wait polls the device every second."""

    def __init__(self, endpoint: Any, protocols: list[Any]) -> None:
        self._endpoint = endpoint
        self._protocols = protocols

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        factory.noisy = False
        d: defer.Deferred[Any] = self._endpoint.connect(factory)

        def remember(protocol: Any) -> Any:
            self._protocols.append(protocol)
            return protocol

        return d.addCallback(remember)


@implementer(IAgentEndpointFactory)
class _DeviceEndpointFactory:
    def __init__(self, connector: DeviceConnector, port: int, timeout: float) -> None:
        self._connector = connector
        self._port = port
        self._timeout = timeout
        self.protocols: list[Any] = []

    def endpointForURI(self, uri: Any) -> Any:
        return _TrackingEndpoint(self._connector.endpoint(self._port, self._timeout), self.protocols)


def description_url(host: str, port: int) -> str:
    return f"http://{host}:{port}{DESCRIPTION_PATH}"


async def fetch_description(
    connector: DeviceConnector, port: int, timeout: float, clock: IReactorTime | None = None
) -> DeviceDescription:
    """GET the description document within ``timeout`` seconds (connect, headers and body).

    Raises :class:`DescriptionFetchError` for a non-200 answer, an oversized or unparsable body;
    connection errors and ``defer.TimeoutError`` pass through (the caller decides on retries).
    """
    clock = clock or connector.reactor
    return await bounded(
        clock, defer.ensureDeferred(_fetch(connector, port, timeout)), timeout, "the description document"
    )


async def _fetch(connector: DeviceConnector, port: int, timeout: float) -> DeviceDescription:
    pool = HTTPConnectionPool(connector.reactor, persistent=False)  # type: ignore[no-untyped-call]
    endpoints = _DeviceEndpointFactory(connector, port, timeout)
    agent = Agent.usingEndpointFactory(connector.reactor, endpoints, pool=pool)  # type: ignore[no-untyped-call]
    client = HTTPClient(agent)
    url = description_url(connector.host, port)
    try:
        response = await client.get(url, headers=Headers({b"Connection": [b"close"]}))
        if response.code != 200:
            raise DescriptionFetchError(f"GET {url} answered HTTP {response.code}")
        body = await _bounded_body(response)
    finally:
        await _close_connections(connector.reactor, endpoints.protocols)
    try:
        return parse_description(body)
    except DescriptionError as e:
        raise DescriptionFetchError(str(e)) from None


async def _bounded_body(response: Any) -> bytes:
    """The response body, refused as soon as it grows past :data:`MAX_DOCUMENT_SIZE` (a device
    sending garbage without end must not fill the daemon's memory for the whole fetch timeout)."""
    chunks: list[bytes] = []
    received = 0

    def collect(data: bytes) -> None:
        nonlocal received
        received += len(data)
        if received > MAX_DOCUMENT_SIZE:
            raise DescriptionFetchError(f"the description document is over {MAX_DOCUMENT_SIZE} bytes; refusing it")
        chunks.append(data)

    await treq.collect(response, collect)
    return b"".join(chunks)


async def _close_connections(reactor: IReactorTime, protocols: list[Any]) -> None:
    """Close the fetch's connections and wait until they are closed (the loader never closes its
    side), so that a finished fetch leaves no connection behind.

    One reactor turn first: the fetch's Deferreds fire from inside the HTTP protocol's own
    callbacks, before it has updated its state. Then each connection still open is aborted at the
    transport, not with the HTTP protocol's ``abort()``: that one closes gracefully in a state where
    a body delimited by the connection's end (a device sending without end) makes Twisted's client
    log a critical error when the connection finally goes. The transport's abort takes effect one
    reactor turn later.
    """
    await deferLater(reactor, 0, lambda: None)
    aborted = False
    for protocol in protocols:
        transport = getattr(protocol, "transport", None)
        if transport is not None and not transport.disconnected:
            transport.abortConnection()
            aborted = True
    if aborted:
        await deferLater(reactor, 0, lambda: None)
