"""The 20-byte ``struct net_ota`` header of the OTA stream (TCP 3335), and its checksums.

Every field is little-endian::

    off  size  field
    0    u32   sum_check         byte sum of bytes 4..19 (device -> app)
                                 byte sum of bytes 4..19 plus every payload byte (app -> device)
    4    u32   seek_addr         file offset
    8    u32   read_size         bytes
    12   u32   all_size          total upgrade bytes; non-zero in exactly one message
    16   u8    status            see :class:`Status`
    17   u8    download_percent  the device's own percent
    18   u16   resv              0

No I/O and no Twisted here: values in, bytes out, and back.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, replace

import numpy

HEADER_SIZE = 20
#: The largest request the app will serve (the vendor's ``NET_BUF_MAX_SIZE``).
MAX_READ_SIZE = 42 * 1024
#: The device's request windows (research §4.2).
PHASE1_WINDOW = 20436
PHASE2_WINDOW = 40916

_LAYOUT = struct.Struct("<IIIIBBH")
_BODY = struct.Struct("<IIIBBH")  # bytes 4..19, the summed part


class Status(enum.IntEnum):
    """The ``status`` byte."""

    DOING = 0
    OK = 1
    ERR = 2
    READ = 4
    STOP = 8
    SAME = 16


class OtaHeaderError(ValueError):
    """A header that can't be decoded (wrong length)."""


def byte_sum(data: bytes | bytearray | memoryview) -> int:
    """The unsigned sum of every byte of ``data``, mod 2**32, computed without a Python loop."""
    if len(data) <= 64:  # a header: the built-in sum beats numpy's per-call overhead
        return sum(data) & 0xFFFFFFFF
    # uint32 accumulation wraps mod 2**32, the checksum's own rule, and is about twice as fast.
    return int(numpy.frombuffer(data, dtype=numpy.uint8).sum(dtype=numpy.uint32))


def _fields_sum(seek_addr: int, read_size: int, all_size: int, status: int, percent: int, resv: int) -> int:
    return byte_sum(_BODY.pack(seek_addr, read_size, all_size, status, percent, resv))


@dataclass(frozen=True, slots=True)
class OtaHeader:
    """One decoded ``net_ota`` header.

    ``status`` is kept as a plain int so that a header with an unknown status byte can still be
    represented (and reported) rather than refused by the decoder.
    """

    seek_addr: int = 0
    read_size: int = 0
    all_size: int = 0
    status: int = Status.DOING
    percent: int = 0
    resv: int = 0
    sum_check: int | None = None  # as received; None for a header we build

    # -- decoding -------------------------------------------------------------------------------
    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> OtaHeader:
        if len(data) != HEADER_SIZE:
            raise OtaHeaderError(f"an OTA header is {HEADER_SIZE} bytes, got {len(data)}")
        sum_check, seek, size, all_size, status, percent, resv = _LAYOUT.unpack(data)
        return cls(seek, size, all_size, status, percent, resv, sum_check)

    def computed_sum(self) -> int:
        """The header checksum: the byte sum of bytes 4..19."""
        return _fields_sum(self.seek_addr, self.read_size, self.all_size, self.status, self.percent, self.resv)

    def is_valid(self) -> bool:
        """Whether a received header's checksum matches its bytes (device -> app rule)."""
        return self.sum_check == self.computed_sum()

    def status_name(self) -> str:
        try:
            return Status(self.status).name
        except ValueError:
            return f"UNKNOWN({self.status})"

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, payload_sum: int = 0) -> bytes:
        """The 20 header bytes with a freshly computed checksum.

        ``payload_sum`` is :func:`byte_sum` of the payload that follows the header (app -> device
        rule); leave it 0 for a bare header (device -> app rule, STOP, notice echo).
        """
        check = (self.computed_sum() + payload_sum) & 0xFFFFFFFF
        return _LAYOUT.pack(check, self.seek_addr, self.read_size, self.all_size, self.status, self.percent, self.resv)


STOP_HEADER = OtaHeader(status=Status.STOP)
#: The exact bytes of STOP: status 8, every other field 0, valid sum.
STOP_BYTES = STOP_HEADER.encode()


def encode_device_header(
    status: int, seek_addr: int = 0, read_size: int = 0, all_size: int = 0, percent: int = 0
) -> bytes:
    """A device -> app header with a valid checksum."""
    return OtaHeader(seek_addr, read_size, all_size, status, percent).encode()


def clamp_read(request: OtaHeader, image_size: int) -> int:
    """How many bytes the reply to ``request`` carries: ``read_size``, shortened at end of file.

    Raises ValueError when the request starts at or beyond the end of the image (nothing to send).
    """
    if request.seek_addr >= image_size:
        raise ValueError(f"read at offset {request.seek_addr} is beyond the image's {image_size} bytes")
    return min(request.read_size, image_size - request.seek_addr)


def reply_header(request: OtaHeader, sent: int, payload_sum: int) -> bytes:
    """The 20-byte header of the reply to a READ: the request echoed, ``all_size`` 0, ``read_size`` =
    bytes sent, and the checksum over header fields plus payload."""
    fields = (request.seek_addr, sent, 0, request.status, request.percent, request.resv)
    check = (byte_sum(_BODY.pack(*fields)) + payload_sum) & 0xFFFFFFFF
    return _LAYOUT.pack(check, *fields)


def encode_reply(request: OtaHeader, payload: bytes | memoryview) -> bytes:
    """The whole reply to a READ (header + payload) in one buffer, as it should go in one write."""
    return reply_header(request, len(payload), byte_sum(payload)) + bytes(payload)


def notice_echo(notice: OtaHeader) -> bytes:
    """The 20-byte echo that ends the device's 5 s wait after the final 100 % notice.

    ``read_size`` and ``all_size`` are 0. Never send this for the all_size notice (PROTOCOL.md).
    """
    return replace(notice, read_size=0, all_size=0, sum_check=None).encode()


def verify_reply(header: OtaHeader, payload: bytes | memoryview) -> bool:
    """Device side: whether a reply's checksum covers its header fields and payload."""
    return header.sum_check == (header.computed_sum() + byte_sum(payload)) & 0xFFFFFFFF


class OtaHeaderReader:
    """Accumulates stream bytes and yields whole 20-byte headers (device -> app direction).

    The device sends only headers on this stream, so framing is a fixed 20 bytes. :meth:`feed`
    gives every whole header at once; :meth:`push` and :meth:`next` let a reader take them one at a
    time (and stop while it can't answer), with :attr:`headers_pending` telling how many wait.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._start = 0  # headers before this offset were taken by next()

    def feed(self, data: bytes) -> list[OtaHeader]:
        self.push(data)
        headers = []
        while (header := self.next()) is not None:
            headers.append(header)
        return headers

    def push(self, data: bytes) -> None:
        """Add received bytes."""
        if self._start:
            del self._buffer[: self._start]
            self._start = 0
        self._buffer += data

    def next(self) -> OtaHeader | None:
        """The next whole header, or None until more bytes arrive."""
        end = self._start + HEADER_SIZE
        if len(self._buffer) < end:
            return None
        header = OtaHeader.decode(self._buffer[self._start : end])
        self._start = end
        return header

    @property
    def headers_pending(self) -> int:
        """Whole headers received and not taken yet."""
        return (len(self._buffer) - self._start) // HEADER_SIZE

    @property
    def pending(self) -> int:
        """Bytes of an incomplete header still buffered."""
        return (len(self._buffer) - self._start) % HEADER_SIZE
