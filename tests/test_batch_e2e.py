"""Batches and rescue end to end: the real ``twistd netota``, the real engine, several ``netota sim``
processes, driven through the ``netota`` client (issue 13, "Done when"). Few tests, each waiting on
events with generous bounds."""

from __future__ import annotations

import json
import signal
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from tests.conftest import free_port
from tests.live_rig import LiveRig
from tests.openapi_schema import answer_errors
from tests.test_daemon_e2e import IMAGE_SIZE, PHASE2_HOLD_SCALE, PHASE2_HOLD_STALL

PHASE1_HOLD_STALL = "4:3000"


class Rack(LiveRig):
    """Several simulated devices tagged "rack", devices that are not there, and one daemon."""

    def __init__(self, tmp: Path, reactor: Any) -> None:
        super().__init__(tmp, reactor)
        self.dead: list[str] = []

    async def start_daemon(self, extra: str = "") -> None:
        dead = "".join(  # nothing listens there
            f'\n[devices.{name}]\nhost = "127.0.0.1"\nctp_port = {free_port()}\nhttp_port = {free_port()}\n'
            f"ota_port = {free_port()}\n"
            for name in self.dead
        )
        await super().start_daemon(extra, dead, web=False, device_lines='tags = ["rack"]\n', extra_timeouts="http = 5")

    async def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill(signal.SIGKILL)
        await self.daemon.wait(self.reactor)

    async def netota(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        return await super().netota(*args, timeout=timeout)

    async def control(self, method: str, path: str, body: dict | None = None) -> dict:
        """A request on the control socket, its answer checked against the OpenAPI document."""
        answer = await super().control(method, path, body)
        errors = answer_errors(method, path, answer)
        assert not errors, (method, path, errors)
        return answer

    async def batch(self, batch_id: str) -> dict:
        return (await self.control("GET", f"/v1/batches/{batch_id}"))["batch"]


@pytest.fixture
def rack(reactor, tmp_path):
    rack = Rack(tmp_path, reactor)
    yield rack
    pytest_twisted.blockon(Deferred.fromCoroutine(rack.stop()))


def states(batch: dict) -> dict[str, tuple[str, str | None]]:
    return {m["device"]: (m["state"], m["reason"]) for m in batch["members"]}


@pytest_twisted.ensureDeferred
async def test_a_failing_canary_stops_the_batch_before_any_other_device_is_touched(rack, reactor, tmp_path):
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
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
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
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
    rack.make_image("v3.bin", "3.0.0", IMAGE_SIZE)
    for name in ("ok", "current"):
        rack.sims[name].process.kill(signal.SIGTERM)
        await rack.sims[name].process.wait(reactor)
    await rack.start_sim("ok", "--reject-image")
    await rack.start_sim("current", "--reject-image")
    await rack.kill_daemon()
    double = rack.sims.pop("double")  # not in the next daemon's config: stopped here, as rack.stop() won't
    double.process.kill(signal.SIGTERM)
    await double.process.wait(reactor)
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
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
    await rack.start_sim(
        "held", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    await rack.start_sim("next")
    await rack.start_daemon()
    batch = (
        await rack.control("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": {"max_parallel": 1}})
    )["batch"]
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
    first = (await rack.control("GET", f"/v1/jobs/{held['jobs'][0]}"))["job"]
    assert first["state"] == "interrupted" and first["resumed_by"] == held["jobs"][1]
    for sim in rack.sims.values():
        assert sim.saw("mode", mode="main", firmware_version="2.0.0")


@pytest_twisted.ensureDeferred
async def test_cancel_of_a_batch_stops_what_runs_and_skips_the_rest(rack, reactor):
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
    await rack.start_sim("first", "--stall-after-reads", PHASE1_HOLD_STALL, "--fault-phase", "1")
    await rack.start_sim("second")
    await rack.start_daemon()
    batch = (
        await rack.control("POST", "/v1/batches", {"firmware": "v2.bin", "all": True, "policy": {"max_parallel": 1}})
    )["batch"]
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
    listed = (await rack.control("GET", "/v1/batches"))["batches"]  # its schema checked too
    assert [b["id"] for b in listed] == [batch["id"]] and listed[0]["state"] == "cancelled"
    assert (await rack.batch(batch["id"]))["members"] == final["members"]


@pytest_twisted.ensureDeferred
async def test_rescue_finishes_a_device_left_in_its_loader_by_an_interrupted_job(rack, reactor):
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
    await rack.start_sim(
        "dev", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    rack.dead.append("gone")
    await rack.start_daemon()
    job = (await rack.control("POST", "/v1/jobs", {"device": "dev", "firmware": "v2.bin"}))["job"]
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
    rack.make_image("v2.bin", "2.0.0", IMAGE_SIZE)
    await rack.start_sim(
        "dev", "--stall-after-reads", PHASE2_HOLD_STALL, "--fault-phase", "2", time_scale=PHASE2_HOLD_SCALE
    )
    await rack.start_daemon()
    job = (await rack.control("POST", "/v1/jobs", {"device": "dev", "firmware": "v2.bin"}))["job"]
    await rack.changes.until(lambda: rack.sims["dev"].saw("fault_stall", phase=2), "the stall in phase 2")
    await rack.kill_daemon()
    await rack.start_daemon("rescue = true\nrescue_interval = 600")  # the first sweep runs at start
    await rack.changes.until(
        lambda: rack.sims["dev"].saw("mode", mode="main", firmware_version="2.0.0"), "the device back on 2.0.0", 90
    )
    old = (await rack.control("GET", f"/v1/jobs/{job['id']}"))["job"]
    assert old["state"] == "interrupted" and old["resumed_by"]
    rescued = (await rack.control("GET", f"/v1/jobs/{old['resumed_by']}"))["job"]
    await rack.changes.until(lambda: rack.daemon_log().find("rescue of dev") >= 0, "the daemon's log line")
    assert rescued["resumed_from"] == job["id"]
