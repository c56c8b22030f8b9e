"""End to end: the real ``twistd netota`` process, the real engine, a ``netota sim`` process, driven
only through the ``netota`` client and the HTTP API (issue 4, "Done when")."""

from __future__ import annotations

import json
import os
import signal
import stat
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from netota_daemon.daemon.journal import JobJournal, JobState
from tests.live_rig import TIME_SCALE, LiveRig, Sim

# The simulated loader resets itself after 60 s (scaled) without read progress; a test that holds a
# phase-2 stream stalled while it acts uses a larger scale so that reset stays seconds away.
PHASE2_HOLD_SCALE, PHASE2_HOLD_STALL = "0.3", "4:55"
PHASE1_HOLD_STALL = "4:3000"
IMAGE_SIZE = 200_000
EXIT_BUSY, EXIT_USAGE, EXIT_UNAVAILABLE = 75, 64, 69


#: A second configured device that is not there (nothing listens on port 9).
OTHER_DEVICE = '\n[devices.other]\nhost = "127.0.0.1"\nctp_port = 9\n'


async def start_sim(rig: LiveRig, *faults: str, time_scale: str = TIME_SCALE) -> Sim:
    """The image v2.bin and the simulated device dev1."""
    rig.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
    return await rig.start_sim("dev1", *faults, time_scale=time_scale)


async def start_daemon(rig: LiveRig, *options: str) -> None:
    """The daemon for dev1 and the absent device ``other``, on its control socket only."""
    await rig.start_daemon(extra_devices=OTHER_DEVICE, options=options, max_parallel=2, web=False)


def sim_saw(rig: LiveRig, name: str, **fields: Any) -> dict | None:
    return rig.sims["dev1"].first(name, **fields)


def start_upgrade_waiting(rig: LiveRig) -> Deferred:
    """``netota upgrade dev1 v2.bin --wait --json`` running in the background."""
    return rig.start_netota("upgrade", "dev1", "v2.bin", "--wait", "--json")


async def only_job(rig: LiveRig) -> dict:
    (job,) = (await rig.control("GET", "/v1/jobs?device=dev1"))["jobs"]
    return job


@pytest_twisted.ensureDeferred
async def test_full_upgrade_through_the_client(rig, reactor):
    await start_sim(rig)
    await start_daemon(rig, "--log-format", "json")
    assert stat.S_IMODE(os.stat(rig.control_path).st_mode) == 0o660

    code, out, err = await rig.netota("upgrade", "dev1", "v2.bin", "--wait")
    assert code == 0, (out, err)
    assert "succeeded" in out
    # The progress of both phases was written on stderr (not a terminal: a line per 10 %).
    assert "phase 1  " in err and "phase 2  " in err and "100.0%" in err

    job = (await rig.netota_json("jobs"))["jobs"][0]
    assert job["state"] == "finished" and job["outcome"]["kind"] == "succeeded"
    assert job["outcome"]["firmware_version_after"] == "2.0.0"
    assert sim_saw(rig, "session_end", phase=1, outcome="ok")
    assert sim_saw(rig, "session_end", phase=2, outcome="ok")
    assert sim_saw(rig, "mode", mode="main", firmware_version="2.0.0")
    devices = {d["name"]: d for d in (await rig.netota_json("devices"))["devices"]}
    assert devices["dev1"]["last_outcome"] == "succeeded" and devices["dev1"]["firmware_version"] == "2.0.0"
    shown = (await rig.netota_json("show", job["id"]))["job"]
    notes = [h["note"] for h in shown["history"]]
    assert notes[0] == "created" and notes[-1] == "finished: succeeded" and "entered phase 2" in notes

    # systemd's watchdog was pinged from the reactor.
    assert rig.notified(b"WATCHDOG=1")

    # JSON log lines; every event the daemon logs about the job names the job and the device.
    log_events = [json.loads(line) for line in rig.daemon_log().splitlines() if line.startswith("{")]
    job_events = [e for e in log_events if e.get("namespace") == "netota_daemon.daemon.jobs"]
    assert len(job_events) >= 5
    assert all(e.get("job") == job["id"] and e.get("device") == "dev1" for e in job_events)


@pytest_twisted.ensureDeferred
async def test_bad_inputs_through_the_client_and_the_api(rig, reactor):
    await start_sim(rig)
    await start_daemon(rig)
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
    assert not sim_saw(rig, "ctp_connect")


async def cancel_mid_phase(rig: LiveRig, reactor: Any, phase: int) -> None:
    if phase == 1:
        await start_sim(rig, "--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    else:
        await start_sim(
            rig, "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
        )
    await start_daemon(rig)
    waiting = start_upgrade_waiting(rig)
    await rig.changes.until(lambda: sim_saw(rig, "fault_stall", phase=phase), f"the stall in phase {phase}")
    job = await only_job(rig)
    assert job["state"] == "running" and job["phase"] == f"phase{phase}"

    # A second upgrade of the busy device is refused; the running one carries on.
    code, out, err = await rig.netota("upgrade", "dev1", "v2.bin")
    assert code == EXIT_BUSY and "busy" in err
    assert (await rig.control("GET", f"/v1/jobs/{job['id']}"))["job"]["state"] == "running"

    code, out, err = await rig.netota("cancel", job["id"])
    assert code == 0, err
    out, err, code = await waiting
    assert code == 4, (out, err)  # aborted
    final = json.loads(out)["job"]
    assert final["outcome"]["kind"] == "aborted" and final["resumable"]
    await rig.changes.until(lambda: sim_saw(rig, "stop_received"), "STOP at the simulator")
    # A cancel after the job finished is refused.
    code, out, err = await rig.netota("cancel", job["id"])
    assert code == EXIT_BUSY and "not_active" in err


@pytest_twisted.ensureDeferred
async def test_cancel_mid_phase1_sends_stop(rig, reactor):
    await cancel_mid_phase(rig, reactor, 1)
    assert sim_saw(rig, "stop_received")["mode"] == "main"


@pytest_twisted.ensureDeferred
async def test_cancel_mid_phase2_sends_stop(rig, reactor):
    await cancel_mid_phase(rig, reactor, 2)
    assert sim_saw(rig, "stop_received")["mode"] == "loader"
    job = await only_job(rig)
    assert job["point_of_no_return"] and "loader" in job["outcome"]["advice"]


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_job_then_restart_interrupted_and_resume_completes(rig, reactor):
    await start_sim(rig, "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE)
    await start_daemon(rig)
    waiting = start_upgrade_waiting(rig)
    await rig.changes.until(lambda: sim_saw(rig, "fault_stall", phase=2), "the stall in phase 2")
    job_id = (await only_job(rig))["id"]

    rig.daemon.kill(signal.SIGKILL)
    await rig.daemon.wait(reactor)
    out, err, code = await waiting
    assert code == EXIT_UNAVAILABLE, (out, err)  # the watcher says the daemon went away
    assert "went away" in err.decode()

    await start_daemon(rig)  # the stale socket and lock are cleaned up by lockfile=1
    job = (await rig.netota_json("show", job_id))["job"]
    assert job["state"] == "interrupted" and job["phase"] == "phase2" and job["resumable"]
    assert job["point_of_no_return"] and "loader" in job["advice"]

    code, out, err = await rig.netota("resume", job_id, "--wait", "--json")
    assert code == 0, (out, err)
    resumed = json.loads(out)["job"]
    assert resumed["resumed_from"] == job_id and resumed["outcome"]["kind"] == "succeeded"
    assert resumed["outcome"]["firmware_version_after"] == "2.0.0"
    assert (await rig.netota_json("show", job_id))["job"]["resumed_by"] == resumed["id"]
    assert sim_saw(rig, "mode", mode="main", firmware_version="2.0.0")


@pytest_twisted.ensureDeferred
async def test_sigterm_mid_job_sends_stop_records_interrupted_and_exits_cleanly(rig, reactor):
    await start_sim(rig, "--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    await start_daemon(rig)
    waiting = start_upgrade_waiting(rig)
    await rig.changes.until(lambda: sim_saw(rig, "fault_stall", phase=1), "the stall in phase 1")
    job_id = (await only_job(rig))["id"]

    rig.daemon.kill(signal.SIGTERM)
    await rig.daemon.wait(reactor)
    # twistd shuts down cleanly, then re-raises SIGTERM so its exit status says why it stopped
    # (systemd counts that as a clean exit).
    log_text = rig.daemon_log()
    assert rig.daemon.exit_code == 0 or rig.daemon.signal == signal.SIGTERM, log_text
    assert "netota stopped" in log_text and "Traceback" not in log_text
    assert rig.notified(b"STOPPING=1")
    assert sim_saw(rig, "stop_received")
    out, err, code = await waiting
    assert code == EXIT_UNAVAILABLE, (out, err)
    record = JobJournal(rig.state_dir).get(job_id)
    assert record.state is JobState.INTERRUPTED and record.resumable
    assert record.outcome is not None and record.outcome.kind.value == "aborted"
    assert not os.path.exists(rig.control_path)
