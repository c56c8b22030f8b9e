"""Rescue's decisions (never a guessed image) and the rescuer on a Clock with a fake queue; the
image facts read from a real file."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from netota_daemon.daemon.batches import QueueRefused
from netota_daemon.daemon.firmware_store import FirmwareStore
from netota_daemon.daemon.image_facts import FirmwareProblem, ImageFacts, ImageInspector, read_image_facts
from netota_daemon.daemon.rescue import RescueAction, Rescuer, plan_rescue

IMAGE = ImageFacts("a" * 64, "single_backup", 4096)


@dataclass
class Probed:
    ok: bool = True
    mode: str | None = "loader"
    firmware_version: str | None = None
    error: str | None = None


def job(job_id, phase="phase2", resumable=True, firmware="fw.ufw", sha=None, state="interrupted"):
    return {
        "id": job_id,
        "firmware": firmware,
        "phase": phase,
        "state": state,
        "resumable": resumable,
        "point_of_no_return": phase == "phase2",
        "image_sha256": sha,
    }


def test_a_device_in_its_loader_gets_the_job_that_left_it_there_resumed():
    jobs = [job("j9", phase="detect", state="finished", resumable=False), job("j8")]  # newest first
    plan = plan_rescue("shelf1", Probed(), None, jobs, {"fw.ufw": IMAGE})
    assert (plan.action, plan.job, plan.firmware) == (RescueAction.RESUME, "j8", "fw.ufw")
    assert plan.message == (
        "shelf1 waits in its loader: resuming job j8 (phase 2 with fw.ufw) "
        "(its content could not be checked: the job predates image checksums)"
    )


def test_a_job_that_cannot_be_resumed_gives_its_checked_image_to_a_new_job():
    jobs = [job("j8", phase="reboot", resumable=False, sha=IMAGE.sha256, state="finished")]
    plan = plan_rescue("shelf1", Probed(), None, jobs, {"fw.ufw": IMAGE})
    assert (plan.action, plan.job, plan.firmware) == (RescueAction.START, "j8", "fw.ufw")
    assert plan.message == "shelf1 waits in its loader: phase 2 with fw.ufw, the image of job j8"


@pytest.mark.parametrize(
    ("jobs", "images", "expected"),
    [
        ([], {}, "the journal knows no job that flashed it: name the image (netota rescue shelf1 --firmware FILE)"),
        ([job("j1", phase="phase1")], {}, "the journal knows no job that flashed it"),
        (
            [job("j1", sha="b" * 64)],
            {"fw.ufw": IMAGE},
            "the image of job j1, fw.ufw, changed since that job flashed it: name the image",
        ),
        (
            [job("j1")],
            {"fw.ufw": FirmwareProblem("not_found", "firmware 'fw.ufw' does not exist")},
            "the image of job j1, fw.ufw can't be used now: firmware 'fw.ufw' does not exist",
        ),
        (
            [job("j1")],
            {"fw.ufw": ImageFacts("c" * 64, "double_backup", 10)},
            "is a double-backup image; a single-backup loader can't take it",
        ),
    ],
)
def test_no_known_image_means_the_operator_must_name_one(jobs, images, expected):
    plan = plan_rescue("shelf1", Probed(), None, jobs, images)
    assert plan.action is RescueAction.NEEDS_FIRMWARE
    assert expected in plan.message


def test_an_image_the_operator_names_is_used_as_given_but_its_kind_is_checked():
    plan = plan_rescue("shelf1", Probed(), None, [job("j1")], {"new.ufw": IMAGE}, firmware="new.ufw")
    assert (plan.action, plan.firmware, plan.job) == (RescueAction.START, "new.ufw", None)
    double = {"db.bin": ImageFacts("d" * 64, "double_backup", 1)}
    assert plan_rescue("shelf1", Probed(), None, [], double, firmware="db.bin").action is RescueAction.NEEDS_FIRMWARE


@pytest.mark.parametrize(
    ("probe", "busy", "expected"),
    [
        (Probed(mode="main", firmware_version="1.0.0"), None, "is not in its loader (it runs its main firmware 1.0.0)"),
        (Probed(ok=False, error="timed out"), None, "did not answer the probe (timed out)"),
        (Probed(), "j5", "has a job running (j5)"),
    ],
)
def test_nothing_is_done_for_a_device_that_does_not_need_it(probe, busy, expected):
    plan = plan_rescue("shelf1", probe, busy, [job("j1")], {"fw.ufw": IMAGE})
    assert plan.action is RescueAction.NONE and expected in plan.message


class FakeQueue:
    def __init__(self, jobs):
        self.jobs = jobs
        self.calls = []
        self.refuse = None

    def start(self, device, firmware):
        self.calls.append(("start", device, firmware))
        return defer.succeed({"id": f"new-{device}"})

    def resume(self, job_id):
        self.calls.append(("resume", job_id))
        if self.refuse:
            return defer.fail(self.refuse)
        return defer.succeed({"id": f"resumed-{job_id}"})

    def device_jobs(self, device, limit):
        return defer.succeed(list(self.jobs.get(device, []))[:limit])


def rescuer(queue, probes, busy=None):
    async def probe(names):
        return {n: probes[n] for n in names if n in probes}

    async def inspect(name):
        return IMAGE

    return Rescuer(Clock(), queue, probe, inspect, (busy or {}).get, ["a", "b", "c", "d"])


def run(d):
    out = []
    defer.ensureDeferred(d).addBoth(out.append)
    return out[0]


def test_rescue_resumes_starts_and_says_what_it_did_for_each_device():
    queue = FakeQueue({"a": [job("ja")], "c": [job("jc", phase="detect")]})
    probes = {"a": Probed(), "b": Probed(mode="main"), "c": Probed()}
    plans = run(rescuer(queue, probes, busy={"d": "jd"}).rescue())
    assert [(p.device, p.action, p.started) for p in plans] == [
        ("a", RescueAction.RESUME, "resumed-ja"),
        ("b", RescueAction.NONE, None),
        ("c", RescueAction.NEEDS_FIRMWARE, None),
        ("d", RescueAction.NONE, None),
    ]
    assert queue.calls == [("resume", "ja")]
    assert plans[0].to_json()["started"] == "resumed-ja"
    plans = run(rescuer(queue, probes).rescue(["c"], firmware="fw.ufw"))
    assert queue.calls[-1] == ("start", "c", "fw.ufw") and plans[0].started == "new-c"


def test_a_refused_rescue_says_why():
    queue = FakeQueue({"a": [job("ja")]})
    queue.refuse = QueueRefused("busy", "device a is busy with job x (running)")
    (plan,) = run(rescuer(queue, {"a": Probed()}).rescue(["a"]))
    assert plan.action is RescueAction.NONE and plan.message.endswith("refused: device a is busy with job x (running)")


def test_the_periodic_sweep_rescues_on_its_own_and_logs_what_it_cannot_once():
    queue = FakeQueue({"a": [job("ja")]})
    r = rescuer(queue, {"a": Probed(), "b": Probed()})
    with capturedLogs() as events:
        done = run(r.sweep())
        run(r.sweep())
    assert [p.device for p in done] == ["a"]
    needs = [e for e in events if e.get("log_format") == "rescue: {message}"]
    assert len(needs) == 1 and needs[0]["device"] == "b"
    assert "name the image (netota rescue b --firmware FILE)" in needs[0]["message"]


def test_image_facts_come_from_the_file(tmp_path):
    (tmp_path / "fw.ufw").write_bytes(b"HEAD" + bytes(range(256)) * 10)
    store = FirmwareStore(tmp_path)
    seen = []
    facts = read_image_facts(store, "fw.ufw", lambda head: seen.append(head) or "single_backup")
    data = (tmp_path / "fw.ufw").read_bytes()
    assert facts == ImageFacts(hashlib.sha256(data).hexdigest(), "single_backup", len(data))
    assert seen == [data[:0x40]]
    assert read_image_facts(store, "fw.ufw", lambda head: "something else").kind == "unknown"
    assert read_image_facts(store, "fw.ufw").kind == "unknown"  # wire.firmware_kind knows no such head
    from netota_daemon.sim.image import build_image

    (tmp_path / "single.ufw").write_bytes(build_image("2.0.0", 4096, "single"))
    (tmp_path / "double.bin").write_bytes(build_image("2.0.0", 4096, "double"))
    assert read_image_facts(store, "single.ufw").kind == "single_backup"  # told by wire.firmware_kind
    assert read_image_facts(store, "double.bin").kind == "double_backup"
    with pytest.raises(FirmwareProblem) as caught:
        read_image_facts(store, "../etc/passwd")
    assert caught.value.reason == "outside"


@pytest_twisted.ensureDeferred
async def test_image_facts_are_read_off_the_reactor(reactor, tmp_path):
    import threading

    (tmp_path / "fw.ufw").write_bytes(b"x" * 1000)
    threads = []
    inspector = ImageInspector(
        reactor, FirmwareStore(tmp_path), lambda head: threads.append(threading.current_thread()) or "unknown"
    )
    facts = await inspector("fw.ufw")
    assert facts.size == 1000 and threads and threads[0] is not threading.main_thread()


def test_a_job_given_a_set_of_images_is_finished_with_the_single_backup_one():
    double = ImageFacts("d" * 64, "double_backup", 10)
    last = {**job("j1", resumable=False, state="finished"), "firmware": "db.bin", "firmware_set": ["db.bin", "fw.ufw"]}
    plan = plan_rescue("shelf1", Probed(), None, [last], {"db.bin": double, "fw.ufw": IMAGE})
    assert (plan.action, plan.firmware) == (RescueAction.START, "fw.ufw")
