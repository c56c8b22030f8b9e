"""``SimulatedDevice``: one simulated AC79 device, its modes, reboots and state files.

It owns what is the device's: the mode (:class:`~netota_daemon.sim.config.DeviceMode`), the
listeners, reboots, the loader's watchdog, the faults that fire once over its life and the event
log. The servers keep their own state and reach the device through the host interfaces of
:mod:`netota_daemon.sim.host`; a new set of servers is built at every boot:

- ``main``: the main firmware's CTP (3333) and HTTP (8080) servers, the phase-1 OTA listener (3335)
  once ``NET_OTA_SINGLE`` asks for it (or at start with ``ota_listen_at_start``);
- ``main`` of a double-backup build: CTP and HTTP as above (``NET_OTA_SINGLE`` answers status "0",
  the document ``ota_type`` "0") and the FTP server (21) with its dual-bank writer; a good upload
  resets the device 2 s after its 226 into the new version (``--fixed-version``: unchanged);
- ``loader``: the phase-2 loader's stubs and its 3335 listener;
- ``down``: rebooting, nothing listens.

The ports found at the first start are reused after every reboot. Every connection goes through a
:class:`~netota_daemon.sim.connections.TrackingFactory`, so a reboot or :meth:`SimulatedDevice.stop`
closes them all and waits for each.

Reboots (device seconds, scaled by ``time_scale``)::

    phase-1 OK  -> down (all closed) -reboot_seconds-> WiFi up -loader_start_seconds-> loader listens
    phase-2 OK  -> down -phase2_reboot_seconds-> WiFi up -main_start_seconds-> main firmware (new version)
    watchdog    -> down -phase2_reboot_seconds-> WiFi up -loader_start_seconds-> loader listens

Every event goes to :attr:`SimulatedDevice.events` and ``events.jsonl``; each OTA session's bytes go
to ``phase<N>-received.bin``. ``docs/simulator.md`` lists the events and their fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error, utils
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netota_daemon.sim.config import DeviceMode, SimConfig
from netota_daemon.sim.connections import ConnectionRegistry, TrackingFactory
from netota_daemon.sim.ctp_server import LoaderCtpServer, MainCtpServer, ctp_server
from netota_daemon.sim.ftp_server import FtpCrash, FtpServer
from netota_daemon.sim.host import FaultState
from netota_daemon.sim.http_server import LoaderHttpServer, MainHttpServer, http_server
from netota_daemon.sim.ota_session import OtaDeviceSession, RefusedOtaConnection, SessionOutcome
from netota_daemon.sim.state import StateWriter
from netota_daemon.sim.timers import DeviceTimers

log = Logger()

PORT_NAMES = ("ctp", "http", "ota")  # a single-backup build's ports
DOUBLE_BACKUP_PORT_NAMES = ("ctp", "http", "ftp")  # a double-backup build's (3335 never opens)
EventPredicate = Callable[[dict[str, Any]], bool]


class OtaFactory(Factory):
    """3335: one session at a time; the loader serves only after some HTTP request reached 8080."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        device = self.device
        if device.ota_session is not None:
            return RefusedOtaConnection(device, "another client is being served")
        http = device.http_server
        if device.mode is DeviceMode.LOADER and not (isinstance(http, LoaderHttpServer) and http.requests):
            return RefusedOtaConnection(device, "no HTTP request reached 8080 yet (loader)")
        return OtaDeviceSession(device, 1 if device.mode is DeviceMode.MAIN else 2)


class SimulatedDevice:
    """One device. ``await device.start()``, use ``device.ports``, ``await device.stop()``."""

    def __init__(self, reactor: IReactorTime, config: SimConfig) -> None:
        self.reactor = reactor
        self.config = config
        self.mode = DeviceMode.DOWN
        self.firmware_version = config.firmware_version
        self.events: list[dict[str, Any]] = []
        #: The ports by name (``ftp`` only in a double-backup build, whose 3335 never opens, but whose
        #: ``ota`` is still known); 0 (any free port) is replaced by the port found at start.
        self.ports: dict[str, int] = {"ctp": config.ctp_port, "http": config.http_port, "ota": config.ota_port}
        if config.double_backup:
            self.ports["ftp"] = config.ftp_port
        self.faults = FaultState()
        self.state = StateWriter(config.state_path)
        self.timers = DeviceTimers(reactor, config.time_scale)
        self.ota_session: OtaDeviceSession | None = None
        #: This boot's servers (None while down).
        self.ctp_server: MainCtpServer | LoaderCtpServer | None = None
        self.http_server: MainHttpServer | LoaderHttpServer | None = None
        self.ftp_server: FtpServer | None = None
        self._data_listeners: list[IListeningPort] = []  # PASV listeners (leaked ones too)
        self._connections = ConnectionRegistry()
        self._listeners: dict[str, IListeningPort] = {}
        self._factories: dict[str, TrackingFactory] = {}
        self._closing: list[Deferred[Any]] = []
        self._waiters: list[tuple[EventPredicate, Deferred[dict[str, Any]]]] = []
        self._watchdog: IDelayedCall | None = None
        self._pending_version: str | None = None
        self._stopping = False
        self._background: set[Deferred[Any]] = set()

    # -- events ---------------------------------------------------------------------------------
    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (to :attr:`events` and ``events.jsonl``) and wake matching waiters."""
        entry: dict[str, Any] = {"event": event, "time": round(self.reactor.seconds(), 6), "mode": self.mode.value}
        entry.update(fields)
        self.events.append(entry)
        self.state.append_event(entry)
        log.debug("sim event {event}: {fields}", event=event, fields=fields)
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(entry):
                self._waiters.remove(waiter)
                d.callback(entry)
        return entry

    def wait_for_event(
        self, predicate: EventPredicate, timeout: float = 10.0, after: int = 0
    ) -> Deferred[dict[str, Any]]:
        """A Deferred that fires with the first event matching ``predicate``, among the events
        recorded from index ``after`` on (0: past events count too; ``len(device.events)``: only new
        ones). Fails with ``defer.TimeoutError`` after ``timeout`` real seconds."""
        for entry in self.events[after:]:
            if predicate(entry):
                return defer.succeed(entry)

        def forget(_: Deferred[dict[str, Any]]) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        d: Deferred[dict[str, Any]] = Deferred(forget)
        waiter = (predicate, d)
        self._waiters.append(waiter)
        d.addTimeout(timeout, self.reactor)
        return d

    # -- what tests and tools may look at -------------------------------------------------------
    @property
    def port_names(self) -> tuple[str, ...]:
        """The ports this build serves: ``ctp``, ``http``, then ``ota`` (single backup) or ``ftp``."""
        return DOUBLE_BACKUP_PORT_NAMES if self.config.double_backup else PORT_NAMES

    @property
    def listening(self) -> frozenset[str]:
        """The ports listening now, by name (``ctp``, ``http``, ``ota``)."""
        return frozenset(self._listeners)

    def server_factory(self, name: str) -> IProtocolFactory:
        """The factory listening on port ``name`` now, as connections get it (tracked): in-memory
        tests build their connections with it. ``KeyError`` when that port is not listening."""
        return self._factories[name]

    # -- start / stop ---------------------------------------------------------------------------
    def start(self) -> Deferred[SimulatedDevice]:
        """Listen in the configured mode; fires with the device once every port is known."""
        try:
            self.record("start", firmware_version=self.firmware_version, listen=self.config.listen)
            mode = self.config.start_mode
            opens_ota = mode is DeviceMode.LOADER or self.config.ota_listen_at_start
            if self.ports["ota"] == 0 and not opens_ota:
                # Learn the OTA port now (NET_OTA_SINGLE opens it later), then close it again.
                self._listen("ota", OtaFactory(self))
                self._stop_listening("ota")
            self._enter_mode(mode, initial=True)
        except error.CannotListenError as e:
            self._stop_listening()
            return defer.fail(e)
        self.state.write_ports(self.ports, self.config.listen)
        d = defer.gatherResults(self._closing)
        return d.addCallback(lambda _: self)

    def stop(self) -> Deferred[None]:
        """Close every listener and connection, cancel every timer; fires when all are closed."""
        self._stopping = True
        self.timers.close()
        self.record("stop")
        self._close_everything("simulator stopped")
        self.mode = DeviceMode.DOWN
        waiting = [*self._closing, *self._connections.waiting(), *self._background]
        for _, d in list(self._waiters):
            d.cancel()
        done = defer.DeferredList(waiting, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def reboot_into(self, mode: DeviceMode | str | None, down_seconds: float, boot_seconds: float, reason: str) -> None:
        """Reboot now: every connection and listener closed, mode ``down``; ``down_seconds`` later
        the WiFi is back (``power_up``), ``boot_seconds`` after that ``mode`` listens (None: stay
        down). Device seconds, scaled. Tests use it to make the device leave its loader, say."""
        target = DeviceMode(mode) if mode is not None else None
        self.record("reboot", reason=reason, to=target.value if target else "down")
        self._close_everything("device rebooting")
        self.mode = DeviceMode.DOWN
        self.record("mode")
        self._run_reboot_command("down")
        if target is not None:
            self.timers.later(down_seconds, self._power_up, target, boot_seconds)

    # -- modes ----------------------------------------------------------------------------------
    def _listen(self, name: str, factory: IProtocolFactory) -> IListeningPort:
        tracked = TrackingFactory(factory, self._connections)
        tcp = IReactorTCP(self.reactor)
        port = tcp.listenTCP(self.ports[name], tracked, interface=self.config.listen)  # type: ignore[arg-type]
        self.ports[name] = port.getHost().port  # type: ignore[attr-defined]
        self._listeners[name] = port
        self._factories[name] = tracked
        return port

    def _enter_mode(self, mode: DeviceMode, initial: bool = False) -> None:
        loader = mode is DeviceMode.LOADER
        if mode is DeviceMode.MAIN and self._pending_version:
            self.firmware_version, self._pending_version = self._pending_version, None
        self.mode = mode
        self.ctp_server = ctp_server(self, loader)
        self.http_server = http_server(self, loader)
        double_backup = self.config.double_backup
        self.ftp_server = FtpServer(self) if double_backup else None
        try:
            self._listen("ctp", self.ctp_server)
            self._listen("http", self.http_server)
            if self.ftp_server is not None:
                self._listen("ftp", self.ftp_server)
            if loader or (self.config.ota_listen_at_start and not double_backup):
                self._listen("ota", OtaFactory(self))
        except error.CannotListenError as e:
            self.record("listen_failed", error=str(e))
            self.mode = DeviceMode.DOWN
            self.ctp_server = self.http_server = self.ftp_server = None
            self._stop_listening()
            if initial:
                raise
            return
        self.record("mode", firmware_version=self.firmware_version, ports=dict(self.ports))

    def open_ota_for_phase1(self) -> bool:
        """NET_OTA_SINGLE: open 3335 in the main firmware (harmless when already open)."""
        if self.mode is not DeviceMode.MAIN:
            return False
        if "ota" in self._listeners:
            return True
        try:
            self._listen("ota", OtaFactory(self))
        except error.CannotListenError as e:
            self.record("listen_failed", error=str(e))
            return False
        self.record("ota_listening", port=self.ports["ota"])
        return True

    def _stop_listening(self, *names: str) -> None:
        for name in names or list(self._listeners):
            port = self._listeners.pop(name)
            self._factories.pop(name, None)
            self._closing.append(defer.maybeDeferred(port.stopListening))
        if not names:
            for listener in list(self._data_listeners):
                self.stop_data_listener(listener)

    def _close_everything(self, reason: str) -> None:
        if self.ota_session is not None:
            self.ota_session.kill(SessionOutcome.STOPPED, reason)
        if self.ftp_server is not None:
            self.ftp_server.shutdown()
        self._connections.abort_all()
        self.ctp_server = self.http_server = self.ftp_server = None
        self._stop_listening()
        self.timers.cancel(self._watchdog)

    def _power_up(self, to_mode: DeviceMode, boot_seconds: float) -> None:
        self.record("power_up", to=to_mode.value)
        d = self._run_reboot_command("up")
        d.addCallback(lambda _: None if self._stopping else self.timers.later(boot_seconds, self._boot, to_mode))

    def _boot(self, to_mode: DeviceMode) -> None:
        closing, self._closing = self._closing, []
        d = defer.DeferredList(closing, consumeErrors=True)
        d.addCallback(lambda _: None if self._stopping else self._enter_mode(to_mode))

    def _run_reboot_command(self, direction: str) -> Deferred[Any]:
        command = self.config.reboot_command
        if not command or self._stopping:
            return defer.succeed(None)
        env = dict(os.environ, NETOTA_SIM_REBOOT=direction)
        d: Deferred[Any] = utils.getProcessValue(  # type: ignore[no-untyped-call]
            "/bin/sh", ("-c", command), env=env, reactor=self.reactor
        )
        d.addCallbacks(
            lambda code: self.record("reboot_command", direction=direction, exit_code=code),
            lambda failure: self.record("reboot_command", direction=direction, error=str(failure.value)),
        )
        self._background.add(d)

        def done(result: Any) -> Any:
            self._background.discard(d)
            return result

        return d.addBoth(done)

    # -- FTP host interface ---------------------------------------------------------------------
    def listen_data(self, port: int, factory: IProtocolFactory, interface: str) -> IListeningPort:
        tracked = TrackingFactory(factory, self._connections)
        listener = IReactorTCP(self.reactor).listenTCP(port, tracked, interface=interface)  # type: ignore[arg-type]
        self._data_listeners.append(listener)
        return listener

    def stop_data_listener(self, listener: IListeningPort) -> None:
        if listener in self._data_listeners:
            self._data_listeners.remove(listener)
            self._closing.append(defer.maybeDeferred(listener.stopListening))

    def ftp_crashed(self, cause: FtpCrash, verb: str) -> None:
        self.record("ftp_crash", cause=cause.value, verb=verb)
        config = self.config
        self.reboot_into(
            DeviceMode.MAIN, config.reboot_seconds, config.main_start_seconds, f"ftpd crash ({cause.value})"
        )

    def upgrade_burned(self, version: str | None) -> None:
        if version is not None and not self.config.fixed_version:
            self._pending_version = version
        config = self.config
        self.timers.later(
            config.db_reset_seconds,
            self.reboot_into,
            DeviceMode.MAIN,
            config.reboot_seconds,
            config.main_start_seconds,
            "double-backup upgrade burned: net_update_system_reset",
        )

    def write_upload(self, data: bytes) -> None:
        self.state.write_upload(data)

    # -- OTA host interface ---------------------------------------------------------------------
    def ota_session_started(self, session: OtaDeviceSession) -> None:
        self.ota_session = session
        if self.mode is DeviceMode.LOADER:
            self._arm_watchdog()

    def ota_progress(self, session: OtaDeviceSession) -> None:
        if self.mode is DeviceMode.LOADER and session is self.ota_session:
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        self.timers.cancel(self._watchdog)
        self._watchdog = self.timers.later(self.config.watchdog_seconds, self._watchdog_fired)

    def _watchdog_fired(self) -> None:
        self._watchdog = None
        seconds = self.config.watchdog_seconds
        self.record("watchdog_reset", seconds=seconds)
        if self.ota_session is not None:
            self.ota_session.kill(
                SessionOutcome.WATCHDOG, f"no read progress for {seconds:g} s: the loader reset itself"
            )
        config = self.config
        self.reboot_into(
            DeviceMode.LOADER, config.phase2_reboot_seconds, config.loader_start_seconds, "loader watchdog"
        )

    def ota_session_ended(self, session: OtaDeviceSession) -> None:
        if self.ota_session is session:
            self.ota_session = None
            self.timers.cancel(self._watchdog)
            self._watchdog = None
        result = session.result
        if result is None:
            return
        self.state.write_received(result.phase, result.received)
        self.record("session_end", **result.event_fields())
        if self._stopping or result.outcome is not SessionOutcome.OK:
            return
        config = self.config
        if result.phase == 1:
            if config.no_reboot:
                self.reboot_into(None, 0, 0, "phase 1 OK; --no-reboot: the device stays down")
            else:
                self.reboot_into(DeviceMode.LOADER, config.reboot_seconds, config.loader_start_seconds, "phase 1 OK")
        elif self.mode is DeviceMode.LOADER:
            self._pending_version = result.new_version
            self.reboot_into(DeviceMode.MAIN, config.phase2_reboot_seconds, config.main_start_seconds, "phase 2 OK")
