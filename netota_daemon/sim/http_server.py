"""HTTP on TCP 8080: the main firmware's description document and the loader's raw fixed answer.

Main firmware (research §3): GET of exactly ``/mnt/spiflash/res/dev_desc.txt`` gets 200 with the
document (``Content-Type: text/plain; charset=UTF-8``, headers with spaces) and the connection is
closed; any other path gets the raw text ``Error unexpected end of transmission`` (no status line);
POST gets 501 and other methods 400. Range requests are not supported (the whole document is sent).

Loader (research §2b): every received chunk is answered with the same fixed response, headers
without spaces, the 454-byte document (``ota_step`` "1", version "1.0.1"); the loader never closes.
Every chunk also counts as "an HTTP request reached 8080", which the loader's 3335 waits for:
:attr:`LoaderHttpServer.requests`, kept by the server of that boot.

A double-backup build's document says ``ota_type`` "0"; with ``ota_type_in_description`` off it has
neither ``ota_type`` nor ``ota_step`` (an SDK whose ``dev_desc.h`` leaves the OTA fields out; an app
reads a missing ``ota_type`` as double backup).
"""

from __future__ import annotations

from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netota_daemon.sim.connections import connection
from netota_daemon.sim.host import EventHost, HttpHost
from netota_daemon.wire.description import DESCRIPTION_PATH, LOADER_DOCUMENT, main_firmware_document

log = Logger()

NOT_FOUND_BODY = b"Error unexpected end of transmission"
LOADER_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type:text\r\nContent-Length:%d\r\nAccept-Ranges:bytes\r\nConnection:close\r\n\r\n"
    % len(LOADER_DOCUMENT)
) + LOADER_DOCUMENT
MAX_REQUEST_HEAD = 8192
#: What a document without the OTA fields lacks (both are written by the same dev_desc.h lines).
_OTA_FIELDS = b'"ota_type": "0","ota_step": "0",'


def main_response(method: str, path: str, document: bytes) -> tuple[int | None, bytes]:
    """The main firmware's answer to one request: (status or None for the raw error text, bytes)."""
    if method == "POST":
        return 501, b"HTTP/1.1 501 Not Implemented\r\nConnection: close\r\n\r\n"
    if method != "GET":
        return 400, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"
    if path != DESCRIPTION_PATH:
        return None, NOT_FOUND_BODY
    head = (
        "HTTP/1.1 200 OK\r\n"
        "Content-Type: text/plain; charset=UTF-8\r\n"
        f"Content-Length: {len(document)}\r\n"
        "Accept-Ranges: bytes\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return 200, head + document


def description_document(host: HttpHost) -> bytes:
    """The main firmware's document for this device as it runs now."""
    config = host.config
    document = main_firmware_document(host.firmware_version, single_backup=not config.double_backup, uuid=config.uuid)
    if not config.ota_type_in_description:
        if _OTA_FIELDS not in document:
            raise RuntimeError("the description document's OTA fields are not where the simulator expects them")
        document = document.replace(_OTA_FIELDS, b"")
    return document


class MainHttpServer(Factory):
    """The main firmware's HTTP server for one boot."""

    def __init__(self, host: HttpHost) -> None:
        self.host = host

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return MainHttpProtocol(self.host)


class MainHttpProtocol(Protocol):
    def __init__(self, host: HttpHost) -> None:
        self.host = host
        self.buffer = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if self.answered:
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_REQUEST_HEAD:
                self._answer("?", "?", 400, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        line = self.buffer.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        method, path = (parts[0], parts[1]) if len(parts) >= 2 else (line, "")
        status, response = main_response(method, path, description_document(self.host))
        self._answer(method, path, status, response)

    def _answer(self, method: str, path: str, status: int | None, response: bytes) -> None:
        self.answered = True
        self.host.record("http_request", method=method, path=path, status=status)
        transport = connection(self.transport)
        transport.write(response)
        transport.loseConnection()


class LoaderHttpServer(Factory):
    """The loader's HTTP stub for one boot; ``requests`` counts the chunks it answered."""

    def __init__(self, host: EventHost) -> None:
        self.host = host
        self.requests = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return LoaderHttpProtocol(self)


class LoaderHttpProtocol(Protocol):
    def __init__(self, server: LoaderHttpServer) -> None:
        self.server = server

    def dataReceived(self, data: bytes) -> None:
        self.server.requests += 1
        first_line = data.split(b"\r\n", 1)[0][:200].decode("latin-1")
        self.server.host.record("http_request", request=first_line, status=200)
        connection(self.transport).write(LOADER_RESPONSE)


def http_server(host: HttpHost, loader: bool) -> MainHttpServer | LoaderHttpServer:
    """The HTTP server of one boot: the loader's stub or the main firmware's."""
    return LoaderHttpServer(host) if loader else MainHttpServer(host)
