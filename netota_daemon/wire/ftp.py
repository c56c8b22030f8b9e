"""FTP control-connection bytes <-> values, for the double-backup upload (TCP 21): reply parsing
(multi-line replies included), command encoding, the 227 PASV reply, and telling the device's two
FTP servers apart by their greeting.

The device's server is lwIP's small ftpd (or, in some builds, the closed "Stupid-FTPd"); see
``docs/protocol.md`` ("Double backup: the FTP upload"). Replies follow RFC 959 section 4.2:

- a one-line reply is ``ddd text`` (the text may be empty, and some servers send ``ddd`` alone);
- a multi-line reply starts with ``ddd-text`` and ends with the first line that starts with the same
  code followed by a space (or by nothing); the lines between are free text.

Everything a peer can make grow is bounded: a line longer than :data:`MAX_LINE_LENGTH` or a reply of
more than :data:`MAX_REPLY_LINES` lines is a protocol error, as is a line that is not a reply.
Lines end in CRLF; a bare LF is accepted too. Text is decoded as UTF-8 (RFC 2640) with
replacement, so decoding never fails.

No I/O and no Twisted here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: A reply line longer than this (without its line end) is refused. lwIP's ftpd formats every reply
#: in a 1024-byte buffer.
MAX_LINE_LENGTH = 1024
#: A multi-line reply with more lines than this is refused.
MAX_REPLY_LINES = 64
#: The device routes a STOR to its dual-bank writer only if the name contains this
#: (``strstr``, case-sensitive); any other name goes to its SD card.
OTA_NAME_MARKER = "update-ota.ufw"

#: Which FTP server a greeting comes from.
ServerKind = Literal["lwip", "stupid-ftpd", "unknown"]

_VERB = re.compile(r"[A-Z]{3,4}")
_CODE = re.compile(rb"([1-5]\d\d)([ -]?)")
_PASV_NUMBERS = re.compile(r"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")


class FtpProtocolError(ValueError):
    """The server sent bytes that are not a valid FTP reply (or a 227 without an address)."""


@dataclass(frozen=True)
class FtpReply:
    """One complete reply: its code and its lines as received (code included, line ends removed)."""

    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        """The reply's lines, joined with newlines."""
        return "\n".join(self.lines)

    @property
    def summary(self) -> str:
        """The reply on one line (a multi-line reply's lines joined with `` | ``), for messages."""
        return " | ".join(self.lines)

    @property
    def is_preliminary(self) -> bool:
        """1xx: the command was accepted and another reply will follow (150 before a transfer)."""
        return 100 <= self.code < 200

    @property
    def is_final(self) -> bool:
        """Every reply but a 1xx ends its command."""
        return not self.is_preliminary

    @property
    def is_completion(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        """3xx: the server needs another command (331: the password)."""
        return 300 <= self.code < 400

    @property
    def is_negative(self) -> bool:
        """4xx (transient) or 5xx (permanent): the command failed."""
        return self.code >= 400


class FtpReplyParser:
    """Incremental reply parser: feed it the bytes as they arrive, get complete replies back.

    The result does not depend on how the bytes were split. After a :class:`FtpProtocolError` the
    parser stays broken (every later :meth:`feed` raises the same error): the connection is unusable.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._lines: list[str] = []
        self._code: int | None = None  # the code of the multi-line reply being read
        self._error: FtpProtocolError | None = None

    def feed(self, data: bytes) -> list[FtpReply]:
        """The replies completed by ``data`` (possibly none); raises :class:`FtpProtocolError`."""
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except FtpProtocolError as e:
            self._error = e
            raise

    def _feed(self, data: bytes) -> list[FtpReply]:
        replies: list[FtpReply] = []
        buffer = self._buffer + data
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = buffer[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            start = end + 1
            if len(line) > MAX_LINE_LENGTH:
                raise FtpProtocolError(f"a reply line is over {MAX_LINE_LENGTH} bytes")
            reply = self._line(line)
            if reply is not None:
                replies.append(reply)
        self._buffer = buffer[start:]
        if len(self._buffer) > MAX_LINE_LENGTH + 1:  # + 1: a CR waiting for its LF
            raise FtpProtocolError(f"a reply line is over {MAX_LINE_LENGTH} bytes")
        return replies

    def _line(self, line: bytes) -> FtpReply | None:
        text = line.decode("utf-8", errors="replace")
        if self._code is not None:  # inside a multi-line reply: free text until the closing line
            self._lines.append(text)
            if len(self._lines) > MAX_REPLY_LINES:
                raise FtpProtocolError(f"a multi-line reply ({self._code}) is over {MAX_REPLY_LINES} lines")
            if _closes(line, self._code):
                reply = FtpReply(self._code, tuple(self._lines))
                self._code, self._lines = None, []
                return reply
            return None
        match = _CODE.match(line)
        if match is None or (len(line) > 3 and not match.group(2)):
            raise FtpProtocolError(f"not an FTP reply: {_shown(text)}")
        code = int(match.group(1))
        if match.group(2) == b"-":
            self._code, self._lines = code, [text]
            return None
        return FtpReply(code, (text,))


def _closes(line: bytes, code: int) -> bool:
    """Whether ``line`` ends the multi-line reply with ``code``: the code, then a space or nothing."""
    prefix = b"%d" % code
    return line == prefix or line.startswith(prefix + b" ")


def _shown(text: str, limit: int = 80) -> str:
    """``text`` quoted for an error message, shortened to ``limit`` characters."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


def encode_command(verb: str, argument: str | None = None) -> bytes:
    """One command line, ``VERB[ argument]\\r\\n``: what the device must receive as one TCP segment.

    ``verb`` is 3 or 4 upper-case letters; ``argument`` is printable ASCII (no CR, LF or NUL, which
    would end or split the command). Anything else raises ``ValueError`` before a byte is sent.
    """
    if not _VERB.fullmatch(verb):
        raise ValueError(f"not an FTP command verb: {verb!r}")
    if argument is None:
        return verb.encode("ascii") + b"\r\n"
    check_argument(argument, f"the argument of {verb}")
    return f"{verb} {argument}\r\n".encode("ascii")


def check_argument(value: str, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` can be sent as a command argument: non-empty, printable
    ASCII, no CR, LF or NUL."""
    if not value:
        raise ValueError(f"{what} is empty")
    if not value.isascii() or not value.isprintable():
        raise ValueError(f"{what} must be printable ASCII without CR, LF or NUL: {value!r}")


@dataclass(frozen=True)
class PassiveAddress:
    """The address in a 227 reply. The device puts its own (control-connection) IP here; netota uses
    only the port and connects to the host it already talks to (``docs/protocol.md``)."""

    host: str
    port: int


def parse_pasv_reply(reply: FtpReply) -> PassiveAddress:
    """The address of a ``227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).`` reply.

    As RFC 1123 (4.1.2.6) advises, the six numbers are looked for anywhere in the text (servers
    differ in the parentheses and words around them). Raises :class:`FtpProtocolError` for another
    code, a text without six numbers, a number over 255, or port 0.
    """
    if reply.code != 227:
        raise FtpProtocolError(f"expected a 227 reply to PASV, got {_shown(reply.summary)}")
    match = _PASV_NUMBERS.search(reply.text)
    if match is None:
        raise FtpProtocolError(f"no address in the PASV reply {_shown(reply.summary)}")
    numbers = [int(n) for n in match.groups()]
    if any(n > 255 for n in numbers):
        raise FtpProtocolError(f"a number over 255 in the PASV reply {_shown(reply.summary)}")
    port = numbers[4] * 256 + numbers[5]
    if port == 0:
        raise FtpProtocolError(f"port 0 in the PASV reply {_shown(reply.summary)}")
    return PassiveAddress(".".join(str(n) for n in numbers[:4]), port)


def identify_server(greeting: FtpReply) -> ServerKind:
    """Which of the device's FTP servers sent this greeting: lwIP's ftpd
    (``220 lwIP FTP Server ready.``), Stupid-FTPd (``220 Welcome to Stupid-FTPd server.``), or
    neither."""
    text = greeting.text
    if "lwIP FTP Server" in text:
        return "lwip"
    if "Stupid-FTPd" in text:
        return "stupid-ftpd"
    return "unknown"
