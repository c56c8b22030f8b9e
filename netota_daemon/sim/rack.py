"""A simulated test rack in Linux network namespaces: N devices, every one at 192.168.1.1.

Layout (for N = 2, prefix ``nrk42``)::

    namespace nrk42d0                      namespace nrk42r (the rack host)           namespace nrk42d1
    netota sim on 192.168.1.1  wlan0 <--veth--> nrk42r0 192.168.1.10   nrk42r1 192.168.1.11 <--veth--> wlan0  netota sim on 192.168.1.1
                                               twistd netota (one device per interface)

Each simulator listens on the real ports (3333, 8080, 3335; a double-backup device, started with
``--double-backup`` among its ``sim_args``, FTP on 21 and its PASV ports from 4097, all inside its
own namespace) and takes its own link down and up around its reboots (``--reboot-command``), as a
real device's WiFi does. The daemon runs inside the
rack namespace; its control socket is a UNIX socket on the shared filesystem, so clients run from
anywhere on the host.

Every address here exists only inside namespaces this module creates and deletes itself
(:meth:`SimulatedRack.close` deletes them, and :func:`remove_stale` cleans up after a killed run).
Needs root (``ip netns``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICE_ADDRESS = "192.168.1.1"
DEVICE_INTERFACE = "wlan0"
NAMESPACE_PREFIX = "nrk"


class RackError(Exception):
    """The rack can't be built here (no root, no ``ip netns``) or a step of building it failed."""


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RackError(f"ip {' '.join(args)}: {result.stderr.strip() or 'failed'}")


def namespaces_available() -> str | None:
    """None when network namespaces can be made here, else the reason they can't."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"{NAMESPACE_PREFIX}probe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RackError as e:
        return f"can't create a network namespace: {e}"
    try:
        _ip("netns", "del", probe)
    except RackError:
        pass
    return None


def remove_stale(prefix: str = NAMESPACE_PREFIX) -> None:
    """Delete namespaces left by racks whose process no longer runs (a killed test run)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(re.escape(prefix) + r"(\d+)[rd]\d*", name)
        if match and not _pid_alive(int(match.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RackDevice:
    index: int
    name: str  # the daemon's device name
    namespace: str
    rack_interface: str
    source_address: str
    state_dir: Path
    sim_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def double_backup(self) -> bool:
        """Whether this device runs a double-backup build (upgraded over FTP)."""
        return "--double-backup" in self.sim_args

    def received_upload(self) -> bytes | None:
        """What its last FTP upload delivered (``db-received.bin``), or None when none ended."""
        path = self.state_dir / "db-received.bin"
        return path.read_bytes() if path.exists() else None

    def exited(self) -> bool:
        """Whether its simulator is not running (never started, or gone)."""
        return self.process is None or self.process.poll() is not None

    def events(self) -> list[dict[str, Any]]:
        path = self.state_dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class SimulatedRack:
    """Builds the namespaces, starts one ``netota sim`` per device and the daemon in the rack.

    Use as a context manager: everything is torn down on exit, failure or not.
    """

    def __init__(self, workdir: Path, size: int = 4, time_scale: float = 0.05, python: str = sys.executable) -> None:
        if not 1 <= size <= 200:
            raise RackError("a rack has 1 to 200 devices")
        self.workdir = Path(workdir)
        self.size = size
        self.time_scale = time_scale
        self.python = python
        self.tag = f"{NAMESPACE_PREFIX}{os.getpid()}"  # the owner pid: remove_stale() checks it
        self.rack_namespace = f"{self.tag}r"
        self.devices = [
            RackDevice(
                index=i,
                name=f"dev{i}",
                namespace=f"{self.tag}d{i}",
                rack_interface=f"{self.tag}r{i}",
                source_address=f"192.168.1.{10 + i}",
                state_dir=self.workdir / f"dev{i}",
            )
            for i in range(size)
        ]
        self.daemon: subprocess.Popen[bytes] | None = None
        self.control_path = Path("/tmp") / f"{self.tag}-control.sock"
        self._namespaces: list[str] = []
        self._env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        self._env["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in self._env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        self._env["PYTHONUNBUFFERED"] = "1"

    # -- building ---------------------------------------------------------------------------------
    def __enter__(self) -> SimulatedRack:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def build(self) -> None:
        remove_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._add_namespace(self.rack_namespace)
        _ip("-n", self.rack_namespace, "link", "set", "lo", "up")
        for device in self.devices:
            self._add_namespace(device.namespace)
            _ip("link", "add", device.rack_interface, "type", "veth", "peer", "name", f"{device.namespace}w")
            _ip("link", "set", device.rack_interface, "netns", self.rack_namespace)
            _ip("link", "set", f"{device.namespace}w", "netns", device.namespace)
            _ip("-n", device.namespace, "link", "set", f"{device.namespace}w", "name", DEVICE_INTERFACE)
            _ip("-n", device.namespace, "addr", "add", f"{DEVICE_ADDRESS}/24", "dev", DEVICE_INTERFACE)
            _ip("-n", device.namespace, "link", "set", "lo", "up")
            _ip("-n", device.namespace, "link", "set", DEVICE_INTERFACE, "up")
            _ip("-n", self.rack_namespace, "addr", "add", f"{device.source_address}/24", "dev", device.rack_interface)
            _ip("-n", self.rack_namespace, "link", "set", device.rack_interface, "up")

    def _add_namespace(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)

    # -- processes --------------------------------------------------------------------------------
    def start_devices(self, sim_args: Sequence[Sequence[str]] | None = None) -> None:
        """Start one simulator per device; ``sim_args[i]`` adds options (faults) for device i."""
        for device in self.devices:
            extra = list(sim_args[device.index]) if sim_args else []
            device.state_dir.mkdir(parents=True, exist_ok=True)
            (device.state_dir / "ports.json").unlink(missing_ok=True)
            command = [
                "ip",
                "netns",
                "exec",
                device.namespace,
                self.python,
                "-m",
                "netota_daemon",
                "sim",
                "--listen",
                DEVICE_ADDRESS,
                "--ctp-port",
                "3333",
                "--http-port",
                "8080",
                "--ota-port",
                "3335",
                "--ftp-port",
                "21",  # used by a double-backup device only
                "--state-dir",
                str(device.state_dir),
                "--time-scale",
                str(self.time_scale),
                # The device's WiFi goes away while it reboots, as on real hardware.
                "--reboot-command",
                f'ip link set {DEVICE_INTERFACE} "$NETOTA_SIM_REBOOT"',
                *extra,
            ]
            with open(device.state_dir / "sim.log", "wb") as log:
                device.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self._env)
            device.sim_args = extra
        for device in self.devices:
            _wait_for(
                lambda d=device: (d.state_dir / "ports.json").exists() or d.exited(),  # type: ignore[misc]
                30,
                f"simulator {device.name} to listen",
            )
            if device.exited():
                raise RackError(f"simulator {device.name} exited: {(device.state_dir / 'sim.log').read_text()[-2000:]}")

    def write_config(
        self, firmware_dir: Path, timeouts: dict[str, float] | None = None, max_parallel: int | None = None
    ) -> Path:
        """The daemon's config: one device per rack interface."""
        state_dir = self.workdir / "daemon-state"
        state_dir.mkdir(parents=True, exist_ok=True)
        lines = [
            "[daemon]",
            f'control = "unix:{self.control_path}:mode=660:lockfile=1"',
            f'state_dir = "{state_dir}"',
            f'firmware_dir = "{firmware_dir}"',
            f"max_parallel = {max_parallel or self.size}",
            "",
            "[timeouts]",
        ]
        for key, value in (timeouts or {}).items():
            lines.append(f"{key} = {value!r}")
        for device in self.devices:
            lines += [
                "",
                f"[devices.{device.name}]",
                f'host = "{DEVICE_ADDRESS}"',
                f'interface = "{device.rack_interface}"',
                f'source_address = "{device.source_address}"',
            ]
        path = self.workdir / "netota.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_daemon(self, config: Path) -> None:
        self.control_path.unlink(missing_ok=True)
        with open(self.workdir / "daemon.log", "wb") as log:
            daemon = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.rack_namespace,
                    self.python,
                    "-c",
                    "from twisted.scripts.twistd import run; run()",
                    "--nodaemon",
                    "--pidfile",
                    "",
                    "netota",
                    "--config",
                    str(config),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                cwd=self.workdir,
            )
        self.daemon = daemon
        _wait_for(lambda: self.control_path.exists() or daemon.poll() is not None, 30, "the daemon's control socket")
        if daemon.poll() is not None:
            raise RackError(f"the daemon exited: {(self.workdir / 'daemon.log').read_text()[-3000:]}")

    def client(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``netota ARGS`` against this rack's daemon (from the host namespace)."""
        return subprocess.run(
            [self.python, "-m", "netota_daemon", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(self._env, NETOTA_CONTROL=f"unix:{self.control_path}"),
        )

    def stop_processes(self) -> None:
        procs = [d.process for d in self.devices if d.process] + ([self.daemon] if self.daemon else [])
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def close(self) -> None:
        try:
            self.stop_processes()
        finally:
            for name in reversed(self._namespaces):
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            self._namespaces.clear()
            self.control_path.unlink(missing_ok=True)


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` (a cheap file or process check) until true, for at most ``seconds``."""
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise RackError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.05)
