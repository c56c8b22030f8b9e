"""How an upgrade ended: typed outcomes, failure classes and the vendor's recovery advice."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any


class OutcomeKind(str, enum.Enum):
    SUCCEEDED = "succeeded"
    ALREADY_CURRENT = "already_current"  # the device answered SAME
    UNVERIFIED = "unverified"  # flashed (phase 2 OK) but the new firmware did not come back in time
    FAILED = "failed"
    ABORTED = "aborted"  # cancelled by a person or by the daemon's shutdown
    NOT_APPLICABLE = "not_applicable"  # a double-backup device: this flow does not apply


class FailureClass(str, enum.Enum):
    DEVICE_REFUSED = "device_refused"  # NET_OTA_SINGLE status 0, CTP errno, access refused
    DEVICE_ERROR = "device_error"  # the device ended a session with ERR
    TIMEOUT = "timeout"  # receive timeouts, a step's timeout, the overall deadline
    PROTOCOL_ERROR = "protocol_error"  # garbage, bad requests (read_size 0, over 42 KiB, past EOF)
    FIRMWARE_FILE = "firmware_file"  # the image can't be read
    CONNECTION = "connection"  # refused, reset, unreachable


class Phase(str, enum.Enum):
    """Where a job is. The values are the API's identifiers; :func:`phase_label` is how a person reads them."""

    DETECT = "detect"  # reading the description document
    PHASE1 = "phase1"  # single backup: the main firmware streams the loader's image forward
    REBOOT = "reboot"  # waiting for the device to come back (the loader, or the new firmware's bank)
    PHASE2 = "phase2"  # single backup: the loader rewrites flash (point of no return at all_size)
    UPLOAD = "upload"  # double backup: the image is uploaded over FTP into the inactive bank
    VERIFY = "verify"  # waiting for the new firmware, reading its version
    DONE = "done"


#: How every phase is written for a person, the same in every bar, table, log line and message.
PHASE_LABELS = {
    Phase.DETECT: "detect",
    Phase.PHASE1: "phase 1",
    Phase.REBOOT: "reboot",
    Phase.PHASE2: "phase 2",
    Phase.UPLOAD: "upload",
    Phase.VERIFY: "verify",
    Phase.DONE: "done",
}


def phase_label(phase: Phase | str) -> str:
    """``Phase.PHASE2`` (or ``"phase2"``) -> ``"phase 2"``; unknown text is returned as it is."""
    try:
        return PHASE_LABELS[Phase(phase)]
    except ValueError:
        return str(phase)


ADVICE_RESET = "The old firmware is intact: reset the device and try again."
ADVICE_LOADER = (
    "The device is waiting in its update loader and can't boot its old firmware: do not power it off. "
    "Rejoin its WiFi (an open AP named WIFI_OTA_XXXXXX after a power cut) and upgrade again."
)
ADVICE_UNVERIFIED = (
    "The device reported success but its new firmware did not answer in time: check that it rejoined "
    "the network and read its firmware_version."
)
ADVICE_NOTHING_SENT = (
    "Nothing was sent to the device; its firmware is unchanged. Check that this host reaches it "
    "(joined to its WiFi, or bound to the right interface) and try again."
)
ADVICE_DOUBLE_BACKUP = (
    "This device runs a double-backup build (ota_type 0): it is upgraded over FTP, not by this flow. "
    "Single- and double-backup images can't be swapped."
)


def recovery_advice(point_of_no_return: bool, phase: Phase | None = None) -> str:
    """The vendor's advice for a failed or aborted upgrade.

    Before any all_size notice the old firmware is intact; after it (or anywhere in phase 2, where
    the loader is already running) the device waits in its loader.
    """
    if point_of_no_return or phase in (Phase.PHASE2,):
        return ADVICE_LOADER
    if phase is Phase.REBOOT:
        return (
            "Phase 1 completed, so the device reboots into its update loader: rejoin its WiFi "
            "(WIFI_OTA_XXXXXX after a power cut) and upgrade again to finish."
        )
    return ADVICE_RESET


@dataclass(frozen=True)
class Outcome:
    """The end of one upgrade job."""

    kind: OutcomeKind
    message: str
    phase: Phase  # the phase reached when it ended
    failure: FailureClass | None = None
    advice: str = ""
    point_of_no_return: bool = False  # an all_size notice was seen in phase 2
    firmware_version_before: str | None = None
    firmware_version_after: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.kind in (OutcomeKind.SUCCEEDED, OutcomeKind.ALREADY_CURRENT)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kind"] = self.kind.value
        data["phase"] = self.phase.value
        data["failure"] = self.failure.value if self.failure else None
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Outcome:
        return cls(
            kind=OutcomeKind(data["kind"]),
            message=data.get("message", ""),
            phase=Phase(data.get("phase", Phase.DETECT.value)),
            failure=FailureClass(data["failure"]) if data.get("failure") else None,
            advice=data.get("advice", ""),
            point_of_no_return=bool(data.get("point_of_no_return", False)),
            firmware_version_before=data.get("firmware_version_before"),
            firmware_version_after=data.get("firmware_version_after"),
            details=dict(data.get("details") or {}),
        )


class UpgradeFailed(Exception):
    """Raised inside the engine to end a job as failed; carries the class for the outcome."""

    def __init__(self, failure: FailureClass, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


#: Exit codes shared by ``netota flash`` and ``netota upgrade --wait``.
EXIT_CODES = {
    OutcomeKind.SUCCEEDED: 0,
    OutcomeKind.ALREADY_CURRENT: 0,  # 3 with --strict
    OutcomeKind.FAILED: 1,
    OutcomeKind.UNVERIFIED: 2,
    OutcomeKind.ABORTED: 4,
    OutcomeKind.NOT_APPLICABLE: 5,
}
EXIT_ALREADY_CURRENT_STRICT = 3
EXIT_USAGE = 64  # bad arguments, nothing sent
EXIT_UNAVAILABLE = 69  # the daemon can't be reached / went away


def exit_code(kind: OutcomeKind, strict: bool = False) -> int:
    if kind is OutcomeKind.ALREADY_CURRENT and strict:
        return EXIT_ALREADY_CURRENT_STRICT
    return EXIT_CODES[kind]
