"""``NetotaService``: the daemon as one ``MultiService``, where the daemon's parts (``daemon/``) and
its control API (``control/``) are put together; ``tap.py`` builds it for twistd.

It owns the journal (and its thread), the device registry, the job queue, the journal's retention,
the control API listener and the systemd notifications: the journal is recovered before the control
socket listens; READY is sent once it listens; on stop, STOPPING is sent, running jobs are stopped
(STOP on the wire) and recorded as interrupted, every event stream gets their final events and a
``shutdown`` event, then the listener closes and the journal's thread ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon import __version__
from netota_daemon.control.api import ControlApi
from netota_daemon.control.firmware import FirmwareEndpoints
from netota_daemon.daemon.batch_store import AsyncBatchStore, BatchStore
from netota_daemon.daemon.batches import BatchManager
from netota_daemon.daemon.config import ConfigError, DaemonConfig, with_line
from netota_daemon.daemon.firmware_catalog import FirmwareCatalog
from netota_daemon.daemon.firmware_store import FirmwareStore
from netota_daemon.daemon.image_facts import ImageInspector
from netota_daemon.daemon.jobs import JobFactory, JobQueue, default_job_factory
from netota_daemon.daemon.journal import JobJournal, JobState, JournalError
from netota_daemon.daemon.journal_thread import AsyncJournal, JournalExecutor, ThreadExecutor
from netota_daemon.daemon.metrics import DaemonMetrics, QueueEventFeed
from netota_daemon.daemon.notify import JobNotifier
from netota_daemon.daemon.ports import QueuePort
from netota_daemon.daemon.probe import DeviceProber
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.daemon.rescue import Rescuer
from netota_daemon.daemon.retention import JournalRetention
from netota_daemon.daemon.systemd import SystemdNotifier, WatchdogService, watchdog_interval
from netota_daemon.endpoint_strings import NETWORK_KINDS, is_loopback, split_endpoint, tcp_interface

log = Logger()


class ControlEndpointError(Exception):
    """The control endpoint string can't be turned into a listener."""


#: Descriptors the daemon needs besides its control connections: the journal, logs, the notify
#: socket, and a few connections per device (CTP, HTTP, OTA, a reconnect command's pipes).
FIXED_DESCRIPTORS = 64
DESCRIPTORS_PER_DEVICE = 8


class DescriptorLimitError(Exception):
    """The process may not open as many files as the configuration needs."""


def raise_file_limit(needed: int, source: str = "", limits: Any = None) -> int:
    """Raise the soft RLIMIT_NOFILE to ``needed`` (never above the hard limit, never lowered); the
    resulting soft limit, or DescriptorLimitError when even the hard limit is too low. ``limits`` is
    the :mod:`resource` module (a test passes its own)."""
    if limits is None:
        import resource as limits
    soft, hard = limits.getrlimit(limits.RLIMIT_NOFILE)
    if soft == limits.RLIM_INFINITY or soft >= needed:
        return int(soft)
    if hard != limits.RLIM_INFINITY and hard < needed:
        problem = (
            f"the daemon needs {needed} file descriptors for its connections and devices, but may open at "
            f"most {hard} (raise LimitNOFILE= in the unit, or lower control_max_connections)"
        )
        raise DescriptorLimitError(str(with_line(ConfigError(source, "daemon.control_max_connections", problem))))
    limits.setrlimit(limits.RLIMIT_NOFILE, (needed, hard))
    return needed


class ControlListener(Service):
    """Listens on the control endpoint in ``privilegedStartService`` (a failure to bind stops
    start-up with the error), and calls ``on_listening`` once the reactor runs and the port is open."""

    name = "control"

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: Any,
        on_listening: Callable[[IListeningPort], None],
        description: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.description = description
        self.factory = factory
        self.on_listening = on_listening
        self.port: IListeningPort | None = None
        self._listening: Deferred[IListeningPort] | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        self._listen()

    def _listen(self) -> None:
        if self._listening is not None:
            return
        failures: list[Failure] = []
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._got_port, failures.append)
        if failures:
            # Start-up stops with one line naming the endpoint (twistd prints a SystemExit's message),
            # not a traceback from inside the reactor.
            raise SystemExit(
                f"netota: can't listen on the {self.name} endpoint ({self.description}): {failures[0].getErrorMessage()}"
            )

    def _got_port(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._listen()
        assert self._listening is not None
        self._listening.addCallback(self.on_listening)
        self._listening.addErrback(lambda f: log.failure("control endpoint failed", f))

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        if self.port is not None:
            port, self.port = self.port, None
            stopped = port.stopListening()
            return stopped if isinstance(stopped, Deferred) else succeed(None)
        return None


class NetotaService(MultiService):
    def __init__(
        self,
        config: DaemonConfig,
        reactor: Any = None,
        job_factory: JobFactory = default_job_factory,
        environ: Mapping[str, str] | None = None,
        journal_executor: JournalExecutor | None = None,
        file_limits: Any = None,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.config = config
        self._file_limits = file_limits
        self.journal_store = JobJournal(config.state_dir, reactor)
        self.journal = AsyncJournal(self.journal_store, journal_executor or ThreadExecutor(reactor))
        self.registry = DeviceRegistry(config.devices.values())
        self.queue = JobQueue(
            reactor, config, self.journal, self.registry, FirmwareStore(config.firmware_dir), job_factory=job_factory
        )
        self.notifier = SystemdNotifier(environ)
        self.prober = DeviceProber(self.registry, reactor)
        self.metrics = DaemonMetrics(
            {name: device.target.interface for name, device in config.devices.items()},
            __version__,
            start_time=reactor.seconds(),
        )
        self.queue.subscribe(QueueEventFeed(self.metrics, reactor))
        self.journal_store.on_write = self.metrics.journal_write
        self.catalog = FirmwareCatalog(
            config.firmware_dir,
            self._run_blocking,
            in_use=self._firmware_in_use,
            max_upload=config.firmware_max_upload,
        )
        # Batches, rescue and the job-end hooks (issue 13): around the queue, never inside it.
        firmware = FirmwareStore(config.firmware_dir)
        self.batch_store = BatchStore(config.state_dir)
        port = QueuePort(self.queue, self.journal)
        inspect = ImageInspector(reactor, firmware)
        self.batches = BatchManager(
            reactor,
            port,
            self.prober,
            AsyncBatchStore(self.batch_store, self.journal.run),
            list(config.devices),
            inspect,
            busy=self._busy_job,
            known_version=lambda name: self.registry.get(name).firmware_version,
            device_tags={name: device.tags for name, device in config.devices.items()},
        )
        self.rescuer = Rescuer(reactor, port, self.prober.probe, inspect, self._held, list(config.devices))
        # daemon.rescue: a sweep once the unfinished batches were carried on, then every interval.
        self.rescue_loop: LoopingCall | None = None
        if config.rescue:
            self.rescue_loop = LoopingCall(self._sweep)
            self.rescue_loop.clock = reactor
        self.hooks = JobNotifier(
            reactor,
            on_job_end=config.on_job_end,
            webhook=config.webhook,
            timeout=config.notify_timeout,
            attempts=config.webhook_attempts,
        )
        if self.hooks:
            self.queue.subscribe(self._job_event)
        self.control = ControlApi(
            self.queue,
            self.registry,
            self.prober,
            reactor,
            token=config.control_token,
            idle_timeout=config.control_idle_timeout,
            max_connections=config.control_max_connections,
            firmware=FirmwareEndpoints(self.catalog),
            metrics=self.metrics,
            batches=self.batches,
            rescuer=self.rescuer,
            notifier=self.hooks,
        )
        self.streams = self.control.streams
        self.metrics.subscribers.set_function(lambda: len(self.streams))
        self.listener = self._listener("control", config.control, self.control.site, self._listening)
        self.listener.setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.web is not None:
            self._listener("web", config.web, self.control.make_site(dashboard=True)).setServiceParent(self)  # type: ignore[no-untyped-call]
        if config.metrics is not None:
            # Only /metrics; the token is asked for where the endpoint can be reached from the network.
            kind, args, kwargs = split_endpoint(config.metrics)
            remote = kind in NETWORK_KINDS and not is_loopback(tcp_interface(args, kwargs))
            site = self.control.make_metrics_site(config.control_token if remote else None)
            self._listener("metrics", config.metrics, site).setServiceParent(self)  # type: ignore[no-untyped-call]
        self.retention = JournalRetention(
            self.journal, config.journal_retention_days, config.journal_retention_jobs, reactor
        )
        self.retention.setServiceParent(self)  # type: ignore[no-untyped-call]
        interval = watchdog_interval(environ)
        if interval is not None:
            WatchdogService(self.notifier, interval, reactor).setServiceParent(self)  # type: ignore[no-untyped-call]

    def _listener(
        self, key: str, description: str, site: Any, on_listening: Callable[[IListeningPort], None] | None = None
    ) -> ControlListener:
        config = self.config
        try:
            endpoint = serverFromString(self.reactor, description)  # type: ignore[no-untyped-call]
        except (IndexError, KeyError) as e:
            raise ControlEndpointError(
                f"{config.source}: daemon.{key}: {description!r}: systemd passed no such socket "
                f"(LISTEN_FDS/LISTEN_FDNAMES; is the daemon started by its .socket unit?): {e!r}"
            ) from None
        except ValueError as e:
            raise ControlEndpointError(f"{config.source}: daemon.{key}: {description!r} can't be used: {e}") from None

        def listening(port: IListeningPort) -> None:
            address = port.getHost()
            where = f"{address.host}:{address.port}" if isinstance(address, IPv4Address | IPv6Address) else str(address)
            log.info("netota: {key} endpoint listening on {where}", key=key, where=where)
            if on_listening is not None:
                on_listening(port)

        listener = ControlListener(endpoint, site, listening, f"{config.source}: daemon.{key}: {description}")
        listener.name = key
        return listener

    def _firmware_in_use(self) -> list[str]:
        """The firmware file names jobs being created, queued and running use (as the catalogue names
        them). The job queue's state is the reactor's: the catalogue calls this on the reactor thread
        only."""
        return [os.path.normpath(name) for name in self.queue.firmware_in_use()]

    def _run_blocking(self, call: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), call)

    def _busy_job(self, name: str) -> str | None:
        """The job that holds the device now (queued or running), or None."""
        status = self.registry.get(name)
        return status.job if status.state in ("queued", "running") else None

    def _held(self, name: str) -> str | None:
        """What keeps rescue off a device: its job, or an unfinished batch it belongs to (the batch
        resumes its own members' jobs)."""
        batch = self.batches.batch_of_device(name)
        return self._busy_job(name) or (f"batch {batch}" if batch else None)

    def _sweep(self) -> Deferred[Any] | None:
        """One periodic rescue (daemon.rescue): never overlapping (the loop waits for it), never
        fatal, and not before the unfinished batches were carried on."""
        if not self.batches.recovered or self.batches.stopping:
            return None
        d = Deferred.fromCoroutine(self.rescuer.sweep())
        d.addErrback(lambda f: log.failure("rescue: the periodic check failed", f))
        return d

    def _job_event(self, event: dict[str, Any]) -> None:
        """A job ended (its outcome event, published once its end is in the journal): the hooks get
        it as ``GET /v1/jobs/ID`` shows it."""
        if event.get("type") != "outcome":
            return
        d = self.queue.get(str(event["job"]))
        d.addCallback(self.hooks.job_ended)
        d.addErrback(
            lambda f: log.warn(
                "hooks: job {job} could not be read: {error}", job=event["job"], error=f.getErrorMessage()
            )
        )

    def _recover(self) -> None:
        """Before the control socket listens (on this thread: nothing else runs yet), bounded by the
        journal's indexes whatever its size."""
        store = self.journal_store
        for record in store.recover():
            log.warn(
                "job {job} on {device} interrupted in phase {phase}: {advice}",
                job=record.id,
                device=record.device,
                phase=record.phase.value,
                advice=record.advice,
            )
        for name in self.registry.names():
            last = next(iter(store.jobs(device=name, limit=1)), None)
            if last is not None:
                outcome = None if last.state is JobState.INTERRUPTED else last.outcome
                version = store.last_firmware_version(name)
                self.registry.remember(name, last.id, outcome, version)
                self.metrics.device_changed(
                    name,
                    firmware_version=version,
                    last_outcome=outcome.kind.value if outcome is not None else "interrupted",
                )

    def privilegedStartService(self) -> None:
        needed = (
            self.config.control_max_connections + FIXED_DESCRIPTORS + DESCRIPTORS_PER_DEVICE * len(self.config.devices)
        )
        try:
            raise_file_limit(needed, self.config.source, self._file_limits)
            self._recover()
            for name in self.catalog.remove_partials():
                log.warn("removed {name}: an upload a crash left half written", name=name)
        except (JournalError, DescriptorLimitError) as e:  # one clear line, no traceback
            raise SystemExit(f"netota: {e}") from None
        super().privilegedStartService()  # type: ignore[no-untyped-call]

    def startService(self) -> None:
        self.journal.start()
        super().startService()  # type: ignore[no-untyped-call]
        recovered = Deferred.fromCoroutine(self.batches.recover())
        recovered.addErrback(lambda f: log.failure("batches: carrying them on after the restart failed", f))
        recovered.addCallback(lambda _: self._start_rescue())

    def _start_rescue(self) -> None:
        if self.rescue_loop is not None and not self.rescue_loop.running and not self.batches.stopping:
            self.rescue_loop.start(self.config.rescue_interval, now=True)

    def _listening(self, port: IListeningPort) -> None:
        log.info(
            "netota {version} listening on {control} with {count} device(s), max_parallel {max_parallel}",
            version=__version__,
            control=self.config.control,
            count=len(self.registry.names()),
            max_parallel=self.config.max_parallel,
        )
        self.notifier.ready(f"listening on {self.config.control}")

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self.notifier.stopping("stopping: interrupting running jobs")
        log.info("netota stopping")
        self.batches.shutdown()  # acts no more: the journal has every batch as it stands
        if self.rescue_loop is not None and self.rescue_loop.running:
            self.rescue_loop.stop()
        try:
            await self.queue.shutdown()
        except Exception:
            log.failure("netota: stopping the jobs failed")
        await self.hooks.stop(min(5.0, self.config.shutdown_grace))
        # Every stream has seen each job's final event by now; then the shutdown event, then its end.
        self.streams.close_all("the daemon is shutting down")
        await maybeDeferred(MultiService.stopService, self)
        self.control.stopped = True  # before the journal closes under a still-open connection
        try:
            await self.journal.run(self.batch_store.close)
        except Exception:
            log.failure("netota: closing the batch journal failed")
        try:
            await self.journal.close()
        except Exception:
            log.failure("netota: closing the journal failed")
        self.notifier.close()
        log.info("netota stopped")
