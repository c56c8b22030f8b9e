"""End to end: the real ``twistd netota`` process, the real engine, a ``netota sim`` process, driven
only through the ``netota`` client and the HTTP API (issue 4, "Done when")."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue

from netota_daemon.daemon.journal import JobJournal, JobState
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.daemon_fakes import short_socket_dir
from tests.waiting import Changes

TWISTD = "from twisted.scripts.twistd import run; run()"
TIME_SCALE = "0.02"  # device seconds -> real seconds: the device's 5 s reply wait is 100 ms, enough on 2 loaded cores
# The simulated loader resets itself after 60 s (scaled) without read progress; a test that holds a
# phase-2 stream stalled while it acts uses a larger scale so that reset stays seconds away.
PHASE2_HOLD_SCALE, PHASE2_HOLD_STALL = "0.3", "4:55"
PHASE1_HOLD_STALL = "4:3000"
IMAGE_SIZE = 200_000
EXIT_BUSY, EXIT_USAGE, EXIT_UNAVAILABLE = 75, 64, 69


class NotifyReceiver(DatagramProtocol):
    """The test's stand-in for systemd's notify socket."""

    def __init__(self, received: list[bytes], changes: Changes) -> None:
        self.received = received
        self.changes = changes

    def datagramReceived(self, data: bytes, address: Any) -> None:
        self.received.append(data)
        self.changes.poke()


class Process(ProcessProtocol):
    """A child process whose output is kept and whose end is a Deferred."""

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

    def kill(self, sig: int) -> None:
        if self.running:
            self.transport.signalProcess(sig)

    async def wait(self, reactor: Any, timeout: float = 20) -> None:
        if self.running:
            d = Deferred()
            self.ended.addBoth(lambda r: (d.callback(None) if not d.called else None, r)[1])
            d.addTimeout(timeout, reactor)
            await d


class Rig:
    """One simulated device and one daemon in a temporary directory."""

    def __init__(self, reactor: Any, tmp: Path) -> None:
        self.reactor = reactor
        self.tmp = tmp
        self.sim_dir = tmp / "sim"
        self.firmware_dir = tmp / "fw"
        self.firmware_dir.mkdir()
        self.state_dir = tmp / "state"
        sockets = short_socket_dir()
        self.control_path = os.path.join(sockets, "control.sock")
        self.notify_path = os.path.join(sockets, "notify")
        self.notifications: list[bytes] = []
        # Everything a test waits for (a datagram, a process's output or end, a line in the
        # simulator's events.jsonl) pokes this; waits re-check on each poke, with a bound.
        self.changes = Changes(reactor)
        self.sim_dir.mkdir()
        self.changes.watch_directory(self.sim_dir)
        # Read as systemd does, as the datagrams arrive (a queue nobody drains drops them).
        self.notify = reactor.listenUNIXDatagram(self.notify_path, NotifyReceiver(self.notifications, self.changes))
        self.sim: Process | None = None
        self.daemon: Process | None = None
        self.config_path = tmp / "netota.toml"

    # ----- processes

    async def start_sim(self, *faults: str, time_scale: str = TIME_SCALE) -> None:
        await self._make_image()
        self.sim = Process("sim", self.changes)
        self.reactor.spawnProcess(
            self.sim,
            PYTHON,
            [
                PYTHON,
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
                str(self.sim_dir),
                "--time-scale",
                time_scale,
                *faults,
            ],
            env=subprocess_env(),
            path=str(ROOT),
        )
        ports_file = self.sim_dir / "ports.json"
        await self.changes.until(
            lambda: (ports_file.exists() and ports_file.read_text().strip().endswith("}")) or not self.sim.running,
            "the simulator's ports.json",
        )
        assert self.sim.running, self.sim.output.decode()
        self.ports = json.loads(ports_file.read_text())

    async def _make_image(self) -> None:
        out, err, code = await getProcessOutputAndValue(
            PYTHON,
            [
                "-m",
                "netota_daemon",
                "sim",
                "make-image",
                str(self.firmware_dir / "v2.bin"),
                "--version",
                "2.0.0",
                "--size",
                str(IMAGE_SIZE),
            ],
            env=subprocess_env(),
            path=str(ROOT),
        )
        assert code == 0, err

    def write_config(self) -> None:
        self.config_path.write_text(f"""
[daemon]
control = "unix:{self.control_path}:lockfile=1"
state_dir = "{self.state_dir}"
firmware_dir = "{self.firmware_dir}"
max_parallel = 2
shutdown_grace = 10

[timeouts]
deadline = 120
connect = 2
reboot = 30
verify = 30
poll_interval = 0.05
receive = 5

[devices.dev1]
host = "127.0.0.1"
ctp_port = {self.ports["ctp"]}
http_port = {self.ports["http"]}
ota_port = {self.ports["ota"]}

[devices.other]
host = "127.0.0.1"
ctp_port = 9
""")

    async def start_daemon(self, *options: str) -> None:
        self.write_config()
        self.notifications.clear()  # forget what an earlier daemon said
        self.daemon = Process("daemon", self.changes)
        self.reactor.spawnProcess(
            self.daemon,
            PYTHON,
            [PYTHON, "-c", TWISTD, "-n", "--pidfile=", "netota", "--config", str(self.config_path), *options],
            # As systemd with WatchdogSec=1: the daemon pings every 0.5 s.
            env=subprocess_env(NOTIFY_SOCKET=self.notify_path, WATCHDOG_USEC="1000000"),
            path=str(self.tmp),
        )
        await self.changes.until(
            lambda: self.notified(b"READY=1") or not self.daemon.running, "READY=1 from the daemon"
        )
        assert self.daemon.running, self.daemon.output.decode()

    def notified(self, prefix: bytes) -> bool:
        return any(m.startswith(prefix) for m in self.notifications)

    async def stop(self) -> None:
        for process in (self.daemon, self.sim):
            if process is not None and process.running:
                process.kill(signal.SIGTERM)
                try:
                    await process.wait(self.reactor, 15)
                except Exception:
                    process.kill(signal.SIGKILL)
                    await process.wait(self.reactor, 5)
        await maybeDeferred(self.notify.stopListening)
        self.changes.close()

    # ----- the client and the simulator's record

    async def netota(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        d = getProcessOutputAndValue(
            PYTHON,
            ["-m", "netota_daemon", *args],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{self.control_path}"),
            path=str(ROOT),
        )
        d.addTimeout(timeout, self.reactor)
        out, err, code = await d
        return code, out.decode(), err.decode()

    async def netota_json(self, *args: str) -> Any:
        code, out, err = await self.netota(*args, "--json")
        assert code == 0, (code, out, err)
        return json.loads(out)

    def sim_events(self) -> list[dict]:
        path = self.sim_dir / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

    def sim_saw(self, name: str, **fields: Any) -> dict | None:
        for event in self.sim_events():
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return event
        return None

    async def start_upgrade_waiting(self, *extra: str) -> Deferred:
        """``netota upgrade dev1 v2.bin --wait --json`` running in the background."""
        d = getProcessOutputAndValue(
            PYTHON,
            ["-m", "netota_daemon", "upgrade", "dev1", "v2.bin", "--wait", "--json", *extra],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{self.control_path}"),
            path=str(ROOT),
        )
        d.addTimeout(90, self.reactor)
        return d

    async def api(self, method: str, path: str, body: dict | None = None) -> dict:
        """A request straight to the daemon's HTTP API (quicker than a client process)."""
        from netota_daemon.cli.control_client import ControlClient

        return await ControlClient(self.reactor, f"unix:{self.control_path}").request(method, path, body)

    async def only_job(self) -> dict:
        (job,) = (await self.api("GET", "/v1/jobs?device=dev1"))["jobs"]
        return job


@pytest.fixture
def rig(reactor, tmp_path):
    rig = Rig(reactor, tmp_path)
    yield rig
    pytest_twisted.blockon(Deferred.fromCoroutine(rig.stop()))


@pytest_twisted.ensureDeferred
async def test_full_upgrade_through_the_client(rig, reactor):
    await rig.start_sim()
    await rig.start_daemon("--log-format", "json")
    assert stat.S_IMODE(os.stat(rig.control_path).st_mode) == 0o660

    code, out, err = await rig.netota("upgrade", "dev1", "v2.bin", "--wait")
    assert code == 0, (out, err)
    assert "succeeded" in out
    # The progress of both phases was written on stderr (not a terminal: a line per 10 %).
    assert "phase 1  " in err and "phase 2  " in err and "100.0%" in err

    job = (await rig.netota_json("jobs"))["jobs"][0]
    assert job["state"] == "finished" and job["outcome"]["kind"] == "succeeded"
    assert job["outcome"]["firmware_version_after"] == "2.0.0"
    assert rig.sim_saw("session_end", phase=1, outcome="ok")
    assert rig.sim_saw("session_end", phase=2, outcome="ok")
    assert rig.sim_saw("mode", mode="main", firmware_version="2.0.0")
    devices = {d["name"]: d for d in (await rig.netota_json("devices"))["devices"]}
    assert devices["dev1"]["last_outcome"] == "succeeded" and devices["dev1"]["firmware_version"] == "2.0.0"
    shown = (await rig.netota_json("show", job["id"]))["job"]
    notes = [h["note"] for h in shown["history"]]
    assert notes[0] == "created" and notes[-1] == "finished: succeeded" and "phase phase2" in notes

    # systemd's watchdog was pinged from the reactor.
    assert rig.notified(b"WATCHDOG=1")

    # JSON log lines; every event the daemon logs about the job names the job and the device.
    log_events = [json.loads(line) for line in rig.daemon.output.decode().splitlines() if line.startswith("{")]
    job_events = [e for e in log_events if e.get("namespace") == "netota_daemon.daemon.jobs"]
    assert len(job_events) >= 5
    assert all(e.get("job") == job["id"] and e.get("device") == "dev1" for e in job_events)


@pytest_twisted.ensureDeferred
async def test_bad_inputs_through_the_client_and_the_api(rig, reactor):
    await rig.start_sim()
    await rig.start_daemon()
    outside = rig.tmp / "outside.bin"
    outside.write_bytes(b"x" * 1000)
    (rig.firmware_dir / "escape.bin").symlink_to(outside)
    cases = [
        (("upgrade", "nosuch", "v2.bin"), EXIT_USAGE, "unknown_device"),
        (("upgrade", "dev1", "../v2.bin"), EXIT_USAGE, "firmware_outside"),
        (("upgrade", "dev1", str(rig.firmware_dir / "v2.bin")), EXIT_USAGE, "firmware_outside"),
        (("upgrade", "dev1", "escape.bin"), EXIT_USAGE, "firmware_outside"),
        (("upgrade", "dev1", "missing.bin"), EXIT_USAGE, "firmware_not_found"),
        (("upgrade", "dev1", "v2.bin", "--option", "nope=1"), EXIT_USAGE, "bad_options"),
        (("show", "nosuchjob"), EXIT_USAGE, "unknown_job"),
        (("cancel", "nosuchjob"), EXIT_USAGE, "unknown_job"),
        (("resume", "nosuchjob"), EXIT_USAGE, "unknown_job"),
    ]
    from twisted.internet.defer import gatherResults

    results = await gatherResults([Deferred.fromCoroutine(rig.netota(*args)) for args, _, _ in cases])
    for (args, expected, code_name), (code, out, err) in zip(cases, results, strict=False):
        assert code == expected, (args, code, out, err)
        assert code_name in err, (args, err)
    # Bad JSON and unknown fields straight at the HTTP API.
    import treq

    from netota_daemon.cli.control_client import ControlClient

    client = ControlClient(reactor, f"unix:{rig.control_path}")
    for body, code_name in (
        (b"{oops", "bad_json"),
        (b'{"device": "dev1", "firmware": "v2.bin", "x": 1}', "unknown_field"),
    ):
        response = await client._http.post("http://netota/v1/jobs", data=body, timeout=10)
        answer = json.loads(await treq.content(response))
        assert response.code == 400 and answer["error"]["code"] == code_name
    assert (await rig.netota_json("jobs"))["jobs"] == []
    # Nothing reached the device.
    assert not rig.sim_saw("ctp_connect")


async def cancel_mid_phase(rig: Rig, reactor: Any, phase: int) -> None:
    if phase == 1:
        await rig.start_sim("--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    else:
        await rig.start_sim(
            "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
        )
    await rig.start_daemon()
    waiting = await rig.start_upgrade_waiting()
    await rig.changes.until(lambda: rig.sim_saw("fault_stall", phase=phase), f"the stall in phase {phase}")
    job = await rig.only_job()
    assert job["state"] == "running" and job["phase"] == f"phase{phase}"

    # A second upgrade of the busy device is refused; the running one carries on.
    code, out, err = await rig.netota("upgrade", "dev1", "v2.bin")
    assert code == EXIT_BUSY and "busy" in err
    assert (await rig.api("GET", f"/v1/jobs/{job['id']}"))["job"]["state"] == "running"

    code, out, err = await rig.netota("cancel", job["id"])
    assert code == 0, err
    out, err, code = await waiting
    assert code == 4, (out, err)  # aborted
    final = json.loads(out)["job"]
    assert final["outcome"]["kind"] == "aborted" and final["resumable"]
    await rig.changes.until(lambda: rig.sim_saw("stop_received"), "STOP at the simulator")
    # A cancel after the job finished is refused.
    code, out, err = await rig.netota("cancel", job["id"])
    assert code == EXIT_BUSY and "not_active" in err


@pytest_twisted.ensureDeferred
async def test_cancel_mid_phase1_sends_stop(rig, reactor):
    await cancel_mid_phase(rig, reactor, 1)
    assert rig.sim_saw("stop_received")["mode"] == "main"


@pytest_twisted.ensureDeferred
async def test_cancel_mid_phase2_sends_stop(rig, reactor):
    await cancel_mid_phase(rig, reactor, 2)
    assert rig.sim_saw("stop_received")["mode"] == "loader"
    job = await rig.only_job()
    assert job["point_of_no_return"] and "loader" in job["outcome"]["advice"]


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_job_then_restart_interrupted_and_resume_completes(rig, reactor):
    await rig.start_sim("--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE)
    await rig.start_daemon()
    waiting = await rig.start_upgrade_waiting()
    await rig.changes.until(lambda: rig.sim_saw("fault_stall", phase=2), "the stall in phase 2")
    job_id = (await rig.only_job())["id"]

    rig.daemon.kill(signal.SIGKILL)
    await rig.daemon.wait(reactor)
    out, err, code = await waiting
    assert code == EXIT_UNAVAILABLE, (out, err)  # the watcher says the daemon went away
    assert "went away" in err.decode()

    await rig.start_daemon()  # the stale socket and lock are cleaned up by lockfile=1
    job = (await rig.netota_json("show", job_id))["job"]
    assert job["state"] == "interrupted" and job["phase"] == "phase2" and job["resumable"]
    assert job["point_of_no_return"] and "loader" in job["advice"]

    code, out, err = await rig.netota("resume", job_id, "--wait", "--json")
    assert code == 0, (out, err)
    resumed = json.loads(out)["job"]
    assert resumed["resumed_from"] == job_id and resumed["outcome"]["kind"] == "succeeded"
    assert resumed["outcome"]["firmware_version_after"] == "2.0.0"
    assert (await rig.netota_json("show", job_id))["job"]["resumed_by"] == resumed["id"]
    assert rig.sim_saw("mode", mode="main", firmware_version="2.0.0")


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_job_sends_stop_records_interrupted_and_exits_cleanly(rig, reactor):
    await rig.start_sim("--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    await rig.start_daemon()
    waiting = await rig.start_upgrade_waiting()
    await rig.changes.until(lambda: rig.sim_saw("fault_stall", phase=1), "the stall in phase 1")
    job_id = (await rig.only_job())["id"]

    rig.daemon.kill(signal.SIGTERM)
    await rig.daemon.wait(reactor)
    # twistd shuts down cleanly, then re-raises SIGTERM so its exit status says why it stopped
    # (systemd counts that as a clean exit).
    log_text = rig.daemon.output.decode()
    assert rig.daemon.exit_code == 0 or rig.daemon.signal == signal.SIGTERM, log_text
    assert "netota stopped" in log_text and "Traceback" not in log_text
    assert rig.notified(b"STOPPING=1")
    assert rig.sim_saw("stop_received")
    out, err, code = await waiting
    assert code == EXIT_UNAVAILABLE, (out, err)
    record = JobJournal(rig.state_dir).get(job_id)
    assert record.state is JobState.INTERRUPTED and record.resumable
    assert record.outcome is not None and record.outcome.kind.value == "aborted"
    assert not os.path.exists(rig.control_path)
