"""A real ``twistd netota`` and real ``netota sim`` processes for the tests that drive them from
outside the reactor (the browser tests, the metrics scrape): plain subprocesses whose output goes to
files, so nothing blocks while a test waits in the browser.

Every wait is for an event, with a bound: the simulator's first line on stdout, the daemon's
READY=1 on a notify socket, a line in a simulator's ``events.jsonl`` or the daemon's log (inotify,
through the reactor).

:class:`BrowserThread` runs Playwright's synchronous API on a thread of its own (it can't run in the
reactor's greenlet, where pytest-twisted runs the tests), so the reactor goes on while the page waits.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import selectors
import signal
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred

from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.daemon_fakes import short_socket_dir
from tests.waiting import Changes

T = TypeVar("T")
TWISTD = "from twisted.scripts.twistd import run; run()"
SIM_LISTEN = ("--listen", "127.0.0.1", "--ctp-port", "0", "--http-port", "0", "--ota-port", "0")


class Sim:
    def __init__(self, directory: Path, proc: subprocess.Popen[bytes], ports: dict[str, int]) -> None:
        self.directory = directory
        self.proc = proc
        self.ports = ports

    def events(self) -> list[dict[str, Any]]:
        path = self.directory / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def saw(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())]


class LiveRig:
    def __init__(self, tmp: Path, reactor: Any) -> None:
        self.tmp = tmp
        self.reactor = reactor
        self.firmware_dir = tmp / "fw"
        self.firmware_dir.mkdir()
        self.state_dir = tmp / "state"
        sockets = short_socket_dir()
        self.control_path = os.path.join(sockets, "control.sock")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_path = os.path.join(sockets, "notify")
        self.notify.bind(self.notify_path)
        self.sims: dict[str, Sim] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemon: subprocess.Popen[bytes] | None = None
        self.web_port = 0
        self.changes = Changes(reactor)
        self.changes.watch_directory(tmp)  # the daemon's log

    def make_image(self, name: str, version: str, size: int) -> None:
        subprocess.run(
            [
                PYTHON,
                "-m",
                "netota_daemon",
                "sim",
                "make-image",
                str(self.firmware_dir / name),
                *self._image(version, size),
            ],
            env=subprocess_env(),
            cwd=ROOT,
            check=True,
            capture_output=True,
            timeout=60,
        )

    @staticmethod
    def _image(version: str, size: int) -> list[str]:
        return ["--version", version, "--size", str(size)]

    @staticmethod
    def _scale(time_scale: str, faults: tuple[str, ...]) -> list[str]:
        return ["--time-scale", time_scale, *faults]

    def start_sim(self, name: str, *faults: str, time_scale: str = "0.02") -> Sim:
        directory = self.tmp / f"sim-{name}"
        directory.mkdir()
        self.changes.watch_directory(directory)
        proc = subprocess.Popen(
            [
                PYTHON,
                "-m",
                "netota_daemon",
                "sim",
                *SIM_LISTEN,
                "--state-dir",
                str(directory),
                *self._scale(time_scale, faults),
            ],
            env=subprocess_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=open(directory / "stderr.log", "wb"),
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:  # its first line says it listens (ports.json is written)
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(30), f"simulator {name} said nothing in 30 s"
        line = proc.stdout.readline().decode()
        assert line.startswith("netota sim:"), (line, (directory / "stderr.log").read_text())
        sim = Sim(directory, proc, json.loads((directory / "ports.json").read_text()))
        self.sims[name] = sim
        return sim

    def write_config(self, extra_daemon: str = "", extra_devices: str = "") -> Path:
        devices = "".join(
            f"""
[devices.{name}]
host = "127.0.0.1"
ctp_port = {sim.ports["ctp"]}
http_port = {sim.ports["http"]}
ota_port = {sim.ports["ota"]}
"""
            for name, sim in self.sims.items()
        )
        path = self.tmp / "netota.toml"
        path.write_text(f"""
[daemon]
control = "unix:{self.control_path}:lockfile=1"
state_dir = "{self.state_dir}"
firmware_dir = "{self.firmware_dir}"
max_parallel = 4
shutdown_grace = 10
web = "tcp:0:interface=127.0.0.1"
{extra_daemon}

[timeouts]
deadline = 120
connect = 2
reboot = 30
verify = 30
poll_interval = 0.05
receive = 5
{devices}{extra_devices}""")
        return path

    async def start_daemon(self, extra_daemon: str = "", extra_devices: str = "") -> None:
        config = self.write_config(extra_daemon, extra_devices)
        log = open(self.tmp / "daemon.log", "wb")
        self.daemon = subprocess.Popen(
            [PYTHON, "-c", TWISTD, "-n", "--pidfile=", "netota", "--config", str(config)],
            env=subprocess_env(NOTIFY_SOCKET=self.notify_path),
            cwd=self.tmp,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(self.daemon)
        self.notify.settimeout(30)
        while True:
            try:
                message = self.notify.recv(4096)
            except TimeoutError:
                raise AssertionError(f"no READY=1 from the daemon in 30 s:\n{self.daemon_log()}") from None
            if message.startswith(b"READY=1"):
                break
        self.web_port = await self.listening_port("web")

    async def listening_port(self, key: str) -> int:
        """The port a ``tcp:0`` endpoint got, from the daemon's log line for it (it may follow READY)."""

        def port() -> int | None:
            for line in self.daemon_log().splitlines():
                if f"{key} endpoint listening on" in line:
                    return int(line.rsplit(":", 1)[1])
            return None

        return int(await self.wait_for(port, f"the daemon's log line for its {key} endpoint"))

    def daemon_log(self) -> str:
        return (self.tmp / "daemon.log").read_text(errors="replace")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def api(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def get_text(self, path: str, port: int | None = None) -> str:
        url = f"http://127.0.0.1:{port}{path}" if port else self.url + path
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode()

    async def wait_for(self, predicate: Any, what: str, timeout: float = 30) -> Any:
        """``predicate``'s first true value, re-checked on every change inotify sees in the daemon's and
        the simulators' directories."""
        return await self.changes.until(predicate, what, timeout)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            if proc.stdout is not None:
                proc.stdout.close()
        self.changes.close()
        self.notify.close()


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
