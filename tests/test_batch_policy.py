"""The batch policy's decisions, one rule at a time, on a ``Clock`` (no sockets, no reactor), and a
Hypothesis run over random sequences of outcomes that checks what must never happen."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from netota_daemon.daemon.batch_policy import (
    BatchPolicy,
    BatchState,
    Cancel,
    EarlierJob,
    Finish,
    MemberOutcome,
    MemberProbe,
    MemberState,
    PolicyError,
    Probe,
    Reason,
    Resume,
    RolloutPolicy,
    Start,
    TargetVersion,
    image_fits,
    target_version_from_jobs,
)

OK = MemberOutcome("succeeded", "upgraded to 2.0.0", firmware_version_after="2.0.0")
FAILED = MemberOutcome("failed", "phase 1: the device refused", failure="device_refused", advice="reset it")
ABORTED = MemberOutcome("aborted", "cancelled by the batch", advice="The old firmware is intact.")
MAIN = MemberProbe(reachable=True, mode="main", firmware_version="1.0.0")


def started(actions):
    return [a.device for a in actions if isinstance(a, Start)]


def states(batch):
    return {name: m.state for name, m in batch.members.items()}


class Rack:
    """A batch and a clock; ``start`` confirms Start actions as jobs ``job-DEVICE-N``."""

    def __init__(self, devices, policy=None, image_kind="single_backup", daemon_max=4, target=None, known=None):
        self.clock = Clock()
        self.batch = BatchPolicy(
            list(devices),
            policy or RolloutPolicy(),
            image_kind,
            daemon_max,
            target=target,
            known_versions=known,
        )
        self.jobs: dict[str, str] = {}
        self.counter = 0

    @property
    def now(self):
        return self.clock.seconds()

    def begin(self, probes=None):
        actions = self.batch.begin(self.now)
        if self.batch.policy.preflight:
            assert actions == [Probe(tuple(self.batch.members))]
            self.clock.advance(1)
            probes = probes if probes is not None else {d: MAIN for d in self.batch.members}
            actions = self.batch.preflight_done(probes, self.now)
        return self.confirm(actions)

    def confirm(self, actions):
        """Confirm every Start/Resume as a new job; return the actions."""
        for action in list(actions):
            if isinstance(action, (Start, Resume)):
                self.counter += 1
                job = f"job-{action.device}-{self.counter}"
                self.jobs[action.device] = job
                actions = actions + self.confirm(self.batch.job_started(action.device, job, self.now))
        return actions

    def end(self, device, outcome=OK, seconds=10):
        self.clock.advance(seconds)
        return self.confirm(self.batch.job_ended(device, self.jobs[device], outcome, self.now))


# ----- canary


def test_a_canary_goes_first_and_the_rest_start_when_it_succeeded():
    rack = Rack("abcd", RolloutPolicy(canary=1))
    assert started(rack.begin()) == ["a"]
    assert rack.batch.members["a"].canary and not rack.batch.members["b"].canary
    assert states(rack.batch)["b"] is MemberState.READY
    assert started(rack.end("a")) == ["b", "c", "d"]
    for device in "bcd":
        actions = rack.end(device)
    assert actions == [Finish(rack.batch.summary())]
    assert rack.batch.result() == "succeeded"
    assert rack.batch.members["a"].to_json()["duration"] == 10


def test_a_canary_that_fails_stops_the_batch_before_any_other_device_is_touched():
    rack = Rack("abcd", RolloutPolicy(canary=1))
    rack.begin()
    actions = rack.end("a", FAILED)
    assert started(actions) == []
    assert [type(a) for a in actions] == [Finish]
    batch = rack.batch
    assert batch.state is BatchState.FINISHED and batch.result() == "failed"
    assert batch.stop_reason is Reason.CANARY_FAILED
    assert "canary a did not succeed (failed)" in batch.stop_message
    for device in "bcd":
        member = batch.members[device]
        assert (member.state, member.reason, member.job) == (MemberState.SKIPPED, Reason.CANARY_FAILED, None)
        assert "canary a did not succeed" in member.message
    assert batch.members["a"].outcome == FAILED
    summary = actions[0].summary
    assert summary["counts"]["skipped"] == 3 and summary["counts"]["failed"] == 1


def test_several_canaries_one_at_a_time_and_the_second_fails():
    rack = Rack("abcde", RolloutPolicy(canary=2, max_parallel=1))
    assert started(rack.begin()) == ["a"]
    assert started(rack.end("a")) == ["b"]  # the second canary, not the rest
    actions = rack.end("b", MemberOutcome("unverified", "the new firmware did not answer"))
    assert started(actions) == []
    assert {d: rack.batch.members[d].reason for d in "cde"} == dict.fromkeys("cde", Reason.CANARY_FAILED)


def test_canaries_running_together_a_failure_skips_the_canary_not_yet_started():
    rack = Rack("abcde", RolloutPolicy(canary=3, max_parallel=2))
    assert started(rack.begin()) == ["a", "b"]
    assert started(rack.end("a", FAILED)) == []  # c (a canary) is not started either
    assert rack.batch.members["c"].state is MemberState.SKIPPED
    assert rack.batch.state is BatchState.STOPPING and rack.batch.members["b"].state is MemberState.RUNNING
    actions = rack.end("b")  # the running canary finishes
    assert isinstance(actions[-1], Finish) and rack.batch.result() == "failed"
    assert rack.batch.members["b"].state is MemberState.SUCCEEDED


def test_a_canary_refused_at_preflight_or_at_start_is_replaced_by_the_next_device():
    rack = Rack("abcd", RolloutPolicy(canary=1))
    probes = {"a": MemberProbe(reachable=False, error="timed out"), "b": MAIN, "c": MAIN, "d": MAIN}
    actions = rack.batch.begin(0)
    actions = rack.batch.preflight_done(probes, 1)
    assert started(actions) == ["b"] and rack.batch.members["b"].canary
    actions = rack.batch.start_refused("b", "device b is busy with job 1234", 2)
    assert started(actions) == ["c"]
    assert rack.batch.members["c"].canary and not rack.batch.members["b"].canary
    assert rack.batch.members["b"].reason is Reason.START_REFUSED
    assert "busy with job 1234" in rack.batch.members["b"].message


# ----- max_failures


def test_max_failures_stops_launching_at_the_threshold_and_running_jobs_finish():
    rack = Rack("abcdef", RolloutPolicy(max_failures=2, max_parallel=3))
    assert started(rack.begin()) == ["a", "b", "c"]
    assert started(rack.end("a", FAILED)) == ["d"]  # one failure: carry on
    actions = rack.end("b", FAILED)
    assert started(actions) == []
    batch = rack.batch
    assert batch.state is BatchState.STOPPING and batch.stop_reason is Reason.MAX_FAILURES
    assert "2 member job(s) failed (max_failures 2)" in batch.stop_message
    assert (batch.members["e"].state, batch.members["e"].reason) == (MemberState.SKIPPED, Reason.MAX_FAILURES)
    assert batch.members["f"].reason is Reason.MAX_FAILURES
    assert started(rack.end("c")) == []
    actions = rack.end("d", FAILED)  # a third failure while stopping changes nothing
    assert isinstance(actions[-1], Finish)
    counts = batch.counts()
    assert (counts["failed"], counts["succeeded"], counts["skipped"], counts["total"]) == (3, 1, 2, 6)
    assert batch.result() == "failed"


def test_aborted_by_hand_and_not_applicable_count_as_failures():
    rack = Rack("abc", RolloutPolicy(max_failures=2, max_parallel=1, preflight=False))
    rack.begin()
    rack.end("a", MemberOutcome("aborted", "cancelled by user"))
    actions = rack.end("b", MemberOutcome("not_applicable", "a double-backup device"))
    assert rack.batch.members["c"].reason is Reason.MAX_FAILURES
    assert isinstance(actions[-1], Finish)


# ----- pre-flight


def test_preflight_refuses_unreachable_busy_and_wrong_kind_devices_before_anything_starts():
    rack = Rack("abcdef", RolloutPolicy(max_parallel=4), image_kind="single_backup")
    probes = {
        "a": MemberProbe(reachable=False, error="GET http://192.0.2.1:8080/...: timed out after 10 s"),
        "b": MemberProbe(reachable=False, busy_job="0b1c2d3e4f50"),
        "c": MemberProbe(reachable=True, mode="double_backup", firmware_version="1.0.0"),
        "d": MemberProbe(reachable=True, mode="loader", firmware_version=None),
        "e": MAIN,
        # f: no result at all
    }
    actions = rack.begin(probes)
    assert started(actions) == ["d", "e"]
    members = rack.batch.members
    assert (members["a"].state, members["a"].reason) == (MemberState.REFUSED, Reason.UNREACHABLE)
    assert members["a"].message == "unreachable: GET http://192.0.2.1:8080/...: timed out after 10 s"
    assert (members["b"].reason, members["b"].message) == (Reason.BUSY, "busy with job 0b1c2d3e4f50")
    assert members["c"].reason is Reason.WRONG_KIND
    assert "double-backup build (ota_type 0)" in members["c"].message and "single-backup image" in members["c"].message
    assert members["f"].reason is Reason.UNREACHABLE and "no probe result" in members["f"].message
    assert members["c"].probe.mode == "double_backup" and members["e"].firmware_version == "1.0.0"
    assert members["d"].firmware_version is None  # the loader's document says nothing of the firmware


def test_a_double_backup_image_is_refused_for_single_backup_builds_and_taken_by_double_backup_ones():
    rack = Rack("abc", image_kind="double_backup")
    probes = {"a": MAIN, "b": MemberProbe(True, "loader"), "c": MemberProbe(True, "double_backup", "1.0.0")}
    assert started(rack.begin(probes)) == ["c"]
    assert rack.batch.members["a"].reason is Reason.WRONG_KIND
    assert "single-backup build" in rack.batch.members["a"].message
    assert rack.batch.members["b"].reason is Reason.WRONG_KIND


def test_an_unrecognised_image_is_not_held_against_any_build_and_the_batch_says_so():
    rack = Rack("ab", image_kind="unknown")
    assert started(rack.begin({"a": MAIN, "b": MemberProbe(True, "double_backup")})) == ["a", "b"]
    assert any("kind could not be told" in note for note in rack.batch.notes)
    assert image_fits("single_backup", None) is None and image_fits("unknown", "double_backup") is None


def test_a_batch_whose_every_device_is_refused_finishes_failed_at_once():
    rack = Rack("ab")
    actions = rack.begin({})
    assert [type(a) for a in actions] == [Finish]
    assert rack.batch.result() == "failed" and rack.batch.counts()["refused"] == 2


# ----- skip_current


def test_skip_current_skips_devices_on_the_requested_version():
    rack = Rack("abc", RolloutPolicy(skip_current=True), target=TargetVersion("2.0.0"))
    probes = {"a": MemberProbe(True, "main", "2.0.0"), "b": MAIN, "c": MemberProbe(True, "loader")}
    assert started(rack.begin(probes)) == ["b", "c"]
    a = rack.batch.members["a"]
    assert (a.state, a.reason, a.message) == (
        MemberState.SKIPPED,
        Reason.CURRENT,
        "already runs the target version 2.0.0",
    )
    rack.end("b")
    actions = rack.end("c")
    assert isinstance(actions[-1], Finish) and rack.batch.result() == "succeeded"  # skipped as current is fine


def test_skip_current_with_a_version_known_from_an_earlier_job_with_the_same_image():
    earlier = [  # newest first, as the journal lists them
        EarlierJob("j5", "other-image", "succeeded", "3.0.0"),
        EarlierJob("j4", "sha-of-image", "already_current", "9.9.9"),
        EarlierJob("j3", "sha-of-image", "failed", None),
        EarlierJob("j2", "sha-of-image", "succeeded", "2.0.0"),
        EarlierJob("j1", "sha-of-image", "succeeded", "1.9.0"),
    ]
    target = target_version_from_jobs("sha-of-image", earlier)
    assert target == TargetVersion("2.0.0", source="job", job="j2")
    assert target_version_from_jobs("never-flashed", earlier) is None
    rack = Rack("ab", RolloutPolicy(skip_current=True), target=target)
    assert started(rack.begin({"a": MemberProbe(True, "main", "2.0.0"), "b": MAIN})) == ["b"]
    assert rack.batch.members["a"].message == (
        "already runs the target version 2.0.0 (read back by job j2, which flashed the same image)"
    )


def test_skip_current_without_a_known_target_skips_nothing_and_says_why():
    rack = Rack("a", RolloutPolicy(skip_current=True))
    assert started(rack.begin({"a": MemberProbe(True, "main", "2.0.0")})) == ["a"]
    assert any("target version is not known" in note for note in rack.batch.notes)


def test_skip_current_without_preflight_uses_the_versions_the_daemon_knows():
    rack = Rack(
        "abc",
        RolloutPolicy(skip_current=True, preflight=False),
        target=TargetVersion("2.0.0"),
        known={"a": "2.0.0", "b": "1.0.0"},
    )
    assert started(rack.begin()) == ["b", "c"]
    assert rack.batch.members["a"].reason is Reason.CURRENT


def test_without_skip_current_a_current_device_is_upgraded():
    rack = Rack("a", target=TargetVersion("2.0.0"))
    assert started(rack.begin({"a": MemberProbe(True, "main", "2.0.0")})) == ["a"]


# ----- max_parallel


def test_max_parallel_of_the_batch_within_the_daemons():
    rack = Rack("abcdef", RolloutPolicy(max_parallel=2), daemon_max=4)
    assert started(rack.begin()) == ["a", "b"]
    assert started(rack.end("a")) == ["c"]
    assert Rack("abcdef", daemon_max=3).begin() and Rack("abcdef", daemon_max=3).batch.max_parallel == 3
    with pytest.raises(PolicyError, match=r"policy.max_parallel: 5 is more than the daemon's max_parallel \(4\)"):
        RolloutPolicy.from_json({"max_parallel": 5}, daemon_max_parallel=4)


def test_a_smaller_daemon_max_parallel_after_a_restart_holds_new_starts_back():
    rack = Rack("abcdef", daemon_max=4)
    assert started(rack.begin()) == ["a", "b", "c", "d"]
    restored = BatchPolicy.from_json(json.loads(json.dumps(rack.batch.to_json())), daemon_max_parallel=2)
    assert restored.max_parallel == 2
    assert started(restored.job_ended("a", rack.jobs["a"], OK, 5)) == []  # 3 still run: over 2
    assert started(restored.job_ended("b", rack.jobs["b"], OK, 6)) == []
    assert started(restored.job_ended("c", rack.jobs["c"], OK, 7)) == ["e"]


# ----- cancel


def test_cancel_skips_queued_members_and_cancels_running_ones():
    rack = Rack("abcd", RolloutPolicy(max_parallel=2))
    rack.begin()
    actions = rack.batch.cancel("wrong image", rack.now)
    assert actions == [Cancel("a", rack.jobs["a"]), Cancel("b", rack.jobs["b"])]
    batch = rack.batch
    assert batch.state is BatchState.CANCELLING
    assert {d: batch.members[d].reason for d in "cd"} == dict.fromkeys("cd", Reason.CANCELLED)
    assert batch.members["c"].message == "the batch was cancelled: wrong image"
    assert batch.cancel("again", rack.now) == []
    assert rack.end("a", ABORTED) == []
    actions = rack.end("b", OK)  # it reached its end before the STOP took effect
    assert isinstance(actions[-1], Finish)
    assert batch.state is BatchState.CANCELLED and batch.result() == "cancelled"
    assert batch.members["a"].state is MemberState.CANCELLED and batch.members["b"].state is MemberState.SUCCEEDED


def test_cancel_during_preflight_ends_the_batch_and_a_late_probe_answer_starts_nothing():
    rack = Rack("ab")
    rack.batch.begin(0)
    actions = rack.batch.cancel("changed my mind", 1)
    assert [type(a) for a in actions] == [Finish] and rack.batch.state is BatchState.CANCELLED
    assert rack.batch.preflight_done({"a": MAIN, "b": MAIN}, 2) == []


def test_a_member_being_started_when_the_batch_is_cancelled_is_cancelled_once_its_job_exists():
    rack = Rack("ab", RolloutPolicy(preflight=False))
    actions = rack.batch.begin(0)
    assert started(actions) == ["a", "b"]
    rack.batch.cancel("stop", 1)
    assert rack.batch.job_started("a", "job-a", 2) == [Cancel("a", "job-a")]
    assert rack.batch.start_refused("b", "the daemon is shutting down", 2) == []
    assert rack.batch.members["b"].reason is Reason.CANCELLED
    actions = rack.batch.job_ended("a", "job-a", ABORTED, 3)
    assert isinstance(actions[-1], Finish) and rack.batch.result() == "cancelled"


# ----- restarts and interrupted jobs


def test_a_restored_batch_carries_on_and_resumes_its_interrupted_jobs():
    rack = Rack("abcd", RolloutPolicy(max_parallel=2, canary=1))
    rack.begin()
    rack.end("a")  # the canary succeeded: b and c start
    saved = json.loads(json.dumps(rack.batch.to_json()))
    restored = BatchPolicy.from_json(saved)
    assert restored.to_json() == saved
    job_b = rack.jobs["b"]
    assert restored.job_interrupted("b", job_b, 20) == [Resume("b", job_b)]
    assert restored.members["b"].state is MemberState.STARTING
    assert restored.job_started("b", "job-b-resumed", 21) == []
    assert restored.members["b"].jobs == [job_b, "job-b-resumed"]
    assert restored.restart(21) == []  # two running: no slot
    assert started(restored.job_ended("c", rack.jobs["c"], OK, 30)) == ["d"]
    assert restored.job_started("d", "job-d", 30) == []
    assert restored.job_ended("b", job_b, OK, 31) == []  # the old job's report is stale
    assert restored.members["b"].state is MemberState.RUNNING
    assert restored.job_ended("b", "job-b-resumed", OK, 32) == []
    actions = restored.job_ended("d", "job-d", OK, 34)
    assert isinstance(actions[-1], Finish) and restored.result() == "succeeded"


def test_interrupted_jobs_are_not_resumed_when_the_policy_says_so():
    rack = Rack("ab", RolloutPolicy(resume_interrupted=False, max_parallel=1, max_failures=1))
    rack.begin()
    actions = rack.batch.job_interrupted("a", rack.jobs["a"], 5)
    member = rack.batch.members["a"]
    assert member.state is MemberState.FAILED and member.outcome.kind == "interrupted"
    assert rack.batch.members["b"].reason is Reason.MAX_FAILURES and isinstance(actions[-1], Finish)


def test_a_start_lost_in_a_crash_is_made_again_after_the_restart():
    batch = BatchPolicy(["a"], RolloutPolicy(preflight=False), "single_backup", 4)
    assert started(batch.begin(0)) == ["a"]
    restored = BatchPolicy.from_json(batch.to_json())
    restored.start_lost("a")
    assert started(restored.restart(1)) == ["a"]


def test_a_restart_during_preflight_probes_again():
    batch = BatchPolicy(["a", "b"], RolloutPolicy(), "single_backup", 4)
    batch.begin(0)
    assert BatchPolicy.from_json(batch.to_json()).restart(5) == [Probe(("a", "b"))]


def test_stale_and_unknown_reports_change_nothing():
    rack = Rack("ab", RolloutPolicy(max_parallel=1))
    rack.begin()
    before = rack.batch.to_json()
    assert rack.batch.job_ended("a", "some-other-job", FAILED, 1) == []
    assert rack.batch.job_started("b", "job-x", 1) == []  # b was never told to start
    assert rack.batch.start_refused("a", "no", 1) == []  # a's job exists already
    assert rack.batch.to_json() == before


def test_stop_skips_what_waits_and_lets_running_jobs_finish():
    rack = Rack("abc", RolloutPolicy(max_parallel=1))
    rack.begin()
    assert rack.batch.stop(Reason.IMAGE_CHANGED, "the firmware file changed", rack.now) == []
    assert {d: rack.batch.members[d].reason for d in "bc"} == dict.fromkeys("bc", Reason.IMAGE_CHANGED)
    assert rack.batch.members["b"].message == "not started: the firmware file changed"
    actions = rack.end("a")
    assert isinstance(actions[-1], Finish) and rack.batch.result() == "failed"
    assert rack.batch.stop(Reason.IMAGE_CHANGED, "again", rack.now) == []


def test_stop_during_preflight_ignores_the_probes_answer():
    batch = BatchPolicy(["a"], RolloutPolicy(), "single_backup", 4)
    batch.begin(0)
    actions = batch.stop(Reason.IMAGE_CHANGED, "changed", 1)
    assert [type(a) for a in actions] == [Finish]
    assert batch.preflight_done({"a": MAIN}, 2) == []


# ----- a job that can't be followed, a decision that can't be journaled


def test_a_member_whose_job_end_is_not_known_fails_and_a_canary_so_lost_stops_the_batch():
    rack = Rack("abc", RolloutPolicy(canary=1))
    rack.begin()
    actions = rack.batch.job_lost("a", rack.jobs["a"], "the daemon could not follow its job", 5)
    member = rack.batch.members["a"]
    assert (member.state, member.outcome, member.message) == (
        MemberState.FAILED,
        None,
        "the daemon could not follow its job",
    )
    assert rack.batch.stop_reason is Reason.CANARY_FAILED and isinstance(actions[-1], Finish)
    assert "canary a did not succeed (its end is not known)" in rack.batch.stop_message
    assert rack.batch.job_lost("a", rack.jobs["a"], "again", 6) == []  # it ended already


def test_a_lost_member_frees_its_slot_for_the_next_one():
    rack = Rack("ab", RolloutPolicy(max_parallel=1))
    rack.begin()
    assert rack.batch.job_lost("b", "job-x", "not its job", 5) == []  # b has no job: a stale report
    assert started(rack.batch.job_lost("a", rack.jobs["a"], "lost", 5)) == ["b"]


def test_a_halted_batch_starts_nothing_more_and_frees_what_it_did_not_start():
    rack = Rack("abcd", RolloutPolicy(max_parallel=2))
    rack.begin()  # a and b run
    rack.clock.advance(10)
    not_made = rack.batch.job_ended("a", rack.jobs["a"], OK, rack.now)
    assert not_made == [Start("c")]  # the decision the daemon could not journal
    assert rack.batch.halt("its state could not be journaled (disk full)", not_made, rack.now) == []
    batch = rack.batch
    assert batch.state is BatchState.STOPPING and batch.stop_reason is Reason.JOURNAL_ERROR
    assert {d: (m.state, m.reason) for d, m in batch.members.items()} == {
        "a": (MemberState.SUCCEEDED, None),
        "b": (MemberState.RUNNING, None),
        "c": (MemberState.SKIPPED, Reason.JOURNAL_ERROR),
        "d": (MemberState.SKIPPED, Reason.JOURNAL_ERROR),
    }
    assert batch.members["c"].message == "not started: its state could not be journaled (disk full)"
    actions = rack.end("b")  # a running job finishes, and the batch with it
    assert isinstance(actions[-1], Finish) and batch.result() == "failed"


def test_a_halt_with_a_resume_not_made_fails_the_member_and_a_cancel_not_made_lets_the_job_end():
    rack = Rack("abc", RolloutPolicy(max_parallel=2))
    rack.begin()
    restored = BatchPolicy.from_json(rack.batch.to_json())
    resume = restored.job_interrupted("a", rack.jobs["a"], 20)
    assert restored.halt("its state could not be journaled", resume, 20) == []
    a = restored.members["a"]
    assert a.state is MemberState.FAILED and a.outcome.kind == "interrupted"
    assert a.outcome.message == "its interrupted job was not resumed: its state could not be journaled"
    cancel = restored.cancel("wrong shelf", 21)
    assert cancel == [Cancel("b", rack.jobs["b"])]
    assert restored.halt("its state could not be journaled", cancel, 21) == []
    assert restored.state is BatchState.CANCELLING and restored.members["b"].state is MemberState.CANCELLING
    actions = restored.job_ended("b", rack.jobs["b"], OK, 30)  # not stopped: it ran to its end
    assert restored.members["b"].state is MemberState.SUCCEEDED and isinstance(actions[-1], Finish)
    assert restored.result() == "cancelled"


# ----- the policy as a request gives it


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([], "policy.: the policy must be a JSON object"),
        ({"canary": -1}, "policy.canary: must be at least 0, not -1"),
        ({"canary": True}, "policy.canary: must be an integer, not True"),
        ({"canary": 10**400}, "policy.canary: must be at most 1000000"),
        ({"max_failures": 0}, "policy.max_failures: must be at least 1, not 0"),
        ({"max_parallel": 0}, "policy.max_parallel: must be at least 1, not 0"),
        ({"preflight": "yes"}, "policy.preflight: must be true or false, not 'yes'"),
        ({"canaries": 1}, "policy.canaries: unknown key"),
    ],
)
def test_a_bad_policy_is_refused_with_its_key(body, message):
    with pytest.raises(PolicyError) as caught:
        RolloutPolicy.from_json(body, daemon_max_parallel=4)
    assert str(caught.value).startswith(message)


def test_policy_defaults_and_round_trip():
    assert RolloutPolicy.from_json(None) == RolloutPolicy()
    policy = RolloutPolicy.from_json({"canary": 2, "max_failures": 1, "skip_current": True, "max_parallel": 3}, 4)
    assert RolloutPolicy.from_json(policy.to_json(), 4) == policy
    assert policy.preflight and policy.resume_interrupted


def test_a_batch_needs_devices_named_once_and_a_known_image_kind():
    with pytest.raises(ValueError, match="at least one device"):
        BatchPolicy([], RolloutPolicy(), "single_backup", 4)
    with pytest.raises(ValueError, match="named twice"):
        BatchPolicy(["a", "a"], RolloutPolicy(), "single_backup", 4)
    with pytest.raises(ValueError, match="unknown image kind"):
        BatchPolicy(["a"], RolloutPolicy(), "ufw", 4)


# ----- what no sequence of outcomes may do

OUTCOMES = [
    OK,
    FAILED,
    ABORTED,
    MemberOutcome("already_current", "SAME"),
    MemberOutcome("unverified", "no answer"),
]

PROBES = st.sampled_from(
    [
        MAIN,
        MemberProbe(True, "main", "2.0.0"),
        MemberProbe(True, "loader"),
        MemberProbe(True, "double_backup", "1.0.0"),
        MemberProbe(False, error="timed out"),
        MemberProbe(False, busy_job="other"),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    devices=st.integers(min_value=1, max_value=7),
    canary=st.integers(min_value=0, max_value=3),
    max_failures=st.one_of(st.none(), st.integers(min_value=1, max_value=3)),
    max_parallel=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
    daemon_max=st.integers(min_value=1, max_value=4),
    preflight=st.booleans(),
    skip_current=st.booleans(),
    resume=st.booleans(),
    image_kind=st.sampled_from(["single_backup", "double_backup", "unknown"]),
    data=st.data(),
)
def test_no_sequence_of_outcomes_breaks_the_batchs_promises(
    devices, canary, max_failures, max_parallel, daemon_max, preflight, skip_current, resume, image_kind, data
):
    names = [f"d{i}" for i in range(devices)]
    policy = RolloutPolicy(
        canary=canary,
        max_failures=max_failures,
        preflight=preflight,
        skip_current=skip_current,
        max_parallel=min(max_parallel, daemon_max) if max_parallel else None,
        resume_interrupted=resume,
    )
    batch = BatchPolicy(names, policy, image_kind, daemon_max, target=TargetVersion("2.0.0"))
    limit = batch.max_parallel
    clock = Clock()
    ever_started: set[str] = set()
    live_job: dict[str, str] = {}  # device -> its job that runs now
    interrupted: dict[str, str] = {}  # device -> its job a "restart" interrupted
    pending_start: set[str] = set()  # Start/Resume told, not confirmed yet
    canary_failed = False
    stopped_or_cancelled = False
    cancelled = False
    finished = 0
    counter = 0

    def check(actions):
        nonlocal finished, stopped_or_cancelled
        for action in actions:
            assert finished == 0, f"{action} after the batch finished"
            if isinstance(action, Start):
                assert action.device not in ever_started, f"{action.device} started twice"
                assert not stopped_or_cancelled, f"{action.device} started after the batch stopped"
                assert not canary_failed, f"{action.device} started after a canary failed"
                if not batch.members[action.device].canary:
                    canaries = [m for m in batch.members.values() if m.canary]
                    assert all(m.state is MemberState.SUCCEEDED for m in canaries), "started before the canaries"
                if max_failures is not None:
                    assert batch.failures() < max_failures, "started at the failure threshold"
                ever_started.add(action.device)
                pending_start.add(action.device)
            elif isinstance(action, Resume):
                assert not cancelled, "resumed after the batch was cancelled"
                assert interrupted.pop(action.device) == action.job
                pending_start.add(action.device)
            elif isinstance(action, Cancel):
                assert live_job.get(action.device) == action.job
            elif isinstance(action, Finish):
                finished += 1
                assert all(m.ended for m in batch.members.values())
        active = len(pending_start) + len(live_job)
        assert active == len(batch.active())
        assert active <= limit, f"{active} member jobs at once, max_parallel {limit}"
        if batch.state in (BatchState.STOPPING, BatchState.CANCELLING, BatchState.CANCELLED):
            stopped_or_cancelled = True

    if preflight:
        actions = batch.begin(clock.seconds())
        assert actions == [Probe(tuple(names))]
        probes = {name: data.draw(PROBES, label=f"probe {name}") for name in names}
        check(batch.preflight_done(probes, clock.seconds()))
    else:
        check(batch.begin(clock.seconds()))

    for _ in range(60):
        if batch.done:
            break
        clock.advance(1)
        now = clock.seconds()
        choices = [("cancel", None)]
        choices += [("confirm", d) for d in sorted(pending_start)]
        choices += [("refuse", d) for d in sorted(pending_start)]
        choices += [("end", d) for d in sorted(live_job)]
        choices += [("interrupt", d) for d in sorted(live_job)]
        choices += [("lost", d) for d in sorted(live_job)]
        choices.append(("halt", None))
        choices.append(("restart", None))
        choices.append(("stop", None))
        kind, device = data.draw(st.sampled_from(choices), label="event")
        if kind == "cancel":
            cancelled = True
            check(batch.cancel("test", now))
        elif kind == "confirm":
            pending_start.discard(device)
            counter += 1
            live_job[device] = f"job{counter}"
            check(batch.job_started(device, live_job[device], now))
        elif kind == "refuse":
            pending_start.discard(device)
            check(batch.start_refused(device, "refused", now))
        elif kind == "end":
            outcome = data.draw(st.sampled_from(OUTCOMES), label="outcome")
            job = live_job.pop(device)
            was_canary = batch.members[device].canary
            check(batch.job_ended(device, job, outcome, now))
            if was_canary and not outcome.ok and batch.members[device].state is MemberState.FAILED:
                canary_failed = True
        elif kind == "interrupt":
            job = live_job.pop(device)
            interrupted[device] = job
            check(batch.job_interrupted(device, job, now))
            if batch.members[device].state is MemberState.FAILED and batch.members[device].canary:
                canary_failed = True
            if batch.members[device].ended:
                interrupted.pop(device, None)
        elif kind == "lost":
            job = live_job.pop(device)
            was_canary = batch.members[device].canary
            check(batch.job_lost(device, job, "could not be followed", now))
            if was_canary and batch.members[device].state is MemberState.FAILED:
                canary_failed = True
        elif kind == "halt":
            # The last decision could not be journaled: the starts and resumes told and not confirmed
            # yet are taken as its actions, not made.
            not_made = []
            for told in sorted(pending_start):
                member = batch.members[told]
                not_made.append(Resume(told, member.job) if member.jobs else Start(told))
                pending_start.discard(told)
            check(batch.halt("its state could not be journaled", not_made, now))
            assert batch.state not in (BatchState.PREFLIGHT, BatchState.RUNNING)
            stopped_or_cancelled = True
        elif kind == "stop":
            check(batch.stop(Reason.IMAGE_CHANGED, "the firmware file changed", now))
        elif kind == "restart":
            # The daemon dies and starts again: the batch comes back from its JSON, a start that
            # made no job is made again, and every job that ran was interrupted.
            saved = json.loads(json.dumps(batch.to_json()))
            batch = BatchPolicy.from_json(saved)
            assert batch.to_json() == saved
            for lost in sorted(pending_start):
                if not batch.members[lost].jobs:
                    pending_start.discard(lost)
                    ever_started.discard(lost)
                    check(batch.start_lost(lost))
            for device, job in sorted(live_job.items()):
                del live_job[device]
                interrupted[device] = job
                check(batch.job_interrupted(device, job, now))
                if batch.members[device].state is MemberState.FAILED and batch.members[device].canary:
                    canary_failed = True
                if batch.members[device].ended:
                    interrupted.pop(device, None)
            check(batch.restart(now))
        if batch.state in (BatchState.STOPPING, BatchState.CANCELLING, BatchState.CANCELLED):
            stopped_or_cancelled = True
    if batch.done:
        assert finished == 1
