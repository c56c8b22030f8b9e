"""The JUnit report: written, parsed back, and checked against the outcomes it reports."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.cli.junit import (
    CaseResult,
    JUnitError,
    case_from_job,
    case_from_member,
    case_from_outcome,
    check_junit_path,
    junit_bytes,
    write_junit,
    xml_text,
)
from netota_daemon.daemon.batch_policy import BatchPolicy, MemberOutcome, MemberProbe, RolloutPolicy
from netota_daemon.daemon.journal import JobRecord, JobState
from netota_daemon.engine.outcome import FailureClass, Outcome, OutcomeKind, Phase


def parse(data: bytes) -> ET.Element:
    root = ET.fromstring(data)
    assert root.tag == "testsuites"
    return root


def cases_of(root: ET.Element) -> dict[str, ET.Element]:
    return {case.get("name"): case for case in root.iter("testcase")}


def job_json(device, outcome, started=100.0, finished=142.5, state=JobState.FINISHED, job_id=None):
    record = JobRecord(
        id=job_id or f"job{device}",
        device=device,
        firmware="ac79-2.0.0.ufw",
        state=state,
        phase=outcome.phase if outcome else Phase.PHASE1,
        created=started,
        started=started,
        finished=finished,
        outcome=outcome,
        message=outcome.message if outcome else "the daemon stopped while the job was running (phase phase1)",
        advice=outcome.advice if outcome else "Resume the job to continue (netota resume JOB).",
    )
    return record.to_json()


def test_jobs_become_test_cases_with_their_durations_and_failures():
    succeeded = Outcome(
        OutcomeKind.SUCCEEDED,
        "upgraded",
        Phase.DONE,
        firmware_version_before="1.0.0",
        firmware_version_after="2.0.0",
    )
    failed = Outcome(
        OutcomeKind.FAILED,
        "phase 2: no reply within 5 s, 11 times",
        Phase.PHASE2,
        failure=FailureClass.TIMEOUT,
        point_of_no_return=True,
        advice="The device is waiting in its update loader and can't boot its old firmware: do not power it off.",
    )
    jobs = [
        job_json("shelf1", succeeded),
        job_json("shelf2", failed, 10.0, 20.25),
        job_json("shelf3", None, state=JobState.INTERRUPTED),
    ]
    root = parse(junit_bytes("netota upgrade", [case_from_job(j) for j in jobs], timestamp=0))
    suite = root.find("testsuite")
    assert (
        suite.get("name"),
        suite.get("tests"),
        suite.get("failures"),
        suite.get("skipped"),
        suite.get("errors"),
    ) == (
        "netota upgrade",
        "3",
        "2",
        "0",
        "0",
    )
    assert suite.get("timestamp") == "1970-01-01T00:00:00"
    assert suite.get("time") == f"{42.5 + 10.25 + 42.5:.3f}"
    cases = cases_of(root)
    assert list(cases) == ["shelf1", "shelf2", "shelf3"]
    assert cases["shelf1"].get("time") == "42.500" and cases["shelf1"].find("failure") is None
    assert "firmware: 1.0.0 -> 2.0.0" in cases["shelf1"].find("system-out").text
    failure = cases["shelf2"].find("failure")
    assert cases["shelf2"].get("time") == "10.250"
    assert failure.get("type") == "timeout"
    assert failure.get("message") == "failed: phase 2: no reply within 5 s, 11 times"
    text = failure.text
    for line in (
        "outcome: failed",
        "failure class: timeout",
        "phase: phase 2",
        f"advice: {failed.advice}",
        "job: jobshelf2",
        "firmware file: ac79-2.0.0.ufw",
    ):
        assert line in text
    interrupted = cases["shelf3"].find("failure")
    assert interrupted.get("type") == "interrupted"
    assert "advice: Resume the job to continue" in interrupted.text


def test_a_batch_report_matches_the_batchs_members():
    batch = BatchPolicy(
        ["a", "b", "c", "d", "e"],
        RolloutPolicy(canary=1, max_parallel=1, skip_current=True),
        "single_backup",
        4,
        target=None,
    )
    batch.begin(0)
    probes = {
        "a": MemberProbe(True, "main", "1.0.0"),
        "b": MemberProbe(False, error="timed out after 10 s"),
        "c": MemberProbe(True, "double_backup"),
        "d": MemberProbe(True, "main", "1.0.0"),
    }
    batch.preflight_done(probes, 1)
    batch.job_started("a", "job-a", 2)
    failure = MemberOutcome("failed", "phase 1: refused", failure="device_refused", advice="Reset the device.")
    batch.job_ended("a", "job-a", failure, 32)
    members = batch.to_json()["members"]
    root = parse(junit_bytes("netota batch b1", [case_from_member(m) for m in members], classname="netota.batch"))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("5", "4", "1")
    cases = cases_of(root)
    assert cases["a"].get("time") == "30.000" and cases["a"].get("classname") == "netota.batch"
    assert cases["a"].find("failure").get("type") == "device_refused"
    assert "canary: yes" in cases["a"].find("failure").text
    assert cases["b"].find("failure").get("type") == "refused.unreachable"
    assert cases["b"].find("failure").get("message") == "refused: unreachable: timed out after 10 s"
    assert cases["c"].find("failure").get("type") == "refused.wrong_kind"
    assert cases["d"].find("skipped").get("message") == "not started: canary a did not succeed (failed)"
    assert cases["e"].find("failure").get("type") == "refused.unreachable"  # no probe result at all


def test_a_flash_outcome_becomes_one_case():
    outcome = Outcome(OutcomeKind.ABORTED, "interrupted (Ctrl-C)", Phase.PHASE1, advice="The old firmware is intact.")
    root = parse(junit_bytes("netota flash", [case_from_outcome("192.0.2.1", outcome, 3.5)]))
    case = cases_of(root)["192.0.2.1"]
    assert case.get("time") == "3.500"
    assert case.find("failure").get("type") == "aborted"
    assert "advice: The old firmware is intact." in case.find("failure").text


def test_awkward_text_survives_and_the_file_still_parses():
    message = "bad bytes \x00\x1b[31m\x7f ]]> <tag> & \"quoted\" 'single' Ünïcødé 设备 \U0001f525 \udcff end"
    case = CaseResult(
        device="shelf]]>\x01设备",
        status="failed",
        duration=1.0,
        kind="failed",
        message=message,
        failure="protocol_error",
        advice="line one\nline two\r\n\ttabbed",
    )
    root = parse(junit_bytes("netota \x02 suite", [case]))
    element = root.find("testsuite/testcase")
    assert element.get("name") == "shelf]]>\\x01设备"
    failure = element.find("failure")
    expected = "bad bytes \\x00\\x1b[31m\x7f ]]> <tag> & \"quoted\" 'single' Ünïcødé 设备 \U0001f525 \\udcff end"
    assert failure.get("message") == f"failed: {expected}"
    assert f"message: {expected}\n" in failure.text
    assert "advice: line one\nline two\n\ttabbed" in failure.text  # the XML parser normalises \r\n
    assert root.get("name") == "netota \\x02 suite"


@given(st.text(), st.text(), st.text(min_size=1))
def test_any_text_gives_a_parseable_report_that_keeps_it(message, advice, device):
    case = CaseResult(device=device, status="failed", kind="failed", message=message, advice=advice)
    root = parse(junit_bytes("s", [case]))
    element = root.find("testsuite/testcase")
    assert element.get("name") == xml_text(device)  # attributes keep even \r and \t (character references)
    failure = element.find("failure")
    assert failure.get("message") == (f"failed: {xml_text(message)}" if message else "failed")

    def as_text(value):  # element text: an XML parser reads any line break as \n
        return xml_text(value).replace("\r\n", "\n").replace("\r", "\n")

    if message:
        assert f"message: {as_text(message)}\n" in failure.text
    if advice:
        assert f"advice: {as_text(advice)}\n" in failure.text


def test_a_message_ending_in_a_carriage_return_keeps_its_line_break():
    """Found by the property test above: "x\r" then the line's own \n was read back as one break."""
    case = CaseResult(device="d", status="failed", kind="failed", message="x\r", advice="a")
    failure = parse(junit_bytes("s", [case])).find("testsuite/testcase/failure")
    assert "message: x\n\nadvice: a\n" in failure.text


def test_xml_text_escapes_only_what_xml_cannot_carry():
    assert xml_text("plain é ✓ \t\n\r") == "plain é ✓ \t\n\r"
    assert xml_text("\x00\x08\x0b\x0c\x1f\ufffe\uffff\ud800") == "\\x00\\x08\\x0b\\x0c\\x1f\\ufffe\\uffff\\ud800"
    assert xml_text(None) == ""


def test_the_report_is_written_atomically_and_readable(tmp_path):
    path = tmp_path / "report.xml"
    path.write_text("old")
    write_junit(path, "netota upgrade", [CaseResult(device="a", status="passed", duration=2.0, kind="succeeded")])
    root = ET.parse(path).getroot()
    assert cases_of(root)["a"].get("time") == "2.000"
    assert [p.name for p in tmp_path.iterdir()] == ["report.xml"]  # no temporary file left
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_path_that_cant_be_written_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(JUnitError, match="no such directory"):
        check_junit_path(tmp_path / "missing" / "report.xml")
    with pytest.raises(JUnitError, match="is a directory"):
        check_junit_path(tmp_path)
    with pytest.raises(JUnitError, match="the file name is empty"):
        check_junit_path("")
    assert check_junit_path(tmp_path / "ok.xml") == tmp_path / "ok.xml"
