"""CTP frames (the JSON command channel on TCP 3333): encoding and an incremental decoder.

Layout, both directions, lengths little-endian::

    "CTP:" | u16 topic length | topic (ASCII) | u32 content length | content (JSON or empty)

No I/O and no Twisted here.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"CTP:"
#: Content larger than this is refused as a protocol error (PROTOCOL.md: "a sane bound").
MAX_CONTENT_LENGTH = 64 * 1024
MAX_TOPIC_LENGTH = 256

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class CtpProtocolError(ValueError):
    """The peer sent bytes that are not a valid CTP frame."""


@dataclass(frozen=True)
class CtpFrame:
    """One frame: a topic and its decoded JSON content (``None`` when the content was empty)."""

    topic: str
    content: dict[str, Any] | None = None
    raw_content: bytes = field(default=b"", compare=False, repr=False)

    @property
    def op(self) -> str | None:
        return self.content.get("op") if isinstance(self.content, dict) else None

    @property
    def param(self) -> dict[str, Any]:
        value = self.content.get("param") if isinstance(self.content, dict) else None
        return value if isinstance(value, dict) else {}

    @property
    def errno(self) -> int | None:
        """The device's error number, or None for a success reply (which has no ``errno``)."""
        if not isinstance(self.content, dict) or "errno" not in self.content:
            return None
        try:
            return int(self.content["errno"])
        except (TypeError, ValueError):
            return -1


def encode_json(obj: Any) -> bytes:
    """Compact JSON, as the device writes it."""
    return json.dumps(obj, separators=(",", ":")).encode("ascii")


def encode_frame(topic: str, content: dict[str, Any] | bytes | None = None) -> bytes:
    """One CTP frame. ``content`` may be a dict (encoded as compact JSON), raw bytes, or None (empty)."""
    topic_bytes = topic.encode("ascii")
    if content is None:
        body = b""
    elif isinstance(content, (bytes, bytearray)):
        body = bytes(content)
    else:
        body = encode_json(content)
    return MAGIC + _U16.pack(len(topic_bytes)) + topic_bytes + _U32.pack(len(body)) + body


def request(topic: str, op: str, **param: str) -> bytes:
    """An app -> device request: ``{"op":op,"param":{...}}`` with every value a string."""
    return encode_frame(topic, {"op": op, "param": {k: str(v) for k, v in param.items()}})


def notify(topic: str, param: dict[str, Any] | None = None, errno: int | None = None) -> bytes:
    """A device -> app reply: success without ``errno``, or an error with ``errno`` and ``msg``."""
    content: dict[str, Any] = {"op": "NOTIFY"}
    if errno is not None:
        content["errno"] = errno
    content["param"] = {k: str(v) for k, v in (param or {}).items()}
    return encode_frame(topic, content)


class CtpDecoder:
    """Incremental decoder: feed it any chunks of the stream, get whole frames back.

    Raises :class:`CtpProtocolError` on bad magic, an absurd length, a non-ASCII topic or content
    that is not a JSON object; after an error the stream can't be trusted and the decoder stays
    failed (every later ``feed`` raises the same error).
    """

    def __init__(self, max_content_length: int = MAX_CONTENT_LENGTH) -> None:
        self._buffer = bytearray()
        self._max = max_content_length
        self._error: CtpProtocolError | None = None

    def feed(self, data: bytes) -> list[CtpFrame]:
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames: list[CtpFrame] = []
        try:
            while True:
                frame = self._next_frame()
                if frame is None:
                    return frames
                frames.append(frame)
        except CtpProtocolError as e:
            self._error = e
            raise

    def _next_frame(self) -> CtpFrame | None:
        buf = self._buffer
        if len(buf) < 4:
            if bytes(buf) != MAGIC[: len(buf)]:
                raise CtpProtocolError(f"bad CTP magic {bytes(buf)!r}, expected {MAGIC!r}")
            return None
        if buf[:4] != MAGIC:
            raise CtpProtocolError(f"bad CTP magic {bytes(buf[:4])!r}, expected {MAGIC!r}")
        if len(buf) < 6:
            return None
        (topic_length,) = _U16.unpack_from(buf, 4)
        if topic_length == 0 or topic_length > MAX_TOPIC_LENGTH:
            raise CtpProtocolError(f"CTP topic length {topic_length} is out of range (1..{MAX_TOPIC_LENGTH})")
        if len(buf) < 6 + topic_length + 4:
            return None
        (content_length,) = _U32.unpack_from(buf, 6 + topic_length)
        if content_length > self._max:
            raise CtpProtocolError(f"CTP content length {content_length} exceeds the {self._max}-byte bound")
        end = 10 + topic_length + content_length
        if len(buf) < end:
            return None
        topic_raw = bytes(buf[6 : 6 + topic_length])
        body = bytes(buf[10 + topic_length : end])
        del buf[:end]
        try:
            topic = topic_raw.decode("ascii")
        except UnicodeDecodeError:
            raise CtpProtocolError(f"CTP topic {topic_raw!r} is not ASCII") from None
        return CtpFrame(topic, decode_content(topic, body), body)

    @property
    def pending(self) -> int:
        return len(self._buffer)


def decode_content(topic: str, body: bytes) -> dict[str, Any] | None:
    """The JSON object of a frame's content; None for empty content."""
    if not body.strip():
        return None
    try:
        content = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CtpProtocolError(f"CTP {topic} content is not valid JSON: {e}") from None
    except RecursionError:  # "[[[[..." within the length bound: too deep for the JSON parser
        raise CtpProtocolError(f"CTP {topic} content is JSON nested too deeply to decode") from None
    if not isinstance(content, dict):
        raise CtpProtocolError(f"CTP {topic} content is JSON but not an object: {body[:60]!r}")
    return content
