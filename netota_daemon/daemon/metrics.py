"""``DaemonMetrics``: what the daemon exposes to Prometheus (``docs/metrics.md`` lists every metric).

The metrics live in their own :class:`prometheus_client.CollectorRegistry` (never the process-wide
default one: two daemons in one test process, or a library that registers its own, can't clash),
and are fed by methods the daemon calls: :meth:`DaemonMetrics.job_finished`,
:meth:`DaemonMetrics.bytes_served`, :meth:`DaemonMetrics.journal_write` and the rest.
:class:`QueueEventFeed` turns the job queue's events (the same ones the control event stream
carries) into those calls, so the queue itself knows nothing of metrics.

Cardinality is bounded by the configuration, never by input: a ``device`` label only ever takes the
name of a configured device (anything else is dropped, and counted in
``netota_metrics_dropped_total``), ``phase``, ``outcome`` and ``failure`` only the values of the
engine's enums, and the firmware version of a device is one label of its single ``netota_device_info``
series, shortened to :data:`MAX_LABEL_CHARS` characters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from twisted.internet.interfaces import IReactorTime

from netota_daemon.engine.outcome import FailureClass, OutcomeKind, Phase

#: ``outcome`` label values: the engine's outcome kinds, and ``interrupted`` (the daemon stopped).
OUTCOMES = (*(k.value for k in OutcomeKind), "interrupted")
#: ``failure`` label values: the engine's failure classes, and ``none`` for a job that did not fail.
FAILURES = (*(f.value for f in FailureClass), "none")
PHASES = tuple(p.value for p in Phase)
#: A device's ``state`` label: no job, or its job's state.
DEVICE_STATES = ("idle", "queued", "running", "cancelling")
#: Longest label value taken from what a device said (its firmware version).
MAX_LABEL_CHARS = 64
#: Stream ends at which the app sends STOP (``OtaStream.abort``), when the stream's facts do not say.
STOP_ENDS = frozenset({"aborted", "timeout", "protocol_error"})

DURATION_BUCKETS = (5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1200, 1800, 3600, 7200)
PHASE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)
JOURNAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


def _label_text(value: str | None) -> str:
    """A label value from outside text: printable, bounded; "" for none."""
    if not value:
        return ""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= MAX_LABEL_CHARS else text[: MAX_LABEL_CHARS - 3] + "..."


@dataclass
class _DeviceInfo:
    interface: str
    state: str = "idle"
    phase: str = ""
    firmware_version: str = ""
    last_outcome: str = ""
    percent: float = 0.0
    point_of_no_return: bool = False


class _DeviceCollector(Collector):
    """One ``netota_device_info`` series per configured device, its labels the current values; and
    the device's progress and point of no return as gauges."""

    def __init__(self, devices: Mapping[str, _DeviceInfo]) -> None:
        self._devices = devices

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "netota_device_info",
            "One series per configured device (value 1): its job state, phase, firmware version and last outcome.",
            labels=["device", "interface", "state", "phase", "firmware_version", "last_outcome"],
        )
        progress = GaugeMetricFamily(
            "netota_device_progress_ratio",
            "The running phase's progress on each device, 0 to 1 (0 when idle).",
            labels=["device"],
        )
        no_return = GaugeMetricFamily(
            "netota_device_point_of_no_return",
            "1 while a device's job is past the point of no return (do not power it off).",
            labels=["device"],
        )
        for name, d in self._devices.items():
            info.add_metric([name, d.interface, d.state, d.phase, d.firmware_version, d.last_outcome], 1)
            progress.add_metric([name], d.percent / 100.0)
            no_return.add_metric([name], 1 if d.point_of_no_return else 0)
        yield info
        yield progress
        yield no_return


class DaemonMetrics:
    """The daemon's metrics and the methods that feed them. ``devices``: every configured device's
    name and interface (the only values the ``device`` label takes)."""

    def __init__(self, devices: Mapping[str, str | None], version: str, start_time: float) -> None:
        # No ``*_created`` series: a counter's creation time is the daemon's start time, given once.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._devices = {name: _DeviceInfo(interface=interface or "") for name, interface in devices.items()}
        Info("netota_build", "The daemon's version.", registry=r).info({"version": version})
        Gauge("netota_start_time_seconds", "When the daemon started (Unix time).", registry=r).set(start_time)
        self.jobs_finished = Counter(
            "netota_jobs_finished_total",
            "Jobs that ended, by device, outcome and failure class.",
            ["device", "outcome", "failure"],
            registry=r,
        )
        self.job_duration = Histogram(
            "netota_job_duration_seconds",
            "How long jobs ran, from start to end (jobs that never started are not counted).",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.phase_duration = Histogram(
            "netota_phase_duration_seconds",
            "How long each phase of a job took, however it ended.",
            ["phase"],
            buckets=PHASE_BUCKETS,
            registry=r,
        )
        self.served = Counter(
            "netota_served_bytes_total",
            "Bytes of firmware sent to devices, re-reads included, by device and phase.",
            ["device", "phase"],
            registry=r,
        )
        self.running = Gauge("netota_jobs_running", "Jobs running now (cancelling included).", registry=r)
        self.queued = Gauge("netota_jobs_queued", "Jobs waiting for a slot now.", registry=r)
        self.retries = Counter(
            "netota_connection_retries_total",
            "Failed connection attempts to a device (each one is retried while the connection window lasts).",
            ["device", "phase"],
            registry=r,
        )
        self.stops = Counter(
            "netota_stops_sent_total",
            "STOP headers sent to a device on its OTA stream (cancel, timeout, protocol error).",
            ["device", "phase"],
            registry=r,
        )
        self.receive_timeouts = Counter(
            "netota_ota_receive_timeouts_total",
            "Receive timeouts of OTA streams: waits of timeouts.receive seconds in which the device sent no request.",
            ["device", "phase"],
            registry=r,
        )
        self.bad_headers = Counter(
            "netota_ota_corrupt_headers_skipped_total",
            "OTA headers with a bad checksum that were skipped.",
            ["device", "phase"],
            registry=r,
        )
        self.journal_latency = Histogram(
            "netota_journal_write_seconds",
            "How long one journal write took (on the journal's writer).",
            buckets=JOURNAL_BUCKETS,
            registry=r,
        )
        self.subscribers = Gauge(
            "netota_event_stream_subscribers", "Open event streams (GET /v1/events, /v1/jobs/ID/events).", registry=r
        )
        self.dropped = Counter(
            "netota_metrics_dropped_total",
            "Observations dropped because they named no configured device (should stay 0).",
            registry=r,
        )
        r.register(_DeviceCollector(self._devices))

    # ----- the methods the daemon calls

    def _known(self, device: str) -> bool:
        if device in self._devices:
            return True
        self.dropped.inc()
        return False

    def job_finished(
        self,
        device: str,
        outcome: str,
        failure: str | None = None,
        duration: float | None = None,
    ) -> None:
        """A job ended with ``outcome`` (an :class:`OutcomeKind` value or ``interrupted``) and, for a
        failure, its :class:`FailureClass` value; ``duration``: seconds it ran (None if it never ran)."""
        if not self._known(device):
            return
        outcome = outcome if outcome in OUTCOMES else "failed"
        failure = failure if failure in FAILURES else "none"
        self.jobs_finished.labels(device, outcome, failure).inc()
        if duration is not None and duration >= 0:
            self.job_duration.labels(outcome).observe(duration)

    def phase_finished(self, phase: str, seconds: float) -> None:
        if phase in PHASES and seconds >= 0:
            self.phase_duration.labels(phase).observe(seconds)

    def bytes_served(self, device: str, phase: str, count: int) -> None:
        if count > 0 and phase in PHASES and self._known(device):
            self.served.labels(device, phase).inc(count)

    def connection_retry(self, device: str, phase: str) -> None:
        if phase in PHASES and self._known(device):
            self.retries.labels(device, phase).inc()

    def stop_sent(self, device: str, phase: str) -> None:
        if phase in PHASES and self._known(device):
            self.stops.labels(device, phase).inc()

    def receive_timeout(self, device: str, phase: str, count: int = 1) -> None:
        if count > 0 and phase in PHASES and self._known(device):
            self.receive_timeouts.labels(device, phase).inc(count)

    def corrupt_headers_skipped(self, device: str, phase: str, count: int) -> None:
        if count > 0 and phase in PHASES and self._known(device):
            self.bad_headers.labels(device, phase).inc(count)

    def jobs_active(self, running: int, queued: int) -> None:
        self.running.set(running)
        self.queued.set(queued)

    def journal_write(self, seconds: float) -> None:
        """One journal write took ``seconds`` (callable from the journal's writer thread)."""
        self.journal_latency.observe(max(0.0, seconds))

    def event_streams(self, count: int) -> None:
        self.subscribers.set(count)

    def device_changed(
        self,
        device: str,
        *,
        state: str | None = None,
        phase: str | None = None,
        firmware_version: str | None = None,
        last_outcome: str | None = None,
        percent: float | None = None,
        point_of_no_return: bool | None = None,
    ) -> None:
        """What a device is doing now; only the arguments given change."""
        if not self._known(device):
            return
        d = self._devices[device]
        if state is not None and state in DEVICE_STATES:
            d.state = state
        if phase is not None:
            d.phase = phase if phase in PHASES else ""
        if firmware_version is not None:
            d.firmware_version = _label_text(firmware_version)
        if last_outcome is not None and last_outcome in OUTCOMES:
            d.last_outcome = last_outcome
        if percent is not None:
            d.percent = min(100.0, max(0.0, float(percent)))
        if point_of_no_return is not None:
            d.point_of_no_return = point_of_no_return

    # ----- exposition

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition and its content type, as ``/metrics`` answers a request with this
        ``Accept`` header: OpenMetrics when asked for, else Prometheus's text format."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


@dataclass
class _JobSeen:
    device: str
    state: str
    started: float | None = None
    phase: str | None = None
    phase_started: float = 0.0
    served: dict[str, int] = field(default_factory=dict)  # phase -> bytes counted so far
    last_served: dict[str, int] = field(default_factory=dict)  # phase -> the stream's last bytes_served


class QueueEventFeed:
    """Feeds :class:`DaemonMetrics` from the job queue's events (``JobQueue.subscribe``).

    - ``state``: the device's state, the running/queued gauges; a job's start time.
    - ``phase``: phase durations (from one phase event to the next, or to the outcome).
    - ``progress``: bytes served, live: each event carries the stream's running total in its phase,
      so the counter grows by the difference (a total that went down is a new stream: all of it).
    - ``waiting``: a failed connection attempt (a retry).
    - ``outcome``: the job's outcome, its duration, and what its streams say (``details.streams``):
      bytes served not yet counted, skipped bad headers, STOPs and receive timeouts.
    """

    def __init__(self, metrics: DaemonMetrics, clock: IReactorTime) -> None:
        self.metrics = metrics
        self.clock = clock
        self._jobs: dict[str, _JobSeen] = {}
        self._handlers: dict[str, Callable[[str, str, Mapping[str, Any]], None]] = {
            "state": self._state,
            "phase": self._phase,
            "progress": self._progress,
            "waiting": self._waiting,
            "outcome": self._outcome,
        }

    def __call__(self, event: Mapping[str, Any]) -> None:
        handler = self._handlers.get(str(event.get("type")))
        job, device = event.get("job"), event.get("device")
        if handler is None or not isinstance(job, str) or not isinstance(device, str):
            return
        handler(job, device, event)

    def _gauges(self) -> None:
        running = sum(1 for j in self._jobs.values() if j.state in ("running", "cancelling"))
        queued = sum(1 for j in self._jobs.values() if j.state == "queued")
        self.metrics.jobs_active(running, queued)

    def _state(self, job: str, device: str, event: Mapping[str, Any]) -> None:
        state = str(event.get("state"))
        seen = self._jobs.get(job)
        if seen is None:
            seen = self._jobs[job] = _JobSeen(device, state)
        seen.state = state
        if state == "running" and seen.started is None:
            seen.started = self.clock.seconds()
        self.metrics.device_changed(device, state=state, phase=event.get("phase") or None)
        self._gauges()

    def _phase(self, job: str, device: str, event: Mapping[str, Any]) -> None:
        seen = self._seen(job, device)
        phase = str(event.get("phase"))
        now = self.clock.seconds()
        if seen.phase is not None and seen.phase != phase:
            self.metrics.phase_finished(seen.phase, now - seen.phase_started)
        if seen.phase != phase:
            seen.phase, seen.phase_started = phase, now
        self.metrics.device_changed(device, phase=phase, percent=0.0)

    def _progress(self, job: str, device: str, event: Mapping[str, Any]) -> None:
        seen = self._seen(job, device)
        phase = str(event.get("phase"))
        total = event.get("bytes_served")
        if isinstance(total, int) and not isinstance(total, bool) and total >= 0:
            last = seen.last_served.get(phase, 0)
            added = total - last if total >= last else total
            seen.last_served[phase] = total
            seen.served[phase] = seen.served.get(phase, 0) + added
            self.metrics.bytes_served(device, phase, added)
        percent = event.get("percent")
        self.metrics.device_changed(
            device,
            phase=phase,
            percent=percent if isinstance(percent, int | float) and not isinstance(percent, bool) else None,
            point_of_no_return=bool(event.get("point_of_no_return")),
        )

    def _waiting(self, job: str, device: str, event: Mapping[str, Any]) -> None:
        attempt = event.get("attempt")
        if isinstance(attempt, int) and attempt >= 1 and event.get("last_error"):
            self.metrics.connection_retry(device, str(event.get("phase")))

    def _outcome(self, job: str, device: str, event: Mapping[str, Any]) -> None:
        seen = self._jobs.pop(job, None)
        now = self.clock.seconds()
        outcome = event.get("outcome") if isinstance(event.get("outcome"), dict) else None
        state = event.get("state")
        if state == "interrupted" or outcome is None:
            kind, failure = "interrupted", None
        else:
            kind, failure = str(outcome.get("kind")), outcome.get("failure")
        if seen is not None and seen.phase is not None:
            self.metrics.phase_finished(seen.phase, now - seen.phase_started)
        started = seen.started if seen is not None else None
        self.metrics.job_finished(device, kind, failure, None if started is None else now - started)
        details = outcome.get("details") if outcome else None
        streams = details.get("streams") if isinstance(details, dict) else None
        if isinstance(streams, list):
            self._streams(device, seen, [s for s in streams if isinstance(s, dict)])
        versions = [outcome.get("firmware_version_after"), outcome.get("firmware_version_before")] if outcome else []
        version = next((v for v in versions if isinstance(v, str) and v), None)
        self.metrics.device_changed(
            device,
            state="idle",
            phase="",
            percent=0.0,
            point_of_no_return=False,
            last_outcome=kind,
            firmware_version=version,
        )
        self._gauges()

    def _streams(self, device: str, seen: _JobSeen | None, streams: Iterable[dict[str, Any]]) -> None:
        totals: dict[str, int] = {}
        for stream in streams:
            phase = str(stream.get("phase"))
            served = _count(stream.get("bytes_served"))
            totals[phase] = totals.get(phase, 0) + served
            self.metrics.corrupt_headers_skipped(device, phase, _count(stream.get("bad_headers")))
            end = stream.get("end")
            stop = stream.get("stop_sent")
            if stop is True or (stop is None and end in STOP_ENDS):
                self.metrics.stop_sent(device, phase)
            timeouts = stream.get("receive_timeouts")
            if timeouts is not None:
                self.metrics.receive_timeout(device, phase, _count(timeouts))
            elif end == "timeout":
                self.metrics.receive_timeout(device, phase)
        counted = seen.served if seen is not None else {}
        for phase, total in totals.items():
            self.metrics.bytes_served(device, phase, total - counted.get(phase, 0))

    def _seen(self, job: str, device: str) -> _JobSeen:
        seen = self._jobs.get(job)
        if seen is None:
            seen = self._jobs[job] = _JobSeen(device, "running", started=self.clock.seconds())
        return seen


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
