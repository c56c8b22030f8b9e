"""The double-backup device's dual-bank writer: one uploaded OTA file, from ``net_fopen`` to
``net_fclose``. Sans-IO: bytes in, the flash time they cost and the burn's result out.

What the device does (the FTP route's research notes: ``net_update.c`` and the closed ``update.a``):

- ``net_fwrite`` buffers 4 KiB; each full buffer is one flash write, which blocks the network
  thread, so TCP is throttled to flash speed (:meth:`DualBankWriter.write` returns the device
  seconds those writes take at ``flash_kbps``; None: free).
- On the first flush the writer checks the 32-byte JL file head: its CRC and the name
  ``update_data``; the size it declares must fit the bank. A head that fails makes every later
  write fail too (invisible to the client: the FTP server still answers 226).
- ``net_fclose`` (a clean end of the upload): if nothing failed, burn the boot info: the file must be
  exactly as long as its head says ("Upgrade file size not match" otherwise: nothing burned). On
  success the device resets 2 s later into the new bank. The real writer also decodes the app's
  header with the chip key; the simulator stands in for that with the test image's trailer: a
  test image whose SHA-256 does not verify is not burned. (On a device, a full-length image
  corrupted inside is *not* caught before the switch: it would burn and fail to boot.)

Only the inactive bank is written, so anything that is not burned leaves the old firmware booting.
What the writer keeps is bounded: at most :data:`BANK_SIZE` bytes of the upload are stored.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from netota_daemon.wire.firmware_kind import (
    DOUBLE_BACKUP_HEAD_NAME,
    JL_FILE_HEAD_SIZE,
    identify_file_bytes,
    parse_jl_file_head,
    parse_test_trailer,
)

#: The writer's buffer: one flash write.
FLUSH_BYTES = 4096
#: The bank an image must fit in (the simulated flash's free space), and the most the writer keeps.
BANK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class BurnResult:
    """How ``net_fclose`` ended."""

    burned: bool
    reason: str
    received_bytes: int
    image_length: int | None  # what the JL file head declares
    version: str | None = None  # the burned test image's version (None: opaque, or not burned)


class DualBankWriter:
    """One OTA file being written. :meth:`write` each received segment, then :meth:`close` on a
    clean end (or drop the writer: a reset data connection burns nothing)."""

    def __init__(self, flash_kbps: float | None = None) -> None:
        self.flash_kbps = flash_kbps
        self.received = bytearray()  # the first BANK_SIZE bytes of the upload
        self.total = 0  # every byte received
        self.error: str | None = None  # the first write error; later writes fail too
        self.image_length: int | None = None  # from the JL file head, once checked
        self._head_checked = False
        self._flushed = 0  # bytes handed to flash writes so far

    @property
    def sha256(self) -> str:
        """Of the bytes kept (the whole upload, up to :data:`BANK_SIZE`)."""
        return hashlib.sha256(self.received).hexdigest()

    def write(self, data: bytes) -> float:
        """Take one received segment; returns the device seconds of the flash writes it completed."""
        room = BANK_SIZE - len(self.received)
        if room > 0:
            self.received += data[:room]
        self.total += len(data)
        if not self._head_checked and self.total >= FLUSH_BYTES:
            self._check_head()  # the first flush
        self._check_length()
        blocks = (self.total - self._flushed) // FLUSH_BYTES
        self._flushed += blocks * FLUSH_BYTES
        if not blocks or self.error is not None or self.flash_kbps is None:
            return 0.0  # a failed writer writes nothing and returns at once
        return blocks * FLUSH_BYTES / (self.flash_kbps * 1024)

    def _check_head(self) -> None:
        self._head_checked = True
        head = parse_jl_file_head(self.received[:JL_FILE_HEAD_SIZE])
        if head is None:
            self._failed("JL file head check failed: not a double-backup image (CRC)")
        elif head.name != DOUBLE_BACKUP_HEAD_NAME:
            self._failed(f"JL file head check failed: named {head.name!r}, not {DOUBLE_BACKUP_HEAD_NAME!r}")
        elif head.size > BANK_SIZE:
            self._failed(f"the image ({head.size} bytes) does not fit the bank ({BANK_SIZE} bytes)")
        else:
            self.image_length = head.size

    def _check_length(self) -> None:
        if self.image_length is not None and self.total > self.image_length:
            self._failed(f"more data than the head declares ({self.image_length} bytes)")

    def _failed(self, reason: str) -> None:
        if self.error is None:
            self.error = reason

    @property
    def head_error(self) -> bool:
        """Whether the head was checked and refused (the writer then writes nothing)."""
        return self._head_checked and self.image_length is None

    def _final_flush(self) -> None:
        if not self._head_checked and self.total:
            self._check_head()
        self._flushed = self.total

    @property
    def will_burn(self) -> bool:
        """Whether :meth:`close` tries the burn (nothing failed), which takes the device its time."""
        self._final_flush()
        return self.error is None and self.total > 0

    def close(self) -> BurnResult:
        """``net_fclose`` after a clean end: flush, then burn if nothing failed and the size matches."""
        self._final_flush()
        if self.total == 0:
            return BurnResult(False, "nothing was written", 0, None)
        if self.error is not None:
            return BurnResult(False, self.error, self.total, self.image_length)
        assert self.image_length is not None
        if self.total != self.image_length:
            reason = f"Upgrade file size not match: {self.total} bytes of {self.image_length}"
            return BurnResult(False, reason, self.total, self.image_length)
        data = bytes(self.received)
        if parse_test_trailer(data) is None:
            reason = "burned (an image without a test trailer: its version is unknown)"
            return BurnResult(True, reason, self.total, self.image_length)
        info = identify_file_bytes(data)
        if not info.intact:
            return BurnResult(
                False, f"the test image does not verify: {info.description}", self.total, self.image_length
            )
        return BurnResult(True, "burned", self.total, self.image_length, info.version)
