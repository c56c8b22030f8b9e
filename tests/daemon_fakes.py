"""Fakes for the daemon's unit tests: an engine job the test (or a clock) drives through its phases,
a journal executor the test decides the commits of, and a service made for a test."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from netota_daemon.engine.events import EventPublisher, PhaseChanged, Progress, TransferState, Waiting
from netota_daemon.engine.outcome import Happened, Outcome, OutcomeKind, Phase, advice


def fired(d: Deferred) -> Any:
    """The result of a Deferred that has already fired (its failure is raised): for tests whose
    journal answers at once (an ImmediateExecutor) or whose ManualExecutor ran the calls."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class ManualExecutor:
    """A journal executor whose calls wait until the test runs them (a write "commits" when the test
    says): for tests of the "journal before acting" rule. ``fail_next`` makes the next call run
    raise instead (a full disk)."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Callable[[], Any], Deferred]] = deque()
        self.fail_next: Exception | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, call: Callable[[], Any]) -> Deferred:
        d: Deferred = Deferred()
        self.pending.append((call, d))
        return d

    def run_one(self) -> None:
        call, d = self.pending.popleft()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            d.errback(Failure(error))
            return
        maybeDeferred(call).chainDeferred(d)

    def run_all(self) -> None:
        while self.pending:
            self.run_one()


class FakeJob:
    """Looks like ``UpgradeJob``; ``cancel`` ends it as aborted after ``stop_delay`` clock seconds
    (the real engine sends STOP first). ``on_run`` / ``on_cancel`` let a test look at the world at
    the moment the queue acts."""

    def __init__(
        self,
        reactor: Any,
        target: Any,
        image: Any,
        timeouts: Any,
        job_id: str,
        log_context: dict | None = None,
        factory: FakeJobFactory | None = None,
        verify_only: bool = False,
        behaviour: Any = None,
    ) -> None:
        self.reactor = reactor
        self.verify_only = verify_only
        self.target = target
        self.image = image
        self.timeouts = timeouts
        self.behaviour = behaviour
        self.job_id = job_id
        self.log_context = log_context
        self.events = EventPublisher()
        self.phase = Phase.DETECT
        self.point_of_no_return = False
        self.cancelled: str | None = None
        self.factory = factory
        self._done: Deferred | None = None

    def run(self) -> Deferred:
        self._done = Deferred()
        if self.factory and self.factory.on_run:
            self.factory.on_run(self)
        return self._done

    @property
    def running(self) -> bool:
        return self._done is not None and not self._done.called

    def enter(self, phase: Phase, message: str = "") -> None:
        self.phase = phase
        self.events.publish(PhaseChanged(phase, message))

    def progress(self, percent: float, point_of_no_return: bool = False, total: int = 1000) -> None:
        self.point_of_no_return = self.point_of_no_return or point_of_no_return
        self.events.publish(
            Progress(
                self.phase, int(total * percent / 100), total, percent, int(percent), 1000.0, self.point_of_no_return
            )
        )

    def waiting(self, attempt: int, last_error: str | None, message: str = "connecting") -> None:
        self.events.publish(Waiting(self.phase, message, attempt, last_error))

    def progress_event(self, **fields: Any) -> None:
        """A progress event with the fields honest progress has (done_bytes, basis, state, ...)."""
        self.point_of_no_return = self.point_of_no_return or fields.get("point_of_no_return", False)
        fields.setdefault("point_of_no_return", self.point_of_no_return)
        fields.setdefault("state", TransferState.TRANSFERRING)
        self.events.publish(Progress(phase=self.phase, **fields))

    def fail_with(self, error: Exception) -> None:
        """The engine's run() Deferred fails (a bug in the engine: the real one never does)."""
        assert self._done is not None and not self._done.called
        self._done.errback(error)

    def finish(self, kind: OutcomeKind = OutcomeKind.SUCCEEDED, message: str = "done", **extra: Any) -> None:
        assert self._done is not None and not self._done.called
        told = "" if kind is OutcomeKind.SUCCEEDED else advice(Happened.FAILED, self.phase, self.point_of_no_return)
        extra.setdefault("advice", told)
        self._done.callback(
            Outcome(kind=kind, message=message, phase=self.phase, point_of_no_return=self.point_of_no_return, **extra)
        )

    def cancel(self, reason: str = "cancelled") -> None:
        if self.factory and self.factory.on_cancel:
            self.factory.on_cancel(self)
        if not self.running or self.cancelled is not None:
            return
        self.cancelled = reason
        delay = self.factory.stop_delay if self.factory else 0.0
        self.reactor.callLater(delay, self._aborted, reason)

    def _aborted(self, reason: str) -> None:
        if self.running:
            self.finish(OutcomeKind.ABORTED, reason)


class FakeJobFactory:
    def __init__(self, stop_delay: float = 1.0) -> None:
        self.jobs: dict[str, FakeJob] = {}
        self.order: list[FakeJob] = []
        self.stop_delay = stop_delay
        self.on_run: Callable[[FakeJob], None] | None = None
        self.on_cancel: Callable[[FakeJob], None] | None = None

    def __call__(
        self,
        reactor: Any,
        target: Any,
        image: Any,
        timeouts: Any,
        job_id: str,
        log_context: dict | None = None,
        verify_only: bool = False,
        behaviour: Any = None,
    ) -> FakeJob:
        job = FakeJob(
            reactor,
            target,
            image,
            timeouts,
            job_id,
            log_context,
            factory=self,
            verify_only=verify_only,
            behaviour=behaviour,
        )
        self.jobs[job_id] = job
        self.order.append(job)
        return job


class AutoJobFactory(FakeJobFactory):
    """Jobs that play a whole two-phase upgrade on their own, step by step on the reactor's clock
    (``step`` seconds apart), for tests of the client and the control API on a real reactor."""

    def __init__(
        self,
        step: float = 0.01,
        stop_delay: float = 0.01,
        outcome: OutcomeKind = OutcomeKind.SUCCEEDED,
        hold_in: Phase | None = None,
    ) -> None:
        super().__init__(stop_delay)
        self.step = step
        self.outcome = outcome
        self.hold_in = hold_in  # stop advancing in this phase (until cancelled)
        self.on_run = self._play

    def outcome_for(self, job: FakeJob) -> OutcomeKind:
        return self.outcome

    def _play(self, job: FakeJob) -> None:
        script: list[Callable[[], None]] = []
        for phase in (Phase.DETECT, Phase.PHASE1, Phase.REBOOT, Phase.PHASE2, Phase.VERIFY):
            script.append(lambda phase=phase: job.enter(phase))
            if phase is self.hold_in:
                break
            if phase in (Phase.PHASE1, Phase.PHASE2):
                for percent in (25.0, 50.0, 75.0, 100.0):
                    script.append(
                        lambda percent=percent, phase=phase: job.progress(
                            percent, point_of_no_return=phase is Phase.PHASE2
                        )
                    )
        outcome = self.outcome_for(job)
        if self.hold_in is None:
            script.append(
                lambda: job.finish(
                    outcome, "fake upgrade done", firmware_version_before="1.0.0", firmware_version_after="2.0.0"
                )
            )

        def next_step(index: int) -> None:
            if not job.running or job.cancelled is not None:
                return
            script[index]()
            if index + 1 < len(script):
                job.reactor.callLater(self.step, next_step, index + 1)

        job.reactor.callLater(self.step, next_step, 0)


def streams_opened(service: Any, count: int, reactor: Any, timeout: float = 20) -> Any:
    """A Deferred that fires once ``count`` event streams are open on ``service``'s control API (a
    client is following), failing after ``timeout`` seconds: an event to wait for, not a poll."""
    from twisted.internet.defer import Deferred

    streams = service.streams
    opened: Deferred = Deferred()
    unsubscribe: list[Callable[[], None]] = []

    def fire_if_enough(_: Any = None) -> None:
        if len(streams) >= count and not opened.called:
            for stop in unsubscribe:
                stop()
            # From the reactor, once the request that opened the stream has been answered.
            reactor.callLater(0, opened.callback, None)

    unsubscribe.append(streams.opened.subscribe(fire_if_enough))
    fire_if_enough()
    opened.addTimeout(timeout, reactor)
    return opened


def short_socket_dir() -> str:
    """A fresh directory under /tmp whose paths fit a UNIX socket address (~100 bytes); removed when
    the test run ends."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="nt", dir="/tmp")
    atexit.register(shutil.rmtree, path, True)
    return path


def make_service(
    tmp_path: Any,
    reactor: Any,
    factory: Any,
    devices: tuple[str, ...] = ("a", "b", "c"),
    max_parallel: int = 2,
    token: str | None = None,
    environ: dict | None = None,
    control: str | None = None,
    journal_executor: Any = None,
    device_configs: dict | None = None,
    **settings: Any,
) -> Any:
    """A NetotaService (not started) on a UNIX socket in a short directory, with fake jobs and a
    firmware_dir holding ``v2.bin``; ``devices`` are names on 127.0.0.1, unless ``device_configs``
    (name -> DeviceConfig) says otherwise; ``settings`` are further DaemonConfig fields."""
    import os
    from pathlib import Path

    from netota_daemon.daemon.config import DaemonConfig, DeviceConfig, check_control_endpoint
    from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
    from netota_daemon.service import NetotaService

    firmware_dir = Path(tmp_path) / "fw"
    firmware_dir.mkdir(exist_ok=True)
    (firmware_dir / "v2.bin").write_bytes(os.urandom(2048))
    socket_path = os.path.join(short_socket_dir(), "control.sock")
    config = DaemonConfig(
        source="test",
        control=check_control_endpoint("test", control or f"unix:{socket_path}:lockfile=1", token),
        state_dir=Path(tmp_path) / "state",
        firmware_dir=firmware_dir,
        max_parallel=max_parallel,
        control_token=token,
        shutdown_grace=5.0,
        devices=device_configs
        or {n: DeviceConfig(DeviceTarget(name=n, host="127.0.0.1"), UpgradeTimeouts()) for n in devices},
        **settings,
    )
    service = NetotaService(
        config, reactor, job_factory=factory, environ=environ or {}, journal_executor=journal_executor
    )
    service.socket_path = socket_path
    return service


class ApiWorld:
    """The control API in memory: a Clock, a journal that answers at once, fake engine jobs, a
    prober whose fetch answers at once (or never, with ``hold_probes``), and a StubTreq client over
    the API's resource. Nothing listens; nothing leaves the process.

    ``full``: also the firmware catalogue, the batch manager (its store in ``tmp_path``), the rescuer
    and the job-end notifier, wired as ``service.py`` wires them, so ``/v1/firmware...``,
    ``/v1/batches...`` and ``/v1/rescue`` answer too. What blocks in the daemon (the catalogue's
    ``run_blocking``, the image inspection) runs here at once on the caller's thread, and the batch
    manager has carried on its unfinished batches (none) before the first request."""

    def __init__(
        self,
        tmp_path: Any,
        devices: tuple[str, ...] = ("a", "b", "c"),
        max_parallel: int = 2,
        token: str | None = None,
        max_connections: int = 256,
        idle_timeout: float = 60.0,
        full: bool = False,
        tags: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        import os
        from pathlib import Path

        from treq.testing import StubTreq
        from twisted.internet.testing import MemoryReactorClock

        from netota_daemon.control.api import ControlApi
        from netota_daemon.daemon.config import DaemonConfig, DeviceConfig
        from netota_daemon.daemon.firmware_store import FirmwareStore
        from netota_daemon.daemon.jobs import JobQueue
        from netota_daemon.daemon.journal import JobJournal
        from netota_daemon.daemon.journal_thread import AsyncJournal, ImmediateExecutor
        from netota_daemon.daemon.probe import DeviceProber
        from netota_daemon.daemon.registry import DeviceRegistry
        from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
        from netota_daemon.wire.description import main_firmware_document, parse_description

        self.clock = MemoryReactorClock()
        self.clock.advance(1000)
        self.firmware_dir = Path(tmp_path) / "fw"
        self.firmware_dir.mkdir(exist_ok=True)
        (self.firmware_dir / "v2.bin").write_bytes(os.urandom(2048))
        tags = tags or {}
        # One HTTP port per device, so that the fake fetch below knows whose description is asked for.
        device_configs = {
            n: DeviceConfig(
                DeviceTarget(name=n, host="127.0.0.1", http_port=8080 + i), UpgradeTimeouts(), tags=tags.get(n, ())
            )
            for i, n in enumerate(devices)
        }
        self.config = DaemonConfig(
            source="test",
            state_dir=Path(tmp_path) / "state",
            firmware_dir=self.firmware_dir,
            max_parallel=max_parallel,
            shutdown_grace=5.0,
            devices=device_configs,
        )
        self.journal = JobJournal(self.config.state_dir, self.clock)
        self.registry = DeviceRegistry(device_configs.values())
        self.factory = FakeJobFactory(stop_delay=0.0)
        self.async_journal = AsyncJournal(self.journal, ImmediateExecutor())
        self.queue = JobQueue(
            self.clock,
            self.config,
            self.async_journal,
            self.registry,
            FirmwareStore(self.firmware_dir),
            job_factory=self.factory,
        )
        self.hold_probes = False
        self.held_probes: list[Deferred] = []
        #: The description document a device's probe reads (by name; default: main firmware 9.9).
        #: ``LOADER_DOCUMENT`` puts a device in its loader (rescue's case).
        self.descriptions: dict[str, bytes] = {}
        by_port = {device.target.http_port: n for n, device in device_configs.items()}

        async def fetch(connector: Any, port: int, timeout: float, clock: Any) -> Any:
            if self.hold_probes:
                d: Deferred = Deferred()
                self.held_probes.append(d)
                await d
            return parse_description(self.descriptions.get(by_port[port], main_firmware_document("9.9")))

        self.prober = DeviceProber(self.registry, self.clock, fetch=fetch, clock=self.clock)
        wiring = self._wire_the_rest() if full else {}
        self.api = ControlApi(
            self.queue,
            self.registry,
            self.prober,
            self.clock,
            token=token,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            **wiring,
        )
        self.http = StubTreq(self.api.resource)

    def _wire_the_rest(self) -> dict[str, Any]:
        """The firmware catalogue, batches, rescue and the notifier, as ``NetotaService`` makes them
        (``service.py``), in memory: ``ControlApi``'s keyword arguments for them."""
        import os

        from netota_daemon.control.firmware import FirmwareEndpoints
        from netota_daemon.daemon.batch_store import AsyncBatchStore, BatchStore
        from netota_daemon.daemon.batches import BatchManager
        from netota_daemon.daemon.firmware_catalog import FirmwareCatalog
        from netota_daemon.daemon.firmware_store import FirmwareStore
        from netota_daemon.daemon.image_facts import read_image_facts
        from netota_daemon.daemon.notify import JobNotifier
        from netota_daemon.daemon.ports import QueuePort
        from netota_daemon.daemon.rescue import Rescuer

        config, queue, registry = self.config, self.queue, self.registry

        def run_blocking(call: Callable[[], Any]) -> Deferred:
            return maybeDeferred(call)  # at once, on this thread: no thread pool on a Clock

        def in_use() -> list[str]:
            return [os.path.normpath(name) for name in queue.firmware_in_use()]

        self.catalog = FirmwareCatalog(
            config.firmware_dir, run_blocking, in_use=in_use, max_upload=config.firmware_max_upload
        )
        firmware = FirmwareStore(config.firmware_dir)

        def inspect(name: str) -> Deferred:
            return maybeDeferred(read_image_facts, firmware, name)

        def busy_job(name: str) -> str | None:
            status = registry.get(name)
            return status.job if status.state in ("queued", "running") else None

        def held(name: str) -> str | None:
            batch = self.batches.batch_of_device(name)
            return busy_job(name) or (f"batch {batch}" if batch else None)

        self.batch_store = BatchStore(config.state_dir)
        port = QueuePort(queue, self.async_journal)
        self.batches = BatchManager(
            self.clock,
            port,
            self.prober,
            AsyncBatchStore(self.batch_store, self.async_journal.run),
            list(config.devices),
            inspect,
            busy=busy_job,
            known_version=lambda name: registry.get(name).firmware_version,
            device_tags={name: device.tags for name, device in config.devices.items()},
        )
        self.rescuer = Rescuer(self.clock, port, self.prober.probe, inspect, held, list(config.devices))
        self.notifier = JobNotifier(self.clock)
        fired(Deferred.fromCoroutine(self.batches.recover()))
        return {
            "firmware": FirmwareEndpoints(self.catalog),
            "batches": self.batches,
            "rescuer": self.rescuer,
            "notifier": self.notifier,
        }

    def call(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Any:
        """(status, headers, parsed JSON or raw bytes) of one request, answered in memory."""
        import json

        d = self.http.request(method, f"http://netota{path}", data=body, headers=headers)
        self.http.flush()
        response = fired(d)
        content = self.http.content(response)
        self.http.flush()
        raw = fired(content)
        kind = response.headers.getRawHeaders(b"content-type", [b""])[0]
        return response.code, response.headers, json.loads(raw) if kind == b"application/json" else raw
