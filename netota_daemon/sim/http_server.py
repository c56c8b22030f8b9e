"""HTTP on TCP 8080: the main firmware's description document and the loader's raw fixed answer.

Main firmware (research §3): GET of exactly ``/mnt/spiflash/res/dev_desc.txt`` gets 200 with the
document (``Content-Type: text/plain; charset=UTF-8``, headers with spaces) and the connection is
closed; any other path gets the raw text ``Error unexpected end of transmission`` (no status line);
POST gets 501 and other methods 400. Range requests are not supported (the whole document is sent).

Loader (research §2b): every received chunk is answered with the same fixed response, headers
without spaces, the 454-byte document (``ota_step`` "1", version "1.0.1"); the loader never closes.
Every chunk also counts as "an HTTP request reached 8080", which the loader's 3335 waits for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netota_daemon.wire.description import DESCRIPTION_PATH, LOADER_DOCUMENT, main_firmware_document

if TYPE_CHECKING:
    from netota_daemon.sim.device import SimulatedDevice

log = Logger()

NOT_FOUND_BODY = b"Error unexpected end of transmission"
LOADER_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type:text\r\nContent-Length:%d\r\nAccept-Ranges:bytes\r\nConnection:close\r\n\r\n"
    % len(LOADER_DOCUMENT)
) + LOADER_DOCUMENT
MAX_REQUEST_HEAD = 8192


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


class MainHttpProtocol(Protocol):
    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
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
        document = main_firmware_document(
            self.device.firmware_version,
            single_backup=not self.device.config.double_backup,
            uuid=self.device.config.uuid,
        )
        status, response = main_response(method, path, document)
        self._answer(method, path, status, response)

    def _answer(self, method: str, path: str, status: int | None, response: bytes) -> None:
        self.answered = True
        self.device.record("http_request", method=method, path=path, status=status)
        self.transport.write(response)
        self.transport.loseConnection()


class LoaderHttpProtocol(Protocol):
    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device

    def dataReceived(self, data: bytes) -> None:
        self.device.loader_http_requests += 1
        first_line = data.split(b"\r\n", 1)[0][:200].decode("latin-1")
        self.device.record("http_request", request=first_line, status=200)
        self.transport.write(LOADER_RESPONSE)


class HttpFactory(Factory):
    def __init__(self, device: SimulatedDevice, loader: bool) -> None:
        self.device = device
        self.loader = loader

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = LoaderHttpProtocol(self.device) if self.loader else MainHttpProtocol(self.device)
        return self.device.track(protocol)
