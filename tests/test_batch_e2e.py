"""Batches and rescue end to end: the real ``twistd netota``, the real engine, several ``netota sim``
processes, driven through the ``netota`` client (issue 13, "Done when"). Few tests, each waiting on
events with generous bounds."""

from __future__ import annotations

import json
import os
import signal
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import PYTHON, ROOT, free_port, subprocess_env
from tests.daemon_fakes import short_socket_dir
from tests.test_daemon_e2e import (
    IMAGE_SIZE,
    PHASE2_HOLD_SCALE,
    PHASE2_HOLD_STALL,
    TIME_SCALE,
    TWISTD,
    NotifyReceiver,
    Process,
)
from tests.waiting import Changes

PHASE1_HOLD_STALL = "4:3000"


class Sim:
    def __init__(self, name: str, directory: Path, process: Process, ports: dict[str, int]) -> None:
        self.name = name
        self.directory = directory
        self.process = process
        self.ports = ports

    def events(self) -> list[dict]:
        path = self.directory / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def saw(self, name: str, **fields: Any) -> dict | None:
        for event in self.events():
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None


class Rack:
    """Several simulated devices and one daemon, in a temporary directory."""

    def __init__(self, reactor: Any, tmp: Path) -> None:
        self.reactor = reactor
        self.tmp = tmp
        self.firmware_dir = tmp / "fw"
        self.firmware_dir.mkdir()
        self.state_dir = tmp / "state"
        sockets = short_socket_dir()
        self.control_path = os.path.join(sockets, "control.sock")
        self.notify_path = os.path.join(sockets, "notify")
        self.notifications: list[bytes] = []
        self.changes = Changes(reactor)
        self.notify = reactor.listenUNIXDatagram(self.notify_path, NotifyReceiver(self.notifications, self.changes))
        self.sims: dict[str, Sim] = {}
        self.dead: list[str] = []
        self.daemon: Process | None = None
        self.config_path = tmp / "netota.toml"

    async def make_image(self, name: str = "v2.bin", version: str = "2.0.0") -> None:
        out, err, code = await getProcessOutputAndValue(
            PYTHON,
            [
                "-m",
                "netota_daemon",
                "sim",
                "make-image",
                str(self.firmware_dir / name),
                "--version",
                version,
                "--size",
                str(IMAGE_SIZE),
            ],
            env=subprocess_env(),
            path=str(ROOT),
        )
        assert code == 0, err

    async def start_sim(self, name: str, *options: str, time_scale: str = TIME_SCALE) -> Sim:
        directory = self.tmp / f"sim-{name}"
        directory.mkdir(exist_ok=True)
        (directory / "ports.json").unlink(missing_ok=True)  # a simulator started again: its new ports
        self.changes.watch_directory(directory)
        process = Process(name, self.changes)
        self.reactor.spawnProcess(
            process,
            PYTHON,
            [
                *(PYTHON, "-m", "netota_daemon", "sim", "--listen", "127.0.0.1", "--ctp-port", "0", "--http-port", "0"),
                *("--ota-port", "0", "--state-dir", str(directory), "--time-scale", time_scale, *options),
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
        sim = Sim(name, directory, process, json.loads(ports_file.read_text()))
        self.sims[name] = sim
        return sim

    def write_config(self, extra: str = "") -> None:
        devices = ""
        for name, sim in self.sims.items():
            devices += (
                f'\n[devices.{name}]\nhost = "127.0.0.1"\nctp_port = {sim.ports["ctp"]}\n'
                f'http_port = {sim.ports["http"]}\nota_port = {sim.ports["ota"]}\ntags = ["rack"]\n'
            )
        for name in self.dead:  # nothing listens there
            devices += (
                f'\n[devices.{name}]\nhost = "127.0.0.1"\nctp_port = {free_port()}\nhttp_port = {free_port()}\n'
                f"ota_port = {free_port()}\n"
            )
        self.config_path.write_text(f"""
[daemon]
control = "unix:{self.control_path}:lockfile=1"
state_dir = "{self.state_dir}"
firmware_dir = "{self.firmware_dir}"
max_parallel = 4
shutdown_grace = 10
{extra}

[timeouts]
deadline = 120
connect = 2
http = 5
reboot = 30
verify = 30
poll_interval = 0.05
receive = 5
{devices}""")

    async def start_daemon(self, extra: str = "") -> None:
        self.write_config(extra)
        self.notifications.clear()
        self.daemon = Process("daemon", self.changes)
        self.reactor.spawnProcess(
            self.daemon,
            PYTHON,
            [PYTHON, "-c", TWISTD, "-n", "--pidfile=", "netota", "--config", str(self.config_path)],
            env=subprocess_env(NOTIFY_SOCKET=self.notify_path),
            path=str(self.tmp),
        )
        await self.changes.until(
            lambda: any(m.startswith(b"READY=1") for m in self.notifications) or not self.daemon.running,
            "READY=1 from the daemon",
        )
        assert self.daemon.running, self.daemon.output.decode()

    async def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill(signal.SIGKILL)
        await self.daemon.wait(self.reactor)

    async def stop(self) -> None:
        for process in [self.daemon, *(s.process for s in self.sims.values())]:
            if process is not None and process.running:
                process.kill(signal.SIGTERM)
                try:
                    await process.wait(self.reactor, 15)
                except Exception:
                    process.kill(signal.SIGKILL)
                    await process.wait(self.reactor, 5)
        await maybeDeferred(self.notify.stopListening)
        self.changes.close()

    def netota_background(self, *args: str, timeout: float = 120) -> Deferred:
        d = getProcessOutputAndValue(
            PYTHON,
            ["-m", "netota_daemon", *args],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{self.control_path}"),
            path=str(ROOT),
        )
        d.addTimeout(timeout, self.reactor)
        return d

    async def netota(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        out, err, code = await self.netota_background(*args, timeout=timeout)
        return code, out.decode(), err.decode()

    async def api(self, method: str, path: str, body: dict | None = None) -> dict:
        from netota_daemon.cli.control_client import ControlClient

        return await ControlClient(self.reactor, f"unix:{self.control_path}").request(method, path, body)

    async def batch(self, batch_id: str) -> dict:
        return (await self.api("GET", f"/v1/batches/{batch_id}"))["batch"]


@pytest.fixture
def rack(reactor, tmp_path):
    rack = Rack(reactor, tmp_path)
    yield rack
    pytest_twisted.blockon(Deferred.fromCoroutine(rack.stop()))


def states(batch: dict) -> dict[str, tuple[str, str | None]]:
    return {m["device"]: (m["state"], m["reason"]) for m in batch["members"]}


@pytest_twisted.ensureDeferred
async def test_a_failing_canary_stops_the_batch_before_any_other_device_is_touched(rack, reactor, tmp_path):
    await rack.make_image()
    await rack.start_sim("s1", "--reject-image")
    await rack.start_sim("s2")
    await rack.start_sim("s3")
    await rack.start_daemon()
    report = tmp_path / "report.xml"
    code, out, err = await rack.netota(
        "batch", "start", "v2.bin", "--tag", "rack", "--canary", "1", "--wait", "--junit", str(report), "--json"
    )
    assert code == 1, (out, err)
    batch = json.loads(out)["batch"]
    assert batch["stop_reason"] == "canary_failed"
    assert states(batch) == {
        "s1": ("failed", None),
        "s2": ("skipped", "canary_failed"),
        "s3": ("skipped", "canary_failed"),
    }
    assert rack.sims["s1"].saw("session_start")
    for name in ("s2", "s3"):  # probed (the description document), never flashed
        assert rack.sims[name].saw("http_request") and not rack.sims[name].saw("ctp_connect")
    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    assert cases["s1"].find("failure") is not None and cases["s1"].find("failure").get("type") == "device_error"
    assert cases["s2"].find("skipped").get("message").startswith("not started: canary s1 did not succeed")


@pytest_twisted.ensureDeferred
async def test_preflight_and_skip_current_then_max_failures(rack, reactor):
    await rack.make_image()
    await rack.start_sim("ok")
    await rack.start_sim("current", "--firmware-version", "2.0.0")
    await rack.start_sim("double", "--double-backup", "--ftp-port", "0")  # refused before any FTP
    rack.dead.append("gone")
    await rack.start_daemon()
    code, out, err = await rack.netota(
        "batch", "start", "v2.bin", "--all", "--skip-current", "2.0.0", "--wait", "--json"
    )
    assert code == 1, (out, err)  # refused devices are not a success
    batch = json.loads(out)["batch"]
    assert states(batch) == {
        "ok": ("succeeded", None),
        "current": ("skipped", "already_current"),
        "double": ("refused", "wrong_kind"),
        "gone": ("refused", "unreachable"),
    }
    assert not rack.sims["double"].saw("ctp_connect") and not rack.sims["current"].saw("ctp_connect")
    assert rack.sims["ok"].saw("mode", mode="main", firmware_version="2.0.0")

    # max_failures: the two devices that now take the image both reject it; the first failure stops it.
    await rack.make_image("v3.bin", "3.0.0")
    for name in ("ok", "current"):
        rack.sims[name].process.kill(signal.SIGTERM)
        await rack.sims[name].process.wait(reactor)
    await rack.start_sim("ok", "--reject-image")
    await rack.start_sim("current", "--reject-image")
    await rack.kill_daemon()
    rack.sims.pop("double")
    rack.dead.clear()
    await rack.start_daemon()
    code, out, err = await rack.netota(
        "batch", "start", "v3.bin", "ok", "current", "--max-failures", "1", "--max-parallel", "1", "--wait", "--json"
    )
    assert code == 1, (out, err)
    batch = json.loads(out)["batch"]
    assert batch["stop_reason"] == "max_failures", json.dumps(batch["members"])
    assert states(batch) == {"ok": ("failed", None), "current": ("skipped", "max_failures")}
    assert not rack.sims["current"].saw("ctp_connect")


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_batch_then_restart_and_the_batch_completes(rack, reactor):
    await rack.make_image()
    await rack.start_sim(
        "held", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    await rack.start_sim("next")
    await rack.start_daemon()
    batch = (await rack.api("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": {"max_parallel": 1}}))[
        "batch"
    ]
    await rack.changes.until(lambda: rack.sims["held"].saw("fault_stall", phase=2), "the stall in phase 2")
    await rack.kill_daemon()
    assert not rack.sims["next"].saw("ctp_connect")
    await rack.start_daemon()  # the batch carries on: the interrupted job is resumed, then the next device
    code, out, err = await rack.netota("batch", "watch", batch["id"], "--json")
    assert code == 0, (out, err)
    final = json.loads(out)["batch"]
    assert states(final) == {"held": ("succeeded", None), "next": ("succeeded", None)}
    held = next(m for m in final["members"] if m["device"] == "held")
    assert len(held["jobs"]) == 2
    first = (await rack.api("GET", f"/v1/jobs/{held['jobs'][0]}"))["job"]
    assert first["state"] == "interrupted" and first["resumed_by"] == held["jobs"][1]
    for sim in rack.sims.values():
        assert sim.saw("mode", mode="main", firmware_version="2.0.0")


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_batch_stops_what_runs_and_skips_the_rest(rack, reactor):
    await rack.make_image()
    await rack.start_sim("first", "--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    await rack.start_sim("second")
    await rack.start_daemon()
    batch = (await rack.api("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": {"max_parallel": 1}}))[
        "batch"
    ]
    await rack.changes.until(lambda: rack.sims["first"].saw("fault_stall", phase=1), "the stall in phase 1")
    code, out, err = await rack.netota("batch", "cancel", batch["id"], "--reason", "wrong shelf")
    assert code == 0, (out, err)
    code, out, err = await rack.netota("batch", "watch", batch["id"], "--json")
    assert code == 4, (out, err)
    final = json.loads(out)["batch"]
    assert final["state"] == "cancelled"
    assert states(final) == {"first": ("cancelled", None), "second": ("skipped", "cancelled")}
    await rack.changes.until(lambda: rack.sims["first"].saw("stop_received"), "STOP at the device")
    assert not rack.sims["second"].saw("ctp_connect")


@pytest_twisted.ensureDeferred
async def test_rescue_finishes_a_device_left_in_its_loader_by_an_interrupted_job(rack, reactor):
    await rack.make_image()
    await rack.start_sim(
        "dev", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    rack.dead.append("gone")
    await rack.start_daemon()
    job = (await rack.api("POST", "/v1/jobs", {"device": "dev", "firmware": "v2.bin"}))["job"]
    await rack.changes.until(lambda: rack.sims["dev"].saw("fault_stall", phase=2), "the stall in phase 2")
    await rack.kill_daemon()
    await rack.start_daemon()
    code, out, err = await rack.netota("rescue", "--wait")
    assert code == 0, (out, err)
    lines = out.splitlines()
    assert f"dev: dev waits in its loader: resuming job {job['id']} (phase 2 with v2.bin)" in lines[0]
    assert any(line.startswith("gone: gone did not answer the probe") for line in lines)
    assert any("succeeded" in line for line in lines)
    assert rack.sims["dev"].saw("mode", mode="main", firmware_version="2.0.0")
    code, out, err = await rack.netota("rescue", "dev", "--json")
    assert code == 0 and json.loads(out)["rescues"][0]["action"] == "none"  # it booted its new firmware


@pytest_twisted.ensureDeferred
async def test_with_daemon_rescue_on_a_device_left_in_its_loader_is_finished_at_start(rack, reactor):
    await rack.make_image()
    await rack.start_sim(
        "dev", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    await rack.start_daemon()
    job = (await rack.api("POST", "/v1/jobs", {"device": "dev", "firmware": "v2.bin"}))["job"]
    await rack.changes.until(lambda: rack.sims["dev"].saw("fault_stall", phase=2), "the stall in phase 2")
    await rack.kill_daemon()
    await rack.start_daemon("rescue = true\nrescue_interval = 600")  # the first sweep runs at start
    await rack.changes.until(
        lambda: rack.sims["dev"].saw("mode", mode="main", firmware_version="2.0.0"), "the device back on 2.0.0", 90
    )
    old = (await rack.api("GET", f"/v1/jobs/{job['id']}"))["job"]
    assert old["state"] == "interrupted" and old["resumed_by"]
    rescued = (await rack.api("GET", f"/v1/jobs/{old['resumed_by']}"))["job"]
    await rack.changes.until(lambda: rack.daemon.output.find(b"rescue of dev") >= 0, "the daemon's log line")
    assert rescued["resumed_from"] == job["id"]
