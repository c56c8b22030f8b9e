"""``BatchManager`` on a Clock with a fake job queue and prober and a real batch store (SQLite in a
temporary directory): requests, the journal-before-acting rule, the policy carried out, cancel, and
carrying a batch on after the daemon died."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs

from netota_daemon.daemon.batch_policy import EarlierJob
from netota_daemon.daemon.batch_store import AsyncBatchStore, BatchStore, BatchStoreError
from netota_daemon.daemon.batches import BatchError, BatchManager, BatchRefusal, QueueRefused
from netota_daemon.daemon.image_facts import FirmwareProblem, ImageFacts

SHA = "a" * 64
IMAGE = ImageFacts(SHA, "single_backup", 4096)


@dataclass
class Probed:
    ok: bool
    mode: str | None = "main"
    firmware_version: str | None = "1.0.0"
    error: str | None = None
    busy_job: str | None = None


class FakeQueue:
    """Jobs as dicts; a test ends them with :meth:`end`. Records every call."""

    max_parallel = 4

    def __init__(self):
        self.jobs: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.waiters: dict[str, list[defer.Deferred]] = {}
        self.refuse: dict[str, QueueRefused] = {}
        self.earlier: list[EarlierJob] = []
        self.on_start = None
        self.counter = 0

    def _new(self, device, firmware, batch, resumed_from=None):
        self.counter += 1
        job = {
            "id": f"j{self.counter}",
            "device": device,
            "firmware": firmware,
            "state": "running",
            "batch": batch,
            "outcome": None,
            "resumed_from": resumed_from,
            "resumed_by": None,
            "finished": None,
        }
        self.jobs[job["id"]] = job
        return job

    def start(self, device, firmware, options, batch):
        self.calls.append(("start", device, firmware, options, batch))
        if self.on_start:
            self.on_start(device)
        if device in self.refuse:
            return defer.fail(self.refuse.pop(device))
        return defer.succeed(dict(self._new(device, firmware, batch)))

    def resume(self, job_id, batch=None):
        self.calls.append(("resume", job_id))
        old = self.jobs.get(job_id)
        if old is None:
            return defer.fail(QueueRefused("unknown_job", f"no job {job_id!r}"))
        job = self._new(old["device"], old["firmware"], old["batch"], resumed_from=job_id)
        old["resumed_by"] = job["id"]
        return defer.succeed(dict(job))

    def cancel(self, job_id, reason):
        self.calls.append(("cancel", job_id, reason))
        return defer.succeed(dict(self.jobs[job_id]))

    def wait(self, job_id):
        job = self.jobs[job_id]
        if job["state"] not in ("queued", "running", "cancelling"):
            return defer.succeed(dict(job))
        d = defer.Deferred()
        self.waiters.setdefault(job_id, []).append(d)
        return d

    def get(self, job_id):
        job = self.jobs.get(job_id)
        return defer.succeed(dict(job) if job else None)

    def batch_job(self, batch_id, device):
        found = [j for j in self.jobs.values() if j["batch"] == batch_id and j["device"] == device]
        return defer.succeed(dict(found[-1]) if found else None)

    def earlier_jobs(self, sha):
        return defer.succeed(list(self.earlier))

    def end(self, device, kind="succeeded", state="finished", finished=100.0, **outcome):
        job = next(j for j in reversed(list(self.jobs.values())) if j["device"] == device)
        job.update(state=state, finished=finished)
        job["outcome"] = None if state == "interrupted" else {"kind": kind, "message": f"{kind} here", **outcome}
        for d in self.waiters.pop(job["id"], []):
            d.callback(dict(job))
        return job["id"]

    def fail_wait(self, device, error):
        """The wait for the device's newest job fails with ``error`` (the job itself goes on)."""
        job = next(j for j in reversed(list(self.jobs.values())) if j["device"] == device)
        for d in self.waiters.pop(job["id"]):
            d.errback(error)
        return job["id"]

    def started(self):
        return [c[1] for c in self.calls if c[0] == "start"]


class FakeProber:
    def __init__(self, results=None):
        self.results = results or {}
        self.asked: list[list[str]] = []

    async def probe(self, names):
        names = list(names)
        self.asked.append(names)
        return {n: self.results.get(n, Probed(True)) for n in names}


class World:
    def __init__(self, tmp_path, devices=("a", "b", "c", "d"), tags=None, results=None, queue=None, image=IMAGE):
        self.clock = Clock()
        self.queue = queue or FakeQueue()
        self.prober = FakeProber(results)
        self.store = BatchStore(tmp_path / "state")
        self.images = [image]
        self.busy_jobs: dict[str, str] = {}
        self.broken: str | None = None  # set: every call of the batch store fails with this error
        self.ids = iter(f"batch{n}" for n in range(1, 100))
        self.manager = self.make_manager(devices, tags)

    def make_manager(self, devices=("a", "b", "c", "d"), tags=None):
        async def inspect(name):
            if name == "missing.ufw":
                raise FirmwareProblem("not_found", f"firmware {name!r} does not exist")
            return self.images[-1]

        manager = BatchManager(
            self.clock,
            self.queue,
            self.prober,
            AsyncBatchStore(self.store, self.submit),
            list(devices),
            inspect,
            busy=self.busy_jobs.get,
            known_version=lambda d: None,
            device_tags=tags or {},
            new_id=lambda: next(self.ids),
        )
        manager.recovered = True  # as after a start-up with nothing to carry on
        return manager

    def submit(self, call):
        if self.broken:
            return defer.fail(BatchStoreError(self.broken))
        return defer.maybeDeferred(call)

    def create(self, body):
        d = defer.ensureDeferred(self.manager.create(body))
        return self.result(d)

    def refused(self, coroutine):
        """The BatchError a request is refused with."""
        with pytest.raises(BatchError) as caught:
            self.result(defer.ensureDeferred(coroutine))
        return caught.value

    @staticmethod
    def result(d):
        results = []
        d.addBoth(results.append)
        assert results, "did not finish"
        if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def get(self, batch_id):
        return self.result(defer.ensureDeferred(self.manager.get(batch_id)))


def member_states(batch):
    return {m["device"]: (m["state"], m["reason"]) for m in batch["members"]}


def test_a_batch_is_journaled_before_any_job_starts_and_runs_its_policy(tmp_path):
    world = World(tmp_path)
    seen = []
    world.queue.on_start = lambda device: seen.append(world.store.get("batch1").data["policy"]["members"])
    batch = world.create({"firmware": "fw.ufw", "all": True, "policy": {"canary": 1}})
    assert batch["id"] == "batch1" and batch["state"] == "running"
    assert world.prober.asked == [["a", "b", "c", "d"]]
    assert world.queue.started() == ["a"]
    # at the moment the job was asked for, the journal already said a was being started
    assert {m["device"]: m["state"] for m in seen[0]}["a"] == "starting"
    assert world.queue.calls[0] == ("start", "a", "fw.ufw", None, "batch1")
    world.queue.end("a")
    assert world.queue.started() == ["a", "b", "c", "d"]
    for device in "bcd":
        world.queue.end(device)
    final = world.get("batch1")
    assert final["state"] == "finished" and final["result"] == "succeeded"
    assert world.store.get("batch1").state == "finished"
    assert "batch1" not in world.manager.batches  # ended: read from the store
    assert final["jobs"] == ["j1", "j2", "j3", "j4"]


def test_a_failed_canary_starts_nothing_else(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "devices": ["a", "b", "c"], "policy": {"canary": 1}})
    world.queue.end("a", kind="failed", failure="device_refused", advice="Reset it.")
    assert world.queue.started() == ["a"]
    batch = world.get("batch1")
    assert batch["result"] == "failed" and batch["stop_reason"] == "canary_failed"
    assert member_states(batch) == {
        "a": ("failed", None),
        "b": ("skipped", "canary_failed"),
        "c": ("skipped", "canary_failed"),
    }
    a = batch["members"][0]
    assert a["outcome"]["failure"] == "device_refused" and a["outcome"]["advice"] == "Reset it."


def test_preflight_refuses_busy_unreachable_and_wrong_kind_devices(tmp_path):
    results = {"b": Probed(False, error="timed out"), "c": Probed(True, mode="double_backup")}
    world = World(tmp_path, results=results)
    world.busy_jobs["d"] = "other-job"
    batch = world.create({"firmware": "fw.ufw", "all": True})
    assert world.prober.asked == [["a", "b", "c"]]  # the busy device is not contacted
    assert world.queue.started() == ["a"]
    assert member_states(batch) == {
        "a": ("running", None),
        "b": ("refused", "unreachable"),
        "c": ("refused", "wrong_kind"),
        "d": ("refused", "busy"),
    }


def test_skip_current_with_the_version_an_earlier_job_read_back(tmp_path):
    world = World(tmp_path, results={"a": Probed(True, firmware_version="2.0.0")})
    world.queue.earlier = [EarlierJob("old", SHA, "succeeded", "2.0.0")]
    batch = world.create({"firmware": "fw.ufw", "devices": ["a", "b"], "policy": {"skip_current": True}})
    assert batch["target"] == {"version": "2.0.0", "source": "job", "job": "old"}
    assert world.queue.started() == ["b"]
    assert member_states(batch)["a"] == ("skipped", "already_current")


@pytest.mark.parametrize(
    ("body", "kind", "message"),
    [
        ([], BatchRefusal.BAD_FIELD, "must be a JSON object"),
        ({"firmware": "fw.ufw", "all": True, "colour": 1}, BatchRefusal.UNKNOWN_FIELD, "unknown field(s) colour"),
        ({"all": True}, BatchRefusal.MISSING_FIELD, "missing field firmware"),
        ({"firmware": 3, "all": True}, BatchRefusal.BAD_FIELD, "firmware must be a string"),
        ({"firmware": "fw.ufw"}, BatchRefusal.MISSING_FIELD, "exactly one of devices"),
        ({"firmware": "fw.ufw", "all": True, "tag": "x"}, BatchRefusal.BAD_FIELD, "exactly one of devices"),
        ({"firmware": "fw.ufw", "all": False}, BatchRefusal.BAD_FIELD, "all must be true"),
        ({"firmware": "fw.ufw", "devices": []}, BatchRefusal.BAD_FIELD, "non-empty list"),
        ({"firmware": "fw.ufw", "devices": ["a", "zz"]}, BatchRefusal.UNKNOWN_DEVICE, "no such device(s) zz"),
        ({"firmware": "fw.ufw", "tag": "shelf9"}, BatchRefusal.UNKNOWN_TAG, "tags in the configuration: top"),
        ({"firmware": "fw.ufw", "all": True, "policy": {"canary": -1}}, BatchRefusal.BAD_POLICY, "policy.canary"),
        ({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 9}}, BatchRefusal.BAD_POLICY, "more than"),
        ({"firmware": "fw.ufw", "all": True, "options": {"nope": 1}}, BatchRefusal.BAD_OPTIONS, "unknown option"),
        ({"firmware": "fw.ufw", "all": True, "options": {"deadline": -1}}, BatchRefusal.BAD_OPTIONS, "deadline"),
        ({"firmware": "fw.ufw", "all": True, "target_version": ""}, BatchRefusal.BAD_FIELD, "target_version"),
        ({"firmware": "missing.ufw", "all": True}, BatchRefusal.FIRMWARE_NOT_FOUND, "does not exist"),
    ],
)
def test_a_bad_request_is_refused_and_nothing_is_journaled_or_started(tmp_path, body, kind, message):
    world = World(tmp_path, tags={"a": ["top"]})
    with pytest.raises(BatchError) as caught:
        world.create(body)
    assert caught.value.kind is kind
    assert message in caught.value.message
    assert world.store.page().rows == [] and world.queue.calls == []


def test_devices_by_tag_and_a_device_in_an_unfinished_batch_is_refused(tmp_path):
    world = World(tmp_path, tags={"a": ["top"], "c": ["top", "left"]})
    batch = world.create({"firmware": "fw.ufw", "tag": "top", "options": {"deadline": 600}})
    assert [m["device"] for m in batch["members"]] == ["a", "c"] and batch["selection"] == {"tag": "top"}
    assert world.queue.calls[0] == ("start", "a", "fw.ufw", {"deadline": 600.0}, "batch1")
    with pytest.raises(BatchError) as caught:
        world.create({"firmware": "fw.ufw", "devices": ["b", "c"]})
    assert caught.value.kind is BatchRefusal.BUSY
    assert caught.value.message == "device c belongs to the unfinished batch batch1"


def test_cancel_skips_what_waits_and_stops_what_runs(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 2}})
    batch = world.result(defer.ensureDeferred(world.manager.cancel("batch1", "wrong shelf")))
    assert batch["state"] == "cancelling"
    assert [c for c in world.queue.calls if c[0] == "cancel"] == [
        ("cancel", "j1", "batch cancelled batch1"),
        ("cancel", "j2", "batch cancelled batch1"),
    ]
    assert member_states(batch)["c"] == ("skipped", "cancelled")
    world.queue.end("a", kind="aborted")
    world.queue.end("b", kind="aborted")
    final = world.get("batch1")
    assert final["state"] == "cancelled" and final["result"] == "cancelled"
    assert member_states(final)["a"] == ("cancelled", None)
    with pytest.raises(BatchError) as caught:
        world.result(defer.ensureDeferred(world.manager.cancel("batch1")))
    assert caught.value.kind is BatchRefusal.NOT_ACTIVE and "already ended (cancelled)" in caught.value.message
    with pytest.raises(BatchError) as caught:
        world.result(defer.ensureDeferred(world.manager.cancel("nope")))
    assert caught.value.kind is BatchRefusal.UNKNOWN_BATCH


def test_after_the_daemon_died_the_batch_resumes_its_interrupted_jobs_and_completes(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 2}})
    world.queue.end("a")  # a succeeded; c started
    assert world.queue.started() == ["a", "b", "c"]
    # kill -9: no shutdown. The next daemon's journal recovery marks the running jobs interrupted.
    for job in world.queue.jobs.values():
        if job["state"] == "running":
            job["state"] = "interrupted"
    world.queue.waiters.clear()
    world.manager = world.make_manager()
    world.result(defer.ensureDeferred(world.manager.recover()))
    resumes = [c for c in world.queue.calls if c[0] == "resume"]
    assert resumes == [("resume", "j2"), ("resume", "j3")]
    world.queue.end("b")
    world.queue.end("c")
    assert world.queue.started() == ["a", "b", "c", "d"]  # d only now: two ran at once
    world.queue.end("d")
    final = world.get("batch1")
    assert final["result"] == "succeeded"
    members = {m["device"]: m for m in final["members"]}
    assert members["b"]["jobs"] == ["j2", "j4"] and members["c"]["jobs"] == ["j3", "j5"]


def test_a_start_the_crash_lost_is_found_or_made_again(tmp_path):
    world = World(tmp_path)
    starts = []

    def crash_before_answer(device):
        starts.append(device)

    world.queue.on_start = crash_before_answer
    world.create({"firmware": "fw.ufw", "devices": ["a", "b"]})
    # The daemon dies after journaling "starting" for both: a's job was made (the queue journaled it),
    # b's was not. Simulate with the store as the first daemon left it and a queue that knows only j1.
    row = world.store.get("batch1")
    for member in row.data["policy"]["members"]:
        member.update(state="starting", job=None, jobs=[])
    world.store.save("batch1", "running", row.data)
    queue = FakeQueue()
    queue._new("a", "fw.ufw", "batch1")["state"] = "interrupted"
    world.queue = queue
    world.manager = world.make_manager()
    world.result(defer.ensureDeferred(world.manager.recover()))
    assert queue.calls == [("resume", "j1"), ("start", "b", "fw.ufw", None, "batch1")]


def test_a_firmware_file_that_changes_under_the_batch_stops_it(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 1}})
    world.images.append(ImageFacts("b" * 64, "single_backup", 4096))
    world.queue.end("a")
    batch = world.get("batch1")
    assert world.queue.started() == ["a"]
    assert batch["stop_reason"] == "image_changed" and batch["result"] == "failed"
    assert member_states(batch)["b"] == ("refused", "start_refused")
    assert "changed since the batch began" in batch["members"][1]["message"]
    assert member_states(batch)["c"] == ("skipped", "image_changed")


def test_a_refused_start_is_reported_and_the_next_device_starts(tmp_path):
    world = World(tmp_path)
    world.queue.refuse["a"] = QueueRefused("busy", "device a is busy with job x1 (running)")
    world.create({"firmware": "fw.ufw", "devices": ["a", "b"], "policy": {"max_parallel": 1}})
    batch = world.get("batch1")
    assert member_states(batch)["a"] == ("refused", "start_refused")
    assert batch["members"][0]["message"] == "device a is busy with job x1 (running)"
    assert world.queue.started() == ["a", "b"]


def test_events_follow_the_journal_and_say_what_changed(tmp_path):
    world = World(tmp_path)
    events = []
    world.manager.subscribe(events.append)
    world.create({"firmware": "fw.ufw", "devices": ["a"]})
    world.queue.end("a")
    kinds = [(e["type"], e.get("device"), (e.get("member") or {}).get("state") or e.get("state")) for e in events]
    assert kinds[0] == ("batch", None, "preflight")
    assert ("member", "a", "starting") in kinds and ("member", "a", "running") in kinds
    assert ("member", "a", "succeeded") in kinds
    assert kinds[-2:] == [("batch", None, "finished"), ("batch_end", None, None)]
    assert events[-1]["snapshot"]["result"] == "succeeded"


def test_listing_pages_newest_first(tmp_path):
    world = World(tmp_path, devices=[f"d{i}" for i in range(5)])
    for i in range(5):
        world.create({"firmware": "fw.ufw", "devices": [f"d{i}"]})
    page = world.result(defer.ensureDeferred(world.manager.page(2)))
    assert [b["id"] for b in page["batches"]] == ["batch5", "batch4"]
    assert "members" not in page["batches"][0]
    page = world.result(defer.ensureDeferred(world.manager.page(2, page["next_cursor"])))
    assert [b["id"] for b in page["batches"]] == ["batch3", "batch2"]
    page = world.result(defer.ensureDeferred(world.manager.page(2, page["next_cursor"])))
    assert [b["id"] for b in page["batches"]] == ["batch1"] and page["next_cursor"] is None
    with pytest.raises(BatchError) as caught:
        world.result(defer.ensureDeferred(world.manager.page(2, "1; DROP TABLE batches")))
    assert caught.value.kind is BatchRefusal.BAD_QUERY


def test_a_shutdown_leaves_running_members_for_the_restart(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "devices": ["a", "b"], "policy": {"max_parallel": 1}})
    world.manager.shutdown()
    world.queue.end("a", state="interrupted")
    assert world.queue.started() == ["a"]
    row = world.store.get("batch1")
    assert {m["device"]: m["state"] for m in row.data["policy"]["members"]} == {"a": "running", "b": "ready"}
    with pytest.raises(BatchError) as caught:
        world.create({"firmware": "fw.ufw", "devices": ["c"]})
    assert caught.value.kind is BatchRefusal.SHUTTING_DOWN


def test_a_batch_asked_for_before_the_restart_was_carried_on_waits_for_it(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "devices": ["a"]})
    for job in world.queue.jobs.values():
        job["state"] = "interrupted"
    world.manager = world.make_manager()
    world.manager.recovered = False  # as at start-up, before recover() ran
    d = defer.ensureDeferred(world.manager.create({"firmware": "fw.ufw", "devices": ["a", "b"]}))
    assert not d.called  # it does not know yet that a belongs to batch1
    world.result(defer.ensureDeferred(world.manager.recover()))
    failures = []
    d.addErrback(failures.append)
    assert failures and failures[0].value.kind is BatchRefusal.BUSY


def test_a_busy_device_is_refused_by_the_probes_busy_job_not_by_its_wording(tmp_path):
    results = {
        "a": Probed(False, mode=None, error="occupied (job j9 holds it)", busy_job="j9"),
        "b": Probed(False, mode=None, error="busy with job nothing: just a device's odd answer"),
    }
    world = World(tmp_path, devices=("a", "b", "c"), results=results)
    batch = world.create({"firmware": "fw.ufw", "all": True})
    assert member_states(batch) == {"a": ("refused", "busy"), "b": ("refused", "unreachable"), "c": ("running", None)}
    a = batch["members"][0]
    assert a["probe"]["busy_job"] == "j9" and a["message"] == "busy with job j9"
    assert batch["members"][1]["probe"]["busy_job"] is None


def test_a_member_whose_job_cannot_be_followed_fails_and_the_batch_goes_on(tmp_path):
    world = World(tmp_path, devices=("a", "b", "c"))
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 1, "max_failures": 2}})
    with capturedLogs() as events:
        job = world.queue.fail_wait("a", QueueRefused("journal_unavailable", "can't read the journal: disk I/O error"))
    batch = world.get("batch1")
    a = batch["members"][0]
    assert (a["state"], a["outcome"]) == ("failed", None)
    assert a["message"].startswith(f"the daemon could not follow its job {job} to its end (can't read the journal")
    assert f"the job itself may still run (netota show {job})" in a["message"]
    assert world.queue.started() == ["a", "b"]  # the policy went on
    errors = [e for e in events if e.get("log_level").name == "error"]
    assert [e["device"] for e in errors] == ["a"] and "disk I/O error" in errors[0]["message"]
    with capturedLogs():
        world.queue.fail_wait("b", RuntimeError("a bug"))  # not the queue's own refusal
    final = world.get("batch1")
    assert member_states(final) == {"a": ("failed", None), "b": ("failed", None), "c": ("skipped", "max_failures")}
    assert "(a bug)" in final["members"][1]["message"]
    assert final["state"] == "finished" and final["result"] == "failed"
    assert world.store.get("batch1").state == "finished" and world.manager.batches == {}


def test_a_job_end_the_batch_cannot_read_still_ends_its_member(tmp_path):
    world = World(tmp_path, devices=("a",))
    world.create({"firmware": "fw.ufw", "devices": ["a"], "policy": {"canary": 1}})
    job = world.queue.jobs["j1"]
    job.update(state="finished", outcome="garbage")
    with capturedLogs():
        for d in world.queue.waiters.pop("j1"):
            d.callback(dict(job))
    final = world.get("batch1")
    assert member_states(final) == {"a": ("failed", None)}
    assert "its end can't be read" in final["members"][0]["message"]
    assert final["state"] == "finished" and final["result"] == "failed"


def test_a_wait_refused_by_a_queue_that_shuts_down_leaves_the_member_for_the_restart(tmp_path):
    world = World(tmp_path)
    world.create({"firmware": "fw.ufw", "devices": ["a", "b"], "policy": {"max_parallel": 1}})
    world.queue.fail_wait("a", QueueRefused("shutting_down", "the daemon is shutting down"))
    assert world.manager.stopping and world.queue.started() == ["a"]
    row = world.store.get("batch1")
    assert {m["device"]: m["state"] for m in row.data["policy"]["members"]} == {"a": "running", "b": "ready"}
    world.queue.jobs["j1"]["state"] = "interrupted"  # as the queue's shutdown left it
    world.manager = world.make_manager()
    world.result(defer.ensureDeferred(world.manager.recover()))
    assert [c for c in world.queue.calls if c[0] == "resume"] == [("resume", "j1")]


def test_a_save_that_fails_starts_nothing_frees_the_devices_and_says_why(tmp_path):
    world = World(tmp_path, devices=("a", "b", "c"))
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 1}})
    world.broken = "can't write the batch journal: database or disk is full"
    with capturedLogs() as events:
        world.queue.end("a")  # its decision (start b) can't be journaled
    assert world.queue.started() == ["a"]  # so b was not started
    (line,) = [e for e in events if e.get("log_level").name == "error"]
    assert line["batch"] == "batch1" and "disk is full" in str(line["error"]) and line["then"]
    batch = world.get("batch1")  # from memory: the journal still has it as it was
    assert batch["journal_error"] == "can't write the batch journal: database or disk is full"
    assert batch["stop_reason"] == "journal_error" and batch["state"] == "finished"
    assert member_states(batch) == {
        "a": ("succeeded", None),
        "b": ("skipped", "journal_error"),
        "c": ("skipped", "journal_error"),
    }
    assert "could not be journaled" in batch["members"][1]["message"]
    assert [world.manager.batch_of_device(d) for d in "abc"] == [None, None, None]  # nothing is held
    assert world.store.get("batch1").state == "running"
    # A new batch can't be journaled before the old one's end is: refused, nothing taken.
    refusal = world.refused(world.manager.create({"firmware": "fw.ufw", "devices": ["b"]}))
    assert refusal.kind is BatchRefusal.JOURNAL_UNAVAILABLE and "batch batch1" in refusal.message
    assert world.manager.batches == {}
    world.broken = None  # the disk has room again
    batch2 = world.create({"firmware": "fw.ufw", "devices": ["b", "c"]})
    assert batch2["id"] == "batch2" and world.queue.started() == ["a", "b", "c"]
    row = world.store.get("batch1")  # journaled first: no two unfinished batches claim b
    assert row.state == "finished"
    assert [m["state"] for m in row.data["policy"]["members"]] == ["succeeded", "skipped", "skipped"]


def test_a_cancel_that_cannot_be_journaled_is_refused_and_the_running_job_finishes(tmp_path):
    world = World(tmp_path, devices=("a", "b", "c"))
    world.create({"firmware": "fw.ufw", "all": True, "policy": {"max_parallel": 1}})
    world.broken = "can't write the batch journal: disk I/O error"
    with capturedLogs():
        refusal = world.refused(world.manager.cancel("batch1", "wrong shelf"))
    assert refusal.kind is BatchRefusal.JOURNAL_UNAVAILABLE
    assert refusal.message.startswith("the cancel of batch batch1 can't be journaled (can't write the batch journal")
    assert "its running jobs were not stopped" in refusal.message
    assert [c for c in world.queue.calls if c[0] == "cancel"] == []  # not journaled, not done
    assert [world.manager.batch_of_device(d) for d in "abc"] == ["batch1", None, None]  # a's job still runs
    world.broken = None
    world.queue.end("a")
    final = world.get("batch1")
    assert final["state"] == "cancelled" and member_states(final)["a"] == ("succeeded", None)
    assert world.store.get("batch1").state == "cancelled" and world.manager.batches == {}


def test_a_batch_that_cannot_be_journaled_is_refused_and_takes_nothing(tmp_path):
    world = World(tmp_path)
    world.broken = "can't write the batch journal: disk I/O error"
    with capturedLogs():
        refusal = world.refused(world.manager.create({"firmware": "fw.ufw", "devices": ["a"]}))
    assert refusal.kind is BatchRefusal.JOURNAL_UNAVAILABLE and "disk I/O error" in refusal.message
    assert world.manager.batches == {} and world.queue.calls == []
    world.broken = None
    assert world.create({"firmware": "fw.ufw", "devices": ["a"]})["id"] == "batch2"


def test_a_probe_or_a_start_that_fails_by_a_bug_refuses_its_members_and_the_batch_ends(tmp_path):
    world = World(tmp_path, devices=("a", "b"))

    async def broken_probe(names):
        raise RuntimeError("probe bug")

    world.prober.probe = broken_probe
    with capturedLogs():
        batch = world.create({"firmware": "fw.ufw", "all": True})
    assert member_states(batch) == {"a": ("refused", "unreachable"), "b": ("refused", "unreachable")}
    assert batch["members"][0]["message"] == "unreachable: the probe failed: probe bug"
    assert batch["state"] == "finished" and world.queue.calls == []

    def broken_start(device, firmware, options, batch):
        raise RuntimeError("start bug")

    world.queue.start = broken_start
    with capturedLogs():
        batch = world.create({"firmware": "fw.ufw", "devices": ["a"], "policy": {"preflight": False}})
    assert member_states(batch) == {"a": ("refused", "start_refused")}
    assert batch["members"][0]["message"] == "internal error: start bug" and batch["state"] == "finished"
