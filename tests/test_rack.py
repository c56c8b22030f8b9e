"""The rack: N simulated devices, every one at 192.168.1.1 in its own network namespace, upgraded
at once by one ``twistd netota`` through one interface per device. The last device runs a
double-backup build (FTP on the real port 21 inside its namespace): one ``netota upgrade --all
single.ufw --also double.ufw`` upgrades the mixed rack, each device with the image for its build.

Every 192.168.1.x address here lives only inside the network namespaces that
:class:`netota_daemon.sim.rack.SimulatedRack` creates and deletes (``ip netns``), even when a test
fails. Skipped, with the reason, where namespaces can't be made (not root, no iproute2).
N is 4 by default; ``NETOTA_RACK_SIZE`` asks for more.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pytest

from netota_daemon.sim.image import make_image
from netota_daemon.sim.rack import SimulatedRack, namespaces_available

RACK_SIZE = int(os.environ.get("NETOTA_RACK_SIZE", "4"))
TIME_SCALE = 0.05
# The daemon's waits, in real seconds, fitted to devices that run 20 times faster than real ones.
DAEMON_TIMEOUTS = {
    "deadline": 120.0,
    "connect": 2.0,
    "ctp_reply": 3.0,
    "http": 3.0,
    "ota_accept": 5.0,
    "receive": 0.5,
    "max_receive_timeouts": 10,
    "reboot": 30.0,
    "verify": 30.0,
    "poll_interval": 0.2,
    "keepalive_interval": 2.0,
}

unavailable = namespaces_available()
pytestmark = pytest.mark.skipif(unavailable is not None, reason=f"rack test needs network namespaces: {unavailable}")


@pytest.fixture
def firmware(tmp_path):
    firmware_dir = tmp_path / "firmware"
    firmware_dir.mkdir()
    path = make_image(firmware_dir / "ac79-2.0.0.ufw", "2.0.0", 300_000)
    make_image(firmware_dir / DOUBLE_IMAGE, "2.0.0", 250_000, kind="double")
    return path


#: The double-backup image beside the single-backup one, in the same firmware_dir.
DOUBLE_IMAGE = "ac79-2.0.0-ota.ufw"
#: A real device is away for seconds after its reset; 60 device seconds (3 s here) is far above the
#: daemon's 0.2 s poll and its 1 s presence check, so the reboot that says "it took the image" is seen.
DOUBLE = ["--double-backup", "--reboot-seconds", "60"]


def upgrade_all(rack: SimulatedRack, firmware) -> Any:
    return rack.client("upgrade", "--all", firmware.name, "--also", DOUBLE_IMAGE, "--wait", timeout=240)


def check_double_backup_device(device, job, image: bytes) -> None:
    """A double-backup device took the upload (byte for byte), rebooted, and runs the new version,
    and netota never broke its FTP server's rules."""
    outcome = job["outcome"]
    assert outcome["kind"] == "succeeded" and outcome["firmware_version_after"] == "2.0.0", (device.name, job)
    assert outcome["details"]["route"] == "double_backup" and outcome["details"]["image"].endswith(DOUBLE_IMAGE)
    assert device.received_upload() == image
    events = device.events()
    assert not [e for e in events if e["event"] in ("ftp_protocol_error", "ftp_crash", "session_end")], events
    assert any(e["event"] == "db_burn" and e["burned"] for e in events)


@pytest.fixture
def make_rack(tmp_path):
    """Builds a rack of a given size; its namespaces and processes are removed at the end of the
    test, whether it passed or not."""
    racks: list[SimulatedRack] = []

    def make(size: int) -> SimulatedRack:
        rack = SimulatedRack(tmp_path / f"rack{len(racks)}", size=size, time_scale=TIME_SCALE)
        racks.append(rack)
        return rack.__enter__()

    yield make
    for rack in racks:
        rack.close()


def _start(rack: SimulatedRack, firmware, sim_args=None) -> None:
    sim_args = sim_args or [[] for _ in rack.devices]
    rack.start_devices(sim_args)
    rack.start_daemon(rack.write_config(firmware.parent, DAEMON_TIMEOUTS))


def _jobs_by_device(rack: SimulatedRack) -> dict[str, dict]:
    result = rack.client("jobs", "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    jobs = data["jobs"] if isinstance(data, dict) else data
    newest: dict[str, dict] = {}
    for job in jobs:  # newest first
        newest.setdefault(job["device"], job)
    return newest


def _diagnostics(rack: SimulatedRack) -> str:
    parts = [(rack.workdir / "daemon.log").read_text(errors="replace")[-4000:]]
    for device in rack.devices:
        log = device.state_dir / "sim.log"
        if log.exists():
            parts.append(f"--- {device.name}\n" + log.read_text(errors="replace")[-1500:])
    return "\n".join(parts)


def test_rack_upgrades_every_device_at_once(make_rack, firmware):
    rack = make_rack(RACK_SIZE)
    _start(rack, firmware, [[] for _ in range(RACK_SIZE - 1)] + [DOUBLE])
    image = firmware.read_bytes()
    double_image = (firmware.parent / DOUBLE_IMAGE).read_bytes()

    result = upgrade_all(rack, firmware)
    assert result.returncode == 0, result.stdout + result.stderr + _diagnostics(rack)
    for device in rack.devices:
        assert device.name in result.stdout  # the summary table names every device

    jobs = _jobs_by_device(rack)
    singles = [d for d in rack.devices if not d.double_backup]
    (double,) = [d for d in rack.devices if d.double_backup]
    check_double_backup_device(double, jobs[double.name], double_image)
    for device in singles:
        job = jobs[device.name]
        assert job["outcome"]["kind"] == "succeeded", (device.name, job, _diagnostics(rack))
        assert job["outcome"]["firmware_version_after"] == "2.0.0"
        # The bytes each device received, byte for byte, in both phases.
        assert (device.state_dir / "phase1-received.bin").read_bytes() == image, device.name
        assert (device.state_dir / "phase2-received.bin").read_bytes() == image, device.name
        events = device.events()
        reboots = [e for e in events if e["event"] == "reboot"]
        assert len(reboots) >= 2, (device.name, reboots)
        # The reboot took the device's link down and up again.
        commands = [e.get("direction") for e in events if e["event"] == "reboot_command"]
        assert "down" in commands and "up" in commands, (device.name, commands)

    # Every device was served over its own interface: its simulator saw connections only from the
    # source address of the matching rack interface.
    for device in rack.devices:
        peers = {e.get("peer") for e in device.events() if e.get("peer")}
        assert peers and all(str(p).startswith(device.source_address) for p in peers), (device.name, peers)

    devices = rack.client("devices", "--json", timeout=60)
    assert devices.returncode == 0, devices.stderr
    listed = json.loads(devices.stdout)
    listed = listed["devices"] if isinstance(listed, dict) else listed
    assert {d["name"]: d["last_outcome"] for d in listed} == {d.name: "succeeded" for d in rack.devices}


FAULTS = [
    # (simulator options, expected outcome kind, expected failure class or None, proof the fault fired)
    (
        ["--drop-after-reads", "3", "--fault-phase", "1"],
        "failed",
        "connection",
        lambda events: any(e["event"] == "fault_drop" and e.get("phase") == 1 for e in events),
    ),
    (
        ["--drop-after-reads", "3", "--fault-phase", "2"],
        "succeeded",
        None,
        lambda events: any(e["event"] == "fault_drop" and e.get("phase") == 2 for e in events),
    ),
    (
        ["--stall-after-reads", "2:40", "--fault-phase", "1"],
        "succeeded",
        None,
        lambda events: any(e["event"] == "fault_stall" and e.get("phase") == 1 for e in events),
    ),
    (
        ["--corrupt-reply-check", "--fault-phase", "2"],
        "succeeded",
        None,
        lambda events: any(e["event"] == "session_end" and e["phase"] == 2 and e["checksum_errors"] for e in events),
    ),
]


def test_rack_faults_stay_with_their_device(make_rack, firmware):
    """A different fault in each device (cycling for a rack larger than 4), plus one healthy device:
    each outcome is its own, and the healthy device is upgraded as if it were alone."""
    faulted = max(RACK_SIZE, len(FAULTS))
    expected = [FAULTS[i % len(FAULTS)] for i in range(faulted)] + [([], "succeeded", None, None)]
    # and a double-backup device whose first upload is dropped: retried from the start, it succeeds
    rack = make_rack(faulted + 2)
    _start(rack, firmware, [args for args, *_ in expected] + [[*DOUBLE, "--ftp-drop-after-bytes", "100000"]])
    image = firmware.read_bytes()
    image_sha = hashlib.sha256(image).hexdigest()

    result = upgrade_all(rack, firmware)
    assert result.returncode == 1, "a failed device must make the batch exit with the failure's code"

    jobs = _jobs_by_device(rack)
    double = rack.devices[-1]
    check_double_backup_device(double, jobs[double.name], (firmware.parent / DOUBLE_IMAGE).read_bytes())
    ends = [e["outcome"] for e in double.events() if e["event"] == "ftp_upload_end"]
    assert ends == ["reset", "closed"] and jobs[double.name]["outcome"]["details"]["upload_attempts"] == 2
    for device, (_, kind, failure, fault_fired) in zip(rack.devices, expected, strict=False):
        job = jobs[device.name]
        outcome = job["outcome"]
        events = device.events()
        assert outcome["kind"] == kind, (device.name, device.sim_args, job, _diagnostics(rack))
        assert outcome["failure"] == failure, (device.name, outcome)
        if fault_fired is not None:
            assert fault_fired(events), (device.name, device.sim_args, events)
        else:  # the healthy device: no fault, one clean session per phase
            assert not any(e["event"].startswith("fault_") for e in events)
            assert [(s["phase"], s["outcome"]) for s in events if s["event"] == "session_end"] == [(1, "ok"), (2, "ok")]
        sessions = [e for e in events if e["event"] == "session_end"]
        if kind == "succeeded":
            assert outcome["firmware_version_after"] == "2.0.0"
            assert sessions[-1]["sha256"] == image_sha and sessions[-1]["phase"] == 2
            assert (device.state_dir / "phase2-received.bin").read_bytes() == image
        else:
            assert "reset the device" in outcome["advice"]
            assert all(s["phase"] == 1 for s in sessions)
