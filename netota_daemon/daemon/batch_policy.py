"""``BatchPolicy``: what a batch of upgrades does next, as a pure decision object (no I/O, no reactor).

A batch is one firmware image for a set of devices (its *members*) under a :class:`RolloutPolicy`:

- ``preflight`` (default on): every member is probed first; a member that can't take this image is
  *refused* before anything is flashed: unreachable, busy with another job, or a build of the wrong
  kind for the image (a single-backup image for a double-backup build, or the other way round).
- ``skip_current``: a member whose firmware version is already the batch's target version (given in
  the request, or known from an earlier job with the same image: :func:`target_version_from_jobs`)
  is *skipped* as current.
- ``canary`` N: the first N members that passed pre-flight are upgraded first; the rest start only
  if every canary succeeded. A canary that fails skips every member not started yet.
- ``max_failures`` F: once F member jobs failed, no new job starts; running ones finish; the rest are
  skipped with the reason.
- ``max_parallel``: at most this many member jobs at once (never more than the daemon's).
- ``resume_interrupted`` (default on): a member job interrupted by a daemon restart is resumed.
- A decision the daemon could not journal is not carried out, and the batch starts nothing more
  (:meth:`BatchPolicy.halt`): what was not started is skipped (``journal_error``), running jobs finish.

The object is fed what happens (:meth:`BatchPolicy.begin`, :meth:`~BatchPolicy.preflight_done`,
:meth:`~BatchPolicy.job_started`, :meth:`~BatchPolicy.start_refused`, :meth:`~BatchPolicy.job_ended`,
:meth:`~BatchPolicy.job_interrupted`, :meth:`~BatchPolicy.job_lost`, :meth:`~BatchPolicy.cancel`,
:meth:`~BatchPolicy.halt`) and answers each with the actions to take now (:class:`Probe`,
:class:`Start`, :class:`Resume`, :class:`Cancel`, :class:`Finish`). Times are passed in (``now``),
never read. :meth:`~BatchPolicy.to_json` / :meth:`~BatchPolicy.from_json` round-trip the whole state,
so the daemon journals it and carries on after a restart.

Member states::

    pending --preflight--> ready --Start--> starting --job_started--> running --job_ended--> succeeded | failed
       |                     |                 |                         |  \\--cancel--> cancelling --> cancelled
       |                     |                 \\--start_refused--> refused \\--job_interrupted--> (Resume) starting
       |                     |                                              \\--job_lost--> failed
       +--> refused          +--> skipped (already current, max_failures, canary_failed, cancelled, ...: see Reason)
       +--> skipped
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from netota_daemon.daemon.probe import BUILD_OF_MODE
from netota_daemon.engine.outcome import OutcomeKind
from netota_daemon.wire.firmware_kind import FirmwareKind

#: The image kinds (``netota_daemon.wire.firmware_kind``'s values) and the builds (a probe's ``mode``;
#: which kind each takes is :data:`~netota_daemon.daemon.probe.BUILD_OF_MODE`).
IMAGE_KINDS = tuple(kind.value for kind in FirmwareKind)
BUILD_MODES = tuple(BUILD_OF_MODE)

_KIND_WORDS = {"single_backup": "single-backup", "double_backup": "double-backup", "unknown": "unknown"}


class PolicyError(ValueError):
    """A policy the daemon refuses; ``field`` names the policy key at fault."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"policy.{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True)
class RolloutPolicy:
    """How a batch rolls out (the ``policy`` of ``POST /v1/batches``)."""

    canary: int = 0  # the first N members go first; 0: no canary
    max_failures: int | None = None  # stop launching once this many member jobs failed; None: never
    preflight: bool = True  # probe every member first and refuse those that can't take the image
    skip_current: bool = False  # skip members already running the target version
    max_parallel: int | None = None  # member jobs at once; None: the daemon's max_parallel
    resume_interrupted: bool = True  # resume member jobs a daemon restart interrupted

    FIELDS: ClassVar[tuple[str, ...]] = (
        "canary",
        "max_failures",
        "preflight",
        "skip_current",
        "max_parallel",
        "resume_interrupted",
    )

    @classmethod
    def from_json(cls, data: Any, daemon_max_parallel: int | None = None) -> RolloutPolicy:
        """The policy a request gives (``None``: the defaults), every value checked; raises
        :class:`PolicyError` naming the key. ``max_parallel`` may not exceed the daemon's."""
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise PolicyError("", "the policy must be a JSON object")
        unknown = sorted(set(data) - set(cls.FIELDS))
        if unknown:
            raise PolicyError(unknown[0], f"unknown key (known: {', '.join(cls.FIELDS)})")

        def count(name: str, minimum: int, allow_none: bool) -> int | None:
            value = data.get(name)
            if value is None and allow_none:
                return None
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(name, f"must be an integer, not {value!r}")
            if value < minimum:
                raise PolicyError(name, f"must be at least {minimum}, not {value}")
            if value > 1_000_000:
                raise PolicyError(name, f"must be at most 1000000, not {value}")
            return value

        def flag(name: str, default: bool) -> bool:
            value = data.get(name, default)
            if not isinstance(value, bool):
                raise PolicyError(name, f"must be true or false, not {value!r}")
            return value

        canary = count("canary", 0, False) if "canary" in data else 0
        max_parallel = count("max_parallel", 1, True)
        if max_parallel is not None and daemon_max_parallel is not None and max_parallel > daemon_max_parallel:
            raise PolicyError(
                "max_parallel", f"{max_parallel} is more than the daemon's max_parallel ({daemon_max_parallel})"
            )
        return cls(
            canary=canary or 0,
            max_failures=count("max_failures", 1, True),
            preflight=flag("preflight", True),
            skip_current=flag("skip_current", False),
            max_parallel=max_parallel,
            resume_interrupted=flag("resume_interrupted", True),
        )

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.FIELDS}


@dataclass(frozen=True)
class TargetVersion:
    """The version the batch's image installs, and how it is known: ``request`` (the client said
    so) or ``job`` (an earlier job with the same image read it back from a device: ``job`` is its id)."""

    version: str
    source: str = "request"  # request | job
    job: str | None = None

    def describe(self) -> str:
        if self.source == "job" and self.job:
            return f"{self.version} (read back by job {self.job}, which flashed the same image)"
        return self.version

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "source": self.source, "job": self.job}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> TargetVersion | None:
        if not data:
            return None
        return cls(version=str(data["version"]), source=str(data.get("source", "request")), job=data.get("job"))


@dataclass(frozen=True)
class EarlierJob:
    """What :func:`target_version_from_jobs` needs of a journaled job."""

    id: str
    image_sha256: str | None
    outcome: str | None  # the outcome kind, None while active or interrupted
    firmware_version_after: str | None


def target_version_from_jobs(image_sha256: str, jobs: Iterable[EarlierJob]) -> TargetVersion | None:
    """The version an earlier job with the same image (same SHA-256) read back from its device after
    it succeeded, newest first in ``jobs``; None when no such job is known. Only a success counts: an
    ``already_current`` answer says the device had that image already, not which version it reports."""
    for job in jobs:
        if (
            job.image_sha256 == image_sha256
            and job.outcome == OutcomeKind.SUCCEEDED.value
            and job.firmware_version_after
        ):
            return TargetVersion(job.firmware_version_after, source="job", job=job.id)
    return None


def image_fits(image_kind: str, mode: str | None) -> str | None:
    """Why an image of ``image_kind`` can't go to a build in ``mode``, or None when it can (or when
    either is unknown: an unrecognised image is not proof of a wrong one)."""
    if mode is None or image_kind == FirmwareKind.UNKNOWN.value or mode not in BUILD_OF_MODE:
        return None
    wanted = BUILD_OF_MODE[mode].value
    if wanted == image_kind:
        return None
    build = "a double-backup build (ota_type 0)" if mode == "double_backup" else "a single-backup build"
    return (
        f"wrong image kind: the device runs {build}, which takes a {_KIND_WORDS[wanted]} image; "
        f"this is a {_KIND_WORDS[image_kind]} image"
    )


@dataclass(frozen=True)
class MemberProbe:
    """A member's pre-flight result: reachable (with its build's ``mode`` and ``firmware_version``),
    or not (``error`` says why), or ``busy_job`` (a job outside this batch holds the device: it was
    not contacted)."""

    reachable: bool
    mode: str | None = None  # main | loader | double_backup
    firmware_version: str | None = None  # None in the loader (its document says nothing of the firmware)
    error: str | None = None
    busy_job: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "reachable": self.reachable,
            "mode": self.mode,
            "firmware_version": self.firmware_version,
            "error": self.error,
            "busy_job": self.busy_job,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MemberProbe | None:
        if not data:
            return None
        return cls(
            reachable=bool(data["reachable"]),
            mode=data.get("mode"),
            firmware_version=data.get("firmware_version"),
            error=data.get("error"),
            busy_job=data.get("busy_job"),
        )


@dataclass(frozen=True)
class MemberOutcome:
    """How a member's job ended, as the batch keeps it (the job itself is in the journal)."""

    kind: str  # an OutcomeKind value, or "interrupted" (not resumed)
    message: str = ""
    failure: str | None = None
    advice: str = ""
    phase: str | None = None
    firmware_version_after: str | None = None

    @property
    def ok(self) -> bool:
        return self.kind in (OutcomeKind.SUCCEEDED.value, OutcomeKind.ALREADY_CURRENT.value)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "failure": self.failure,
            "advice": self.advice,
            "phase": self.phase,
            "firmware_version_after": self.firmware_version_after,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MemberOutcome | None:
        if not data:
            return None
        return cls(
            kind=str(data["kind"]),
            message=data.get("message") or "",
            failure=data.get("failure"),
            advice=data.get("advice") or "",
            phase=data.get("phase"),
            firmware_version_after=data.get("firmware_version_after"),
        )


class MemberState(str, enum.Enum):
    PENDING = "pending"  # waiting for its pre-flight probe
    READY = "ready"  # may be started when its turn comes
    STARTING = "starting"  # told to start (or resume); its job is not confirmed yet
    RUNNING = "running"  # its job is queued or running in the daemon
    CANCELLING = "cancelling"  # the batch was cancelled; its job is being stopped (STOP)
    SUCCEEDED = "succeeded"  # its job succeeded (or the device was already current)
    FAILED = "failed"  # its job ended otherwise (failed, unverified, aborted by hand, not applicable, interrupted)
    CANCELLED = "cancelled"  # its job was stopped by the batch's cancel
    SKIPPED = "skipped"  # never started: see ``reason``
    REFUSED = "refused"  # can't take this image, or its job was refused: see ``reason``


ACTIVE_MEMBER_STATES = (MemberState.STARTING, MemberState.RUNNING, MemberState.CANCELLING)
ENDED_MEMBER_STATES = (
    MemberState.SUCCEEDED,
    MemberState.FAILED,
    MemberState.CANCELLED,
    MemberState.SKIPPED,
    MemberState.REFUSED,
)


class Reason(str, enum.Enum):
    """Why a member was skipped or refused."""

    CURRENT = "already_current"  # skipped: it runs the target version
    MAX_FAILURES = "max_failures"  # skipped: the batch reached its failure threshold
    CANARY_FAILED = "canary_failed"  # skipped: a canary did not succeed
    CANCELLED = "cancelled"  # skipped: the batch was cancelled before it started
    UNREACHABLE = "unreachable"  # refused: the pre-flight probe did not reach it
    WRONG_KIND = "wrong_kind"  # refused: its build takes the other kind of image
    BUSY = "busy"  # refused: another job holds the device
    START_REFUSED = "start_refused"  # refused: the daemon refused its job (see the message)
    IMAGE_CHANGED = "image_changed"  # skipped: the firmware file changed since the batch began
    JOURNAL_ERROR = "journal_error"  # skipped: the batch's state could not be journaled, so it starts nothing more


#: Skips that say the batch went wrong (a client's exit status is non-zero for them).
FAILURE_SKIPS = (Reason.MAX_FAILURES, Reason.CANARY_FAILED, Reason.IMAGE_CHANGED, Reason.JOURNAL_ERROR)


@dataclass
class Member:
    """One device of the batch; mutable, owned by its :class:`BatchPolicy`."""

    device: str
    state: MemberState = MemberState.PENDING
    canary: bool = False
    reason: Reason | None = None
    message: str = ""
    job: str | None = None  # the current (or last) job
    jobs: list[str] = field(default_factory=list)  # every job of this member, oldest first (resumes)
    probe: MemberProbe | None = None
    firmware_version: str | None = None  # as last known (a probe, else the daemon's registry)
    outcome: MemberOutcome | None = None
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_MEMBER_STATES

    @property
    def ended(self) -> bool:
        return self.state in ENDED_MEMBER_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "state": self.state.value,
            "canary": self.canary,
            "reason": self.reason.value if self.reason else None,
            "message": self.message,
            "job": self.job,
            "jobs": list(self.jobs),
            "probe": self.probe.to_json() if self.probe else None,
            "firmware_version": self.firmware_version,
            "outcome": self.outcome.to_json() if self.outcome else None,
            "started": self.started,
            "finished": self.finished,
            "duration": (self.finished - self.started)
            if self.started is not None and self.finished is not None
            else None,
            "cancel_requested": self.cancel_requested,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Member:
        return cls(
            device=str(data["device"]),
            state=MemberState(data["state"]),
            canary=bool(data.get("canary", False)),
            reason=Reason(data["reason"]) if data.get("reason") else None,
            message=data.get("message") or "",
            job=data.get("job"),
            jobs=[str(j) for j in data.get("jobs") or []],
            probe=MemberProbe.from_json(data.get("probe")),
            firmware_version=data.get("firmware_version"),
            outcome=MemberOutcome.from_json(data.get("outcome")),
            started=data.get("started"),
            finished=data.get("finished"),
            cancel_requested=bool(data.get("cancel_requested", False)),
        )


class BatchState(str, enum.Enum):
    PREFLIGHT = "preflight"  # probing the members
    RUNNING = "running"  # launching members as slots free up
    STOPPING = "stopping"  # a canary failed, max_failures was reached, the image changed or the journal failed: running jobs finish, nothing starts
    CANCELLING = "cancelling"  # cancelled: running jobs are being stopped
    FINISHED = "finished"  # every member ended (see ``result``)
    CANCELLED = "cancelled"  # cancelled, and every member ended


ENDED_BATCH_STATES = (BatchState.FINISHED, BatchState.CANCELLED)


# ----- actions: what the daemon must do now


@dataclass(frozen=True)
class Probe:
    """Probe these members (description document only) and report with :meth:`BatchPolicy.preflight_done`."""

    devices: tuple[str, ...]


@dataclass(frozen=True)
class Start:
    """Start a job for this member; report with :meth:`~BatchPolicy.job_started` or
    :meth:`~BatchPolicy.start_refused`."""

    device: str


@dataclass(frozen=True)
class Resume:
    """Resume this member's interrupted job ``job``; report as for :class:`Start`."""

    device: str
    job: str


@dataclass(frozen=True)
class Cancel:
    """Cancel this member's job (STOP); its end comes with :meth:`~BatchPolicy.job_ended`."""

    device: str
    job: str


@dataclass(frozen=True)
class Finish:
    """Every member ended: the batch is over (``summary`` as :meth:`BatchPolicy.summary`)."""

    summary: dict[str, Any]


Action = Probe | Start | Resume | Cancel | Finish


class BatchPolicy:
    """The decisions of one batch. See the module docstring."""

    def __init__(
        self,
        devices: Sequence[str],
        policy: RolloutPolicy,
        image_kind: str,
        daemon_max_parallel: int,
        target: TargetVersion | None = None,
        known_versions: Mapping[str, str | None] | None = None,
    ) -> None:
        if not devices:
            raise ValueError("a batch needs at least one device")
        if len(set(devices)) != len(devices):
            raise ValueError("a device is named twice in the batch")
        if image_kind not in IMAGE_KINDS:
            raise ValueError(f"unknown image kind {image_kind!r} (known: {', '.join(IMAGE_KINDS)})")
        if daemon_max_parallel < 1:
            raise ValueError("daemon_max_parallel must be at least 1")
        self.policy = policy
        self.image_kind = image_kind
        self.daemon_max_parallel = daemon_max_parallel
        self.target = target
        known = known_versions or {}
        self.members: dict[str, Member] = {d: Member(d, firmware_version=known.get(d)) for d in devices}
        self.state = BatchState.PREFLIGHT if policy.preflight else BatchState.RUNNING
        self.stop_reason: Reason | None = None
        self.stop_message = ""
        self.began: float | None = None
        self.finished: float | None = None
        self.notes: list[str] = []  # things a person should know (an unrecognised image kind, no target version)
        self._canaries_chosen = False
        self._finish_sent = False

    # ----- queries

    @property
    def max_parallel(self) -> int:
        """Member jobs at once: the policy's, never more than the daemon's."""
        wanted = self.policy.max_parallel or self.daemon_max_parallel
        return max(1, min(wanted, self.daemon_max_parallel))

    @property
    def done(self) -> bool:
        return self.state in ENDED_BATCH_STATES

    @property
    def launching(self) -> bool:
        """Whether new member jobs may still start."""
        return self.state is BatchState.RUNNING

    def active(self) -> list[Member]:
        return [m for m in self.members.values() if m.active]

    def failures(self) -> int:
        return sum(1 for m in self.members.values() if m.state is MemberState.FAILED)

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in MemberState}
        for member in self.members.values():
            counts[member.state.value] += 1
        counts["total"] = len(self.members)
        return counts

    def result(self) -> str | None:
        """``succeeded`` (every member succeeded or was skipped as current), ``cancelled``, ``failed``;
        None while the batch runs."""
        if not self.done:
            return None
        if self.state is BatchState.CANCELLED:
            return "cancelled"
        ok = all(
            m.state is MemberState.SUCCEEDED or (m.state is MemberState.SKIPPED and m.reason is Reason.CURRENT)
            for m in self.members.values()
        )
        return "succeeded" if ok else "failed"

    def summary(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "result": self.result(),
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "stop_message": self.stop_message,
            "counts": self.counts(),
            "began": self.began,
            "finished": self.finished,
            "duration": (self.finished - self.began) if self.began is not None and self.finished is not None else None,
        }

    # ----- events

    def begin(self, now: float) -> list[Action]:
        """The batch was accepted: probe every member first, or (no pre-flight) start the first ones."""
        self.began = now
        if self.image_kind == "unknown":
            self.notes.append("the image's kind could not be told: devices' builds were not checked against it")
        if self.policy.skip_current and self.target is None:
            self.notes.append(
                "skip_current: the target version is not known (no earlier job flashed this image; give it in the request): no device is skipped as current"
            )
        if self.state is BatchState.PREFLIGHT:
            return [Probe(tuple(m.device for m in self.members.values() if m.state is MemberState.PENDING))]
        for member in self.members.values():
            if member.state is MemberState.PENDING:
                self._admit(member, now)
        return self._advance(now)

    def preflight_done(self, results: Mapping[str, MemberProbe], now: float) -> list[Action]:
        """Every member's probe result (a member missing from ``results`` counts as unreachable)."""
        if self.state is not BatchState.PREFLIGHT:
            return []  # cancelled meanwhile, or a stale answer after a restart
        for member in self.members.values():
            if member.state is not MemberState.PENDING:
                continue
            probe = results.get(member.device) or MemberProbe(reachable=False, error="no probe result")
            member.probe = probe
            if probe.busy_job:
                self._end(member, MemberState.REFUSED, Reason.BUSY, f"busy with job {probe.busy_job}", now)
                continue
            if not probe.reachable:
                self._end(member, MemberState.REFUSED, Reason.UNREACHABLE, f"unreachable: {probe.error or '?'}", now)
                continue
            if probe.firmware_version or probe.mode == "loader":
                member.firmware_version = probe.firmware_version  # the loader tells nothing of the firmware
            wrong = image_fits(self.image_kind, probe.mode)
            if wrong:
                self._end(member, MemberState.REFUSED, Reason.WRONG_KIND, wrong, now)
                continue
            self._admit(member, now)
        self.state = BatchState.RUNNING
        return self._advance(now)

    def job_started(self, device: str, job_id: str, now: float) -> list[Action]:
        """The member's job (or resumed job) exists: ``job_id``."""
        member = self.members[device]
        if member.state is not MemberState.STARTING:
            return []
        member.state = MemberState.RUNNING
        member.job = job_id
        if job_id not in member.jobs:
            member.jobs.append(job_id)
        if member.started is None:
            member.started = now
        if member.cancel_requested:
            member.state = MemberState.CANCELLING
            return [Cancel(device, job_id)]
        return []

    def start_lost(self, device: str) -> list[Action]:
        """After a restart: the member was told to start, but no job of it exists (the daemon died
        between the decision and the job): it is ready again."""
        member = self.members[device]
        if member.state is MemberState.STARTING and not member.jobs:
            member.state = MemberState.READY
        return []

    def start_refused(self, device: str, message: str, now: float) -> list[Action]:
        """The daemon refused the member's job (``message`` says why)."""
        member = self.members[device]
        if member.state is not MemberState.STARTING:
            return []
        if member.cancel_requested:
            self._end(member, MemberState.SKIPPED, Reason.CANCELLED, "the batch was cancelled before it started", now)
        else:
            self._end(member, MemberState.REFUSED, Reason.START_REFUSED, message, now)
            if member.canary:
                member.canary = False  # it tested nothing: the next ready member takes its place
                self._promote_canaries()
        return self._advance(now)

    def job_ended(self, device: str, job_id: str, outcome: MemberOutcome, now: float) -> list[Action]:
        """The member's job ``job_id`` ended with ``outcome``."""
        member = self.members[device]
        if not member.active or job_id != member.job:
            return []  # a stale report (an older job of the member, or after it ended)
        member.outcome = outcome
        if outcome.ok:
            self._end(member, MemberState.SUCCEEDED, None, outcome.message, now)
        elif member.state is MemberState.CANCELLING and outcome.kind == OutcomeKind.ABORTED.value:
            self._end(member, MemberState.CANCELLED, None, outcome.message, now)
        else:
            self._end(member, MemberState.FAILED, None, outcome.message, now)
            self._check_failures()
        return self._advance(now)

    def job_interrupted(self, device: str, job_id: str, now: float) -> list[Action]:
        """The member's job ``job_id`` was interrupted (the daemon stopped or died while it ran): resume
        it when the policy says so and the batch was not cancelled, else the member failed."""
        member = self.members[device]
        if not member.active or job_id != member.job:
            return []
        if member.state is MemberState.CANCELLING or self.state in (BatchState.CANCELLING, BatchState.CANCELLED):
            member.outcome = MemberOutcome("interrupted", "interrupted while the batch was being cancelled")
            self._end(member, MemberState.CANCELLED, None, member.outcome.message, now)
            return self._advance(now)
        if self.policy.resume_interrupted:
            # Resumed even when the batch is stopping: "running ones finish", and a device stopped in
            # phase 2 waits in its loader until an upgrade completes.
            member.state = MemberState.STARTING
            return [Resume(device, job_id)]
        member.outcome = MemberOutcome("interrupted", "the daemon stopped while the job ran (not resumed: policy)")
        self._end(member, MemberState.FAILED, None, member.outcome.message, now)
        self._check_failures()
        return self._advance(now)

    def job_lost(self, device: str, job_id: str, message: str, now: float) -> list[Action]:
        """The end of the member's job ``job_id`` can't be learnt (following it failed: ``message``
        says how). The member failed, with no outcome: the job may still run, and a canary whose
        result is not known did not succeed."""
        member = self.members[device]
        if not member.active or job_id != member.job:
            return []
        self._end(member, MemberState.FAILED, None, message, now)
        self._check_failures()
        return self._advance(now)

    def cancel(self, reason: str, now: float) -> list[Action]:
        """Cancel the batch: members not started are skipped, running jobs are cancelled (STOP)."""
        if self.done or self.state is BatchState.CANCELLING:
            return []
        self.state = BatchState.CANCELLING
        self.stop_reason = Reason.CANCELLED
        self.stop_message = reason
        actions: list[Action] = []
        for member in self.members.values():
            if member.state in (MemberState.PENDING, MemberState.READY):
                self._end(member, MemberState.SKIPPED, Reason.CANCELLED, f"the batch was cancelled: {reason}", now)
            elif member.state is MemberState.STARTING:
                member.cancel_requested = True  # cancelled once its job exists
            elif member.state is MemberState.RUNNING and member.job is not None:
                member.cancel_requested = True
                member.state = MemberState.CANCELLING
                actions.append(Cancel(member.device, member.job))
        return actions + self._advance(now)

    def stop(self, reason: Reason, message: str, now: float) -> list[Action]:
        """Stop launching for a reason found outside the outcomes (the firmware file changed under the
        batch): running jobs finish, members not started are skipped with ``reason``."""
        if self.state is BatchState.PREFLIGHT:
            self.state = BatchState.RUNNING  # nothing was started; the probe's answer is ignored
        if self.state is not BatchState.RUNNING:
            return []
        self._stop(reason, message)
        return self._advance(now)

    def halt(self, message: str, not_made: Iterable[Action], now: float) -> list[Action]:
        """The daemon could not journal the batch's last decision, so it did not carry out its actions
        (``not_made``): the batch starts nothing more (``journal_error``). A member told to start was
        not started and is skipped with the others not started; a job told to resume was not resumed
        (the member failed); a job told to stop was not stopped: it runs to its end, like every
        running job, and its member ends with it. The devices of the members that ended are free."""
        for action in not_made:
            if isinstance(action, Start):
                member = self.members[action.device]
                if member.state is MemberState.STARTING and not member.jobs:
                    member.state = MemberState.READY
            elif isinstance(action, Resume):
                member = self.members[action.device]
                if member.state is MemberState.STARTING and member.job == action.job:
                    member.outcome = MemberOutcome("interrupted", f"its interrupted job was not resumed: {message}")
                    self._end(member, MemberState.FAILED, None, member.outcome.message, now)
        if self.state in (BatchState.PREFLIGHT, BatchState.RUNNING):
            self._stop(Reason.JOURNAL_ERROR, message)
        return self._advance(now)

    def restart(self, now: float) -> list[Action]:
        """After a daemon restart (the state from :meth:`from_json`, each member's job reconciled with
        :meth:`job_started` / :meth:`job_ended` / :meth:`job_interrupted` / :meth:`start_lost`): carry on."""
        if self.state is BatchState.PREFLIGHT:
            pending = tuple(m.device for m in self.members.values() if m.state is MemberState.PENDING)
            return [Probe(pending)]
        return self._advance(now)

    # ----- the rules

    def _admit(self, member: Member, now: float) -> None:
        """A member that passed pre-flight (or had none): skipped as current, or ready."""
        if (
            self.policy.skip_current
            and self.target is not None
            and member.firmware_version is not None
            and member.firmware_version == self.target.version
        ):
            self._end(
                member,
                MemberState.SKIPPED,
                Reason.CURRENT,
                f"already runs the target version {self.target.describe()}",
                now,
            )
            return
        member.state = MemberState.READY

    def _end(self, member: Member, state: MemberState, reason: Reason | None, message: str, now: float) -> None:
        member.state = state
        member.reason = reason
        member.message = message
        member.finished = now

    def _promote_canaries(self) -> None:
        """Keep ``policy.canary`` canaries among the members not refused: the first ones in order."""
        wanted = self.policy.canary
        canaries = [m for m in self.members.values() if m.canary]
        for member in self.members.values():
            if len(canaries) >= wanted:
                break
            if member.state is MemberState.READY and not member.canary:
                member.canary = True
                canaries.append(member)

    def _canary_phase(self) -> bool:
        """Whether some canary has not ended yet (only canaries start meanwhile)."""
        return any(m.canary and not m.ended for m in self.members.values())

    def _check_failures(self) -> None:
        """A member job failed: a canary's failure, or reaching max_failures, stops the launching."""
        if self.state is not BatchState.RUNNING:
            return
        failed_canary = next(
            (m for m in self.members.values() if m.canary and m.state is MemberState.FAILED),
            None,
        )
        if failed_canary is not None:
            kind = failed_canary.outcome.kind if failed_canary.outcome else "its end is not known"
            self._stop(Reason.CANARY_FAILED, f"canary {failed_canary.device} did not succeed ({kind})")
            return
        limit = self.policy.max_failures
        if limit is not None and self.failures() >= limit:
            self._stop(Reason.MAX_FAILURES, f"{self.failures()} member job(s) failed (max_failures {limit})")

    def _stop(self, reason: Reason, message: str) -> None:
        self.state = BatchState.STOPPING
        self.stop_reason = reason
        self.stop_message = message

    def _advance(self, now: float) -> list[Action]:
        """Skip what can no longer start, start what may start now, and finish when all ended."""
        actions: list[Action] = []
        if self.state in (BatchState.STOPPING, BatchState.CANCELLING):
            reason = self.stop_reason or Reason.CANCELLED
            for member in self.members.values():
                if member.state in (MemberState.PENDING, MemberState.READY):
                    self._end(member, MemberState.SKIPPED, reason, f"not started: {self.stop_message}", now)
        if self.state is BatchState.RUNNING:
            if not self._canaries_chosen:
                self._canaries_chosen = True
                self._promote_canaries()
            canary_phase = self._canary_phase()
            slots = self.max_parallel - len(self.active())
            for member in self.members.values():
                if slots <= 0:
                    break
                if member.state is MemberState.READY and (member.canary or not canary_phase):
                    member.state = MemberState.STARTING
                    actions.append(Start(member.device))
                    slots -= 1
        if self.state is not BatchState.PREFLIGHT and all(m.ended for m in self.members.values()):
            self.state = BatchState.CANCELLED if self.state is BatchState.CANCELLING else BatchState.FINISHED
            if self.finished is None:
                self.finished = now
            if not self._finish_sent:
                self._finish_sent = True
                actions.append(Finish(self.summary()))
        return actions

    # ----- persistence

    def to_json(self) -> dict[str, Any]:
        """The whole state, JSON-ready (the journal keeps it; ``GET /v1/batches/ID`` shows it)."""
        return {
            "state": self.state.value,
            "policy": self.policy.to_json(),
            "image_kind": self.image_kind,
            "daemon_max_parallel": self.daemon_max_parallel,
            "max_parallel": self.max_parallel,
            "target": self.target.to_json() if self.target else None,
            "stop_reason": self.stop_reason.value if self.stop_reason else None,
            "stop_message": self.stop_message,
            "began": self.began,
            "finished": self.finished,
            "notes": list(self.notes),
            "canaries_chosen": self._canaries_chosen,
            "members": [m.to_json() for m in self.members.values()],
            "summary": self.summary(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], daemon_max_parallel: int | None = None) -> BatchPolicy:
        """The state :meth:`to_json` saved; ``daemon_max_parallel``: the daemon's now (its config may
        have changed since). Raises ValueError / KeyError for a state this version can't read."""
        members = [Member.from_json(m) for m in data["members"]]
        batch = cls(
            [m.device for m in members],
            RolloutPolicy(**{k: v for k, v in dict(data["policy"]).items() if k in RolloutPolicy.FIELDS}),
            str(data["image_kind"]),
            daemon_max_parallel or int(data["daemon_max_parallel"]),
            target=TargetVersion.from_json(data.get("target")),
        )
        batch.members = {m.device: m for m in members}
        batch.state = BatchState(data["state"])
        batch.stop_reason = Reason(data["stop_reason"]) if data.get("stop_reason") else None
        batch.stop_message = data.get("stop_message") or ""
        batch.began = data.get("began")
        batch.finished = data.get("finished")
        batch.notes = [str(n) for n in data.get("notes") or []]
        batch._canaries_chosen = bool(data.get("canaries_chosen", False))
        batch._finish_sent = batch.done
        return batch
