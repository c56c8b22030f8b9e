"""A fast OTA device peer for the serving benchmark: a separate process, plain asyncio.

It plays the device side of the 3335 stream as fast as the socket allows, so that the app side is
what gets measured: per connection, it asks for the image window after window (forwards, like
phase 1, ``--window`` bytes each, 43008 = 42 KiB by default), sending the next READ header as soon
as the previous reply has fully arrived. Each reply is checked cheaply: its header must echo the
request (offset, size clamped at the end of the image, ``all_size`` 0, status and percent), its
checksum must equal the header byte sum plus the window's byte sum (computed once per window from
the peer's own mapping of the image, not with the codec under test), and its bytes must equal the
image's (one ``memcmp``). After the last window it sends OK and closes; on any mismatch it sends ERR
and closes, and the session counts as failed.

It listens on 127.0.0.1 (port 0 unless told otherwise), prints ``LISTENING <host> <port>``, serves
``--connections`` sessions, then prints one ``RESULT <json>`` line (a :class:`PeerSummary`) and
exits; ``--timeout`` bounds the whole run, and SIGTERM ends it early (still with its result).
``--workers N`` forks N processes that accept on the same listening socket, for when one process
can't keep up. ``--device-mbps`` paces each session like a real device.

Usage: ``python -m benchmarks.peer --image FILE --connections 8 [--workers 1] [--timeout 300]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import multiprocessing
import os
import queue
import random
import resource
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy

#: The default request window: the app's 42 KiB bound (``NET_BUF_MAX_SIZE``).
DEFAULT_WINDOW = 42 * 1024
HEADER_SIZE = 20
_HEADER = struct.Struct("<IIIIBBH")
STATUS_DOING, STATUS_OK, STATUS_ERR, STATUS_READ, STATUS_STOP = 0, 1, 2, 4, 8
#: The percent byte the peer sends in every READ (the device's value before all_size is known).
READ_PERCENT = 1


def device_header(status: int, seek: int = 0, size: int = 0, percent: int = 0) -> bytes:
    """A device -> app header; the checksum (byte sum of bytes 4..19) is computed here, on purpose
    not with the codec under test."""
    body = _HEADER.pack(0, seek, size, 0, status, percent, 0)
    return struct.pack("<I", sum(body[4:])) + body[4:]


class ImageWindows:
    """The image mapped read-only, with each window's byte sum computed once per process (every
    connection asks for the same windows, so verifying a reply costs a ``memcmp``)."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.size = len(self._map)
        self._sums: dict[tuple[int, int], int] = {}

    def window_sum(self, seek: int, length: int) -> int:
        key = (seek, length)
        total = self._sums.get(key)
        if total is None:
            window = numpy.frombuffer(self._map, dtype=numpy.uint8, count=length, offset=seek)
            total = self._sums[key] = int(window.sum(dtype=numpy.uint64)) & 0xFFFFFFFF
        return total

    def matches(self, seek: int, payload: bytearray | memoryview) -> bool:
        """Whether ``payload`` equals the image bytes at ``seek`` (bytes == bytes is a memcmp)."""
        return self._map[seek : seek + len(payload)] == bytes(payload)


@dataclass
class SessionReport:
    """What one connection achieved, sent from a worker to the parent."""

    ok: bool = False
    reason: str = ""
    bytes_verified: int = 0
    windows_verified: int = 0
    checksum_errors: int = 0
    byte_mismatches: int = 0
    #: The app's port of this connection, and when each READ was sent (``time.perf_counter``,
    #: CLOCK_MONOTONIC on Linux: the same clock in every process, so the app can join them).
    app_port: int = 0
    sent_at: list[float] = field(default_factory=list)
    #: Seconds from sending a READ header to the first / the last byte of its reply.
    first_byte: list[float] = field(default_factory=list)
    full_reply: list[float] = field(default_factory=list)


class DeviceSession:
    """One device session without I/O: which READ comes next, when, and whether a reply is right.

    Replies land directly in :attr:`view` (no copy in user space); the slack after the largest reply
    catches one that is longer than asked for."""

    def __init__(self, image: ImageWindows, window: int, interval: float = 0.0) -> None:
        self.image = image
        self.window = window
        #: Seconds between READs for a paced device (0: as fast as the replies come).
        self.interval = interval
        self.report = SessionReport()
        self.buffer = bytearray(HEADER_SIZE + window + 4096)
        self.view = memoryview(self.buffer)
        self.seek = 0
        self.length = min(window, image.size)
        self.sent_at = 0.0
        self.finished = False
        self._due: float | None = None

    @property
    def reply_size(self) -> int:
        """The bytes of a correct reply to the current READ."""
        return HEADER_SIZE + self.length

    def delay(self) -> float:
        """Seconds to wait before the current READ: 0 unless paced. A paced device sends READs on
        its own fixed schedule, one per interval from a random phase (devices started together still
        drift apart); the schedule, not the last send time, sets the next READ, so a late timer in
        this process doesn't bunch sessions together."""
        if not self.interval:
            return 0.0
        now = time.perf_counter()
        self._due = now + random.uniform(0.0, self.interval) if self._due is None else self._due + self.interval
        return max(0.0, self._due - now)

    def request(self) -> bytes:
        """The current READ header, stamped as sent now."""
        self.sent_at = time.perf_counter()
        self.report.sent_at.append(self.sent_at)
        return device_header(STATUS_READ, self.seek, self.length, READ_PERCENT)

    def first_byte_arrived(self) -> None:
        self.report.first_byte.append(time.perf_counter() - self.sent_at)

    def reply_arrived(self, filled: int) -> bool:
        """Check the ``filled`` bytes in :attr:`buffer` as the whole reply and move on to the next
        READ; False (and the session failed) if the reply is wrong."""
        self.report.full_reply.append(time.perf_counter() - self.sent_at)
        if filled != self.reply_size:
            return self.fail(f"the reply to READ {self.seek}+{self.length} is {filled} bytes, not {self.reply_size}")
        check, seek, size, all_size, status, percent, resv = _HEADER.unpack_from(self.buffer)
        if (seek, size, all_size, status, percent, resv) != (self.seek, self.length, 0, STATUS_READ, READ_PERCENT, 0):
            fields = (seek, size, all_size, status, percent, resv)
            return self.fail(f"the reply header {fields} does not echo READ {self.seek}+{self.length}")
        if not self.image.matches(seek, self.view[HEADER_SIZE:filled]):
            self.report.byte_mismatches += 1
            return self.fail(f"the reply to READ {seek}+{size} carries bytes that differ from the image")
        expected = (sum(self.view[4:HEADER_SIZE]) + self.image.window_sum(seek, size)) & 0xFFFFFFFF
        if check != expected:
            self.report.checksum_errors += 1
            return self.fail(f"the reply to READ {seek}+{size} has checksum {check:#x}, expected {expected:#x}")
        self.report.bytes_verified += size
        self.report.windows_verified += 1
        self.seek += size
        if self.seek >= self.image.size:
            self.finished = True
            self.report.ok = True
        else:
            self.length = min(self.window, self.image.size - self.seek)
        return True

    def fail(self, reason: str) -> bool:
        self.finished = True
        self.report.ok = False
        self.report.reason = reason
        return False

    def end_header(self) -> bytes:
        """OK (100 %) after the last window, ERR after a wrong reply."""
        return device_header(STATUS_OK, 0, 0, 100) if self.report.ok else device_header(STATUS_ERR)


class AsyncioDevicePeer(asyncio.BufferedProtocol):
    """A :class:`DeviceSession` on an asyncio connection (many sessions in one process)."""

    def __init__(self, session: DeviceSession, on_done: Callable[[SessionReport], None]) -> None:
        self.session = session
        self.on_done = on_done
        self.filled = 0
        self.reported = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.session.report.app_port = transport.get_extra_info("peername")[1]
        self._request()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.session.view[self.filled :]

    def buffer_updated(self, nbytes: int) -> None:
        session = self.session
        if session.finished:
            return
        if self.filled == 0:
            session.first_byte_arrived()
        self.filled += nbytes
        if self.filled < HEADER_SIZE:
            return
        if self.filled < session.reply_size:
            if session.buffer[16] == STATUS_STOP:
                session.fail("the app sent STOP")
                self._end()
            elif self.filled == len(session.buffer):
                session.fail("the app sent more than a reply")
                self._end()
            return
        if not session.reply_arrived(self.filled) or session.finished:
            self._end()
        else:
            self._request()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.session.finished:
            self.session.fail(f"the app closed the connection at offset {self.session.seek} ({exc or 'EOF'})")
        self._report()

    def _request(self) -> None:
        self.filled = 0
        delay = self.session.delay()
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._send)
        else:
            self._send()

    def _send(self) -> None:
        if not self.session.finished and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.session.request())

    def _end(self) -> None:
        assert self.transport is not None
        self.transport.write(self.session.end_header())
        self.transport.close()  # flushes the end header, then closes
        self._report()

    def _report(self) -> None:
        if not self.reported:
            self.reported = True
            self.on_done(self.session.report)


# -- processes ---------------------------------------------------------------------------------
def _worker(listener: socket.socket, image_path: str, window: int, interval: float, reports: Any) -> None:
    """One peer process: accept on the shared listening socket for ever (the parent ends it)."""
    image = ImageWindows(image_path)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: AsyncioDevicePeer(DeviceSession(image, window, interval), reports.put), sock=listener
        )
        async with server:
            await server.serve_forever()

    asyncio.run(serve())


@dataclass
class PeerSummary:
    """The peer's verdict over every session, printed as ``RESULT <json>``."""

    sessions: int
    sessions_ok: int
    bytes_verified: int
    windows_verified: int
    checksum_errors: int
    byte_mismatches: int
    failures: list[str]
    timed_out: bool
    stopped: bool  # ended early by SIGTERM
    workers: int
    cpu_seconds: float  # of the worker processes, user + system
    cpu_user_seconds: float
    #: Seconds from a READ header sent to the first / last byte of its reply, as the peer saw it.
    first_byte_p50: float | None
    first_byte_p99: float | None
    full_reply_p50: float | None
    full_reply_p99: float | None


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` percentile (0..100) of ``values``, or None for no values."""
    if not values:
        return None
    return float(numpy.percentile(numpy.asarray(values), q))


def run_peer(
    image_path: str,
    connections: int,
    workers: int,
    window: int,
    timeout: float,
    port: int = 0,
    dump: str | None = None,
    device_mbps: float = 0.0,
) -> PeerSummary:
    """Listen, announce the port on stdout, serve ``connections`` sessions (or until ``timeout``).
    With ``dump``, also write each session's app port and READ send times there (JSON). With
    ``device_mbps``, each session asks for at most that many MB (10^6 bytes) per second."""
    interval = window / (device_mbps * 1_000_000) if device_mbps > 0 else 0.0
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(max(128, connections))
    listener.setblocking(False)
    context = multiprocessing.get_context("fork")
    reports = context.Queue()
    processes = [
        context.Process(target=_worker, args=(listener, image_path, window, interval, reports), daemon=True)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    # SIGTERM (after the fork: the workers keep the default) ends the run early, with a result.
    stopped: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    host, bound_port = listener.getsockname()
    print(f"LISTENING {host} {bound_port}", flush=True)

    collected: list[SessionReport] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    while len(collected) < connections and not stopped:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        try:
            collected.append(reports.get(timeout=min(remaining, 0.2)))
        except queue.Empty:
            if not any(p.is_alive() for p in processes):
                break
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
    listener.close()
    if dump:
        with open(dump, "w") as f:
            json.dump([{"app_port": r.app_port, "sent_at": r.sent_at} for r in collected], f)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    first = [t for r in collected for t in r.first_byte]
    full = [t for r in collected for t in r.full_reply]
    return PeerSummary(
        sessions=len(collected),
        sessions_ok=sum(r.ok for r in collected),
        bytes_verified=sum(r.bytes_verified for r in collected),
        windows_verified=sum(r.windows_verified for r in collected),
        checksum_errors=sum(r.checksum_errors for r in collected),
        byte_mismatches=sum(r.byte_mismatches for r in collected),
        failures=sorted({r.reason for r in collected if not r.ok})[:20],
        timed_out=timed_out,
        stopped=bool(stopped),
        workers=workers,
        cpu_seconds=children.ru_utime + children.ru_stime,
        cpu_user_seconds=children.ru_utime,
        first_byte_p50=percentile(first, 50),
        first_byte_p99=percentile(first, 99),
        full_reply_p50=percentile(full, 50),
        full_reply_p99=percentile(full, 99),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="the image file the app serves")
    parser.add_argument("--connections", type=int, required=True, help="sessions to serve before exiting")
    parser.add_argument("--workers", type=int, default=1, help="peer processes accepting on the one socket")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW, help="bytes per READ (default 43008)")
    parser.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: any free port)")
    parser.add_argument(
        "--device-mbps",
        type=float,
        default=0.0,
        help="pace each session to this many MB/s, like a real device (default: no pacing)",
    )
    parser.add_argument("--dump", metavar="FILE", help="write each session's app port and READ send times (JSON)")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.workers < 1 or not 0 < args.window <= DEFAULT_WINDOW or args.device_mbps < 0:
        parser.error("--connections and --workers must be at least 1, --window 1..43008, --device-mbps >= 0")
    if not os.path.isfile(args.image) or os.path.getsize(args.image) == 0:
        parser.error(f"--image {args.image} is not a non-empty file")
    summary = run_peer(
        args.image, args.connections, args.workers, args.window, args.timeout, args.port, args.dump, args.device_mbps
    )
    print("RESULT " + json.dumps(asdict(summary)), flush=True)
    return 0 if summary.sessions_ok == args.connections and not summary.timed_out else 1


if __name__ == "__main__":
    sys.exit(main())
