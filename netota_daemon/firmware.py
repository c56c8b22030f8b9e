"""``FirmwareImage``: an upgrade file, read once and served by byte range.

The file is read into memory once, when a job opens it: serving a READ never touches the file again
and never copies the image (replies are slices of one immutable buffer), and every job flashing the
same file version shares that buffer through :func:`open_image`. Reading it once, rather than
memory-mapping it, means a job always serves one consistent snapshot: a firmware file overwritten
or truncated in place while devices are being flashed can neither mix two images on a device nor
crash the daemon (a truncated mapping raises SIGBUS).
"""

from __future__ import annotations

import os
import stat
import threading
import weakref
from pathlib import Path

from netota_daemon.wire.firmware_kind import FirmwareKindInfo, identify_file_bytes
from netota_daemon.wire.ota import byte_sum

#: The OTA header's offsets and sizes are u32: a larger image can't be addressed.
MAX_IMAGE_SIZE = 0xFFFFFFFF
#: Range sums remembered per image (bounded; a 64 MiB image has about 1600 windows of 42 KiB).
RANGE_SUM_CACHE = 4096


class FirmwareError(Exception):
    """The firmware file can't be used: missing, unreadable, empty or too large."""


class FirmwareImage:
    """A read-only view of one firmware file."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not hang; the fstat below then refuses it.
            with os.fdopen(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    raise IsADirectoryError
                if not stat.S_ISREG(st.st_mode):
                    raise FirmwareError(f"firmware {self.path} is not a regular file")
                size = st.st_size
                if size == 0:
                    raise FirmwareError(f"firmware {self.path} is empty")
                if size > MAX_IMAGE_SIZE:
                    raise FirmwareError(
                        f"firmware {self.path} is {size} bytes; the OTA protocol addresses at most {MAX_IMAGE_SIZE}"
                    )
                data = f.read()
        except FileNotFoundError:
            raise FirmwareError(f"firmware {self.path} does not exist") from None
        except IsADirectoryError:
            raise FirmwareError(f"firmware {self.path} is a directory") from None
        except PermissionError:
            raise FirmwareError(f"firmware {self.path} is not readable (permission denied)") from None
        except OSError as e:
            raise FirmwareError(f"firmware {self.path} can't be read: {e.strerror or e}") from None
        if len(data) != size:
            raise FirmwareError(f"firmware {self.path} changed while it was read ({size} then {len(data)} bytes)")
        self.size = size
        self._view = memoryview(data)
        self._range_sums: dict[tuple[int, int], int] = {}
        self._kind: FirmwareKindInfo | None = None
        self._sha256: str | None = None

    @property
    def kind(self) -> FirmwareKindInfo:
        """Which kind of image this is, as far as its bytes tell (best effort: ``wire.firmware_kind``)."""
        if self._kind is None:
            self._kind = identify_file_bytes(self._view)
        return self._kind

    def read(self, offset: int, length: int) -> memoryview:
        """Bytes ``offset .. offset+length``, clamped at the end of the image (no copy)."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        return self._view[offset : min(offset + length, self.size)]

    def range_sum(self, offset: int, length: int) -> int:
        """The byte sum (mod 2**32) of a range, as the reply checksum needs it.

        Every job flashing this image asks for the same windows, so sums are remembered (bounded)."""
        key = (offset, length)
        total = self._range_sums.get(key)
        if total is None:
            if len(self._range_sums) >= RANGE_SUM_CACHE:
                self._range_sums.clear()
            total = self._range_sums[key] = byte_sum(self.read(offset, length))
        return total

    def sha256(self) -> str:
        """The image's SHA-256 (hex), computed once: every job flashing this file version shares it."""
        if self._sha256 is None:
            import hashlib

            self._sha256 = hashlib.sha256(self._view).hexdigest()
        return self._sha256

    def __repr__(self) -> str:
        return f"<FirmwareImage {self.path} {self.size} bytes>"


_cache: weakref.WeakValueDictionary[tuple[object, ...], FirmwareImage] = weakref.WeakValueDictionary()
_cache_lock = threading.Lock()


def open_image(path: str | os.PathLike[str]) -> FirmwareImage:
    """The shared :class:`FirmwareImage` for ``path``: one buffer per file version, reused by every
    job that holds it. A file replaced or modified on disk gets a new buffer."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FirmwareError(f"firmware {path} does not exist") from None
    except OSError as e:
        raise FirmwareError(f"firmware {path} can't be read: {e.strerror or e}") from None
    key = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _cache_lock:
        image = _cache.get(key)
        if image is None:
            image = FirmwareImage(path)
            _cache[key] = image
        return image
