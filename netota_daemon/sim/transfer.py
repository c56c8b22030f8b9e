"""How the device reads the upgrade file over 3335: its library reads, its one-window cache, the
windows it asks for, and its percent. Sans-IO: no sockets, no time.

The device's update library calls ``f_read(offset, n)`` in a pattern of its own. A read that falls
inside the last window received costs nothing; any other read makes the device ask the app for a
whole window (research §4.2):

- phase 1 (main firmware): a few small reads near offset 0 (the head, an entry list), then a
  forward sweep; each window *starts* at the read's offset and is 20436 bytes (it may run past the
  end of the file: the app clamps).
- phase 2 (loader): the same small reads near 0, then the ``all_size`` notice, then a backward
  sweep; each window *ends* at the read's end (offset+n) and is 40916 bytes, or starts at the read's
  offset when the read lies within the first window's length of the file.

So no request other than the very first one has ``seek_addr`` 0 (the vendor's client reads from its
current file position when ``seek_addr`` is 0, so a device that asked for 0 again would break it).

The image length comes from the head read: a single-backup test image's head, else the configured
``image_size``, else the end of a short first window. A head that is a double-backup image's
(``update_data``) fails the session: the library's UFW check would refuse it on a device.

Percent: 1 until ``all_size`` is known; then, at every library read (cache hits included) and before
counting it, ``max(previous, bytes_read * 100 // all_size)`` capped at 99.
"""

from __future__ import annotations

from dataclasses import dataclass

from netota_daemon.sim.image import image_length_from_head
from netota_daemon.wire.firmware_kind import HEAD_BYTES, FirmwareKind, identify
from netota_daemon.wire.ota import PHASE1_WINDOW, PHASE2_WINDOW

#: The library's first reads: the head of the file, then an "entry list" after it.
HEAD_READ = (0, 64)
ENTRY_READ = (64, 448)
#: The sweep covers the file from here to its end, in library reads of this size.
SWEEP_START = 512
SWEEP_CHUNK = 4096


class ReplyError(ValueError):
    """A reply the device can't use (a protocol fault that ends the session in ERR)."""


@dataclass(frozen=True)
class ReadRequest:
    """Ask the app for a window (a READ header)."""

    seek: int
    size: int
    percent: int


@dataclass(frozen=True)
class SizeNotice:
    """Send the ``all_size`` notice (status 0, read_size 0)."""

    all_size: int
    percent: int


@dataclass(frozen=True)
class TransferDone:
    """Every library read is satisfied."""


@dataclass(frozen=True)
class TransferFailed:
    """The device can't go on (e.g. it can't tell how long the image is)."""

    reason: str


Step = ReadRequest | SizeNotice | TransferDone | TransferFailed


class DeviceReader:
    """One session's reads. Call :meth:`next_step`; after a :class:`ReadRequest`, call
    :meth:`deliver` with the reply, then :meth:`next_step` again."""

    def __init__(self, phase: int, image_size: int | None = None, send_all_size: bool | None = None) -> None:
        if phase not in (1, 2):
            raise ValueError(f"phase must be 1 or 2, got {phase}")
        self.phase = phase
        self.window = PHASE1_WINDOW if phase == 1 else PHASE2_WINDOW
        self.configured_size = image_size
        self.send_all_size = (phase == 2) if send_all_size is None else send_all_size
        self.image_length: int | None = None
        self.received = bytearray()
        self.bytes_received = 0  # payload bytes in accepted replies
        self.replies = 0
        self.percent = 1
        self.all_size = 0
        self.library_bytes = 0  # bytes handed to the library since all_size was sent
        self._reads: list[tuple[int, int] | str] = [HEAD_READ]
        self._index = 0
        self._cache_start = 0
        self._cache = b""
        self._cache_unfilled = False  # the last window "arrived" empty (a reply timeout the device ignored)
        self.unfilled_windows = 0  # windows the device went on without (phase 1, V1.2)
        self.unfilled_reads = 0  # library reads served from such a window: the library got garbage
        self._pending: ReadRequest | None = None
        self.last_request: ReadRequest | None = None
        self._eof: int | None = None
        self._planned = False

    # -- the plan -------------------------------------------------------------------------------
    def _plan(self) -> str | None:
        """Build the reads after the head, once the head told the length. Returns a failure reason."""
        head = bytes(self.received[:HEAD_BYTES])
        if identify(head).kind is FirmwareKind.DOUBLE_BACKUP:
            # The library's UFW header check fails: a double-backup image can't cross-upgrade.
            return (
                "not a UFW container: a double-backup image (update_data head); this single-backup build can't take it"
            )
        length = image_length_from_head(head) or self.configured_size
        if length is None and self._eof is not None:
            length = self._eof  # the whole file fitted in the first window
        if length is None:
            return "image length unknown: not a simulator test image and no --image-size given"
        self.image_length = length
        reads: list[tuple[int, int] | str] = []
        entry_off, entry_n = ENTRY_READ
        if length > entry_off:
            reads.append((entry_off, min(entry_n, length - entry_off)))
        if self.send_all_size:
            reads.append("all_size")
        if self.phase == 1:
            offset = SWEEP_START
            while offset < length:
                reads.append((offset, min(SWEEP_CHUNK, length - offset)))
                offset += SWEEP_CHUNK
        else:
            end = length
            while end > SWEEP_START:
                start = max(SWEEP_START, end - SWEEP_CHUNK)
                reads.append((start, end - start))
                end = start
        self._reads += reads
        self._planned = True
        return None

    def _window_for(self, offset: int, n: int) -> int:
        if self.phase == 2 and offset > self.window - n:
            return offset + n - self.window
        return offset

    def _in_cache(self, offset: int, n: int) -> bool:
        return self._cache_start <= offset and offset + n <= self._cache_start + len(self._cache)

    def _read(self, index: int) -> tuple[int, int]:
        read = self._reads[index]
        assert not isinstance(read, str)
        return read

    def _update_percent(self) -> None:
        if self.all_size:
            self.percent = min(99, max(self.percent, self.library_bytes * 100 // self.all_size))

    # -- driving ----------------------------------------------------------------------------------
    def next_step(self) -> Step:
        if self._pending is not None:
            raise RuntimeError("a request is still waiting for its reply")
        while True:
            if self._index == 1 and not self._planned:
                reason = self._plan()
                if reason:
                    return TransferFailed(reason)
            if self._index >= len(self._reads):
                return TransferDone()
            read = self._reads[self._index]
            if read == "all_size":
                self._index += 1
                assert self.image_length is not None
                self.all_size = self.image_length
                self.library_bytes = 0
                return SizeNotice(self.all_size, self.percent)
            offset, n = self._read(self._index)
            self._update_percent()
            if self._in_cache(offset, n):
                if self._cache_unfilled:
                    self.unfilled_reads += 1
                self._consume(n)
                continue
            self._pending = ReadRequest(self._window_for(offset, n), self.window, self.percent)
            self.last_request = self._pending
            return self._pending

    def _consume(self, n: int) -> None:
        if self.all_size:
            self.library_bytes += n
        self._index += 1

    @property
    def waiting_for(self) -> ReadRequest | None:
        """The request whose reply is outstanding."""
        return self._pending

    def deliver(self, seek: int, payload: bytes) -> None:
        """Accept the reply to the outstanding request (checksum already verified).

        Raises :class:`ReplyError` for a reply that doesn't answer it: another offset, more bytes
        than asked, or too few to cover the library's read (short is fine only at end of file).
        """
        request = self._pending
        if request is None:
            raise ReplyError("a reply arrived but no READ is outstanding")
        if seek != request.seek:
            raise ReplyError(f"reply for offset {seek}, but the device asked for {request.seek}")
        if len(payload) > request.size:
            raise ReplyError(f"reply carries {len(payload)} bytes, more than the {request.size} asked")
        offset, n = self._read(self._index)
        end = seek + len(payload)
        if len(payload) < request.size:
            self._eof = end
        needed = offset + n
        known_length = self.image_length if self.image_length is not None else self.configured_size
        if known_length is not None:
            needed = min(needed, known_length)
        elif len(payload) < request.size:
            needed = min(needed, end)  # the head read of a file shorter than the read
        if len(payload) == 0 or end < needed:
            raise ReplyError(
                f"reply covers {seek}..{end}, but the device needs {offset}..{needed} (short reply before end of file)"
            )
        self._pending = None
        self._cache_start, self._cache, self._cache_unfilled = seek, bytes(payload), False
        self._store(seek, payload)
        self.replies += 1
        self.bytes_received += len(payload)
        self._consume(n)

    def go_on_without_reply(self) -> None:
        """The device gave up waiting for the outstanding reply and went on anyway (the V1.2 main
        firmware ignores its reply timeout): the library is handed the window's buffer, never
        filled. Nothing is stored; every library read served from that window counts in
        :attr:`unfilled_reads` (the one waiting now included)."""
        request = self._pending
        if request is None:
            raise RuntimeError("no READ is outstanding")
        self._pending = None
        self._cache_start, self._cache, self._cache_unfilled = request.seek, bytes(request.size), True
        self.unfilled_windows += 1
        self.unfilled_reads += 1
        self._consume(self._read(self._index)[1])

    def _store(self, seek: int, payload: bytes) -> None:
        end = seek + len(payload)
        if len(self.received) < end:
            self.received.extend(bytes(end - len(self.received)))
        self.received[seek:end] = payload

    def assembled(self) -> bytes:
        """What arrived, placed by offset, ``image_length`` long (zeros where nothing arrived)."""
        length = self.image_length if self.image_length is not None else len(self.received)
        data = bytes(self.received[:length])
        return data + bytes(length - len(data))
