"""``netota batch ...``, ``netota batches`` and ``netota rescue`` in memory against a scripted daemon
(tests/fake_control.py): the requests they make, what they print, their exit codes and the JUnit file.
The batch objects the fake daemon answers with are made by the daemon's own Batch and BatchPolicy,
so the client reads the shapes the daemon writes."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from netota_daemon.cli.control_client import DaemonUnavailable
from netota_daemon.daemon.batch_policy import BatchPolicy, MemberOutcome, MemberProbe, RolloutPolicy
from netota_daemon.daemon.batches import Batch
from netota_daemon.daemon.image_facts import ImageFacts
from tests.fake_control import FakeControl, job, run

OK = MemberOutcome("succeeded", "upgraded: the device now runs firmware 2.0.0", firmware_version_after="2.0.0")
FAILED = MemberOutcome("failed", "phase 1: the device refused", failure="device_refused", advice="Reset it.")


def make_batch(devices=("a", "b", "c"), **policy):
    rollout = RolloutPolicy(**policy)
    batch = Batch(
        id="b1",
        created=1_750_000_000.0,
        firmware="v2.bin",
        image=ImageFacts("ab" * 32, "single_backup", 4096),
        selection={"devices": list(devices)},
        options={},
        policy=BatchPolicy(list(devices), rollout, "single_backup", 4),
    )
    batch.policy.begin(1_750_000_000.0)
    return batch


def preflight(batch, probes=None):
    probes = probes or {}
    return batch.policy.preflight_done(
        {d: probes.get(d, MemberProbe(True, "main", "1.0.0")) for d in batch.policy.members}, 1_750_000_001.0
    )


def member_event(batch, device):
    member = batch.policy.members[device].to_json()
    return "member", {"type": "member", "batch": batch.id, "device": device, "member": member}


def started(batch, device, job_id):
    batch.policy.job_started(device, job_id, 1_750_000_002.0)
    return member_event(batch, device)


def ended(batch, device, job_id, outcome, at=1_750_000_030.0):
    batch.policy.job_ended(device, job_id, outcome, at)
    return member_event(batch, device)


def snapshot(batch):
    return "snapshot", {"type": "snapshot", "batch": batch.id, "snapshot": batch.to_json()}


def daemon(start, script, final):
    return FakeControl(
        answers={("POST", "/v1/batches"): {"batch": start}, ("GET", "/v1/batches/b1"): {"batch": final}},
        streams={"/v1/batches/b1/events": script},
    )


def test_start_sends_the_batch_as_asked():
    batch = make_batch()
    client = FakeControl(answers={("POST", "/v1/batches"): {"batch": batch.to_json()}})
    argv = [
        "batch",
        "start",
        "v2.bin",
        "a",
        "b",
        "a",
        "--canary",
        "1",
        "--max-failures",
        "2",
        "--skip-current",
        "2.0.0",
    ]
    assert run(client, *argv, "--max-parallel", "2", "--option", "deadline=600") == 0
    assert client.requests == [
        (
            "POST",
            "/v1/batches",
            {
                "firmware": "v2.bin",
                "devices": ["a", "b"],
                "policy": {"canary": 1, "max_failures": 2, "skip_current": True, "max_parallel": 2},
                "target_version": "2.0.0",
                "options": {"deadline": 600},
            },
        )
    ]
    client.requests.clear()
    assert run(client, "batch", "start", "v2.bin", "--tag", "top", "--skip-current-known", "--no-preflight") == 0
    assert client.requests[0][2] == {
        "firmware": "v2.bin",
        "tag": "top",
        "policy": {"preflight": False, "skip_current": True},
    }
    client.requests.clear()
    assert run(client, "batch", "start", "--all", "v2.bin", "--no-resume") == 0
    assert client.requests[0][2] == {"firmware": "v2.bin", "all": True, "policy": {"resume_interrupted": False}}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["v2.bin"], "exactly one of them"),
        (["v2.bin", "a", "--all"], "exactly one of them"),
        (["v2.bin", "--all", "--tag", "x"], "exactly one of them"),
        (["v2.bin", "--all", "--skip-current", "1", "--skip-current-known"], "not both"),
        (["v2.bin", "--all", "--junit", "/nonexistent/dir/r.xml", "--wait"], "no such directory"),
        (["v2.bin", "--all", "--junit", "r.xml"], "--junit needs --wait"),
    ],
)
def test_bad_arguments_exit_64_before_anything_is_sent(capsys, argv, message):
    client = FakeControl()
    assert run(client, "batch", "start", *argv) == 64
    assert message in capsys.readouterr().err
    assert client.requests == []


def test_wait_follows_the_batch_and_a_failed_canary_exits_1_with_a_junit_report(capsys, tmp_path):
    batch = make_batch(canary=1)
    start = batch.to_json()
    preflight(batch)
    script = [snapshot(batch), started(batch, "a", "j1")]
    script.append(
        (
            "progress",
            {
                "type": "progress",
                "job": "j1",
                "device": "a",
                "phase": "phase1",
                "bytes_served": 100,
                "total_bytes": 1000,
                "percent": 10.0,
                "device_percent": 10,
                "rate": 1000.0,
            },
        )
    )
    script.append(ended(batch, "a", "j1", FAILED))
    script += [member_event(batch, "b"), member_event(batch, "c")]
    script.append(("batch_end", {"type": "batch_end", "batch": "b1", "snapshot": batch.to_json()}))
    final = batch.to_json()
    report = tmp_path / "report.xml"
    client = daemon(start, script, final)
    assert (
        run(client, "batch", "start", "v2.bin", "a", "b", "c", "--canary", "1", "--wait", "--junit", str(report)) == 1
    )
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0].split() == ["DEVICE", "CANARY", "STATE", "JOB", "TOOK", "OUTCOME"]
    assert out[1].split()[:4] == ["a", "yes", "failed", "j1"]
    assert "failed (device refused): phase 1: the device refused" in out[1]
    assert "skipped (canary failed): not started: canary a did not succeed (failed)" in out[2]
    assert out[-1] == "batch b1 (v2.bin): failed, stopped: canary a did not succeed (failed) (1 failed, 2 skipped)"
    live = captured.err.splitlines()  # a line per device on stderr (prefixed with the time on a log)
    assert live[0] == "batch b1: 3 device(s) with v2.bin"
    assert [line.split(" ", 1)[1] for line in live[1:4]] == [
        "a: starting",
        "b: waiting for its turn",
        "c: waiting for its turn",
    ]
    assert any(line.endswith("a: job j1 failed (device refused): phase 1: the device refused") for line in live)
    assert any(
        line.endswith("c: skipped (canary failed): not started: canary a did not succeed (failed)") for line in live
    )
    assert any("10.0%" in line for line in live)
    root = ET.parse(report).getroot()
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert cases["a"].find("failure").get("type") == "device_refused"
    assert cases["a"].get("time") == "28.000"
    assert cases["b"].find("skipped").get("message") == "not started: canary a did not succeed (failed)"


def test_a_batch_where_everything_succeeded_or_was_current_exits_0(capsys):
    batch = make_batch(("a", "b"), skip_current=True)
    batch.policy.target = None
    start = batch.to_json()
    from netota_daemon.daemon.batch_policy import TargetVersion

    batch.policy.target = TargetVersion("2.0.0")
    preflight(batch, {"b": MemberProbe(True, "main", "2.0.0")})
    script = [snapshot(batch), started(batch, "a", "j1"), ended(batch, "a", "j1", OK)]
    script.append(("batch_end", {"type": "batch_end", "batch": "b1", "snapshot": batch.to_json()}))
    assert run(daemon(start, script, batch.to_json()), "batch", "start", "v2.bin", "a", "b", "--wait") == 0
    out = capsys.readouterr().out
    assert "skipped (already current): already runs the target version 2.0.0" in out
    assert out.splitlines()[-1] == "batch b1 (v2.bin): succeeded (1 succeeded, 1 skipped)"


@pytest.mark.parametrize(
    ("outcomes", "code"),
    [
        ([OK, MemberOutcome("unverified", "no answer"), FAILED], 2),
        ([OK, OK, MemberOutcome("aborted", "cancelled by user")], 4),
        ([FAILED, OK, OK], 1),
    ],
)
def test_the_exit_code_is_the_first_bad_members(outcomes, code):
    batch = make_batch()
    start = batch.to_json()
    preflight(batch)
    script = [snapshot(batch)]
    for n, (device, outcome) in enumerate(zip("abc", outcomes, strict=True)):
        script.append(started(batch, device, f"j{n}"))
        script.append(ended(batch, device, f"j{n}", outcome))
    script.append(("batch_end", {"type": "batch_end", "batch": "b1", "snapshot": batch.to_json()}))
    assert run(daemon(start, script, batch.to_json()), "batch", "start", "v2.bin", "a", "b", "c", "--wait") == code


def test_the_daemon_going_away_mid_batch_exits_69_and_says_it_carries_on(capsys):
    batch = make_batch()
    preflight(batch)
    start = batch.to_json()
    client = FakeControl(
        answers={
            ("GET", "/v1/batches/b1"): DaemonUnavailable("the netota daemon at unix:x went away"),
        },
        streams={"/v1/batches/b1/events": [snapshot(batch), DaemonUnavailable("the connection was lost")]},
    )
    client.answers[("POST", "/v1/batches")] = {"batch": start}
    assert run(client, "batch", "start", "v2.bin", "a", "b", "c", "--wait") == 69
    assert "went away" in capsys.readouterr().err

    client.streams["/v1/batches/b1/events"] = [snapshot(batch), ("shutdown", {"type": "shutdown", "message": "bye"})]
    assert run(client, "batch", "start", "v2.bin", "a", "b", "c", "--wait") == 69
    err = capsys.readouterr().err
    assert "the daemon stopped before batch b1 ended: it carries the batch on when it is back" in err


def test_watch_of_an_ended_batch_reports_it_at_once(capsys):
    batch = make_batch(("a",), preflight=False)
    batch.policy.job_started("a", "j1", 1)
    batch.policy.job_ended("a", "j1", OK, 2)
    data = batch.to_json()
    client = FakeControl(
        answers={("GET", "/v1/batches/b1"): {"batch": data}}, streams={"/v1/batches/b1/events": [snapshot(batch)]}
    )
    assert run(client, "batch", "watch", "b1") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "batch b1 (v2.bin): succeeded (1 succeeded)"


def test_show_batches_and_cancel(capsys):
    batch = make_batch(canary=1, max_failures=1)
    preflight(batch, {"c": MemberProbe(False, error="timed out after 10 s")})
    data = batch.to_json()
    client = FakeControl(
        answers={
            ("GET", "/v1/batches/b1"): {"batch": data},
            ("GET", "/v1/batches?limit=5"): {"batches": [Batch.summary_json(batch)], "next_cursor": "3"},
            ("POST", "/v1/batches/b1/cancel"): lambda body: {"batch": data},
        }
    )
    assert run(client, "batch", "show", "b1") == 0
    out = capsys.readouterr().out
    assert "policy: canary 1, max failures 1, pre-flight on, skip current off, max parallel 4" in out
    assert "refused (unreachable): unreachable: timed out after 10 s" in out
    assert "a       yes     starting" in out
    assert run(client, "batches", "--limit", "5") == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["BATCH", "CREATED", "FIRMWARE", "DEVICES", "STATE", "RESULT", "MEMBERS"]
    assert "b1" in out and "1 starting" in out
    assert out.splitlines()[-1] == "older batches: netota batches --limit=5 --cursor=3"
    assert run(client, "batch", "cancel", "b1", "--reason", "wrong shelf") == 0
    assert client.requests[-1] == ("POST", "/v1/batches/b1/cancel", {"reason": "wrong shelf"})
    capsys.readouterr()
    assert run(client, "batch", "show", "b1", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"batch": data}


def test_rescue_says_what_it_did_and_needs_an_image_where_none_is_known(capsys):
    plans = [
        {"device": "a", "action": "resume", "message": "a waits in its loader: resuming job j8", "started": "j9"},
        {"device": "b", "action": "none", "message": "b is not in its loader", "started": None},
        {
            "device": "c",
            "action": "needs_firmware",
            "message": "c waits in its loader and the journal knows no job that flashed it: name the image",
            "started": None,
        },
    ]
    client = FakeControl(answers={("POST", "/v1/rescue"): {"rescues": plans}})
    assert run(client, "rescue") == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "a: a waits in its loader: resuming job j8 (job j9)",
        "b: b is not in its loader",
        "c: c waits in its loader and the journal knows no job that flashed it: name the image",
    ]
    assert client.requests == [("POST", "/v1/rescue", {})]
    client.answers[("POST", "/v1/rescue")] = {"rescues": [plans[0]]}
    final = job("j9", device="a", kind="succeeded", message="upgraded")
    client.answers[("GET", "/v1/jobs/j9")] = {"job": final}
    client.streams["/v1/jobs/j9/events"] = [
        ("job", {"type": "job", "job": "j9", "snapshot": job("j9", device="a")}),
        ("outcome", {"type": "outcome", "job": "j9", "device": "a", "state": "finished", "outcome": final["outcome"]}),
    ]
    assert run(client, "rescue", "a", "--firmware", "v2.bin", "--wait") == 0
    assert client.requests[-3] == ("POST", "/v1/rescue", {"devices": ["a"], "firmware": "v2.bin"})
    assert "  job j9: succeeded" in capsys.readouterr().out


def test_upgrade_wait_junit_reports_every_device_refused_and_lost_ones_too(capsys, tmp_path):
    done = job("j1", device="a", kind="succeeded", message="upgraded")
    failed = job("j2", device="b", kind="failed", message="phase 1: the device refused", phase="phase1")
    failed["outcome"]["failure"] = "device_refused"
    from netota_daemon.cli.control_client import ApiRefused

    client = FakeControl(
        answers={
            ("POST", "/v1/jobs"): lambda body: (
                {
                    "a": {"job": job("j1", device="a")},
                    "b": {"job": job("j2", device="b")},
                }.get(body["device"])
                or (_ for _ in ()).throw(ApiRefused(409, "busy", "device c is busy with job x (running)"))
            ),
            ("GET", "/v1/jobs/j1"): {"job": done},
            ("GET", "/v1/jobs/j2"): {"job": failed},
        },
        streams={
            "/v1/jobs/j1/events": [("job", {"type": "job", "job": "j1", "snapshot": done})],
            "/v1/jobs/j2/events": [("job", {"type": "job", "job": "j2", "snapshot": failed})],
        },
    )
    report = tmp_path / "up.xml"
    assert run(client, "upgrade", "a", "b", "c", "v2.bin", "--wait", "--junit", str(report)) == 1
    cases = {c.get("name"): c for c in ET.parse(report).getroot().iter("testcase")}
    assert cases["a"].find("failure") is None and cases["a"].get("time") == "34.500"
    assert cases["b"].find("failure").get("type") == "device_refused"
    assert cases["c"].find("failure").get("type") == "refused.busy"
    assert run(FakeControl(), "upgrade", "a", "v2.bin", "--junit", str(report)) == 64  # needs --wait
    assert "--junit needs --wait" in capsys.readouterr().err


def test_upgrade_wait_junit_for_one_device_and_an_unwritable_report(capsys, tmp_path):
    final = job("j1", kind="succeeded", message="upgraded")
    client = FakeControl(
        answers={("POST", "/v1/jobs"): {"job": job()}, ("GET", "/v1/jobs/j1"): {"job": final}},
        streams={"/v1/jobs/j1/events": [("job", {"type": "job", "job": "j1", "snapshot": final})]},
    )
    report = tmp_path / "one.xml"
    assert run(client, "upgrade", "a", "v2.bin", "--wait", "--junit", str(report)) == 0
    (case,) = ET.parse(report).getroot().iter("testcase")
    assert case.get("name") == "a" and case.find("system-out") is not None
    report.unlink()
    report.mkdir()  # now a directory: refused before anything is sent
    client.requests.clear()
    assert run(client, "upgrade", "a", "v2.bin", "--wait", "--junit", str(report)) == 64
    assert client.requests == []


def test_a_member_whose_job_was_lost_is_shown_with_the_reason(capsys):
    """A member that failed with no outcome (the end of its job could not be learnt) says why, not
    only "failed"."""
    batch = make_batch(("a",), preflight=False)
    batch.policy.job_started("a", "j1", 1)
    batch.policy.job_lost("a", "j1", "the journal has no job j1", 2)
    client = FakeControl(answers={("GET", "/v1/batches/b1"): {"batch": batch.to_json()}})
    assert run(client, "batch", "show", "b1") == 0  # show reports; only --wait and watch exit by members
    assert "job j1 failed: the journal has no job j1" in capsys.readouterr().out
