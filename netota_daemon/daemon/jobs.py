"""``JobQueue``: the daemon's jobs. Per-device exclusion, ``max_parallel`` with a visible FIFO queue,
start / cancel / resume, and fan-out of every job event to any number of subscribers.

Each change is written to the journal before it is acted on: the journal runs off the reactor
(:class:`~netota_daemon.daemon.journal_thread.AsyncJournal`), and every action waits for its write
through one :class:`~netota_daemon.daemon.commit_order.CommitOrder`, so actions also happen in the
order they were decided. Commands answer with Deferreds that fire once what they changed is
durable. The engine job is made by an injectable ``job_factory`` (``UpgradeJob`` in the daemon, a
fake driven by a ``Clock`` in tests).

Refusals are :class:`JobError` with a :class:`RefusalKind`; what a kind becomes on the wire (an HTTP
status) is the control API's business.
"""

from __future__ import annotations

import enum
import uuid
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.daemon.commit_order import CommitOrder
from netota_daemon.daemon.config import TIMEOUT_KEYS, ConfigError, DaemonConfig, check_timeout, split_settings
from netota_daemon.daemon.firmware_store import FirmwareRefused, FirmwareStore
from netota_daemon.daemon.journal import DEFAULT_PAGE, JobRecord, JobState, JournalError, interrupted_advice
from netota_daemon.daemon.journal_thread import AsyncJournal
from netota_daemon.daemon.probe import BUILD_OF_MODE
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.engine.events import EventPublisher, Finished, JobEvent, PhaseChanged, Progress, Waiting
from netota_daemon.engine.outcome import (
    ADVICE_UPLOAD_UNSETTLED,
    FailureClass,
    Happened,
    Outcome,
    OutcomeKind,
    Phase,
    Route,
    advice,
    phase_label,
    route_of_phase,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.wire.firmware_kind import FirmwareKind

log = Logger()

#: Seconds between two published progress events of one job (subscribers: the event streams).
PROGRESS_INTERVAL = 0.1

#: Every published event is a JSON-ready dict with at least ``type``, ``job`` and ``device``.
QueueEvent = dict[str, Any]
QueueSubscriber = Callable[[QueueEvent], None]

#: A job that ends before its engine ran: the device was not touched.
ADVICE_NOT_TOUCHED = advice(Happened.NEVER_STARTED, Phase.DETECT)


class EngineJob(Protocol):
    """What the queue needs of an engine job (``netota_daemon.engine.job.UpgradeJob``)."""

    events: EventPublisher[JobEvent]

    @property
    def phase(self) -> Phase: ...

    @property
    def point_of_no_return(self) -> bool: ...

    def run(self) -> Deferred[Outcome]: ...

    def cancel(self, reason: str = ...) -> None: ...


JobFactory = Callable[..., EngineJob]


class RefusalKind(str, enum.Enum):
    """Why the queue refused a request; the value is the control API's error ``code``."""

    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_JOB = "unknown_job"
    BUSY = "busy"  # the device has a queued or running job
    NOT_ACTIVE = "not_active"  # cancel of a job that ended
    NOT_RESUMABLE = "not_resumable"
    SUPERSEDED = "superseded"  # resume of a job whose device a later job upgraded
    SHUTTING_DOWN = "shutting_down"
    BAD_OPTIONS = "bad_options"
    FIRMWARE_OUTSIDE = "firmware_outside"  # the name leaves firmware_dir
    FIRMWARE_NOT_FOUND = "firmware_not_found"
    FIRMWARE_INVALID = "firmware_invalid"
    WRONG_IMAGE_KIND = "wrong_image_kind"  # no image of the set fits the device's build (as its probe told it)
    JOURNAL_UNAVAILABLE = "journal_unavailable"  # the change could not be recorded, so it was not made


class JobError(Exception):
    """A request the queue refuses, and why (``kind``)."""

    kind = RefusalKind.BAD_OPTIONS

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> str:
        return self.kind.value


class UnknownDevice(JobError):
    kind = RefusalKind.UNKNOWN_DEVICE


class UnknownJob(JobError):
    kind = RefusalKind.UNKNOWN_JOB


class DeviceBusy(JobError):
    kind = RefusalKind.BUSY


class JobNotActive(JobError):
    kind = RefusalKind.NOT_ACTIVE


class NotResumable(JobError):
    kind = RefusalKind.NOT_RESUMABLE


class Superseded(JobError):
    kind = RefusalKind.SUPERSEDED


class ShuttingDown(JobError):
    kind = RefusalKind.SHUTTING_DOWN


class BadOptions(JobError):
    kind = RefusalKind.BAD_OPTIONS


class FirmwareNotAllowed(JobError):
    """A firmware name that leaves firmware_dir."""

    kind = RefusalKind.FIRMWARE_OUTSIDE


class FirmwareNotFound(JobError):
    kind = RefusalKind.FIRMWARE_NOT_FOUND


class FirmwareInvalid(JobError):
    kind = RefusalKind.FIRMWARE_INVALID


class JournalUnavailable(JobError):
    kind = RefusalKind.JOURNAL_UNAVAILABLE


class WrongImageKind(JobError):
    kind = RefusalKind.WRONG_IMAGE_KIND


#: Images one job may be given (one of each kind is what a mixed rack needs).
MAX_FIRMWARE_SET = 4


def firmware_set(firmware: Any) -> tuple[str, ...]:
    """The names of a job's images: one name, or a list of 1..MAX_FIRMWARE_SET different names."""
    names = [firmware] if isinstance(firmware, str) else firmware
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FirmwareInvalid("firmware must be a file name, or a list of file names (one image of each kind)")
    if len(names) > MAX_FIRMWARE_SET:
        raise FirmwareInvalid(f"a job takes at most {MAX_FIRMWARE_SET} images, not {len(names)}")
    if len(set(names)) != len(names):
        raise FirmwareInvalid("the same image is named twice")
    return tuple(names)


def check_options(options: Any) -> dict[str, Any]:
    """The engine timeouts a client overrides for one job (or a batch for each of its jobs), checked
    as the config file's are; :class:`BadOptions` says what is wrong."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise BadOptions("options must be a JSON object")
    checked: dict[str, Any] = {}
    for key, value in options.items():
        if key not in TIMEOUT_KEYS:
            raise BadOptions(f"unknown option {key!r} (known: {', '.join(sorted(TIMEOUT_KEYS))})")
        try:
            checked[key] = check_timeout("options", key, key, value)
        except ConfigError as e:
            raise BadOptions(f"option {key}: {e.problem}") from None
    return checked


def check_image_kinds(names: tuple[str, ...], images: list[FirmwareImage], device_mode: str | None) -> None:
    """Refuse, before anything is sent, a set with two images of one known kind (the engine could not
    choose), and a set with nothing for the device's build when its probe told the build."""
    seen: dict[FirmwareKind, str] = {}
    for name, image in zip(names, images, strict=True):
        kind = image.kind.kind
        if kind is not FirmwareKind.UNKNOWN and kind in seen:
            raise FirmwareInvalid(
                f"{seen[kind]} and {name} are both {kind.value.replace('_', '-')} images: give one of each kind"
            )
        seen.setdefault(kind, name)
    wanted = BUILD_OF_MODE.get(device_mode or "")
    if wanted is not None and wanted not in seen and FirmwareKind.UNKNOWN not in seen:
        kinds = ", ".join(f"{name} is {image.kind.description}" for name, image in zip(names, images, strict=True))
        raise WrongImageKind(
            f"the device runs a {wanted.value.replace('_', '-')} build (its last probe said {device_mode}), but {kinds}: "
            "single- and double-backup images can't cross-upgrade; nothing was sent"
        )


def _firmware_error(e: FirmwareRefused) -> JobError:
    return {"outside": FirmwareNotAllowed, "not_found": FirmwareNotFound}.get(e.reason, FirmwareInvalid)(e.message)


def progress_json(progress: Progress) -> dict[str, Any]:
    """A progress event as the job and device objects carry it (without ``type``)."""
    data = progress.to_json()
    del data["type"]
    return data


def waiting_json(waiting: Waiting) -> dict[str, Any]:
    data = waiting.to_json()
    del data["type"]
    return data


def default_job_factory(*args: Any, **kwargs: Any) -> EngineJob:
    from netota_daemon.engine.job import UpgradeJob  # imported late: the engine is optional in unit tests

    return UpgradeJob(*args, **kwargs)


class Stage(enum.Enum):
    """Where an active job is in the queue's own hands (its journal state says the rest)."""

    QUEUED = "queued"  # waiting for a slot
    STARTING = "starting"  # its "running" row is being written; the engine starts once it is
    RUNNING = "running"  # the engine runs
    ENDING = "ending"  # its end is being written


@dataclass
class ActiveJob:
    """A queued or running job, in memory."""

    record: JobRecord
    image: FirmwareImage | tuple[FirmwareImage, ...]  # one image, or the set the engine chooses from
    target: DeviceTarget
    timeouts: UpgradeTimeouts
    behaviour: UpgradeBehaviour = field(default_factory=UpgradeBehaviour)
    verify_only: bool = False  # resumes a job whose phase 2 completed: only read the version back
    stage: Stage = Stage.QUEUED
    engine: EngineJob | None = None
    progress: Progress | None = None  # the latest, shown on the job and its device
    waiting: Waiting | None = None  # the latest connection attempt, until the device answers
    progress_published: tuple[float, Phase, bool] | None = None  # when, in which phase, past no return
    unsubscribe: Callable[[], None] | None = None
    cancel_requested: str | None = None  # a cancel that arrived while the job was starting
    final_published: bool = False
    waiters: list[Deferred[JobRecord]] = field(default_factory=list)


class JobQueue:
    def __init__(
        self,
        reactor: IReactorTime,
        config: DaemonConfig,
        journal: AsyncJournal,
        registry: DeviceRegistry,
        firmware: FirmwareStore | None = None,
        job_factory: JobFactory = default_job_factory,
    ) -> None:
        self._reactor = reactor
        self._config = config
        self._journal = journal
        self._registry = registry
        self._firmware = firmware or FirmwareStore(config.firmware_dir)
        self._job_factory = job_factory
        self._active: dict[str, ActiveJob] = {}
        self._waiting: deque[str] = deque()
        self._by_device: dict[str, str] = {}  # device -> its job (being created, queued or running)
        self._creating: dict[str, tuple[str, ...]] = {}  # job being created (its row written) -> its firmware
        self._events: EventPublisher[QueueEvent] = EventPublisher()
        self._order = CommitOrder()
        self._in_flight: set[Deferred[Any]] = set()
        self._stopping = False
        self.max_parallel = config.max_parallel

    # ----- queries

    @property
    def stopping(self) -> bool:
        return self._stopping

    def running_count(self) -> int:
        return sum(1 for a in self._active.values() if a.stage is not Stage.QUEUED)

    def queued_count(self) -> int:
        return len(self._waiting)

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, or None if not queued."""
        try:
            return self._waiting.index(job_id) + 1
        except ValueError:
            return None

    def job_json(self, record: JobRecord) -> dict[str, Any]:
        data = record.to_json()
        data["position"] = self.position(record.id)
        active = self._active.get(record.id)
        if active is not None:
            # While it runs: the latest progress of the phase it is in (none yet right after a change).
            current = active.progress if active.progress and active.progress.phase is record.phase else None
            data["progress"] = progress_json(current) if current else None
            data["waiting"] = waiting_json(active.waiting) if active.waiting else None
        else:
            data["waiting"] = None
        return data

    def get(self, job_id: str) -> Deferred[dict[str, Any]]:
        """The job (memory for an active one, else the journal) with its history."""
        return self._track(self._get(job_id))

    async def _get(self, job_id: str) -> dict[str, Any]:
        active = self._active.get(job_id)
        record = active.record if active else await self._read(self._journal.get(job_id))
        if record is None:
            raise UnknownJob(f"no job {job_id!r}")
        history = await self._read(self._journal.history(job_id))
        active = self._active.get(job_id)
        data = self.job_json(active.record if active else record)
        data["history"] = history
        return data

    def active_jobs(self) -> list[dict[str, Any]]:
        """The queued, running and cancelling jobs, oldest first (without reading the journal)."""
        return [self.job_json(active.record) for active in self._active.values()]

    def firmware_in_use(self) -> set[str]:
        """The firmware file names of the jobs being created (their images open, their rows being
        written), queued, running or cancelling: what must not be replaced or removed now."""
        names = {name for active in self._active.values() for name in active.record.firmware_set}
        names.update(name for job in self._creating.values() for name in job)
        return names

    def is_active(self, job_id: str) -> bool:
        return job_id in self._active

    def page(
        self, device: str | None = None, limit: int = DEFAULT_PAGE, cursor: str | None = None
    ) -> Deferred[tuple[list[dict[str, Any]], str | None]]:
        """One page of jobs, newest first, and the cursor of the next page (None: the last)."""
        return self._track(self._page(device, limit, cursor))

    async def _page(
        self, device: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        if device is not None and device not in self._registry:
            raise UnknownDevice(f"no device {device!r} in the configuration")
        page = await self._read(self._journal.page(device, limit, cursor))
        out = []
        for record in page.records:
            active = self._active.get(record.id)
            out.append(self.job_json(active.record if active else record))
        return out, page.next_cursor

    def jobs(self, device: str | None = None, limit: int = DEFAULT_PAGE) -> Deferred[list[dict[str, Any]]]:
        """The newest ``limit`` jobs (the first page)."""
        return self.page(device, limit).addCallback(lambda page: page[0])

    async def _read(self, d: Deferred[Any]) -> Any:
        try:
            return await d
        except JournalError as e:
            raise JournalUnavailable(str(e)) from None

    # ----- events

    def subscribe(self, subscriber: QueueSubscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event of every job; returns the unsubscribe function."""
        return self._events.subscribe(subscriber)

    def _publish_after(self, write: Deferred[Any] | None, event: QueueEvent) -> None:
        """Publish ``event`` once ``write`` (if any) committed, in order with every other action.
        A write that failed is logged; the event still goes out (what happened, happened)."""
        step = self._order.after(write)
        step.addErrback(self._write_failed, event)
        step.addCallback(lambda _: self._events.publish(event))

    def _write_failed(self, failure: Failure, event: QueueEvent) -> None:
        failure.trap(JournalError)  # type: ignore[no-untyped-call]
        log.error(
            "job {job} on {device}: the journal could not record {what}: {error}",
            job=event.get("job"),
            device=event.get("device"),
            what=event.get("type"),
            error=failure.getErrorMessage(),
        )

    def _state_event(self, record: JobRecord) -> QueueEvent:
        return {
            "type": "state",
            "job": record.id,
            "device": record.device,
            "state": record.state.value,
            "phase": record.phase.value,
            "position": self.position(record.id),
        }

    def _outcome_event(self, record: JobRecord) -> QueueEvent:
        return {
            "type": "outcome",
            "job": record.id,
            "device": record.device,
            "state": record.state.value,
            "outcome": record.outcome.to_json() if record.outcome else None,
            "advice": record.advice,
        }

    # ----- bookkeeping of the queue's own coroutines

    def _track(self, coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
        """Run ``coroutine``; shutdown waits for every tracked one to end before it acts."""
        d = Deferred.fromCoroutine(coroutine)
        if not d.called:
            self._in_flight.add(d)

            def done(result: Any) -> Any:
                self._in_flight.discard(d)
                return result

            d.addBoth(done)
        return d

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], what: str, job: str) -> None:
        """Run an internal coroutine nobody awaits; an error in it is logged, never lost."""
        d = self._track(coroutine)
        d.addErrback(lambda f: log.failure("job {job}: {what} failed", f, job=job, what=what))

    async def _settle(self) -> None:
        while self._in_flight:
            await DeferredList(list(self._in_flight), consumeErrors=True)

    # ----- commands

    def start(
        self,
        device: str,
        firmware: str | list[str],
        options: Any = None,
        resumed_from: str | None = None,
        verify_only: bool = False,
        batch: str | None = None,
    ) -> Deferred[dict[str, Any]]:
        """Accept a job for ``device`` (a member of ``batch``, if given): once its row is in the
        journal it runs, or waits for a slot. Fires with the job, or fails with a :class:`JobError`."""
        return self._track(self._start(device, firmware, options, resumed_from, verify_only, batch))

    async def _start(
        self,
        device: str,
        firmware: Any,
        options: Any,
        resumed_from: str | None,
        verify_only: bool,
        batch: str | None = None,
    ) -> dict[str, Any]:
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if not isinstance(device, str) or device not in self._registry:
            raise UnknownDevice(
                f"no device {device!r} in the configuration (known: {', '.join(self._registry.names()) or 'none'})"
            )
        busy = self._by_device.get(device)
        if busy is not None:
            active = self._active.get(busy)
            state = active.record.state.value if active else "being created"
            raise DeviceBusy(f"device {device} is busy with job {busy} ({state})")
        checked = check_options(options)
        names = firmware_set(firmware)
        try:
            images = [self._firmware.open(name) for name in names]
        except FirmwareRefused as e:
            raise _firmware_error(e) from None
        status = self._registry.get(device)
        probe = status.probe or {}
        check_image_kinds(names, images, probe.get("mode") if probe.get("ok") else None)
        image: FirmwareImage | tuple[FirmwareImage, ...] = images[0] if len(images) == 1 else tuple(images)
        device_config = status.config
        timeouts, behaviour = split_settings(checked, device_config.timeouts, device_config.behaviour)
        record = JobRecord(
            id=uuid.uuid4().hex[:12],
            device=device,
            firmware=names[0],
            also=names[1:],
            created=self._reactor.seconds(),
            resumed_from=resumed_from,
            options=checked,
            batch=batch,
            # One image: its SHA-256. A set: the engine picks the image of the device's kind later.
            image_sha256=images[0].sha256() if len(images) == 1 else None,
        )
        self._by_device[device] = record.id  # busy from now on, before the row is written
        self._creating[record.id] = tuple(names)  # its images are open: their files are in use
        try:
            await self._order.after(
                self._journal.create(record, note=f"created (resumes {resumed_from})" if resumed_from else "created")
            )
        except JournalError as e:
            del self._by_device[device]
            raise JournalUnavailable(f"the job could not be recorded, so it was not started: {e}") from None
        finally:
            del self._creating[record.id]
        active = ActiveJob(
            record=record,
            image=image,
            target=device_config.target,
            timeouts=timeouts,
            behaviour=behaviour,
            verify_only=verify_only,
        )
        self._active[record.id] = active
        self._waiting.append(record.id)
        log.info(
            "job {job} on {device}: accepted, firmware {firmware} ({size} bytes)",
            job=record.id,
            device=device,
            firmware=", ".join(names),
            size=sum(i.size for i in images),
        )
        self._registry.queued(device, record.id, self.position(record.id) or 0)
        self._events.publish(self._state_event(record))
        self._start_waiting()
        return self.job_json(active.record)

    def resume(self, job_id: str, force: bool = False, batch: str | None = None) -> Deferred[dict[str, Any]]:
        """A new job for the same device and firmware as an interrupted, failed or aborted one; the
        engine sees where the device is (in its loader: straight to phase 2). A job that ended after
        phase 2 completed (in verify) is resumed as a check only: the new firmware's version is read
        back, nothing is flashed again. Refused (:class:`Superseded`) when a later job has upgraded
        the device since, unless ``force``. The new job belongs to ``batch`` only when a batch resumes
        it (a person's resume is outside the batch)."""
        return self._track(self._resume(job_id, force, batch))

    async def _resume(self, job_id: str, force: bool, batch: str | None = None) -> dict[str, Any]:
        if job_id in self._active:
            raise NotResumable(f"job {job_id} is still {self._active[job_id].record.state.value}")
        record = await self._read(self._journal.get(job_id))
        if record is None:
            raise UnknownJob(f"no job {job_id!r}")
        if not record.resumable:
            why = (
                f"it was already resumed by job {record.resumed_by}"
                if record.resumed_by
                else f"it ended {record.outcome.kind.value if record.outcome else record.state.value} (only an "
                "interrupted, failed or aborted job can be resumed)"
            )
            raise NotResumable(f"job {job_id} can't be resumed: {why}")
        if not force:
            later = await self._read(self._journal.superseded_by(job_id))
            if later is not None and later.outcome is not None:
                version = later.outcome.firmware_version_after or later.outcome.firmware_version_before
                raise Superseded(
                    f"device {record.device} was upgraded by the later job {later.id} ({later.outcome.kind.value}"
                    f"{f', firmware {version}' if version else ''}, image {later.firmware}): resuming job {job_id} "
                    f"would flash {record.firmware} over it; resume with force to do it anyway"
                )
        verify_only = record.phase in (Phase.VERIFY, Phase.DONE)
        firmware = record.firmware if not record.also else list(record.firmware_set)
        started = await self._start(record.device, firmware, record.options, job_id, verify_only, batch)
        try:
            await self._order.after(
                self._journal.update(job_id, note=f"resumed by {started['id']}", resumed_by=started["id"])
            )
        except (JournalError, KeyError) as e:
            log.error(
                "job {job}: could not record that job {new} resumes it: {error}", job=job_id, new=started["id"], error=e
            )
        return started

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> Deferred[dict[str, Any]]:
        """Cancel a queued job (it ends aborted, the device untouched) or a running one (the engine
        sends STOP; the outcome follows). A finished job is refused."""
        return self._track(self._cancel(job_id, reason))

    async def _cancel(self, job_id: str, reason: str) -> dict[str, Any]:
        active = self._active.get(job_id)
        if active is None:
            record = await self._read(self._journal.get(job_id))
            if record is None:
                raise UnknownJob(f"no job {job_id!r}")
            result = record.outcome.kind.value if record.outcome else record.state.value
            raise JobNotActive(f"job {job_id} already ended ({result}): nothing to cancel")
        record = active.record
        if active.stage is Stage.QUEUED:
            self._waiting.remove(job_id)
            outcome = Outcome(
                kind=OutcomeKind.ABORTED,
                message=f"{reason} before it started",
                phase=Phase.DETECT,
                advice=ADVICE_NOT_TOUCHED,
            )
            final = await self._end(active, outcome)
            self._publish_positions()
            return self.job_json(final)
        if active.stage is Stage.ENDING or record.state in (JobState.CANCELLING, JobState.INTERRUPTED):
            return self.job_json(record)  # already ending, or being stopped (INTERRUPTED: by the daemon's shutdown)
        active.record = replace(record, state=JobState.CANCELLING)
        if active.stage is Stage.STARTING:
            active.cancel_requested = reason  # the engine will not be started
        accepted = self.job_json(active.record)  # the answer: the job as the cancel found it
        written = self._journal.save(active.record, f"cancel: {reason}")
        try:
            await self._order.after(written)
        except JournalError as e:
            if active.record.state is JobState.CANCELLING:  # nothing changed: it carries on
                active.record = replace(active.record, state=record.state)
                active.cancel_requested = None
            raise JournalUnavailable(f"the cancel could not be recorded, so the job was not stopped: {e}") from None
        log.info("job {job} on {device}: cancelling ({reason})", job=job_id, device=record.device, reason=reason)
        if self._active.get(job_id) is active and active.stage is Stage.RUNNING:
            self._events.publish(self._state_event(active.record))
            assert active.engine is not None
            active.engine.cancel(reason)
        return accepted

    def wait(self, job_id: str) -> Deferred[JobRecord]:
        """A Deferred that fires with the job's final record when it leaves the queue (at once, from
        the journal, for a job that already ended)."""
        active = self._active.get(job_id)
        if active is None:
            return self._track(self._ended(job_id))
        d: Deferred[JobRecord] = Deferred()
        active.waiters.append(d)
        return d

    async def _ended(self, job_id: str) -> JobRecord:
        record: JobRecord | None = await self._read(self._journal.get(job_id))
        if record is None:
            raise UnknownJob(f"no job {job_id!r}")
        return record

    # ----- running

    def _start_waiting(self) -> None:
        while self._waiting and self.running_count() < self.max_parallel and not self._stopping:
            job_id = self._waiting.popleft()
            active = self._active[job_id]
            active.stage = Stage.STARTING
            self._spawn(self._run(active), "starting", job_id)
            self._publish_positions()

    def _publish_positions(self) -> None:
        for position, job_id in enumerate(self._waiting, start=1):
            active = self._active[job_id]
            self._registry.queued(active.record.device, job_id, position)
            self._publish_after(None, self._state_event(active.record))

    async def _run(self, active: ActiveJob) -> None:
        record = replace(active.record, state=JobState.RUNNING, started=self._reactor.seconds())
        active.record = record
        self._registry.running(record.device, record.id)  # shown at once; the engine starts once it is recorded
        try:
            await self._order.after(self._journal.save(record, "running"))
        except JournalError as e:
            # Not journaled, so not acted on: the job ends without touching the device.
            log.error(
                "job {job} on {device}: can't record it as running: {error}",
                job=record.id,
                device=record.device,
                error=e,
            )
            await self._end(
                active,
                Outcome(
                    kind=OutcomeKind.FAILED, message=f"not started: {e}", phase=Phase.DETECT, advice=ADVICE_NOT_TOUCHED
                ),
            )
            return
        if self._stopping:
            return  # the shutdown interrupts it as a job that never started
        if active.cancel_requested is not None:
            await self._end(
                active,
                Outcome(
                    kind=OutcomeKind.ABORTED,
                    message=f"{active.cancel_requested} before it started",
                    phase=Phase.DETECT,
                    advice=ADVICE_NOT_TOUCHED,
                ),
            )
            return
        context = {"job": record.id, "device": record.device}
        try:
            extra = {"verify_only": True} if active.verify_only else {}
            engine = self._job_factory(
                self._reactor,
                active.target,
                active.image,
                active.timeouts,
                record.id,
                log_context=context,
                behaviour=active.behaviour,
                **extra,
            )
        except Exception as e:
            log.failure("job {job} on {device}: the engine job could not be made", job=record.id, device=record.device)
            await self._end(
                active,
                Outcome(
                    kind=OutcomeKind.FAILED,
                    message=f"internal error: {e}",
                    phase=Phase.DETECT,
                    failure=FailureClass.PROTOCOL_ERROR,
                    advice=ADVICE_NOT_TOUCHED,
                ),
            )
            return
        active.engine = engine
        active.stage = Stage.RUNNING
        active.unsubscribe = engine.events.subscribe(lambda event: self._on_engine_event(active, event))
        log.info("job {job} on {device}: running", job=record.id, device=record.device)
        self._events.publish(self._state_event(active.record))
        d = maybeDeferred(engine.run)  # an engine that raises at once still ends the job (and frees the device)
        d.addErrback(self._engine_failed, active)
        d.addCallback(lambda outcome: self._spawn(self._end(active, outcome), "finishing", record.id))

    def _engine_failed(self, failure: Failure, active: ActiveJob) -> Outcome:
        log.failure(
            "job {job} on {device}: the engine failed", failure, job=active.record.id, device=active.record.device
        )
        engine = active.engine
        phase = engine.phase if engine else Phase.DETECT
        point_of_no_return = bool(engine and engine.point_of_no_return)
        return Outcome(
            kind=OutcomeKind.FAILED,
            message=f"internal error: {failure.getErrorMessage()}",
            phase=phase,
            failure=FailureClass.PROTOCOL_ERROR,
            point_of_no_return=point_of_no_return,
            # A bug, not the device: what it did is unknown, as if the daemon had stopped here.
            advice=advice(Happened.INTERRUPTED, phase, point_of_no_return, active.record.route or Route.SINGLE_BACKUP),
        )

    def _on_engine_event(self, active: ActiveJob, event: JobEvent) -> None:
        if active.stage is not Stage.RUNNING:
            return  # its end is being written: later events can't change it
        record = active.record
        base = {"job": record.id, "device": record.device}
        latest = progress_json(active.progress) if active.progress else record.progress
        if isinstance(event, PhaseChanged):
            written = None
            if event.phase is not record.phase:
                route = route_of_phase(event.phase) or record.route
                active.record = replace(record, phase=event.phase, progress=latest, route=route)
                written = self._journal.save(active.record, f"entered {phase_label(event.phase)}")
            active.waiting = None
            self._registry.phase(record.device, event.phase)
            log.info(
                "job {job} on {device}: phase {phase} {message}",
                job=record.id,
                device=record.device,
                phase=event.phase.value,
                message=event.message,
            )
            self._publish_after(written, {**event.to_json(), **base})
        elif isinstance(event, Progress):
            written = None
            if event.point_of_no_return and not record.point_of_no_return:
                active.record = replace(
                    record, point_of_no_return=True, phase=event.phase, progress=progress_json(event)
                )
                written = self._journal.save(active.record, "point of no return")
                log.warn("job {job} on {device}: point of no return reached", job=record.id, device=record.device)
            elif event.phase is not record.phase:
                route = route_of_phase(event.phase) or record.route
                active.record = replace(record, phase=event.phase, progress=latest, route=route)
                written = self._journal.save(active.record, f"entered {phase_label(event.phase)}")
            due = self._progress_due(active, event)  # before active.progress changes: it compares with it
            active.progress = event
            active.waiting = None
            self._registry.progress(record.device, event)
            if due or written is not None:
                self._publish_after(written, {**event.to_json(), **base})
        elif isinstance(event, Waiting):
            active.waiting = event
            self._registry.waiting(record.device, event)
            self._publish_after(None, {**event.to_json(), **base})
        elif isinstance(event, Finished):
            pass  # the run() Deferred carries the same outcome; _end publishes it once

    def _progress_due(self, active: ActiveJob, event: Progress) -> bool:
        """Publish at most one progress event per job every PROGRESS_INTERVAL seconds (a fast stream
        makes thousands), but always the first of a phase, the one passing the point of no return,
        a change of transfer state (the device starts working, or is done), and 100 %."""
        now = self._reactor.seconds()
        last = active.progress_published
        previous = active.progress
        due = (
            last is None
            or now - last[0] >= PROGRESS_INTERVAL
            or last[1] is not event.phase
            or last[2] != event.point_of_no_return
            or event.percent >= 100.0
            or (previous is not None and previous.state is not event.state)
        )
        if due:
            active.progress_published = (now, event.phase, event.point_of_no_return)
        return due

    async def _end(self, active: ActiveJob, outcome: Outcome) -> JobRecord:
        """Record the job's end, then free its device, tell its waiters and the streams."""
        active.stage = Stage.ENDING
        record = active.record
        if active.unsubscribe is not None:
            active.unsubscribe()
            active.unsubscribe = None
        now = self._reactor.seconds()
        point_of_no_return = record.point_of_no_return or outcome.point_of_no_return
        progress = progress_json(active.progress) if active.progress else record.progress
        if record.route is None and outcome.details.get("route") in {r.value for r in Route}:
            record = replace(record, route=Route(outcome.details["route"]))
        if record.state is JobState.INTERRUPTED and outcome.kind is OutcomeKind.ABORTED:
            # The daemon's shutdown stopped it: it stays interrupted (and resumable). A job that
            # reached its own end before the STOP took effect is finished with that outcome.
            final = replace(
                record, outcome=outcome, phase=outcome.phase, point_of_no_return=point_of_no_return, finished=now
            )
            final = replace(
                final,
                progress=progress,
                # The engine knows more when the whole image went out before it stopped.
                advice=outcome.advice
                if outcome.advice == ADVICE_UPLOAD_UNSETTLED
                else interrupted_advice(final, active.engine is not None),
            )
            note = f"interrupted: {outcome.kind.value}"
        else:
            final = replace(
                record,
                state=JobState.FINISHED,
                outcome=outcome,
                phase=outcome.phase,
                point_of_no_return=point_of_no_return,
                finished=now,
                progress=progress,
                message=outcome.message,
                advice=outcome.advice,
            )
            note = f"finished: {outcome.kind.value}"
        active.record = final
        try:
            await self._order.after(self._journal.save(final, note))
        except JournalError as e:
            # The journal keeps the job as active (a restart marks it interrupted); in memory it
            # ends, so its device is free and its waiters hear of it.
            log.error(
                "job {job} on {device}: can't record its end: {error}", job=record.id, device=record.device, error=e
            )
        self._active.pop(record.id, None)
        if self._by_device.get(record.device) == record.id:
            del self._by_device[record.device]
        self._registry.idle(record.device, record.id, outcome)
        log.info(
            "job {job} on {device}: {state} with outcome {kind}: {message}",
            job=record.id,
            device=record.device,
            state=final.state.value,
            kind=outcome.kind.value,
            message=outcome.message,
        )
        if not active.final_published:
            active.final_published = True
            self._events.publish(self._outcome_event(final))
        for waiter in active.waiters:
            waiter.callback(final)
        if not self._stopping:
            self._start_waiting()
        return final

    # ----- shutdown

    def shutdown(self, reason: str = "the daemon is shutting down") -> Deferred[None]:
        """Refuse new jobs, let the commands already accepted finish, record every queued and running
        job as interrupted (before acting), cancel the running ones (the engine sends STOP) and fire
        when they have all ended, or after ``shutdown_grace`` seconds. Every job that was active gets a
        final ``outcome`` event, also one that did not stop in time."""
        self._stopping = True
        return Deferred.fromCoroutine(self._shutdown(reason))

    async def _shutdown(self, reason: str) -> None:
        await self._settle()
        pending: list[Deferred[JobRecord]] = []
        for active in list(self._active.values()):
            record = active.record
            started = active.engine is not None
            interrupted = replace(
                record,
                state=JobState.INTERRUPTED,
                message=reason,
                advice=interrupted_advice(record, started),
            )
            if not started:
                interrupted = replace(interrupted, finished=self._reactor.seconds())
            active.record = interrupted
            written = self._journal.save(interrupted, f"interrupted: {reason}")
            if not started:
                # Queued, or never got as far as its engine: it ends now.
                if active.record.id in self._waiting:
                    self._waiting.remove(active.record.id)
                active.stage = Stage.ENDING
                self._spawn(self._interrupt_unstarted(active, written), "interrupting", record.id)
                continue
            log.info("job {job} on {device}: stopping ({reason})", job=record.id, device=record.device, reason=reason)
            d: Deferred[JobRecord] = Deferred()
            active.waiters.append(d)
            pending.append(d)
            step = self._order.after(written)
            step.addErrback(self._write_failed, self._state_event(interrupted))
            engine = active.engine
            assert engine is not None
            step.addCallback(self._stop_engine, engine, reason)
        await self._settle()
        if not pending:
            return
        done = DeferredList(pending, consumeErrors=True)
        done.addTimeout(self._config.shutdown_grace, self._reactor)
        await done  # a timeout cancels the waits: the list then fires with their failures
        left = [active for active in self._active.values() if active.engine is not None]
        if left:
            log.warn(
                "{count} job(s) did not stop within {grace} s; the journal has them as interrupted",
                count=len(left),
                grace=self._config.shutdown_grace,
            )
        for active in left:
            if not active.final_published:  # the streams hear of its end before the daemon goes
                active.final_published = True
                self._events.publish(self._outcome_event(active.record))

    @staticmethod
    def _stop_engine(_: object, engine: EngineJob, reason: str) -> None:
        engine.cancel(reason)

    async def _interrupt_unstarted(self, active: ActiveJob, written: Deferred[Any]) -> None:
        record = active.record
        try:
            await self._order.after(written)
        except JournalError as e:
            log.error("job {job}: can't record it as interrupted: {error}", job=record.id, error=e)
        self._active.pop(record.id, None)
        self._by_device.pop(record.device, None)
        self._registry.idle(record.device, record.id, None)
        active.final_published = True
        self._events.publish(self._outcome_event(record))
        for waiter in active.waiters:
            waiter.callback(record)
