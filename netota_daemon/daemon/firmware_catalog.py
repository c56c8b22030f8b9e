"""``FirmwareCatalog``: what is in ``firmware_dir``, adding an image to it and removing one.

- :meth:`FirmwareCatalog.list`: every regular file directly in ``firmware_dir`` (name, size, SHA-256,
  modification time, and the image's kind where :mod:`netota_daemon.wire.firmware_kind` can tell).
  Reading and hashing files blocks, so the control API calls it off the reactor thread; hashes are
  remembered per (name, size, mtime), so a listing reads only new or changed files.
- :meth:`FirmwareCatalog.add`: copies a body (a file object: Twisted spools a large request body to
  a temporary file on disk) into ``firmware_dir`` in chunks, never whole in memory, through a hidden
  temporary file that is fsynced and then renamed over the name, so a half upload never appears
  under a name and an interrupted one leaves nothing behind.
- :meth:`FirmwareCatalog.remove`: deletes a file, unless a queued or running job uses it.

Names follow the rules of a job's ``firmware``: a plain file name (no directory, no ``..``, no NUL,
no leading dot, at most :data:`MAX_NAME_BYTES` bytes of UTF-8), so an upload can only ever land
directly in ``firmware_dir``.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from netota_daemon.wire import firmware_kind

#: The largest image an upload may write (a whole AC79 flash is 4 to 16 MiB).
DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
MAX_NAME_BYTES = 255
CHUNK = 256 * 1024
PARTIAL_PREFIX = ".upload-"


class CatalogError(Exception):
    """A refusal: ``reason`` is ``bad_name``, ``outside`` (a path that leaves firmware_dir), ``not_found``, ``in_use``, ``too_large``, ``empty``,
    ``exists`` or ``unavailable`` (the directory can't be written or read)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class FirmwareFile:
    name: str
    size: int
    sha256: str
    modified: float
    kind: str | None  # single_backup | double_backup | unknown, or None when it can't be told here
    description: str | None
    version: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "modified": self.modified,
            "kind": self.kind,
            "description": self.description,
            "version": self.version,
        }


def check_name(name: Any) -> str:
    """``name`` if it is a plain file name for ``firmware_dir``, else :class:`CatalogError`."""
    if not isinstance(name, str) or not name:
        raise CatalogError("bad_name", "a firmware name must be a non-empty file name")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise CatalogError("bad_name", "a firmware name must be valid Unicode") from None
    if len(encoded) > MAX_NAME_BYTES:
        raise CatalogError("bad_name", f"a firmware name has at most {MAX_NAME_BYTES} bytes")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise CatalogError("outside", f"firmware name {name[:80]!r} leaves firmware_dir: give a plain file name")
    if name.startswith("."):
        raise CatalogError("bad_name", f"firmware name {name[:80]!r} must not start with a dot")
    if any(not c.isprintable() for c in name):
        raise CatalogError("bad_name", "a firmware name must not contain control characters")
    return name


class FirmwareCatalog:
    """``in_use``: the firmware names queued or running jobs use now (the job queue's view)."""

    def __init__(
        self,
        firmware_dir: str | os.PathLike[str],
        in_use: Callable[[], Iterable[str]] = lambda: (),
        max_upload: int = DEFAULT_MAX_UPLOAD,
    ) -> None:
        self.firmware_dir = Path(firmware_dir)
        self.in_use = in_use
        self.max_upload = max_upload
        self._hashes: dict[tuple[str, int, int], tuple[str, tuple[str | None, str | None, str | None]]] = {}
        self._lock = threading.RLock()  # add/remove/list may run on several threads at once

    # ----- reading

    # ``list`` names this method inside the class: its annotations say ``builtins.list``.
    def list(self) -> builtins.list[FirmwareFile]:
        """Every regular file directly in ``firmware_dir`` (not hidden ones: partial uploads), by name.
        Blocking: call it off the reactor thread."""
        with self._lock:
            return self._list()

    def _list(self) -> builtins.list[FirmwareFile]:
        try:
            entries = sorted(os.scandir(self.firmware_dir), key=lambda e: e.name)
        except OSError as e:
            raise CatalogError("unavailable", f"can't read {self.firmware_dir}: {e.strerror}") from None
        out = []
        seen = set()
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed meanwhile
            if not stat.S_ISREG(st.st_mode):
                continue  # directories, symlinks (a job refuses those that leave), FIFOs
            key = (entry.name, st.st_size, st.st_mtime_ns)
            seen.add(key)
            known = self._hashes.get(key)
            if known is None:
                try:
                    known = self._read(Path(entry.path))
                except OSError:
                    continue
                self._hashes[key] = known
            digest, (kind, description, version) = known
            out.append(FirmwareFile(entry.name, st.st_size, digest, st.st_mtime, kind, description, version))
        for key in set(self._hashes) - seen:
            del self._hashes[key]  # forget files that went away: bounded by the directory
        return out

    def _read(self, path: Path) -> tuple[str, tuple[str | None, str | None, str | None]]:
        digest = hashlib.sha256()
        head = b""
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                if not head:
                    head = chunk[:4096]
                digest.update(chunk)
        return digest.hexdigest(), self._kind(path, head)

    @staticmethod
    def _kind(path: Path, head: bytes) -> tuple[str | None, str | None, str | None]:
        if path.stat().st_size <= CHUNK * 64:  # small enough to check whole (test images carry a version)
            info = firmware_kind.identify_file_bytes(path.read_bytes())
        else:
            info = firmware_kind.identify(head)
        return info.kind.value, info.description, info.version

    def get(self, name: str) -> FirmwareFile:
        name = check_name(name)
        for item in self.list():
            if item.name == name:
                return item
        raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}")

    # ----- writing

    def add(self, name: str, body: IO[bytes], replace: bool = True) -> FirmwareFile:
        """Copy ``body`` (read from its current position) to ``firmware_dir/name``: a hidden temporary
        file, fsynced, renamed over ``name``, and the directory fsynced. At most ``max_upload`` bytes
        (more: ``too_large``, nothing written). A name a queued or running job uses is refused
        (``in_use``), and so is an existing name when ``replace`` is false (``exists``). Blocking."""
        name = check_name(name)
        if name in set(self.in_use()):
            raise CatalogError(
                "in_use", f"firmware {name!r} is used by a queued or running job: it can't be replaced now"
            )
        target = self.firmware_dir / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise CatalogError("bad_name", f"{name!r} in firmware_dir is not a regular file: it is not replaced")
        if not replace and target.exists():
            raise CatalogError("exists", f"firmware {name!r} already exists")
        try:
            fd, partial = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".partial", dir=self.firmware_dir)
        except OSError as e:
            raise CatalogError("unavailable", f"can't write into {self.firmware_dir}: {e.strerror}") from None
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := body.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_upload:
                        raise CatalogError("too_large", f"the upload is larger than {self.max_upload} bytes")
                    out.write(chunk)
                if size == 0:
                    raise CatalogError("empty", "the upload is empty: an image has at least one byte")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(partial, 0o644)
            with self._lock:
                if name in set(self.in_use()):  # a job took it while the body was copied
                    raise CatalogError("in_use", f"firmware {name!r} is used by a queued or running job")
                if not replace and target.exists():  # another upload stored it meanwhile
                    raise CatalogError("exists", f"firmware {name!r} already exists")
                os.replace(partial, target)
                _fsync_directory(self.firmware_dir)
                return self.get(name)
        except BaseException:
            _unlink_quietly(partial)
            raise

    def remove(self, name: str) -> FirmwareFile:
        """Delete ``firmware_dir/name`` unless a queued or running job uses it. Blocking."""
        name = check_name(name)
        with self._lock:
            item = self.get(name)
            if name in set(self.in_use()):
                raise CatalogError("in_use", f"firmware {name!r} is used by a queued or running job: cancel it first")
            try:
                os.unlink(self.firmware_dir / name)
            except FileNotFoundError:
                raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}") from None
            except OSError as e:
                raise CatalogError("unavailable", f"can't remove {name!r}: {e.strerror}") from None
        _fsync_directory(self.firmware_dir)
        return item

    def remove_partials(self) -> builtins.list[str]:
        """Delete uploads a crash left half written (the daemon calls it at start-up)."""
        removed = []
        for path in self.firmware_dir.glob(PARTIAL_PREFIX + "*.partial"):
            _unlink_quietly(str(path))
            removed.append(path.name)
        return removed


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
