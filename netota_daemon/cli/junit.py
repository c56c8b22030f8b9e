"""JUnit XML for upgrades: one ``testcase`` per device, for a CI system (Jenkins, GitLab, GitHub
Actions) to read as a test report (``--junit FILE`` on ``netota batch start --wait``,
``netota upgrade --wait`` and ``netota flash``).

Each case is named after its device and carries its duration. A device that did not end well has a
``failure`` element: ``message`` is the outcome and its message, ``type`` the failure class (or the
outcome kind, or ``refused.REASON`` for a device a batch refused), and its text the outcome, failure
class, phase, advice and job. A device a batch skipped (already current, after a failed canary, at
the failure threshold, or cancelled before it started) has a ``skipped`` element with the reason.

The document is built with :mod:`xml.etree.ElementTree`, which escapes markup (``<``, ``&``, ``]]>``).
XML 1.0 can't carry most control characters, nor a lone surrogate, at all: those are written as
visible escapes (``\\x1b``, ``\\udcff``) by :func:`xml_text`, so nothing a device or a message holds
can make the file unreadable. The file is written whole to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from netota_daemon.engine.outcome import Outcome, phase_label

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"

#: Outcome kinds that pass.
_OK_KINDS = ("succeeded", "already_current")

# Characters XML 1.0 does not allow (everything but \t \n \r, U+0020..U+D7FF, U+E000..U+FFFD and
# the planes above), lone surrogates included.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def xml_text(text: Any) -> str:
    """``text`` as a string XML 1.0 can carry: characters it can't are written as ``\\xNN`` /
    ``\\uNNNN`` escapes (markup is escaped by ElementTree when the document is written)."""
    return _NOT_XML.sub(_escape, "" if text is None else str(text))


class JUnitError(Exception):
    """The report can't be written where asked (the message names the file and why)."""


@dataclass(frozen=True)
class CaseResult:
    """One device's result, as a test case."""

    device: str
    status: str  # passed | failed | skipped
    duration: float = 0.0
    kind: str = ""  # the outcome kind, or what ended the device otherwise (refused, skipped, interrupted)
    message: str = ""
    failure: str | None = None  # the outcome's failure class
    advice: str = ""
    phase: str | None = None
    job: str | None = None
    reason: str | None = None  # a batch's refusal or skip reason
    details: dict[str, str] = field(default_factory=dict)  # more lines for the report (versions, ...)

    @property
    def failure_type(self) -> str:
        if self.reason and self.kind == "refused":
            return f"refused.{self.reason}"
        return self.failure or self.kind or "failed"


def _duration(started: Any, finished: Any) -> float:
    if isinstance(started, (int, float)) and isinstance(finished, (int, float)) and finished >= started:
        return float(finished - started)
    return 0.0


def _versions(outcome: Mapping[str, Any]) -> dict[str, str]:
    before, after = outcome.get("firmware_version_before"), outcome.get("firmware_version_after")
    if before or after:
        return {"firmware": f"{before or '?'} -> {after or '?'}"}
    return {}


def case_from_job(job: Mapping[str, Any]) -> CaseResult:
    """A case from a job as the control API shows it (``GET /v1/jobs/ID``)."""
    outcome: Mapping[str, Any] = job.get("outcome") or {}
    duration = _duration(job.get("started"), job.get("finished"))
    common: dict[str, Any] = {
        "device": str(job.get("device", "?")),
        "duration": duration,
        "job": job.get("id"),
        "phase": outcome.get("phase") or job.get("phase"),
        "details": {"firmware file": str(job.get("firmware"))} if job.get("firmware") else {},
    }
    if job.get("state") == "interrupted":
        return CaseResult(
            status=FAILED,
            kind="interrupted",
            message=job.get("message") or "the daemon stopped while the job ran",
            advice=job.get("advice") or "",
            **common,
        )
    if not outcome:
        return CaseResult(
            status=FAILED,
            kind="unknown",
            message=f"the job's end was not seen (it was {job.get('state', '?')})",
            **common,
        )
    kind = str(outcome.get("kind"))
    common["details"] = {**common["details"], **_versions(outcome)}
    return CaseResult(
        status=PASSED if kind in _OK_KINDS else FAILED,
        kind=kind,
        message=outcome.get("message") or "",
        failure=outcome.get("failure"),
        advice=outcome.get("advice") or job.get("advice") or "",
        **common,
    )


def case_from_outcome(device: str, outcome: Outcome, duration: float, job: str | None = None) -> CaseResult:
    """A case from an engine outcome (``netota flash``)."""
    data = outcome.to_json()
    return CaseResult(
        device=device,
        status=PASSED if outcome.ok else FAILED,
        duration=max(0.0, duration),
        kind=outcome.kind.value,
        message=outcome.message,
        failure=outcome.failure.value if outcome.failure else None,
        advice=outcome.advice,
        phase=outcome.phase.value,
        job=job,
        details=_versions(data),
    )


def case_from_member(member: Mapping[str, Any]) -> CaseResult:
    """A case from a batch member (``GET /v1/batches/ID``, ``members[]``)."""
    state = str(member.get("state"))
    outcome: Mapping[str, Any] = member.get("outcome") or {}
    common: dict[str, Any] = {
        "device": str(member.get("device", "?")),
        "duration": _duration(member.get("started"), member.get("finished")),
        "job": member.get("job"),
        "reason": member.get("reason"),
        "phase": outcome.get("phase"),
    }
    if member.get("canary"):
        common["details"] = {"canary": "yes"}
    if state == "skipped":
        return CaseResult(status=SKIPPED, kind="skipped", message=member.get("message") or "", **common)
    if state == "refused":
        return CaseResult(status=FAILED, kind="refused", message=member.get("message") or "", **common)
    if state == "succeeded":
        return CaseResult(
            status=PASSED, kind=outcome.get("kind") or "succeeded", message=member.get("message") or "", **common
        )
    if state in ("failed", "cancelled"):
        return CaseResult(
            status=FAILED,
            kind=outcome.get("kind") or state,
            message=outcome.get("message") or member.get("message") or "",
            failure=outcome.get("failure"),
            advice=outcome.get("advice") or "",
            **common,
        )
    return CaseResult(status=FAILED, kind="unknown", message=f"the member had not ended (it was {state})", **common)


def _one_line_breaks(text: str) -> str:
    """Line breaks as ``\n`` only: an XML parser reads a ``\r`` in element text as ``\n`` (and
    ``\r\n`` as one), so a message ending in ``\r`` would lose a line against the next one."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _report_text(case: CaseResult) -> str:
    lines = [f"outcome: {case.kind}"]
    if case.failure:
        lines.append(f"failure class: {case.failure}")
    if case.reason:
        lines.append(f"reason: {case.reason}")
    if case.phase:
        lines.append(f"phase: {phase_label(case.phase)}")
    if case.message:
        lines.append(f"message: {case.message}")
    if case.advice:
        lines.append(f"advice: {case.advice}")
    if case.job:
        lines.append(f"job: {case.job}")
    lines.extend(f"{key}: {value}" for key, value in case.details.items())
    return "".join(_one_line_breaks(line) + "\n" for line in lines)


def junit_document(
    suite: str,
    cases: Iterable[CaseResult],
    timestamp: float | None = None,
    properties: Mapping[str, Any] | None = None,
    classname: str = "netota",
    duration: float | None = None,
) -> ET.ElementTree[ET.Element]:
    """The JUnit XML tree: one ``testsuites`` with one ``testsuite`` named ``suite``."""
    cases = list(cases)
    failures = sum(1 for c in cases if c.status == FAILED)
    skipped = sum(1 for c in cases if c.status == SKIPPED)
    total_time = duration if duration is not None else sum(c.duration for c in cases)
    counts = {
        "tests": str(len(cases)),
        "failures": str(failures),
        "errors": "0",
        "skipped": str(skipped),
        "time": f"{max(0.0, total_time):.3f}",
    }
    root = ET.Element("testsuites", {"name": xml_text(suite), **counts})
    attributes = {"name": xml_text(suite), **counts, "hostname": xml_text(socket.gethostname())}
    if timestamp is not None:
        attributes["timestamp"] = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    suite_element = ET.SubElement(root, "testsuite", attributes)
    if properties:
        props = ET.SubElement(suite_element, "properties")
        for name, value in properties.items():
            if value is not None:
                ET.SubElement(props, "property", {"name": xml_text(name), "value": xml_text(value)})
    for case in cases:
        element = ET.SubElement(
            suite_element,
            "testcase",
            {"name": xml_text(case.device), "classname": xml_text(classname), "time": f"{case.duration:.3f}"},
        )
        if case.status == FAILED:
            message = f"{case.kind}: {case.message}" if case.message else case.kind
            failure = ET.SubElement(
                element, "failure", {"message": xml_text(message), "type": xml_text(case.failure_type)}
            )
            failure.text = xml_text(_report_text(case))
        elif case.status == SKIPPED:
            ET.SubElement(element, "skipped", {"message": xml_text(case.message or case.reason or "skipped")})
        else:
            out = ET.SubElement(element, "system-out")
            out.text = xml_text(_report_text(case))
    ET.indent(root)
    return ET.ElementTree(root)


def junit_bytes(suite: str, cases: Iterable[CaseResult], **kwargs: Any) -> bytes:
    """The document as UTF-8 bytes, with its XML declaration."""
    tree = junit_document(suite, cases, **kwargs)
    root = tree.getroot()
    assert root is not None
    data: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return data + b"\n"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_junit_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if a report can be written there (its directory exists and is writable, and it is not
    a directory), else :class:`JUnitError`: checked before anything starts, so a typo costs no upgrade."""
    target = Path(path)
    if not str(path):
        raise JUnitError("--junit: the file name is empty")
    if target.is_dir():
        raise JUnitError(f"--junit {path}: is a directory")
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise JUnitError(f"--junit {path}: no such directory {directory}")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise JUnitError(f"--junit {path}: the directory {directory} is not writable")
    return target


def write_junit(path: str | os.PathLike[str], suite: str, cases: Iterable[CaseResult], **kwargs: Any) -> Path:
    """Write the report to ``path`` atomically (a temporary file in the same directory, renamed);
    :class:`JUnitError` when it can't be written."""
    target = check_junit_path(path)
    data = junit_bytes(suite, cases, **kwargs)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(temporary, 0o666 & ~_umask())  # as open() would have made it (mkstemp makes 0600)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise JUnitError(f"can't write the JUnit report {path}: {e.strerror or e}") from None
    return target
