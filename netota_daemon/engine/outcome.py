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
    NOT_APPLICABLE = "not_applicable"  # the image's kind is not the device's build: nothing was sent


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


class Route(str, enum.Enum):
    """How a device is upgraded: by its build (``ota_type`` in the description document)."""

    SINGLE_BACKUP = "single_backup"  # ota_type "1": two phases over the 3335 stream, a loader between
    DOUBLE_BACKUP = "double_backup"  # ota_type "0" or absent: one FTP upload into the inactive bank


def route_of_phase(phase: Phase) -> Route | None:
    """The route a job is on, told by a phase only that route has (None: detect, reboot, verify, done)."""
    if phase in (Phase.PHASE1, Phase.PHASE2):
        return Route.SINGLE_BACKUP
    if phase is Phase.UPLOAD:
        return Route.DOUBLE_BACKUP
    return None


class Happened(str, enum.Enum):
    """What happened to a job, as far as the advice is concerned."""

    SUCCEEDED = "succeeded"
    ALREADY_CURRENT = "already_current"
    NOT_APPLICABLE = "not_applicable"
    UNVERIFIED = "unverified"  # flashed, but the new firmware did not answer in time
    FAILED = "failed"
    ABORTED = "aborted"
    OLD_FIRMWARE_BACK = "old_firmware_back"  # phase 2 found the main firmware before the point of no return
    NEVER_STARTED = "never_started"  # the job never reached the device
    INTERRUPTED = "interrupted"  # the daemon stopped or died while the job ran
    UNSETTLED = "unsettled"  # stopped after a double-backup upload was sent whole: the device may be taking it


ADVICE_RESET = "The old firmware is intact: reset the device and try again."
ADVICE_LOADER = (
    "The device is waiting in its update loader and can't boot its old firmware: do not power it off. "
    "Rejoin its WiFi (an open AP named WIFI_OTA_XXXXXX after a power cut) and upgrade again."
)
ADVICE_AFTER_PHASE1 = (
    "Phase 1 completed, so the device reboots into its update loader: rejoin its WiFi "
    "(WIFI_OTA_XXXXXX after a power cut) and upgrade again to finish."
)
ADVICE_UNVERIFIED = (
    "The device reported success but its new firmware did not answer in time: check that it rejoined "
    "the network and read its firmware_version."
)
ADVICE_NOTHING_SENT = (
    "Nothing was sent to the device; its firmware is unchanged. Check that this host reaches it "
    "(joined to its WiFi, or bound to the right interface) and try again."
)
ADVICE_NEVER_STARTED = "The job never started, so the device was not touched: resume it or start it again."
ADVICE_NOTHING_TO_DO = "Nothing to do."
ADVICE_WRONG_KIND = (
    "Nothing was sent. Single- and double-backup images can't be swapped: use the image built for this "
    "device's kind (update.ufw for a single-backup build, update-ota.ufw, the db_update_files_data.bin, "
    "for a double-backup one)."
)
ADVICE_UPLOAD_INCOMPLETE = (
    "The upload did not complete, so the device keeps booting its old firmware (the new bank was not "
    "switched to): try again."
)
ADVICE_NOT_ACCEPTED = (
    "The device took the whole upload but was not seen to reboot: it most likely did not accept the image "
    "(wrong kind, another board's image, or a corrupt file) and keeps its old firmware. Read its "
    "firmware_version (netota devices --probe): if it is the old one, check the image and try again."
)
ADVICE_UPLOAD_UNSETTLED = (
    "The whole image was sent and closed cleanly before the job stopped: the device may still switch to "
    "its new bank and reboot, or keep its old firmware. Wait a minute, then read its firmware_version "
    "(netota devices --probe); if it still runs the old one, resume the job (netota resume JOB) to upload "
    "the image again."
)
ADVICE_RESUME = " Resume the job to continue (netota resume JOB)."
ADVICE_RESUME_CHECKS = (
    " Resuming the job (netota resume JOB) checks it: it reads the device's firmware version back and flashes nothing."
)


def advice(
    happened: Happened,
    phase: Phase,
    point_of_no_return: bool = False,
    route: Route = Route.SINGLE_BACKUP,
) -> str:
    """What a person should do now: the vendor's recovery advice, as one pure function of what
    happened, the phase the job reached and whether the point of no return was passed.

    Used by the engine for every outcome, by the daemon's queue and journal for jobs that never
    started or were interrupted. ``phase`` is the phase that decides: a job that ended while closing
    phase 1's session after the device's OK passes ``Phase.REBOOT`` (the device reboots into its loader).
    """
    if happened is Happened.SUCCEEDED:
        return ""
    if happened is Happened.ALREADY_CURRENT:
        return ADVICE_NOTHING_TO_DO
    if happened is Happened.NOT_APPLICABLE:
        return ADVICE_WRONG_KIND
    if happened is Happened.NEVER_STARTED:
        return ADVICE_NEVER_STARTED
    if happened is Happened.OLD_FIRMWARE_BACK:
        return ADVICE_RESET
    if happened is Happened.UNSETTLED:
        return ADVICE_UPLOAD_UNSETTLED
    if happened is Happened.UNVERIFIED or phase in (Phase.VERIFY, Phase.DONE):
        if happened is Happened.INTERRUPTED:
            return ADVICE_UNVERIFIED + ADVICE_RESUME_CHECKS
        return ADVICE_UNVERIFIED
    if phase is Phase.DETECT:
        text = ADVICE_NOTHING_SENT
    elif route is Route.DOUBLE_BACKUP:
        if phase is not Phase.REBOOT:
            text = ADVICE_UPLOAD_INCOMPLETE
        elif happened is Happened.FAILED:  # it did not reboot within upload_reboot: it refused the image
            text = ADVICE_NOT_ACCEPTED
        else:  # stopped, or lost, while the device was expected to reboot
            return ADVICE_UPLOAD_UNSETTLED
    elif point_of_no_return or phase is Phase.PHASE2:
        text = ADVICE_LOADER
    elif phase is Phase.REBOOT:
        text = ADVICE_AFTER_PHASE1
    else:
        text = ADVICE_RESET
    return text + ADVICE_RESUME if happened is Happened.INTERRUPTED else text


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
