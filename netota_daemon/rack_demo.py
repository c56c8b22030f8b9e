"""``make rack-demo``: a whole rack flashed at once, for a person to watch. Needs root.

Builds a rack in network namespaces (:mod:`netota_daemon.sim.rack`: N simulated devices, every one at
192.168.1.1, each behind its own interface of a rack namespace where ``twistd netota`` runs), then
runs ``netota upgrade --all FIRMWARE --wait`` and ``netota devices``. Everything it made (namespaces,
processes, files) is removed at the end, whatever happens.

Usage: ``python -m netota_daemon.rack_demo [--devices N] [--time-scale F]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from netota_daemon.sim.image import make_image
from netota_daemon.sim.rack import RackError, SimulatedRack, namespaces_available

FIRMWARE = "rack-2.0.0.ufw"
#: The daemon's waits, fitted to simulated devices that run at ``--time-scale``.
TIMEOUTS = {"connect": 2.0, "receive": 1.0, "poll_interval": 0.2, "reboot": 60.0, "verify": 60.0}


def _say(text: str) -> None:
    print(f"rack-demo: {text}", flush=True)


def run(devices: int, time_scale: float) -> int:
    reason = namespaces_available()
    if reason:
        _say(f"can't build a rack here: {reason}")
        return 77
    work = Path(tempfile.mkdtemp(prefix="netota-rack-", dir="/tmp"))
    try:
        firmware_dir = work / "firmware"
        firmware_dir.mkdir()
        make_image(firmware_dir / FIRMWARE, "2.0.0", 1_048_576)
        with SimulatedRack(work / "rack", size=devices, time_scale=time_scale) as rack:
            _say(
                f"{devices} simulated devices, each at 192.168.1.1 in its own network namespace, delays x{time_scale:g}"
            )
            rack.start_devices()
            rack.start_daemon(rack.write_config(firmware_dir, TIMEOUTS))
            for device in rack.devices:
                _say(
                    f"  {device.name}: interface {device.rack_interface} ({device.source_address}) "
                    f"-> namespace {device.namespace}"
                )
            _say(f"daemon running in namespace {rack.rack_namespace}; control socket {rack.control_path}")
            print(rack.client("devices").stdout, flush=True)
            _say(f"netota upgrade --all {FIRMWARE} --wait")
            code = subprocess.run(
                [sys.executable, "-m", "netota_daemon", "upgrade", "--all", FIRMWARE, "--wait"],
                env=dict(rack._env, NETOTA_CONTROL=f"unix:{rack.control_path}"),
            ).returncode
            print(rack.client("devices").stdout, flush=True)
            _say(f"the batch exited with status {code}")
            return code
    except RackError as e:
        _say(f"failed: {e}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _say("namespaces, processes and files removed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m netota_daemon.rack_demo",
        description="make rack-demo: a whole rack flashed at once, for a person to watch. Needs root.",
    )
    parser.add_argument("--devices", type=int, default=4, help="how many devices (default 4)")
    parser.add_argument(
        "--time-scale", type=float, default=0.2, help="the simulated devices' delays, times the real ones (default 0.2)"
    )
    args = parser.parse_args(argv)
    return run(args.devices, args.time_scale)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
