"""A real ``twistd netota`` and real ``netota sim`` processes for the end-to-end tests (the daemon's
own, the client's, the browser tests, the metrics scrape, the firmware API, the OpenAPI check): one
:class:`LiveRig` per test (the ``rig`` fixture in ``tests/conftest.py``), its processes spawned on the
reactor, the daemon's output in a file (``daemon_log()``), so a test that blocks the reactor for a
moment (a urllib request, a browser call) never stalls a process writing into a full pipe.

Every wait is for an event, with a bound: a simulator's ``ports.json``, the daemon's READY=1 on a
notify socket read as systemd does, a line in a simulator's ``events.jsonl`` or the daemon's log
(inotify, through the reactor), a process's end.

:class:`BrowserThread` runs Playwright's synchronous API on a thread of its own (it can't run in the
reactor's greenlet, where pytest-twisted runs the tests), so the reactor goes on while the page waits.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol

from tests.conftest import PYTHON, ROOT, run_netota, start_netota, subprocess_env
from tests.daemon_fakes import short_socket_dir
from tests.waiting import Changes

T = TypeVar("T")
TWISTD = "from twisted.scripts.twistd import run; run()"
SIM_LISTEN = ("--listen", "127.0.0.1", "--ctp-port", "0", "--http-port", "0", "--ota-port", "0")
TIME_SCALE = "0.02"  # device seconds -> real seconds: the device's 5 s reply wait is 100 ms, enough on 2 loaded cores


def image(version: str, size: int) -> list[str]:
    return ["--version", version, "--size", str(size)]


def scaled(time_scale: str, faults: tuple[str, ...]) -> list[str]:
    return ["--time-scale", time_scale, *faults]


class Process(ProcessProtocol):
    """A child process whose output (if it is not sent to a file) is kept and whose end is a Deferred."""

    def __init__(self, name: str, changes: Changes) -> None:
        self.name = name
        self.changes = changes
        self.output = bytearray()
        self.ended: Deferred = Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self.changes.poke()

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = reason.value.exitCode
        self.signal = reason.value.signal
        self.ended.callback(None)
        self.changes.poke()

    @property
    def running(self) -> bool:
        return not self.ended.called

    @property
    def pid(self) -> int:
        return int(self.transport.pid)

    def kill(self, sig: int) -> None:
        if self.running:
            self.transport.signalProcess(sig)

    async def wait(self, reactor: Any, timeout: float = 20) -> None:
        if self.running:
            d: Deferred = Deferred()
            self.ended.addBoth(lambda r: (d.callback(None) if not d.called else None, r)[1])
            d.addTimeout(timeout, reactor)
            await d


def spawn_twistd(
    reactor: Any,
    changes: Changes,
    config: Path,
    cwd: Path,
    log: Path | None = None,
    twistd_options: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Process:
    """``twistd -n netota --config CONFIG OPTIONS`` as a child of the reactor; its output into ``log``
    (truncated), else kept by the :class:`Process`."""
    daemon = Process("daemon", changes)
    args = [PYTHON, "-c", TWISTD, "-n", "--pidfile=", *twistd_options, "netota", "--config", str(config), *options]
    if log is None:
        reactor.spawnProcess(daemon, PYTHON, args, env=env or subprocess_env(), path=str(cwd))
        return daemon
    with open(log, "wb") as out:
        fd = out.fileno()
        reactor.spawnProcess(
            daemon, PYTHON, args, env=env or subprocess_env(), path=str(cwd), childFDs={0: "w", 1: fd, 2: fd}
        )
    return daemon


class NotifyReceiver(DatagramProtocol):
    """The test's stand-in for systemd's notify socket."""

    def __init__(self, received: list[bytes], changes: Changes) -> None:
        self.received = received
        self.changes = changes

    def datagramReceived(self, data: bytes, address: Any) -> None:
        self.received.append(data)
        self.changes.poke()


class Sim:
    def __init__(self, directory: Path, process: Process, ports: dict[str, int]) -> None:
        self.directory = directory
        self.process = process
        self.ports = ports

    def events(self) -> list[dict[str, Any]]:
        path = self.directory / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def saw(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        """Every event ``name`` the simulator recorded with these fields."""
        return [e for e in self.events() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]

    def first(self, name: str, **fields: Any) -> dict[str, Any] | None:
        """The first such event, or None."""
        found = self.saw(name, **fields)
        return found[0] if found else None


class LiveRig:
    """Simulators by name and one daemon (at a time) in a temporary directory."""

    def __init__(self, tmp: Path, reactor: Any) -> None:
        self.tmp = tmp
        self.reactor = reactor
        self.firmware_dir = tmp / "fw"
        self.firmware_dir.mkdir()
        self.state_dir = tmp / "state"
        self.config_path = tmp / "netota.toml"
        self.log_path = tmp / "daemon.log"
        sockets = short_socket_dir()
        self.control_path = os.path.join(sockets, "control.sock")
        self.notify_path = os.path.join(sockets, "notify")
        self.notifications: list[bytes] = []
        # Everything a test waits for (a datagram, a process's end, a line in the daemon's log or a
        # simulator's events.jsonl) pokes this; waits re-check on each poke, with a bound.
        self.changes = Changes(reactor)
        self.changes.watch_directory(tmp)  # the daemon's log
        # Read as systemd does, as the datagrams arrive (a queue nobody drains drops them).
        self.notify = reactor.listenUNIXDatagram(self.notify_path, NotifyReceiver(self.notifications, self.changes))
        self.sims: dict[str, Sim] = {}
        self.daemon: Process | None = None
        self.web_port = 0

    # ----- images and simulators

    def make_image(self, name: str, version: str, size: int) -> None:
        subprocess.run(
            [PYTHON, "-m", "netota_daemon", "sim", "make-image", str(self.firmware_dir / name), *image(version, size)],
            env=subprocess_env(),
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )

    async def start_sim(self, name: str, *faults: str, time_scale: str = TIME_SCALE) -> Sim:
        directory = self.tmp / f"sim-{name}"
        if not directory.exists():
            directory.mkdir()
            self.changes.watch_directory(directory)
        (directory / "ports.json").unlink(missing_ok=True)  # a simulator started again: its new ports
        process = Process(f"sim {name}", self.changes)
        self.reactor.spawnProcess(
            process,
            PYTHON,
            [
                PYTHON,
                "-m",
                "netota_daemon",
                "sim",
                *SIM_LISTEN,
                "--state-dir",
                str(directory),
                *scaled(time_scale, faults),
            ],
            env=subprocess_env(),
            path=str(ROOT),
        )
        ports_file = directory / "ports.json"
        await self.changes.until(
            lambda: (ports_file.exists() and ports_file.read_text().strip().endswith("}")) or not process.running,
            f"simulator {name}'s ports.json",
        )
        assert process.running, process.output.decode()
        sim = Sim(directory, process, json.loads(ports_file.read_text()))
        self.sims[name] = sim
        return sim

    # ----- the daemon

    def write_config(
        self,
        extra_daemon: str = "",
        extra_devices: str = "",
        max_parallel: int = 4,
        web: bool = True,
        device_lines: str = "",
        extra_timeouts: str = "",
    ) -> Path:
        """The config for the simulators started so far (``device_lines`` added to each one's table),
        then ``extra_devices``."""
        devices = "".join(
            f"""
[devices.{name}]
host = "127.0.0.1"
ctp_port = {sim.ports["ctp"]}
http_port = {sim.ports["http"]}
ota_port = {sim.ports["ota"]}
{device_lines}"""
            for name, sim in self.sims.items()
        )
        web_line = 'web = "tcp:0:interface=127.0.0.1"' if web else ""
        self.config_path.write_text(f"""
[daemon]
control = "unix:{self.control_path}:lockfile=1"
state_dir = "{self.state_dir}"
firmware_dir = "{self.firmware_dir}"
max_parallel = {max_parallel}
shutdown_grace = 10
{web_line}
{extra_daemon}

[timeouts]
deadline = 120
connect = 2
reboot = 30
verify = 30
poll_interval = 0.05
receive = 5
{extra_timeouts}
{devices}{extra_devices}""")
        return self.config_path

    async def start_daemon(
        self,
        extra_daemon: str = "",
        extra_devices: str = "",
        options: tuple[str, ...] = (),
        max_parallel: int = 4,
        web: bool = True,
        device_lines: str = "",
        extra_timeouts: str = "",
    ) -> None:
        """Write the config for the simulators started so far and start the daemon (again, after an
        earlier one ended: its log starts anew); returns once it said READY=1 (and, with ``web``, its
        web endpoint listens)."""
        config = self.write_config(extra_daemon, extra_devices, max_parallel, web, device_lines, extra_timeouts)
        self.notifications.clear()  # forget what an earlier daemon said
        # As systemd with WatchdogSec=1: the daemon pings every 0.5 s.
        env = subprocess_env(NOTIFY_SOCKET=self.notify_path, WATCHDOG_USEC="1000000")
        self.daemon = daemon = spawn_twistd(
            self.reactor, self.changes, config, self.tmp, self.log_path, (), options, env
        )
        await self.changes.until(lambda: self.notified(b"READY=1") or not daemon.running, "READY=1 from the daemon")
        assert daemon.running, self.daemon_log()
        if web:
            self.web_port = await self.listening_port("web")

    def notified(self, prefix: bytes) -> bool:
        return any(m.startswith(prefix) for m in self.notifications)

    async def listening_port(self, key: str) -> int:
        """The port a ``tcp:0`` endpoint got, from the daemon's log line for it (it may follow READY)."""

        def port() -> int | None:
            for line in self.daemon_log().splitlines():
                if f"{key} endpoint listening on" in line:
                    return int(line.rsplit(":", 1)[1])
            return None

        return int(await self.wait_for(port, f"the daemon's log line for its {key} endpoint"))

    def daemon_log(self) -> str:
        """What the current daemon wrote (stdout and stderr)."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ----- talking to it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """A request on the web endpoint, blocking (for the browser's thread too)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    async def control(self, method: str, path: str, body: dict | None = None) -> dict:
        """A request on the control socket, through the client's own ControlClient."""
        from netota_daemon.cli.control_client import ControlClient

        return await ControlClient(self.reactor, f"unix:{self.control_path}").request(method, path, body)

    def get_text(self, path: str, port: int | None = None) -> str:
        url = f"http://127.0.0.1:{port}{path}" if port else self.url + path
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()

    def start_netota(self, *args: str, timeout: float = 90) -> Deferred:
        """``netota ARGS`` against this daemon's control socket, in the background: fires with
        (stdout, stderr, exit code)."""
        return start_netota(self.reactor, f"unix:{self.control_path}", *args, timeout=timeout)

    async def netota(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) of ``netota ARGS``."""
        return await run_netota(self.reactor, f"unix:{self.control_path}", *args, timeout=timeout)

    async def netota_json(self, *args: str) -> Any:
        code, out, err = await self.netota(*args, "--json")
        assert code == 0, (code, out, err)
        return json.loads(out)

    async def wait_for(self, predicate: Any, what: str, timeout: float = 30) -> Any:
        """``predicate``'s first true value, re-checked on every change inotify sees in the daemon's and
        the simulators' directories (and every notification or process end)."""
        return await self.changes.until(predicate, what, timeout)

    async def stop(self) -> None:
        processes = [self.daemon] + [sim.process for sim in self.sims.values()]
        for process in processes:
            if process is not None and process.running:
                process.kill(signal.SIGTERM)
                try:
                    await process.wait(self.reactor, 15)
                except Exception:
                    process.kill(signal.SIGKILL)
                    await process.wait(self.reactor, 5)
        await maybeDeferred(self.notify.stopListening)
        self.changes.close()


class BrowserThread:
    """One thread for every Playwright call (its objects belong to the thread that made them)."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="browser")

    def call(self, function: Callable[[], T]) -> T:
        """Run ``function`` there and wait (for fixtures, outside the reactor's turns)."""
        return self.executor.submit(function).result(timeout=120)

    def run(self, function: Callable[[], T]) -> Deferred[T]:
        """Run ``function`` there; the Deferred fires on the reactor with its result."""
        d: Deferred[T] = Deferred()
        future = self.executor.submit(function)

        def done(f: concurrent.futures.Future[T]) -> None:
            error = f.exception()
            if error is not None:
                self.reactor.callFromThread(d.errback, error)
            else:
                self.reactor.callFromThread(d.callback, f.result())

        future.add_done_callback(done)
        return d

    def close(self) -> None:
        self.executor.shutdown(wait=True)
