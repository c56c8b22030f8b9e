"""``SimulatedDevice``: one simulated AC79 device, its modes, reboots and state files.

It ties the servers together: in ``main`` mode the main firmware's CTP (3333) and HTTP (8080)
servers, and the phase-1 OTA listener (3335) once ``NET_OTA_SINGLE`` asks for it (or at start with
``ota_listen_at_start``); in ``loader`` mode the phase-2 loader's stubs and its 3335 listener;
``down`` while rebooting. The ports found at the first start are reused after every reboot.

Reboots (device seconds, scaled by ``time_scale``)::

    phase-1 OK  -> down (all closed) -reboot_seconds-> WiFi up -loader_start_seconds-> loader listens
    phase-2 OK  -> down -phase2_reboot_seconds-> WiFi up -main_start_seconds-> main firmware (new version)
    watchdog    -> down -phase2_reboot_seconds-> WiFi up -loader_start_seconds-> loader listens

Every event goes to :attr:`events` and ``events.jsonl``; each OTA session's bytes go to
``phase<N>-received.bin``. ``docs/simulator.md`` lists the events and their fields.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, error, utils
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.ctp_server import CtpFactory, MainCtpProtocol
from netota_daemon.sim.http_server import HttpFactory
from netota_daemon.sim.ota_session import FaultState, OtaDeviceSession, RefusedOtaConnection
from netota_daemon.sim.state import StateWriter
from netota_daemon.sim.timers import DeviceTimers

log = Logger()

PORT_NAMES = ("ctp", "http", "ota")


class OtaFactory(Factory):
    """3335: one session at a time; the loader serves only after some HTTP request reached 8080."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device

    def buildProtocol(self, addr: Any) -> Protocol:
        device = self.device
        protocol: Protocol
        if device.ota_session is not None:
            protocol = RefusedOtaConnection(device, "another client is being served")
        elif device.mode == "loader" and not device.loader_http_requests:
            protocol = RefusedOtaConnection(device, "no HTTP request reached 8080 yet (loader)")
        else:
            protocol = OtaDeviceSession(device, 1 if device.mode == "main" else 2)
        return device.track(protocol)


class SimulatedDevice:
    """One device. ``await device.start()``, use ``device.ports``, ``await device.stop()``."""

    def __init__(self, reactor: Any, config: SimConfig) -> None:
        self.reactor = reactor
        self.clock = reactor
        self.config = config
        self.mode = "down"
        self.firmware_version = config.firmware_version
        self.events: list[dict[str, Any]] = []
        self.ports: dict[str, int] = {"ctp": config.ctp_port, "http": config.http_port, "ota": config.ota_port}
        self.faults = FaultState()
        self.state = StateWriter(config.state_path)
        self.timers = DeviceTimers(reactor, config.time_scale)
        self.ota_session: OtaDeviceSession | None = None
        self.ctp_holder: MainCtpProtocol | None = None
        self.loader_ctp_answered = 0
        self.loader_http_requests = 0
        self._listeners: dict[str, IListeningPort] = {}
        self._closing: list[Deferred] = []
        self._connections: dict[Protocol, Deferred] = {}
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], Deferred]] = []
        self._watchdog: Any = None
        self._pending_version: str | None = None
        self._stopping = False
        self._background: set[Deferred] = set()

    # -- events ---------------------------------------------------------------------------------
    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (to :attr:`events` and ``events.jsonl``) and wake matching waiters."""
        entry: dict[str, Any] = {"event": event, "time": round(self.clock.seconds(), 6), "mode": self.mode}
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
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0, after: int = 0
    ) -> Deferred:
        """A Deferred that fires with the first event matching ``predicate``, among the events
        recorded from index ``after`` on (0: past events count too; ``len(device.events)``: only new
        ones). Fails with ``defer.TimeoutError`` after ``timeout`` real seconds."""
        for entry in self.events[after:]:
            if predicate(entry):
                return defer.succeed(entry)
        d: Deferred = Deferred(lambda _: self._waiters.remove(waiter) if waiter in self._waiters else None)
        waiter = (predicate, d)
        self._waiters.append(waiter)
        d.addTimeout(timeout, self.reactor)
        return d

    # -- helpers for the servers ----------------------------------------------------------------
    def new_timers(self) -> DeviceTimers:
        return DeviceTimers(self.clock, self.config.time_scale)

    def track(self, protocol: Protocol) -> Protocol:
        """Remember a connection until it is lost, so reboots and :meth:`stop` can close it."""
        lost: Deferred = Deferred()
        original = protocol.connectionLost

        def connection_lost(reason: Any = None) -> None:
            self._connections.pop(protocol, None)
            try:
                original(reason)
            finally:
                lost.callback(None)

        protocol.connectionLost = connection_lost  # type: ignore[method-assign]
        self._connections[protocol] = lost
        return protocol

    # -- start / stop ---------------------------------------------------------------------------
    def start(self) -> Deferred:
        """Listen in the configured mode; fires with the device once every port is known."""
        try:
            self.record("start", firmware_version=self.firmware_version, listen=self.config.listen)
            opens_ota = self.config.mode == "loader" or self.config.ota_listen_at_start
            if self.ports["ota"] == 0 and not opens_ota:
                # Learn the OTA port now (NET_OTA_SINGLE opens it later), then close it again.
                port = self._listen("ota", OtaFactory(self))
                del self._listeners["ota"]
                self._closing.append(defer.maybeDeferred(port.stopListening))
            self._enter_mode(self.config.mode, initial=True)
        except error.CannotListenError as e:
            self._stop_listening()
            return defer.fail(e)
        self.state.write_ports(self.ports, self.config.listen)
        d = defer.gatherResults(self._closing)
        d.addCallback(lambda _: self)
        return d

    def stop(self) -> Deferred:
        """Close every listener and connection, cancel every timer; fires when all are closed."""
        self._stopping = True
        self.timers.close()
        self.record("stop")
        self._close_everything("simulator stopped")
        self.mode = "down"
        waiting = list(self._closing) + list(self._connections.values()) + list(self._background)
        for d in list(self._waiters):
            d[1].cancel()
        d = defer.DeferredList(waiting, consumeErrors=True)
        d.addCallback(lambda _: None)
        return d

    # -- modes ----------------------------------------------------------------------------------
    def _listen(self, name: str, factory: Factory) -> IListeningPort:
        port = self.reactor.listenTCP(self.ports[name], factory, interface=self.config.listen)
        self.ports[name] = port.getHost().port
        self._listeners[name] = port
        return port

    def _enter_mode(self, mode: str, initial: bool = False) -> None:
        loader = mode == "loader"
        if mode == "main" and self._pending_version:
            self.firmware_version, self._pending_version = self._pending_version, None
        self.loader_ctp_answered = 0
        self.loader_http_requests = 0
        self.mode = mode
        try:
            self._listen("ctp", CtpFactory(self, loader))
            self._listen("http", HttpFactory(self, loader))
            if loader or self.config.ota_listen_at_start:
                self._listen("ota", OtaFactory(self))
        except error.CannotListenError as e:
            self.record("listen_failed", error=str(e))
            self.mode = "down"
            self._stop_listening()
            if initial:
                raise
            return
        self.record("mode", firmware_version=self.firmware_version, ports=dict(self.ports))

    def open_ota_for_phase1(self) -> bool:
        """NET_OTA_SINGLE: open 3335 in the main firmware (harmless when already open)."""
        if self.mode != "main":
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

    def _stop_listening(self) -> None:
        for port in self._listeners.values():
            self._closing.append(defer.maybeDeferred(port.stopListening))
        self._listeners.clear()

    def _close_everything(self, reason: str) -> None:
        if self.ota_session is not None:
            self.ota_session.kill("stopped", reason)
        for protocol in list(self._connections):
            transport = getattr(protocol, "transport", None)
            if transport is not None:
                transport.abortConnection()
        self.ctp_holder = None
        self._stop_listening()
        self.timers.cancel(self._watchdog)

    def _reboot(self, to_mode: str | None, down_seconds: float, boot_seconds: float, reason: str) -> None:
        """Go down now; come back in ``to_mode`` later (None: stay down)."""
        self.record("reboot", reason=reason, to=to_mode or "down")
        self._close_everything("device rebooting")
        self.mode = "down"
        self.record("mode")
        self._run_reboot_command("down")
        if to_mode is not None:
            self.timers.later(down_seconds, self._power_up, to_mode, boot_seconds)

    def _power_up(self, to_mode: str, boot_seconds: float) -> None:
        self.record("power_up", to=to_mode)
        d = self._run_reboot_command("up")
        d.addCallback(lambda _: None if self._stopping else self.timers.later(boot_seconds, self._boot, to_mode))

    def _boot(self, to_mode: str) -> None:
        closing, self._closing = self._closing, []
        d = defer.DeferredList(closing, consumeErrors=True)
        d.addCallback(lambda _: None if self._stopping else self._enter_mode(to_mode))

    def _run_reboot_command(self, direction: str) -> Deferred:
        command = self.config.reboot_command
        if not command or self._stopping:
            return defer.succeed(None)
        env = dict(os.environ, NETOTA_SIM_REBOOT=direction)
        d = utils.getProcessValue("/bin/sh", ("-c", command), env=env, reactor=self.reactor)
        d.addCallbacks(
            lambda code: self.record("reboot_command", direction=direction, exit_code=code),
            lambda failure: self.record("reboot_command", direction=direction, error=str(failure.value)),
        )
        self._background.add(d)
        d.addBoth(lambda result: (self._background.discard(d), result)[1])
        return d

    # -- OTA host interface ---------------------------------------------------------------------
    def ota_session_started(self, session: OtaDeviceSession) -> None:
        self.ota_session = session
        if self.mode == "loader":
            self._arm_watchdog()

    def ota_progress(self, session: OtaDeviceSession) -> None:
        if self.mode == "loader" and session is self.ota_session:
            self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        self.timers.cancel(self._watchdog)
        self._watchdog = self.timers.later(self.config.watchdog_seconds, self._watchdog_fired)

    def _watchdog_fired(self) -> None:
        self._watchdog = None
        seconds = self.config.watchdog_seconds
        self.record("watchdog_reset", seconds=seconds)
        if self.ota_session is not None:
            self.ota_session.kill("watchdog", f"no read progress for {seconds:g} s: the loader reset itself")
        self._reboot("loader", self.config.phase2_reboot_seconds, self.config.loader_start_seconds, "loader watchdog")

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
        if self._stopping or result.outcome != "ok":
            return
        if result.phase == 1:
            if self.config.no_reboot:
                self._reboot(None, 0, 0, "phase 1 OK; --no-reboot: the device stays down")
            else:
                config = self.config
                self._reboot("loader", config.reboot_seconds, config.loader_start_seconds, "phase 1 OK")
        elif self.mode == "loader":
            self._pending_version = result.new_version
            config = self.config
            self._reboot("main", config.phase2_reboot_seconds, config.main_start_seconds, "phase 2 OK")
