"""``make demo``: the real thing on a simulated device.

Starts ``netota sim`` (a simulated AC79 on loopback) as a subprocess, the daemon under
``twistd -n netota`` with a generated config in a temporary state directory, then runs
``netota upgrade DEVICE FIRMWARE --wait``, which shows both phases' progress to the end: the
percentage of each phase, the device working after netota's last reply, the point of no return.
Everything it prints fits the terminal (80 columns too). Every process and file it made is removed
afterwards, whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Every delay of the simulated device (its reboots, its 5 s waits) is multiplied by this. At 1 the
#: demo shows the real device's timing and takes about half a minute.
TIME_SCALE = 1.0
IMAGE_SIZE = 1_048_576
#: How fast the simulated device writes what it receives (KiB/s, about a real one's pace over WiFi):
#: each phase's transfer then takes a few seconds, not a blink over loopback, and its progress shows.
FLASH_KBPS = 300
DEVICE = "demo-device"
FIRMWARE = "demo-2.0.0.bin"


def _say(text: str) -> None:
    """A line of the demo's own, wrapped to the terminal's width."""
    width = max(40, shutil.get_terminal_size().columns - 1)
    wrapped = textwrap.fill(
        text,
        width,
        initial_indent="demo: ",
        subsequent_indent="      ",
        break_on_hyphens=False,  # a path (/tmp/netota-demo-xxxx/control.sock) stays on one line
        break_long_words=False,
    )
    print(wrapped, flush=True)


def _wait_for(
    check: Callable[[], Any], what: str, timeout: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with status {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes] | None, name: str) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        _say(f"{name} did not stop on SIGTERM: killing it")
        process.kill()
        process.wait(5)


def run() -> int:
    python = sys.executable
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    work = Path(tempfile.mkdtemp(prefix="netota-demo-", dir="/tmp"))
    sim: subprocess.Popen[bytes] | None = None
    daemon: subprocess.Popen[bytes] | None = None
    try:
        firmware_dir, sim_dir, state_dir = work / "firmware", work / "sim", work / "state"
        firmware_dir.mkdir()
        control = work / "control.sock"
        _say(f"working in {work} (removed at the end)")
        if TIME_SCALE == 1.0:
            _say(
                "the simulated device runs at --time-scale 1: its delays (reboots, the loader's start, its 5 s "
                f"waits) are the real device's and it writes {FLASH_KBPS} KiB/s, so this takes under a minute"
            )
        else:
            _say(
                f"the simulated device runs at --time-scale {TIME_SCALE:g}: every delay it has (reboots, waits) "
                f"is {TIME_SCALE:g} times the real device's"
            )
        subprocess.run(
            [
                python,
                "-m",
                "netota_daemon",
                "sim",
                "make-image",
                str(firmware_dir / FIRMWARE),
                "--version",
                "2.0.0",
                "--size",
                str(IMAGE_SIZE),
            ],
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        _say(f"made a {IMAGE_SIZE // 1024} KiB test image, version 2.0.0: {FIRMWARE}")

        sim_log = open(work / "sim.log", "wb")
        sim = subprocess.Popen(
            [
                python,
                "-m",
                "netota_daemon",
                "sim",
                "--listen",
                "127.0.0.1",
                "--ctp-port",
                "0",
                "--http-port",
                "0",
                "--ota-port",
                "0",
                "--state-dir",
                str(sim_dir),
                "--time-scale",
                str(TIME_SCALE),
                "--firmware-version",
                "1.0.0",
                "--flash-kbps",
                str(FLASH_KBPS),
            ],
            env=env,
            stdout=sim_log,
            stderr=subprocess.STDOUT,
        )
        ports_file = sim_dir / "ports.json"
        _wait_for(
            lambda: ports_file.exists() and ports_file.read_text().strip().endswith("}"),
            "the simulator to listen",
            30,
            sim,
        )
        ports = json.loads(ports_file.read_text())
        _say(
            f"simulated device (firmware 1.0.0) on 127.0.0.1: CTP {ports['ctp']}, HTTP {ports['http']}, "
            f"OTA {ports['ota']}"
        )

        config = work / "netota.toml"
        config.write_text(f"""\
[daemon]
control = "unix:{control}:lockfile=1"
state_dir = "{state_dir}"
firmware_dir = "{firmware_dir}"
max_parallel = 1

[timeouts]
poll_interval = 0.2

[devices.{DEVICE}]
host = "127.0.0.1"
ctp_port = {ports["ctp"]}
http_port = {ports["http"]}
ota_port = {ports["ota"]}
""")
        daemon_log = open(work / "daemon.log", "wb")
        daemon = subprocess.Popen(
            [
                python,
                "-c",
                "from twisted.scripts.twistd import run; run()",
                "-n",
                "--pidfile=",
                "netota",
                "--config",
                str(config),
            ],
            env=env,
            stdout=daemon_log,
            stderr=subprocess.STDOUT,
            cwd=str(work),
        )
        _wait_for(control.exists, "the daemon's control socket", 30, daemon)
        _say(f"daemon running under twistd, control socket {control}")

        client_env = dict(env, NETOTA_CONTROL=f"unix:{control}")
        subprocess.run([python, "-m", "netota_daemon", "devices"], env=client_env, check=False)
        _say(f"netota upgrade {DEVICE} {FIRMWARE} --wait")
        started = time.monotonic()
        code = subprocess.run(
            [python, "-m", "netota_daemon", "upgrade", DEVICE, FIRMWARE, "--wait"], env=client_env
        ).returncode
        _say(f"the upgrade took {time.monotonic() - started:.1f} s and exited with status {code}")
        subprocess.run([python, "-m", "netota_daemon", "devices"], env=client_env, check=False)
        if code != 0:
            for name in ("daemon.log", "sim.log"):
                _say(f"--- last lines of {name}")
                print("\n".join((work / name).read_text(errors="replace").splitlines()[-25:]))
        return code
    except (RuntimeError, subprocess.CalledProcessError) as e:
        _say(f"failed: {e}")
        for name in ("daemon.log", "sim.log"):
            if (work / name).exists():
                _say(f"--- last lines of {name}")
                print("\n".join((work / name).read_text(errors="replace").splitlines()[-25:]))
        return 1
    finally:
        _stop(daemon, "the daemon")
        _stop(sim, "the simulator")
        shutil.rmtree(work, ignore_errors=True)
        _say("cleaned up")


if __name__ == "__main__":
    try:
        sys.exit(run())
    except KeyboardInterrupt:
        sys.exit(130)
