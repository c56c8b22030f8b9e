"""``FirmwareCatalog``: what is in ``firmware_dir``, adding an image to it and removing one.

- :meth:`FirmwareCatalog.list`: every regular file directly in ``firmware_dir`` (name, size, SHA-256,
  modification time, and the image's kind where :mod:`netota_daemon.wire.firmware_kind` can tell).
  Hashes are remembered per (name, size, mtime), so a listing reads only new or changed files.
- :meth:`FirmwareCatalog.add`: copies a body (a file object: Twisted spools a large request body to
  a temporary file on disk) into ``firmware_dir`` in chunks, never whole in memory, through a hidden
  temporary file that is fsynced and then renamed over the name, so a half upload never appears
  under a name and an interrupted one leaves nothing behind. The copy is hashed as it is written:
  the file is read once.
- :meth:`FirmwareCatalog.remove`: deletes a file, unless a queued or running job uses it.

Threads: the catalogue's methods are called on the reactor thread. What blocks (scanning, hashing,
copying, fsync) runs through ``run_blocking`` (a thread of the reactor's pool in the daemon), and
``in_use``, the job queue's view, is read on the reactor only, where the queue's state lives. The
decisions a job could race are taken there too, each together with the act it guards, so no job can
take a name between the check and the act: the last in-use check of an upload and its rename over
the name, the in-use check of a removal and its unlink. A rename or an unlink is one system call,
whatever the image's size; the file's bytes are read and written on the thread.

Names follow the rules of a job's ``firmware``: a plain file name (no directory, no ``..``, no NUL,
no leading dot, at most :data:`MAX_NAME_BYTES` bytes of UTF-8), so an upload can only ever land
directly in ``firmware_dir``.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from twisted.internet.defer import Deferred

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


RunBlocking = Callable[[Callable[[], Any]], Deferred[Any]]
"""Runs a blocking call off the reactor thread; its Deferred fires on the reactor thread."""

#: Files up to this size are identified whole (a test image's version is in its trailer); of larger
#: ones only the head is looked at.
IDENTIFY_WHOLE = CHUNK * 64

Description = tuple[str, tuple[str | None, str | None, str | None]]  # SHA-256, (kind, description, version)


class _Reading:
    """What a file's bytes say, taken as they pass once: their SHA-256 and the image's kind."""

    def __init__(self) -> None:
        self.size = 0
        self._digest = hashlib.sha256()
        self._kept: builtins.list[bytes] | None = []  # the whole file while it is small enough
        self._head = b""

    def update(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self.size += len(chunk)
        if self._kept is None:
            return
        self._kept.append(chunk)
        if self.size > IDENTIFY_WHOLE:
            self._head = b"".join(self._kept)[: firmware_kind.HEAD_BYTES]
            self._kept = None

    def description(self) -> Description:
        if self._kept is not None:
            info = firmware_kind.identify_file_bytes(b"".join(self._kept))
        else:
            info = firmware_kind.identify(self._head)
        return self._digest.hexdigest(), (info.kind.value, info.description, info.version)


@dataclass(frozen=True)
class _Staged:
    """An upload copied whole into its hidden temporary file, fsynced, not yet under its name."""

    name: str
    temporary: str  # its path
    size: int
    modified: float
    modified_ns: int
    description: Description


class FirmwareCatalog:
    """The catalogue of ``firmware_dir``. Call its methods on the reactor thread: blocking work goes
    to ``run_blocking``; ``in_use`` (the firmware names queued or running jobs use now: the job
    queue's view) is called on the reactor thread only."""

    def __init__(
        self,
        firmware_dir: str | os.PathLike[str],
        run_blocking: RunBlocking,
        in_use: Callable[[], Iterable[str]] = lambda: (),
        max_upload: int = DEFAULT_MAX_UPLOAD,
    ) -> None:
        self.firmware_dir = Path(firmware_dir)
        self.run_blocking = run_blocking
        self.in_use = in_use
        self.max_upload = max_upload
        self._hashes: dict[tuple[str, int, int], Description] = {}
        self._lock = threading.Lock()  # the remembered hashes: listings may run on several threads at once

    # ----- reading

    # ``list`` names this method inside the class: its annotations say ``builtins.list``.
    async def list(self) -> builtins.list[FirmwareFile]:
        """Every regular file directly in ``firmware_dir`` (not hidden ones: partial uploads), by name."""
        items: builtins.list[FirmwareFile] = await self.run_blocking(self._scan)
        return items

    async def get(self, name: str) -> FirmwareFile:
        """The regular file ``name`` in ``firmware_dir``, or ``not_found``."""
        name = check_name(name)
        item: FirmwareFile = await self.run_blocking(lambda: self._describe(name))
        return item

    def _scan(self) -> builtins.list[FirmwareFile]:
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
            seen.add((entry.name, st.st_size, st.st_mtime_ns))
            try:
                out.append(self._file(entry.name, st, entry.path))
            except OSError:
                continue
        with self._lock:
            for key in set(self._hashes) - seen:
                del self._hashes[key]  # forget files that went away: bounded by the directory
        return out

    def _describe(self, name: str) -> FirmwareFile:
        path = self.firmware_dir / name
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError
            return self._file(name, st, path)
        except FileNotFoundError:
            raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}") from None
        except OSError as e:
            raise CatalogError("unavailable", f"can't read {name!r}: {e.strerror}") from None

    def _file(self, name: str, st: os.stat_result, source: str | Path | IO[bytes]) -> FirmwareFile:
        """``name``'s entry: its hash remembered for this (name, size, mtime), else read once from
        ``source`` (its path, or the file open)."""
        key = (name, st.st_size, st.st_mtime_ns)
        with self._lock:
            known = self._hashes.get(key)
        if known is None:
            reading = _Reading()
            with open(source, "rb") if isinstance(source, str | Path) else source as f:
                while chunk := f.read(CHUNK):
                    reading.update(chunk)
            known = reading.description()
            with self._lock:
                self._hashes[key] = known
        digest, (kind, description, version) = known
        return FirmwareFile(name, st.st_size, digest, st.st_mtime, kind, description, version)

    # ----- writing

    def _refuse_in_use(self, name: str, why: str) -> None:
        """On the reactor thread: ``in_use`` when a queued or running job uses ``name`` now."""
        if name in set(self.in_use()):
            raise CatalogError("in_use", f"firmware {name!r} is used by a queued or running job: {why}")

    async def add(self, name: str, body: IO[bytes], replace: bool = True) -> FirmwareFile:
        """Copy ``body`` (read from its current position) to ``firmware_dir/name``: a hidden temporary
        file, fsynced, renamed over ``name``, and the directory fsynced. At most ``max_upload`` bytes
        (more: ``too_large``, nothing written). A name a queued or running job uses is refused
        (``in_use``), before the copy and again at the rename (a job may take it meanwhile), and so
        is an existing name when ``replace`` is false (``exists``)."""
        name = check_name(name)
        self._refuse_in_use(name, "it can't be replaced now")
        staged: _Staged = await self.run_blocking(lambda: self._stage(name, body, replace))
        try:
            # On the reactor, with nothing in between: the last check and the rename.
            self._refuse_in_use(name, "it can't be replaced now")  # a job took it while the body was copied
            target = self.firmware_dir / name
            if not replace and os.path.lexists(target):  # another upload stored it meanwhile
                raise CatalogError("exists", f"firmware {name!r} already exists")
            try:
                os.replace(staged.temporary, target)
            except OSError as e:
                raise CatalogError("unavailable", f"can't store {name!r}: {e.strerror}") from None
        except BaseException:
            await self.run_blocking(lambda: _unlink_quietly(staged.temporary))
            raise
        item: FirmwareFile = await self.run_blocking(lambda: self._stored(staged))
        return item

    def _stage(self, name: str, body: IO[bytes], replace: bool) -> _Staged:
        """Blocking: ``body`` copied (and hashed as it is) into a new hidden file, fsynced."""
        target = self.firmware_dir / name
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise CatalogError("bad_name", f"{name!r} in firmware_dir is not a regular file: it is not replaced")
        if not replace and target.exists():
            raise CatalogError("exists", f"firmware {name!r} already exists")
        try:
            fd, temporary = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=".partial", dir=self.firmware_dir)
        except OSError as e:
            raise CatalogError("unavailable", f"can't write into {self.firmware_dir}: {e.strerror}") from None
        try:
            reading = _Reading()
            with os.fdopen(fd, "wb") as out:
                while chunk := body.read(CHUNK):
                    if reading.size + len(chunk) > self.max_upload:
                        raise CatalogError("too_large", f"the upload is larger than {self.max_upload} bytes")
                    out.write(chunk)
                    reading.update(chunk)
                if reading.size == 0:
                    raise CatalogError("empty", "the upload is empty: an image has at least one byte")
                out.flush()
                os.fsync(out.fileno())
                st = os.fstat(out.fileno())
            os.chmod(temporary, 0o644)
        except OSError as e:  # a full disk (ENOSPC), an I/O error: nothing is left behind
            _unlink_quietly(temporary)
            raise CatalogError(
                "unavailable", f"can't write {name!r} into {self.firmware_dir}: {e.strerror or e}"
            ) from None
        except BaseException:
            _unlink_quietly(temporary)
            raise
        return _Staged(name, temporary, st.st_size, st.st_mtime, st.st_mtime_ns, reading.description())

    def _stored(self, staged: _Staged) -> FirmwareFile:
        """Blocking: the rename made durable, and the entry of what was stored (from the copy: the
        rename keeps the file's size and mtime, so its hash is remembered, not read again)."""
        _fsync_directory(self.firmware_dir)
        with self._lock:
            self._hashes[(staged.name, staged.size, staged.modified_ns)] = staged.description
        digest, (kind, description, version) = staged.description
        return FirmwareFile(staged.name, staged.size, digest, staged.modified, kind, description, version)

    async def remove(self, name: str) -> FirmwareFile:
        """Delete ``firmware_dir/name`` unless a queued or running job uses it (``in_use``); the entry
        of what was deleted (read through the file, still open, after the unlink; its blocks are
        freed when the thread closes it, not on the reactor)."""
        name = check_name(name)
        # On the reactor, with nothing in between: the check, and the unlink of the file it was about.
        self._refuse_in_use(name, "cancel it first")
        path = self.firmware_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink: not a catalogue entry
                raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}") from None
            raise CatalogError("unavailable", f"can't remove {name!r}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a directory or a FIFO: not a catalogue entry
                raise CatalogError("not_found", f"no firmware {name!r} in {self.firmware_dir}")
            try:
                os.unlink(path)
            except OSError as e:
                raise CatalogError("unavailable", f"can't remove {name!r}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        f = os.fdopen(fd, "rb")
        item: FirmwareFile = await self.run_blocking(lambda: self._removed(name, st, f))
        return item

    def _removed(self, name: str, st: os.stat_result, f: IO[bytes]) -> FirmwareFile:
        """Blocking: the unlink made durable, and the removed file's entry (read through ``f``)."""
        try:
            _fsync_directory(self.firmware_dir)
            try:
                item = self._file(name, st, f)
            except OSError as e:
                raise CatalogError(
                    "unavailable", f"removed {name!r}, but could not read what it was: {e.strerror}"
                ) from None
            with self._lock:
                self._hashes.pop((name, st.st_size, st.st_mtime_ns), None)
            return item
        finally:
            f.close()

    def remove_partials(self) -> builtins.list[str]:
        """Delete uploads a crash left half written (the daemon calls it at start-up, before the
        reactor runs)."""
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
