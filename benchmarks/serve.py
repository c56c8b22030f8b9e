"""The serving benchmark: the daemon's OTA serving path against a fast device peer.

Each scenario (an image size, a number N of concurrent streams) runs in a fresh app process, so
that CPU time and resident memory belong to that scenario alone. The app process:

- opens the image once with :func:`~netota_daemon.firmware.open_image` and touches every page, so
  that the shared image buffer is in the baseline memory figure, not in any job's;
- starts :mod:`benchmarks.peer` (a separate process) and runs one unmeasured warm-up session;
- connects N streams to the peer, each an
  :class:`~netota_daemon.protocols.ota_stream.OtaStreamProtocol`, unchanged, as a job runs it; each
  stream slot runs whole sessions (image start to OK) one after another until the scenario has
  served at least ``--min-mib``, so that short runs are still measurable; always N at once;
- measures aggregate MB/s (10^6 bytes per second of wall time); the app process's CPU seconds
  (``getrusage``, user + system) per GB (10^9 bytes) served; the time from a READ header reaching
  ``dataReceived`` to its reply's ``transport.write`` (p50/p99), and from the peer sending that
  READ to the reply's write (the same CLOCK_MONOTONIC in both processes), which adds the time the
  READ waited in the kernel and the reactor; and resident memory per concurrent job: ``VmHWM``
  (reset before the run) once the first N sessions have all run together, minus ``VmRSS`` before
  connecting, divided by N (and the anonymous part alone, sampled every 20 ms);
- takes the peer's verdict: every byte of every reply verified, every session ended with OK.

Optionally one more scenario paces each device (``--paced-mbps``), like a real one, to show the
latency of a full rack that is not saturated by the benchmark itself.

Usage: ``python -m benchmarks.serve [--streams 1,8,64] [--image-mib 4,64] [--json FILE]``
(``make benchmark`` runs the defaults). Every scenario and the peer are bounded by ``--timeout``.
Exit status 0 only if every session of every scenario was served and verified.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from netota_daemon.firmware import open_image
from netota_daemon.protocols.ota_stream import (
    OtaStreamProtocol,
    StreamEnd,
    StreamProgress,
    StreamResult,
    StreamSettings,
)

#: One READ window: the app's 42 KiB bound.
WINDOW = 42 * 1024
MIB = 1024 * 1024
#: Bytes per "MB" and "GB" in the report.
MB = 1_000_000
GB = 1_000_000_000

ROOT = Path(__file__).resolve().parent.parent


def _child_env() -> dict[str, str]:
    """This environment, with the source tree first on PYTHONPATH."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


# -- measurements of the current process ----------------------------------------------------------
def proc_status() -> dict[str, int]:
    """The ``kB`` fields of /proc/self/status (VmRSS, VmHWM, RssAnon, RssFile...), in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                values[name] = int(parts[0]) * 1024
    return values


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where that isn't allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- one scenario, in its own process -------------------------------------------------------------
class RequestTimes:
    """When each READ reached ``dataReceived`` and when its reply was written, in arrays allocated
    (and touched) before the baseline memory figure, so that measuring costs no memory per job."""

    def __init__(self, capacity: int) -> None:
        self.arrived = numpy.ones(capacity)
        self.written = numpy.ones(capacity)
        self._next = 0
        #: One (app port, first index, replies written) per measured session.
        self.sessions: list[list[int]] = []

    def claim(self, port: int, count: int) -> list[int]:
        """Room for ``count`` replies of the session on ``port``."""
        if self._next + count > len(self.arrived):
            raise RuntimeError("more sessions than planned")
        session = [port, self._next, 0]
        self._next += count
        self.sessions.append(session)
        return session

    def service_times(self) -> numpy.ndarray:
        """``dataReceived`` -> ``write`` for every reply written."""
        return numpy.concatenate(
            [self.written[first : first + n] - self.arrived[first : first + n] for _, first, n in self.sessions]
            or [numpy.empty(0)]
        )

    def join_peer(self, peer_sessions: list[dict[str, Any]]) -> tuple[numpy.ndarray, numpy.ndarray, int]:
        """Match each session with the peer's record of it (same app port, READs sent just before
        they arrived; ``perf_counter`` is CLOCK_MONOTONIC, one clock for both processes) and return
        (READ sent -> reply written, READ sent -> dataReceived, sessions that could not be matched)."""
        if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
            return numpy.empty(0), numpy.empty(0), len(self.sessions)  # no clock shared with the peer
        by_port: dict[int, list[list[float]]] = {}
        for record in peer_sessions:
            by_port.setdefault(record["app_port"], []).append(record["sent_at"])
        wire, queued, unmatched = [], [], 0
        for port, first, n in self.sessions:
            arrived = self.arrived[first : first + n]
            best = None
            for sent_at in by_port.get(port, []):
                if len(sent_at) < n or n == 0:
                    continue
                sent = numpy.asarray(sent_at[:n])
                lag = arrived - sent
                if lag.min() >= 0 and (best is None or lag[0] < best[0]):
                    best = (lag[0], sent)
            if best is None:
                unmatched += 1
                continue
            wire.append(self.written[first : first + n] - best[1])
            queued.append(arrived - best[1])
        empty = [numpy.empty(0)]
        return numpy.concatenate(wire or empty), numpy.concatenate(queued or empty), unmatched


class TimedOtaStream(OtaStreamProtocol):
    """The daemon's stream protocol, unchanged, with each READ timed from its arrival in
    ``dataReceived`` to its reply's ``transport.write``."""

    def __init__(self, *args: Any, times: RequestTimes | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.times = times
        self.arrived: float | None = None
        self._session: list[int] | None = None
        self._capacity = 0

    def makeConnection(self, transport: Any) -> None:
        if self.times is not None:
            self._capacity = -(-self.image.size // WINDOW)
            self._session = self.times.claim(transport.getHost().port, self._capacity)
            transport = _WriteTimer(transport, self)
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.arrived = time.perf_counter()
        super().dataReceived(data)
        self.arrived = None

    def reply_written(self) -> None:
        written = time.perf_counter()
        session, times = self._session, self.times
        if self.arrived is None or session is None or times is None or session[2] >= self._capacity:
            return
        index = session[1] + session[2]
        times.arrived[index] = self.arrived
        times.written[index] = written
        session[2] += 1
        self.arrived = None


class _WriteTimer:
    """Wraps a transport so that each write tells the protocol when it happened."""

    def __init__(self, transport: Any, protocol: TimedOtaStream) -> None:
        self._transport = transport
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._transport.write(data)
        self._protocol.reply_written()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


@dataclass
class ScenarioReport:
    """Every figure of one scenario (times in seconds, sizes in bytes)."""

    image_bytes: int
    streams: int
    device_mbps: float  # the peer's pace per session, MB/s; 0: as fast as the socket allows
    sessions: int
    sessions_ok: int
    bytes_served: int
    wall_seconds: float
    mb_per_second: float
    app_cpu_seconds: float
    app_cpu_seconds_per_gb: float
    app_cpu_utilisation: float  # CPU seconds / wall seconds (1.0 = one core busy)
    #: READ in ``dataReceived`` -> its reply written (the app's own service time).
    reply_latency_samples: int
    reply_latency_p50: float | None
    reply_latency_p99: float | None
    reply_latency_max: float | None
    #: READ sent by the peer -> its reply written by the app (adds the time the READ waited in the
    #: kernel and in the reactor for its turn), and the waiting part alone.
    wire_latency_samples: int
    wire_latency_p50: float | None
    wire_latency_p99: float | None
    queue_delay_p50: float | None
    queue_delay_p99: float | None
    unmatched_sessions: int
    rss_before: int
    #: Peaks while the first N sessions ran together (what N concurrent jobs cost), per job, and
    #: peaks over the whole run (which also hold what the allocator kept from ended sessions).
    rss_peak: int
    rss_per_job: float
    anon_before: int
    anon_peak: int
    anon_per_job: float
    rss_peak_run: int
    anon_peak_run: int
    peak_is_hwm: bool
    peer: dict[str, Any]
    verified: bool  # every session OK on both sides and the peer checked every byte
    failures: list[str]


def _read_line(stream: Any, timeout: float) -> str:
    """One line from a subprocess pipe, waiting at most ``timeout`` seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no line within {timeout:g} s")
    return stream.readline()


def _p(values: numpy.ndarray, q: float) -> float | None:
    return float(numpy.percentile(values, q)) if len(values) else None


def run_scenario(
    image_path: str,
    streams: int,
    sessions_per_stream: int,
    peer_workers: int,
    timeout: float,
    device_mbps: float = 0.0,
) -> ScenarioReport:
    """Serve ``streams`` concurrent streams of ``sessions_per_stream`` sessions each, after one
    unmeasured warm-up session; blocks and runs the reactor (so: once per process)."""
    # Warnings and errors to stderr, as the daemon logs. Until logging begins, Twisted keeps every
    # event in memory, which would show up as memory per session.
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    image = open_image(image_path)
    image.sha256()  # touch every page: the shared image buffer belongs to the baseline, not to a job
    total_sessions = streams * sessions_per_stream
    times = RequestTimes(total_sessions * -(-image.size // WINDOW))
    dump = tempfile.NamedTemporaryFile(prefix="netota-peer-", suffix=".json", delete=False)
    dump.close()
    peer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "benchmarks.peer",
            "--image",
            image_path,
            "--connections",
            str(total_sessions + 1),
            "--workers",
            str(peer_workers),
            "--window",
            str(WINDOW),
            "--timeout",
            str(timeout),
            "--dump",
            dump.name,
            "--device-mbps",
            str(device_mbps),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=_child_env(),
    )
    results: list[StreamResult] = []
    measured: dict[str, Any] = {}
    failures: list[str] = []
    peer_summary: dict[str, Any] = {}
    peer_sessions: list[dict[str, Any]] = []
    try:
        first = _read_line(peer.stdout, 30.0).split()
        if len(first) != 3 or first[0] != "LISTENING":
            raise RuntimeError(f"the peer did not start: {' '.join(first)!r}")
        host, port = first[1], int(first[2])
        settings = StreamSettings(first_header_timeout=30.0, receive_timeout=5.0, max_receive_timeouts=2)
        last_progress: list[StreamProgress] = []

        def on_progress(progress: StreamProgress) -> None:
            # The daemon's job turns each progress report into an event; keep the report alive.
            last_progress[:] = [progress]

        async def session(reactor: Any, endpoint: Any, measure: bool) -> StreamResult:
            protocol = TimedOtaStream(
                image, reactor, settings, on_progress=on_progress, times=times if measure else None
            )
            await connectProtocol(endpoint, protocol)
            return await protocol.done

        anon_peak = [0]
        first_round = [0]

        def sample_anon() -> None:
            anon_peak[0] = max(anon_peak[0], proc_status().get("RssAnon", 0))

        def peak_now() -> int:
            status = proc_status()
            return status.get("VmHWM", 0) if measured.get("peak_is_hwm") else status.get("VmRSS", 0)

        def first_session_done() -> None:
            # Every slot has run one whole session, all N at once: the peak so far is the cost of N
            # concurrent jobs. (Later rounds only add what the allocator keeps from ended sessions.)
            first_round[0] += 1
            if first_round[0] == streams:
                sample_anon()
                measured.update(rss_peak=peak_now(), anon_peak=anon_peak[0])

        async def slot(reactor: Any, endpoint: Any) -> None:
            for number in range(sessions_per_stream):
                result = await session(reactor, endpoint, True)
                results.append(result)
                if number == 0:
                    first_session_done()
                if result.end is not StreamEnd.OK:
                    return

        async def scenario(reactor: Any) -> None:
            endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=30)
            warm_up = await session(reactor, endpoint, False)
            if warm_up.end is not StreamEnd.OK:
                raise RuntimeError(f"the warm-up session failed: {warm_up.message}")
            before = proc_status()
            measured["peak_is_hwm"] = reset_peak_rss()
            sampler = task.LoopingCall(sample_anon)
            sampler.clock = reactor
            sampler.start(0.02)
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            slots = defer.gatherResults(
                [defer.Deferred.fromCoroutine(slot(reactor, endpoint)) for _ in range(streams)], consumeErrors=True
            )
            slots.addTimeout(timeout, reactor)
            try:
                await slots
            finally:
                t1, cpu1 = time.perf_counter(), cpu_seconds()
                sampler.stop()
                sample_anon()
                measured.update(
                    wall=t1 - t0,
                    cpu=cpu1 - cpu0,
                    rss_before=before.get("VmRSS", 0),
                    rss_peak_run=peak_now(),
                    anon_before=before.get("RssAnon", 0),
                    anon_peak_run=anon_peak[0],
                )

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(scenario(reactor)))
        except SystemExit as e:
            if e.code:
                failures.append(f"the app side failed (exit {e.code}; see the log above)")
        if failures or len(results) < total_sessions or any(r.end is not StreamEnd.OK for r in results):
            peer.send_signal(signal.SIGTERM)  # sessions will not come: the peer reports what it saw
        try:
            out, _ = peer.communicate(timeout=timeout)
            for line in out.splitlines():
                if line.startswith("RESULT "):
                    peer_summary = json.loads(line[len("RESULT ") :])
            if peer_summary:
                with open(dump.name) as f:
                    peer_sessions = json.load(f)
        except subprocess.TimeoutExpired:
            failures.append("the peer did not finish in time")
    finally:
        if peer.poll() is None:
            peer.terminate()
            peer.wait(10)
        os.unlink(dump.name)

    served = sum(r.bytes_served for r in results)
    ok = sum(r.end is StreamEnd.OK for r in results)
    failures += sorted({f"{r.end.value}: {r.message}" for r in results if r.end is not StreamEnd.OK})
    if not peer_summary:
        failures.append("the peer gave no result")
    else:
        failures += peer_summary.get("failures", [])
    # The peer verified the warm-up session too.
    verified = (
        not failures
        and ok == total_sessions
        and peer_summary.get("sessions_ok") == total_sessions + 1
        and peer_summary.get("bytes_verified") == served + image.size == (total_sessions + 1) * image.size
    )
    wall, cpu = measured.get("wall", 0.0), measured.get("cpu", 0.0)
    rss_before, rss_peak = measured.get("rss_before", 0), measured.get("rss_peak", 0)
    anon_before, anon_peak = measured.get("anon_before", 0), measured.get("anon_peak", 0)
    service = times.service_times()
    wire, queued, unmatched = times.join_peer(peer_sessions)
    return ScenarioReport(
        image_bytes=image.size,
        streams=streams,
        device_mbps=device_mbps,
        sessions=total_sessions,
        sessions_ok=ok,
        bytes_served=served,
        wall_seconds=wall,
        mb_per_second=served / MB / wall if wall else 0.0,
        app_cpu_seconds=cpu,
        app_cpu_seconds_per_gb=cpu / (served / GB) if served else 0.0,
        app_cpu_utilisation=cpu / wall if wall else 0.0,
        reply_latency_samples=len(service),
        reply_latency_p50=_p(service, 50),
        reply_latency_p99=_p(service, 99),
        reply_latency_max=float(service.max()) if len(service) else None,
        wire_latency_samples=len(wire),
        wire_latency_p50=_p(wire, 50),
        wire_latency_p99=_p(wire, 99),
        queue_delay_p50=_p(queued, 50),
        queue_delay_p99=_p(queued, 99),
        unmatched_sessions=unmatched,
        rss_before=rss_before,
        rss_peak=rss_peak,
        rss_per_job=(rss_peak - rss_before) / streams,
        anon_before=anon_before,
        anon_peak=anon_peak,
        anon_per_job=(anon_peak - anon_before) / streams,
        rss_peak_run=measured.get("rss_peak_run", 0),
        anon_peak_run=measured.get("anon_peak_run", 0),
        peak_is_hwm=bool(measured.get("peak_is_hwm")),
        peer=peer_summary,
        verified=verified,
        failures=failures,
    )


# -- the whole benchmark ----------------------------------------------------------------------------
def make_image(directory: Path, size: int) -> Path:
    """A reproducible pseudo-random image of ``size`` bytes."""
    path = directory / f"image-{size}.ufw"
    path.write_bytes(numpy.random.default_rng(size).bytes(size))
    return path


def sessions_per_stream(image_size: int, streams: int, min_bytes: int) -> int:
    return max(1, math.ceil(min_bytes / (image_size * streams)))


def run_in_subprocess(
    image: Path,
    streams: int,
    sessions: int,
    peer_workers: int,
    timeout: float,
    device_mbps: float = 0.0,
) -> ScenarioReport:
    """One scenario in a fresh interpreter (its own reactor, CPU time and memory)."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.serve",
        "--one-scenario",
        "--image",
        str(image),
        "--streams",
        str(streams),
        "--sessions",
        str(sessions),
        "--peer-workers",
        str(peer_workers),
        "--timeout",
        str(timeout),
        "--device-mbps",
        str(device_mbps),
    ]
    done = subprocess.run(
        command, stdout=subprocess.PIPE, text=True, cwd=ROOT, timeout=timeout * 2 + 60, env=_child_env()
    )
    for line in done.stdout.splitlines():
        if line.startswith("REPORT "):
            return ScenarioReport(**json.loads(line[len("REPORT ") :]))
    raise RuntimeError(f"the scenario ({streams} streams, {image}) gave no report:\n{done.stdout}")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.3f}"


def _pace(device_mbps: float) -> str:
    return "fast" if not device_mbps else f"{device_mbps:g}MB/s"


def format_table(reports: list[ScenarioReport]) -> str:
    """The figures as a table: MB/s aggregate; CPU s per GB and CPU % (of one core) of the app;
    reply p50/p99 (READ in ``dataReceived`` -> reply written); wire p50/p99 (READ sent by the
    peer -> reply written); resident memory per job (all, and anonymous only)."""
    head = (
        f"{'image':>8} {'streams':>7} {'device':>8} {'sessions':>8} {'MB/s':>7} {'CPU s/GB':>8} {'CPU%':>4} "
        f"{'reply p50':>9} {'p99 ms':>7} {'wire p50':>8} {'p99 ms':>7} {'RSS/job':>8} {'anon/job':>8}  verified"
    )
    lines = [head]
    for r in reports:
        lines.append(
            f"{r.image_bytes / MIB:>6.4g}Mi {r.streams:>7} {_pace(r.device_mbps):>8} {r.sessions:>8} "
            f"{r.mb_per_second:>7.1f} "
            f"{r.app_cpu_seconds_per_gb:>8.2f} {100 * r.app_cpu_utilisation:>4.0f} {_ms(r.reply_latency_p50):>9} "
            f"{_ms(r.reply_latency_p99):>7} {_ms(r.wire_latency_p50):>8} {_ms(r.wire_latency_p99):>7} "
            f"{r.rss_per_job / 1024:>6.0f}Ki {r.anon_per_job / 1024:>6.0f}Ki  "
            f"{'yes' if r.verified else 'NO: ' + '; '.join(r.failures)[:300]}"
        )
    return "\n".join(lines)


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _size_list(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive sizes in MiB separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=_int_list, default=[1, 8, 64], help="concurrent streams, e.g. 1,8,64")
    parser.add_argument("--image-mib", type=_size_list, default=[4.0, 64.0], help="image sizes in MiB, e.g. 4,64")
    parser.add_argument(
        "--min-mib",
        type=float,
        default=512.0,
        help="serve at least this much per scenario, repeating whole sessions (default 512)",
    )
    parser.add_argument(
        "--paced-mbps",
        type=float,
        default=2.0,
        help="add one scenario: the most streams on the smallest image, each device paced to "
        "this many MB/s (a realistic rack, for latency); 0 to skip (default 2)",
    )
    parser.add_argument("--peer-workers", type=int, default=1, help="device peer processes (default 1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on each scenario, seconds")
    parser.add_argument("--repeat", type=int, default=1, help="run every scenario this many times (default 1)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE as JSON")
    # Internal: run one scenario in this process and print its report.
    parser.add_argument("--one-scenario", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device-mbps", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer_workers < 1 or args.repeat < 1:
        parser.error("--peer-workers and --repeat must be at least 1")
    if args.one_scenario and not args.image:
        parser.error("--one-scenario needs --image")

    if args.one_scenario:
        report = run_scenario(
            args.image, args.streams[0], args.sessions, args.peer_workers, args.timeout, args.device_mbps
        )
        print("REPORT " + json.dumps(asdict(report)), flush=True)
        return 0

    reports: list[ScenarioReport] = []
    with tempfile.TemporaryDirectory(prefix="netota-bench-") as tmp:
        images = {mib: make_image(Path(tmp), int(mib * MIB)) for mib in args.image_mib}
        for _ in range(args.repeat):
            for mib, image in images.items():
                for streams in args.streams:
                    sessions = sessions_per_stream(image.stat().st_size, streams, int(args.min_mib * MIB))
                    print(
                        f"... {mib:g} MiB image, {streams} streams x {sessions} sessions", file=sys.stderr, flush=True
                    )
                    reports.append(run_in_subprocess(image, streams, sessions, args.peer_workers, args.timeout))
            if args.paced_mbps > 0:
                mib, streams = min(args.image_mib), max(args.streams)
                print(
                    f"... {mib:g} MiB image, {streams} streams paced at {args.paced_mbps:g} MB/s each",
                    file=sys.stderr,
                    flush=True,
                )
                reports.append(
                    run_in_subprocess(images[mib], streams, 1, args.peer_workers, args.timeout, args.paced_mbps)
                )
    print(format_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=2) + "\n")
    return 0 if all(r.verified for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
