"""``JobQueue``: the daemon's jobs. Per-device exclusion, ``max_parallel`` with a visible FIFO queue,
start / cancel / resume, and fan-out of every job event to any number of subscribers.

Each change is written to the :class:`JobJournal` before it is acted on. The engine job is made by an
injectable ``job_factory`` (``UpgradeJob`` in the daemon, a fake driven by a ``Clock`` in tests).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.daemon.config import TIMEOUT_KEYS, ConfigError, DaemonConfig, check_timeout, split_settings
from netota_daemon.daemon.firmware_store import FirmwareRefused, FirmwareStore
from netota_daemon.daemon.journal import JobJournal, JobRecord, JobState, JournalError, interrupted_advice
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.engine.events import EventPublisher, Finished, JobEvent, PhaseChanged, Progress
from netota_daemon.engine.outcome import (
    FailureClass,
    Outcome,
    OutcomeKind,
    Phase,
    recovery_advice,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage

log = Logger()

#: Seconds between two published progress events of one job (subscribers: the event streams).
PROGRESS_INTERVAL = 0.1

#: Every published event is a JSON-ready dict with at least ``type``, ``job`` and ``device``.
QueueEvent = dict[str, Any]
QueueSubscriber = Callable[[QueueEvent], None]


class EngineJob(Protocol):
    """What the queue needs of an engine job (``netota_daemon.engine.job.UpgradeJob``)."""

    events: EventPublisher
    phase: Phase
    point_of_no_return: bool

    def run(self) -> Deferred: ...

    def cancel(self, reason: str = ...) -> None: ...


JobFactory = Callable[..., EngineJob]


class JobError(Exception):
    """A request the queue refuses; ``status`` and ``code`` become the control API's answer."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownDevice(JobError):
    status, code = 404, "unknown_device"


class UnknownJob(JobError):
    status, code = 404, "unknown_job"


class DeviceBusy(JobError):
    status, code = 409, "busy"


class JobNotActive(JobError):
    status, code = 409, "not_active"


class NotResumable(JobError):
    status, code = 409, "not_resumable"


class ShuttingDown(JobError):
    status, code = 503, "shutting_down"


class BadOptions(JobError):
    status, code = 400, "bad_options"


class FirmwareNotAllowed(JobError):
    """A firmware name that leaves firmware_dir."""

    status, code = 403, "firmware_outside"


class FirmwareNotFound(JobError):
    status, code = 404, "firmware_not_found"


class FirmwareInvalid(JobError):
    status, code = 400, "firmware_invalid"


def _firmware_error(e: FirmwareRefused) -> JobError:
    return {"outside": FirmwareNotAllowed, "not_found": FirmwareNotFound}.get(e.reason, FirmwareInvalid)(e.message)


def _progress_json(progress: Progress) -> dict[str, Any]:
    data = progress.to_json()
    del data["type"]
    return data


def default_job_factory(*args: Any, **kwargs: Any) -> EngineJob:
    from netota_daemon.engine.job import UpgradeJob  # imported late: the engine is optional in unit tests

    return UpgradeJob(*args, **kwargs)


@dataclass
class ActiveJob:
    """A queued or running job, in memory."""

    record: JobRecord
    image: FirmwareImage
    target: DeviceTarget
    timeouts: UpgradeTimeouts
    behaviour: UpgradeBehaviour = field(default_factory=UpgradeBehaviour)
    verify_only: bool = False  # resumes a job whose phase 2 completed: only read the version back
    engine: EngineJob | None = None
    done: Deferred | None = None  # fires (with the record) when the job left the queue for good
    progress: Progress | None = None  # the latest, shown on the job and its device
    progress_published: tuple[float, Phase, bool] | None = None  # when, in which phase, past no return
    unsubscribe: Callable[[], None] | None = None
    shutdown: bool = False
    waiters: list[Deferred] = field(default_factory=list)


class JobQueue:
    def __init__(
        self,
        reactor: Any,
        config: DaemonConfig,
        journal: JobJournal,
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
        self._by_device: dict[str, str] = {}
        self._events: EventPublisher[QueueEvent] = EventPublisher()
        self._stopping = False
        self.max_parallel = config.max_parallel

    # ----- queries

    def running_count(self) -> int:
        return sum(1 for a in self._active.values() if a.engine is not None)

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
        data["progress"] = _progress_json(active.progress) if active and active.progress else None
        return data

    def get(self, job_id: str) -> dict[str, Any]:
        active = self._active.get(job_id)
        record = active.record if active else self._journal.get(job_id)
        if record is None:
            raise UnknownJob(f"no job {job_id!r}")
        data = self.job_json(record)
        data["history"] = self._journal.history(job_id)
        return data

    def active_jobs(self) -> list[dict[str, Any]]:
        """The queued, running and cancelling jobs, oldest first (without reading the history)."""
        return [self.job_json(active.record) for active in self._active.values()]

    def is_active(self, job_id: str) -> bool:
        return job_id in self._active

    def jobs(self, device: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        if device is not None and device not in self._registry:
            raise UnknownDevice(f"no device {device!r} in the configuration")
        out = []
        for record in self._journal.jobs(device=device, limit=limit):
            active = self._active.get(record.id)
            out.append(self.job_json(active.record if active else record))
        return out

    # ----- events

    def subscribe(self, subscriber: QueueSubscriber) -> Callable[[], None]:
        """Call ``subscriber`` with every event of every job; returns the unsubscribe function."""
        return self._events.subscribe(subscriber)

    def _publish(self, event: QueueEvent) -> None:
        self._events.publish(event)

    def _publish_state(self, record: JobRecord) -> None:
        self._publish(
            {
                "type": "state",
                "job": record.id,
                "device": record.device,
                "state": record.state.value,
                "phase": record.phase.value,
                "position": self.position(record.id),
            }
        )

    # ----- commands

    def _check_options(self, options: Any) -> dict[str, Any]:
        """The engine timeouts a client overrides for one job, checked as the config file's are."""
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

    def start(
        self,
        device: str,
        firmware: str,
        options: Any = None,
        resumed_from: str | None = None,
        verify_only: bool = False,
    ) -> dict[str, Any]:
        """Accept a job for ``device``: it runs now, or waits for a slot. Raises a :class:`JobError`."""
        if self._stopping:
            raise ShuttingDown("the daemon is shutting down")
        if not isinstance(device, str) or device not in self._registry:
            raise UnknownDevice(
                f"no device {device!r} in the configuration (known: {', '.join(self._registry.names()) or 'none'})"
            )
        busy = self._by_device.get(device)
        if busy is not None:
            raise DeviceBusy(f"device {device} is busy with job {busy} ({self._active[busy].record.state.value})")
        checked = self._check_options(options)
        try:
            image = self._firmware.open(firmware)
        except FirmwareRefused as e:
            raise _firmware_error(e) from None
        device_config = self._registry.get(device).config
        timeouts, behaviour = split_settings(checked, device_config.timeouts, device_config.behaviour)
        record = JobRecord(
            id=uuid.uuid4().hex[:12],
            device=device,
            firmware=firmware,
            created=self._reactor.seconds(),
            resumed_from=resumed_from,
            options=checked,
        )
        self._journal.create(record, note=f"created (resumes {resumed_from})" if resumed_from else "created")
        active = ActiveJob(
            record=record,
            image=image,
            target=device_config.target,
            timeouts=timeouts,
            behaviour=behaviour,
            verify_only=verify_only,
        )
        self._active[record.id] = active
        self._by_device[device] = record.id
        self._waiting.append(record.id)
        log.info(
            "job {job} on {device}: accepted, firmware {firmware} ({size} bytes)",
            job=record.id,
            device=device,
            firmware=firmware,
            size=image.size,
        )
        self._registry.queued(device, record.id, self.position(record.id) or 0)
        self._publish_state(record)
        self._start_waiting()
        return self.job_json(active.record)

    def resume(self, job_id: str) -> dict[str, Any]:
        """A new job for the same device and firmware as an interrupted, failed or aborted one; the
        engine sees where the device is (in its loader: straight to phase 2). A job that ended after
        phase 2 completed (in verify) is resumed as a check only: the new firmware's version is read
        back, nothing is flashed again."""
        if job_id in self._active:
            raise NotResumable(f"job {job_id} is still {self._active[job_id].record.state.value}")
        record = self._journal.get(job_id)
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
        verify_only = record.phase in (Phase.VERIFY, Phase.DONE)
        started = self.start(
            record.device, record.firmware, record.options, resumed_from=job_id, verify_only=verify_only
        )
        self._journal.update(job_id, note=f"resumed by {started['id']}", resumed_by=started["id"])
        return started

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> dict[str, Any]:
        """Cancel a queued job (it ends aborted, the device untouched) or a running one (the engine
        sends STOP; the outcome follows). A finished job is refused."""
        active = self._active.get(job_id)
        if active is None:
            record = self._journal.get(job_id)
            if record is None:
                raise UnknownJob(f"no job {job_id!r}")
            result = record.outcome.kind.value if record.outcome else record.state.value
            raise JobNotActive(f"job {job_id} already ended ({result}): nothing to cancel")
        record = active.record
        if active.engine is None:
            self._waiting.remove(job_id)
            outcome = Outcome(
                kind=OutcomeKind.ABORTED,
                message=f"{reason} before it started",
                phase=Phase.DETECT,
                advice="The job never started, so the device was not touched.",
            )
            self._finish(active, outcome)
            self._publish_positions()
            return self.job_json(active.record)
        if record.state in (JobState.CANCELLING, JobState.INTERRUPTED):
            return self.job_json(record)  # already being stopped (INTERRUPTED: by the daemon's shutdown)
        active.record = self._journal.save(replace(record, state=JobState.CANCELLING), f"cancel: {reason}")
        log.info("job {job} on {device}: cancelling ({reason})", job=job_id, device=record.device, reason=reason)
        self._publish_state(active.record)
        active.engine.cancel(reason)
        return self.job_json(active.record)

    def wait(self, job_id: str) -> Deferred:
        """A Deferred that fires with the job's final record when it leaves the queue."""
        active = self._active.get(job_id)
        if active is None:
            record = self._journal.get(job_id)
            if record is None:
                raise UnknownJob(f"no job {job_id!r}")
            return succeed(record)
        d: Deferred = Deferred()
        active.waiters.append(d)
        return d

    # ----- running

    def _start_waiting(self) -> None:
        while self._waiting and self.running_count() < self.max_parallel and not self._stopping:
            job_id = self._waiting.popleft()
            self._run(self._active[job_id])
            self._publish_positions()

    def _publish_positions(self) -> None:
        for position, job_id in enumerate(self._waiting, start=1):
            active = self._active[job_id]
            self._registry.queued(active.record.device, job_id, position)
            self._publish_state(active.record)

    def _run(self, active: ActiveJob) -> None:
        record = replace(active.record, state=JobState.RUNNING, started=self._reactor.seconds())
        try:
            active.record = self._journal.save(record, "running")
        except JournalError as e:
            # Not journaled, so not acted on: the job ends without touching the device.
            log.failure("job {job} on {device}: can't record it as running", job=record.id, device=record.device)
            self._finish(
                active,
                Outcome(
                    kind=OutcomeKind.FAILED,
                    message=f"not started: {e}",
                    phase=Phase.DETECT,
                    advice="The job never started, so the device was not touched.",
                ),
            )
            return
        self._registry.running(record.device, record.id)
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
            self._finish(
                active,
                Outcome(
                    kind=OutcomeKind.FAILED,
                    message=f"internal error: {e}",
                    phase=Phase.DETECT,
                    failure=FailureClass.PROTOCOL_ERROR,
                    advice="The device was not touched.",
                ),
            )
            return
        active.engine = engine
        active.unsubscribe = engine.events.subscribe(lambda event: self._on_engine_event(active, event))
        log.info("job {job} on {device}: running", job=record.id, device=record.device)
        self._publish_state(active.record)
        d = maybeDeferred(engine.run)  # an engine that raises at once still ends the job (and frees the device)
        d.addErrback(self._engine_failed, active)
        d.addCallback(lambda outcome: self._finish(active, outcome))
        d.addErrback(lambda f: log.failure("job {job}: finishing failed", f, job=record.id))

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
            advice=recovery_advice(point_of_no_return, phase),
        )

    def _on_engine_event(self, active: ActiveJob, event: JobEvent) -> None:
        record = active.record
        base = {"job": record.id, "device": record.device}
        if isinstance(event, PhaseChanged):
            if event.phase is not record.phase:
                active.record = self._journal.save(replace(record, phase=event.phase), f"phase {event.phase.value}")
            active.progress = None
            self._registry.phase(record.device, event.phase)
            log.info(
                "job {job} on {device}: phase {phase} {message}",
                job=record.id,
                device=record.device,
                phase=event.phase.value,
                message=event.message,
            )
            self._publish({**event.to_json(), **base})
        elif isinstance(event, Progress):
            if event.point_of_no_return and not record.point_of_no_return:
                active.record = self._journal.save(
                    replace(record, point_of_no_return=True, phase=event.phase), "point of no return"
                )
                log.warn("job {job} on {device}: point of no return reached", job=record.id, device=record.device)
            elif event.phase is not record.phase:
                active.record = self._journal.save(replace(record, phase=event.phase), f"phase {event.phase.value}")
            active.progress = event
            self._registry.progress(record.device, event)
            if self._progress_due(active, event):
                self._publish({**event.to_json(), **base})
        elif isinstance(event, Finished):
            pass  # the run() Deferred carries the same outcome; _finish publishes it once

    def _progress_due(self, active: ActiveJob, event: Progress) -> bool:
        """Publish at most one progress event per job every PROGRESS_INTERVAL seconds (a fast stream
        makes thousands), but always the first of a phase, the one passing the point of no return,
        and 100 %."""
        now = self._reactor.seconds()
        last = active.progress_published
        due = (
            last is None
            or now - last[0] >= PROGRESS_INTERVAL
            or last[1] is not event.phase
            or last[2] != event.point_of_no_return
            or event.percent >= 100.0
        )
        if due:
            active.progress_published = (now, event.phase, event.point_of_no_return)
        return due

    def _finish(self, active: ActiveJob, outcome: Outcome) -> None:
        record = active.record
        if active.unsubscribe is not None:
            active.unsubscribe()
        now = self._reactor.seconds()
        if record.state is JobState.INTERRUPTED and outcome.kind is OutcomeKind.ABORTED:
            # The daemon's shutdown stopped it: it stays interrupted (and resumable). A job that
            # reached its own end before the STOP took effect is finished with that outcome.
            final = replace(
                record,
                outcome=outcome,
                phase=outcome.phase,
                point_of_no_return=record.point_of_no_return or outcome.point_of_no_return,
                finished=now,
                advice=interrupted_advice(
                    outcome.phase, record.point_of_no_return or outcome.point_of_no_return, record.started is not None
                ),
            )
            note = f"interrupted: {outcome.kind.value}"
        else:
            final = replace(
                record,
                state=JobState.FINISHED,
                outcome=outcome,
                phase=outcome.phase,
                point_of_no_return=record.point_of_no_return or outcome.point_of_no_return,
                finished=now,
                message=outcome.message,
                advice=outcome.advice,
            )
            note = f"finished: {outcome.kind.value}"
        try:
            active.record = self._journal.save(final, note)
        except JournalError:
            # The journal keeps the job as active (a restart marks it interrupted); in memory it
            # ends, so its device is free and its waiters hear of it.
            log.failure("job {job} on {device}: can't record its end", job=record.id, device=record.device)
            active.record = final
        del self._active[record.id]
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
        self._publish(
            {
                "type": "outcome",
                "job": record.id,
                "device": record.device,
                "state": final.state.value,
                "outcome": outcome.to_json(),
                "advice": final.advice,
            }
        )
        for waiter in active.waiters:
            waiter.callback(final)
        if not self._stopping:
            self._start_waiting()

    # ----- shutdown

    def shutdown(self, reason: str = "the daemon is shutting down") -> Deferred:
        """Refuse new jobs, record every queued and running job as interrupted (before acting), cancel
        the running ones (the engine sends STOP) and fire when they have all ended, or after
        ``shutdown_grace`` seconds."""
        self._stopping = True
        pending = []
        for job_id in list(self._waiting):
            active = self._active[job_id]
            active.record = self._journal.save(
                replace(
                    active.record,
                    state=JobState.INTERRUPTED,
                    finished=self._reactor.seconds(),
                    message=reason,
                    advice=interrupted_advice(active.record.phase, False, False),
                ),
                f"interrupted: {reason}",
            )
            self._waiting.remove(job_id)
            del self._active[job_id]
            self._by_device.pop(active.record.device, None)
            self._registry.idle(active.record.device, job_id, None)
            self._publish(
                {
                    "type": "outcome",
                    "job": job_id,
                    "device": active.record.device,
                    "state": JobState.INTERRUPTED.value,
                    "outcome": None,
                    "advice": active.record.advice,
                }
            )
            for waiter in active.waiters:
                waiter.callback(active.record)
        for active in list(self._active.values()):
            record = active.record
            active.record = self._journal.save(
                replace(
                    record,
                    state=JobState.INTERRUPTED,
                    message=reason,
                    advice=interrupted_advice(record.phase, record.point_of_no_return, True),
                ),
                f"interrupted: {reason}",
            )
            log.info("job {job} on {device}: stopping ({reason})", job=record.id, device=record.device, reason=reason)
            d: Deferred = Deferred()
            active.waiters.append(d)
            pending.append(d)
            if active.engine is not None:
                active.engine.cancel(reason)
        if not pending:
            return succeed(None)
        done = DeferredList(pending, consumeErrors=True)
        done.addTimeout(self._config.shutdown_grace, self._reactor)

        def timed_out(failure: Failure) -> None:
            log.warn(
                "{count} job(s) did not stop within {grace} s; the journal has them as interrupted",
                count=len(self._active),
                grace=self._config.shutdown_grace,
            )

        done.addCallbacks(lambda _: None, timed_out)
        return done
