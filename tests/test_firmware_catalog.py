"""``FirmwareCatalog``: listing, adding and removing images in a real temporary ``firmware_dir``.

Its blocking work runs on real threads (:class:`Threads`, each call on a thread of its own, when
the test says), the test's own thread standing for the reactor's: so a test can put a job's taking
of a name between two steps of an upload, and :class:`Jobs` (the job queue's view) can check it is
only ever asked on the reactor's thread."""

from __future__ import annotations

import binascii
import errno
import hashlib
import importlib.util
import io
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from netota_daemon.daemon.firmware_catalog import CatalogError, FirmwareCatalog, check_name
from tests.daemon_fakes import fired

# wire/firmware_kind.py comes with the simulator's image kinds; until it is in the tree the catalogue
# lists no kind (None), which is what these tests then expect.
HAVE_KIND = importlib.util.find_spec("netota_daemon.wire.firmware_kind") is not None

REACTOR_THREAD = threading.get_ident()  # pytest runs the tests on the thread that imports them


class Threads:
    """``run_blocking``: each call on a new thread, joined, its result given on the test's thread; at
    once, or (``hold``) when the test runs it with :meth:`run_next`."""

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self.pending: deque[tuple[Callable[[], Any], Deferred[Any]]] = deque()
        self.ran_on: set[int] = set()

    def __call__(self, call: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((call, d))
        if not self.hold:
            self.run_all()
        return d

    def run_next(self) -> None:
        call, d = self.pending.popleft()
        outcome: list[tuple[bool, Any]] = []

        def run() -> None:
            self.ran_on.add(threading.get_ident())
            try:
                outcome.append((True, call()))
            except BaseException as e:
                outcome.append((False, e))

        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
        ok, value = outcome[0]
        if ok:
            d.callback(value)
        else:
            d.errback(Failure(value))

    def run_all(self) -> None:
        while self.pending:
            self.run_next()


class Jobs:
    """The job queue's view of the firmware names in use: asked on the reactor's thread only."""

    def __init__(self, *names: str) -> None:
        self.names = set(names)
        self.asked = 0

    def __call__(self) -> list[str]:
        assert threading.get_ident() == REACTOR_THREAD, "in_use was called off the reactor thread"
        self.asked += 1
        return sorted(self.names)


def make_catalog(tmp_path: Any, jobs: Jobs | None = None, threads: Threads | None = None, **kw: Any) -> FirmwareCatalog:
    return FirmwareCatalog(tmp_path, threads or Threads(), in_use=jobs or Jobs(), **kw)


def done(work: Coroutine[Any, Any, Any] | Deferred[Any]) -> Any:
    """The result of a catalogue call whose blocking work has all run (its CatalogError raised)."""
    return fired(work if isinstance(work, Deferred) else Deferred.fromCoroutine(work))


def refused(work: Coroutine[Any, Any, Any] | Deferred[Any]) -> CatalogError:
    with pytest.raises(CatalogError) as e:
        done(work)
    return e.value


def jl_file_head(name: str, size: int) -> bytes:
    """A 32-byte JL file head (double backup) with a valid CRC-16/XMODEM over bytes 2..31."""
    body = struct.pack("<HHIIBBH16s", 0, 0, 0, size, 0, 0, 0, name.encode())[2:]
    return binascii.crc_hqx(body, 0).to_bytes(2, "little") + body


class Interrupted(Exception):
    pass


class BrokenBody(io.RawIOBase):
    """A body that ends in an error after ``good`` bytes (the client went away mid-upload)."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise Interrupted("connection lost")
        chunk = min(self.left, 100_000 if n < 0 else n)
        self.left -= chunk
        return b"x" * chunk


def visible(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_list_names_sizes_hashes_and_kinds(tmp_path):
    single = b"NOTASIM\x01" + (100).to_bytes(4, "little") + bytes(4) + b"y" * 84
    (tmp_path / "a.bin").write_bytes(single)
    (tmp_path / "b.bin").write_bytes(jl_file_head("update_data", 64) + b"z" * 32)
    (tmp_path / "junk.txt").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".upload-x.partial").write_bytes(b"half")
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    items = {i.name: i for i in done(make_catalog(tmp_path).list())}
    assert sorted(items) == ["a.bin", "b.bin", "junk.txt"]
    assert items["a.bin"].size == 100 and items["a.bin"].sha256 == hashlib.sha256(single).hexdigest()
    assert items["a.bin"].modified == pytest.approx(os.stat(tmp_path / "a.bin").st_mtime)
    kinds = {name: item.kind for name, item in items.items()}
    if HAVE_KIND:
        assert kinds == {"a.bin": "single_backup", "b.bin": "double_backup", "junk.txt": "unknown"}
    else:
        assert kinds == {"a.bin": None, "b.bin": None, "junk.txt": None}
    assert set(items["a.bin"].to_json()) == {"name", "size", "sha256", "modified", "kind", "description", "version"}


def test_add_writes_the_whole_body_under_its_name_and_nothing_else(tmp_path):
    catalog = make_catalog(tmp_path)
    data = os.urandom(1_000_000)
    item = done(catalog.add("new.ufw", io.BytesIO(data)))
    assert (tmp_path / "new.ufw").read_bytes() == data
    assert item.sha256 == hashlib.sha256(data).hexdigest() and item.size == len(data)
    assert item.modified == os.stat(tmp_path / "new.ufw").st_mtime
    assert visible(tmp_path) == ["new.ufw"]
    assert done(catalog.list()) == [item] == [done(catalog.get("new.ufw"))]
    second = done(catalog.add("new.ufw", io.BytesIO(b"second")))  # PUT replaces
    assert (tmp_path / "new.ufw").read_bytes() == b"second"
    assert second.sha256 == hashlib.sha256(b"second").hexdigest() and done(catalog.list()) == [second]


def test_an_uploaded_image_is_identified_from_its_copy_as_a_listing_identifies_it(tmp_path):
    small = b"NOTASIM\x01" + (100).to_bytes(4, "little") + bytes(4) + b"y" * 84
    large = jl_file_head("update_data", 20_000_000) + bytes(20_000_000 - 32)  # past the size read whole
    catalog = make_catalog(tmp_path, max_upload=30_000_000)
    added = [done(catalog.add(name, io.BytesIO(data))) for name, data in (("s.bin", small), ("l.bin", large))]
    fresh = {i.name: i for i in done(make_catalog(tmp_path).list())}  # nothing remembered: read from disk
    assert {i.name: i for i in added} == fresh
    if HAVE_KIND:
        assert (fresh["s.bin"].kind, fresh["l.bin"].kind) == ("single_backup", "double_backup")


def test_an_interrupted_or_oversized_upload_leaves_nothing_behind(tmp_path):
    catalog = make_catalog(tmp_path, max_upload=500_000)
    (tmp_path / "keep.bin").write_bytes(b"old")
    with pytest.raises(Interrupted):
        done(catalog.add("keep.bin", BrokenBody(300_000)))
    assert refused(catalog.add("big.bin", io.BytesIO(b"x" * 500_001))).reason == "too_large"
    assert done(catalog.add("limit.bin", io.BytesIO(b"x" * 500_000))).size == 500_000
    os.unlink(tmp_path / "limit.bin")
    assert refused(catalog.add("empty.bin", io.BytesIO(b""))).reason == "empty"
    assert visible(tmp_path) == ["keep.bin"]
    assert (tmp_path / "keep.bin").read_bytes() == b"old"


class FailingBody(io.BytesIO):
    """A body whose bytes can't be read past the first chunk: an I/O error (of the disk the
    request body was spooled to), as a full disk fails the copy's writes."""

    def __init__(self) -> None:
        super().__init__(b"x" * 200_000)

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() > 0:
            raise OSError(errno.EIO, "Input/output error")
        return super().read(size)


def test_an_upload_that_meets_an_io_error_is_refused_as_unavailable_and_leaves_nothing(tmp_path):
    catalog = make_catalog(tmp_path)
    error = refused(catalog.add("v2.bin", FailingBody()))
    assert error.reason == "unavailable" and "Input/output error" in error.message
    assert visible(tmp_path) == [] and os.listdir(tmp_path) == []  # no partial either


def test_a_file_in_use_is_neither_replaced_nor_removed(tmp_path):
    (tmp_path / "v2.bin").write_bytes(b"image")
    jobs = Jobs("v2.bin")
    threads = Threads()
    catalog = make_catalog(tmp_path, jobs, threads)
    for work in (catalog.remove("v2.bin"), catalog.add("v2.bin", io.BytesIO(b"new"))):
        error = refused(work)
        assert error.reason == "in_use" and "v2.bin" in error.message
    assert (tmp_path / "v2.bin").read_bytes() == b"image"
    assert visible(tmp_path) == ["v2.bin"]
    jobs.names.clear()
    assert done(catalog.remove("v2.bin")).sha256 == hashlib.sha256(b"image").hexdigest()
    assert visible(tmp_path) == []
    assert refused(catalog.remove("v2.bin")).reason == "not_found"
    # Asked before anything was done, on the reactor's thread; the files were touched on others.
    assert jobs.asked == 4 and threads.ran_on and REACTOR_THREAD not in threads.ran_on


def test_a_job_that_takes_the_name_while_the_body_is_copied_gets_the_upload_refused(tmp_path):
    (tmp_path / "v2.bin").write_bytes(b"old image")
    jobs = Jobs()
    threads = Threads(hold=True)
    catalog = make_catalog(tmp_path, jobs, threads)
    adding = Deferred.fromCoroutine(catalog.add("v2.bin", io.BytesIO(b"new image")))
    assert len(threads.pending) == 1 and jobs.asked == 1  # the name was free: the copy waits for its thread
    jobs.names.add("v2.bin")  # a job takes the name (on the reactor) while the body is copied
    threads.run_next()  # the copy, whole and fsynced: then the last check, before the rename
    assert jobs.asked == 2
    threads.run_all()  # the copy is deleted
    error = refused(adding)
    assert error.reason == "in_use" and "v2.bin" in error.message
    assert (tmp_path / "v2.bin").read_bytes() == b"old image"
    assert visible(tmp_path) == ["v2.bin"]  # no temporary file left


def test_a_job_that_takes_the_name_after_the_rename_sees_the_new_image(tmp_path):
    """The last check and the rename happen together on the reactor: once the upload's thread work
    is over, only the directory's fsync is left, and the name already holds the new bytes."""
    jobs = Jobs()
    threads = Threads(hold=True)
    catalog = make_catalog(tmp_path, jobs, threads)
    adding = Deferred.fromCoroutine(catalog.add("v3.bin", io.BytesIO(b"new image")))
    threads.run_next()  # the copy; the check and the rename follow on this (the reactor's) thread
    assert (tmp_path / "v3.bin").read_bytes() == b"new image" and len(threads.pending) == 1
    jobs.names.add("v3.bin")
    threads.run_all()
    assert done(adding).sha256 == hashlib.sha256(b"new image").hexdigest()


def test_a_removal_is_decided_and_done_on_the_reactor_and_tells_what_it_removed(tmp_path):
    (tmp_path / "v1.bin").write_bytes(b"first image")
    threads = Threads(hold=True)
    catalog = make_catalog(tmp_path, Jobs(), threads)
    removing = Deferred.fromCoroutine(catalog.remove("v1.bin"))
    assert visible(tmp_path) == []  # gone before any thread ran: no job could take it in between
    threads.run_all()  # what it was, read from the file still open
    item = done(removing)
    assert (item.name, item.size, item.sha256) == ("v1.bin", 11, hashlib.sha256(b"first image").hexdigest())


def test_only_regular_files_are_removed(tmp_path):
    outside = tmp_path.parent / (tmp_path.name + "-target.bin")
    outside.write_bytes(b"outside")
    (tmp_path / "link.bin").symlink_to(outside)
    (tmp_path / "dir.bin").mkdir()
    os.mkfifo(tmp_path / "fifo.bin")
    catalog = make_catalog(tmp_path)
    for name in ("link.bin", "dir.bin", "fifo.bin"):
        assert refused(catalog.remove(name)).reason == "not_found"
        assert refused(catalog.get(name)).reason == "not_found"
    assert visible(tmp_path) == ["dir.bin", "fifo.bin", "link.bin"] and outside.read_bytes() == b"outside"


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc/passwd",
        "a/b.bin",
        "/abs.bin",
        "..\\x",
        ".hidden",
        "a\x00b",
        "tab\tname",
        "x" * 256,
        "\ud800",
    ],
)
def test_bad_names_are_refused_before_anything_is_touched(tmp_path, name):
    leaves = "/" in name or "\\" in name or name in (".", "..")
    for work in (make_catalog(tmp_path).add(name, io.BytesIO(b"data")), make_catalog(tmp_path).remove(name)):
        assert refused(work).reason == ("outside" if leaves else "bad_name")
    assert visible(tmp_path) == []
    with pytest.raises(CatalogError):
        check_name(name)


def test_a_symlink_or_directory_name_is_not_replaced(tmp_path):
    outside = tmp_path.parent / (tmp_path.name + "-outside.bin")
    outside.write_bytes(b"outside")
    (tmp_path / "link.bin").symlink_to(outside)
    (tmp_path / "dir.bin").mkdir()
    catalog = make_catalog(tmp_path)
    for name in ("link.bin", "dir.bin"):
        assert refused(catalog.add(name, io.BytesIO(b"data"))).reason == "bad_name"
    assert outside.read_bytes() == b"outside"


def test_partials_left_by_a_crash_are_removed_at_start(tmp_path):
    (tmp_path / ".upload-abc.partial").write_bytes(b"half")
    (tmp_path / "v1.bin").write_bytes(b"x")
    assert make_catalog(tmp_path).remove_partials() == [".upload-abc.partial"]
    assert visible(tmp_path) == ["v1.bin"]
