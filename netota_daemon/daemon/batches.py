"""``BatchManager``: batches as durable objects. It turns a request into a :class:`Batch`, journals it,
carries out its :class:`~netota_daemon.daemon.batch_policy.BatchPolicy`'s decisions through the job
queue and the prober, follows each member's job to its end, and carries every unfinished batch on
after a daemon restart.

- **Journal before acting**: every decision of a batch's policy is saved (:mod:`batch_store`) before
  its actions are carried out or its events published. A start decided but not made when the daemon
  died is found again at start-up (the device's job that names the batch), or made again.
- **A save that fails** (a full disk) is logged and its actions are not carried out; the batch starts
  nothing more (:meth:`BatchPolicy.halt`), so what it had not started is free at once and what runs
  is free when its job ends. The request that made the decision (a cancel) is refused
  (``journal_unavailable``). The state is saved again with the batch's next decision, and before any
  new batch is journaled (a new batch is refused while an older one's state can't be), so the
  journal never holds two unfinished batches that claim one device.
- **Every member's job is followed to its end**: if the daemon can't learn that end (the wait for it
  fails), the member fails with a message that says so (:meth:`BatchPolicy.job_lost`). A pre-flight
  probe or a start that fails by a bug refuses the members it was for: no member waits forever.
- **What it needs** of the rest of the daemon is narrow (:class:`BatchQueue`, :class:`BatchProber`,
  and a few callables), so it is tested on a ``Clock`` with fakes.
- **Bounds**: a device belongs to at most one unfinished batch, so unfinished batches (the only ones
  kept in memory) are bounded by the configuration; ended ones are read from the store by page.
- **The image** is inspected off the reactor (``inspect``: its SHA-256 and kind) when the batch is
  created and again before each member's job starts: a firmware file that changed under a batch
  stops it (the canaries tested the image it had).
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.daemon.batch_policy import (
    IMAGE_KINDS,
    Action,
    BatchPolicy,
    Cancel,
    EarlierJob,
    Finish,
    MemberOutcome,
    MemberProbe,
    PolicyError,
    Probe,
    Reason,
    Resume,
    RolloutPolicy,
    Start,
    TargetVersion,
    target_version_from_jobs,
)
from netota_daemon.daemon.batch_store import AsyncBatchStore, BatchRow
from netota_daemon.daemon.image_facts import FirmwareProblem, ImageFacts
from netota_daemon.daemon.jobs import BadOptions
from netota_daemon.daemon.jobs import check_options as check_job_options
from netota_daemon.daemon.journal import JournalError
from netota_daemon.daemon.probe import ProbeResult
from netota_daemon.engine.events import EventPublisher

log = Logger()

BATCH_FIELDS = {"firmware", "devices", "all", "tag", "policy", "target_version", "options"}
CANCEL_REASON = "batch cancelled"

BatchEvent = dict[str, Any]


class BatchRefusal(str, enum.Enum):
    """Why a batch request is refused; ``control/`` maps each to an HTTP status."""

    BAD_FIELD = "bad_field"
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_QUERY = "bad_query"
    BAD_POLICY = "bad_policy"
    BAD_OPTIONS = "bad_options"
    UNKNOWN_DEVICE = "unknown_device"
    UNKNOWN_TAG = "unknown_tag"
    BUSY = "busy"  # a device already belongs to an unfinished batch
    FIRMWARE_OUTSIDE = "firmware_outside"
    FIRMWARE_NOT_FOUND = "firmware_not_found"
    FIRMWARE_INVALID = "firmware_invalid"
    UNKNOWN_BATCH = "unknown_batch"
    NOT_ACTIVE = "not_active"
    SHUTTING_DOWN = "shutting_down"
    JOURNAL_UNAVAILABLE = "journal_unavailable"


class BatchError(Exception):
    """A batch request the daemon refuses."""

    def __init__(self, kind: BatchRefusal, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def code(self) -> str:
        return self.kind.value


class QueueRefused(Exception):
    """What :class:`BatchQueue` raises for a job it refuses (the queue's own errors are adapted)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class BatchQueue(Protocol):
    """What a batch needs of the job queue. Every call answers with a Deferred; a refusal is a
    :class:`QueueRefused` failure. Jobs are their JSON (as ``GET /v1/jobs/ID`` shows them)."""

    @property
    def max_parallel(self) -> int: ...

    def start(
        self, device: str, firmware: str, options: dict[str, Any] | None, batch: str
    ) -> Deferred[dict[str, Any]]: ...

    def resume(self, job_id: str, batch: str | None = None) -> Deferred[dict[str, Any]]: ...

    def cancel(self, job_id: str, reason: str) -> Deferred[dict[str, Any]]: ...

    def wait(self, job_id: str) -> Deferred[dict[str, Any]]:
        """Fires with the job once it left the queue (finished, or interrupted by a shutdown)."""
        ...

    def get(self, job_id: str) -> Deferred[dict[str, Any] | None]: ...

    def batch_job(self, batch_id: str, device: str) -> Deferred[dict[str, Any] | None]:
        """The device's newest job started for ``batch_id``, or None."""
        ...

    def earlier_jobs(self, image_sha256: str) -> Deferred[list[EarlierJob]]:
        """Jobs that flashed this image, newest first (bounded)."""
        ...


class BatchProber(Protocol):
    def probe(self, names: Iterable[str]) -> Awaitable[Mapping[str, ProbeResult]]:
        """Each device's probe result (``ok``, ``mode``, ``firmware_version``, ``error``, ``busy_job``)."""
        ...


@dataclass
class Batch:
    """One batch: what was asked, and its policy's state."""

    id: str
    created: float
    firmware: str
    image: ImageFacts
    selection: dict[str, Any]  # {"devices": [...]} | {"all": true} | {"tag": "T"}
    options: dict[str, Any]
    policy: BatchPolicy
    journal_error: str | None = None  # the last save that failed: the batch starts nothing more
    unsaved_since: int | None = None  # the save count when a save failed, until one begun later succeeds
    _published: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        state = self.policy.to_json()
        summary = state.pop("summary")
        state.pop("canaries_chosen", None)
        state.pop("daemon_max_parallel", None)
        return {
            "id": self.id,
            "created": self.created,
            "firmware": self.firmware,
            "image": self.image.to_json(),
            "selection": dict(self.selection),
            "options": dict(self.options),
            **state,
            "result": summary["result"],
            "counts": summary["counts"],
            "duration": summary["duration"],
            "jobs": [job for m in self.policy.members.values() for job in m.jobs],
            "journal_error": self.journal_error,
        }

    def summary_json(self) -> dict[str, Any]:
        """The batch without its members (listings)."""
        data = self.to_json()
        data.pop("members")
        data.pop("jobs")
        return data

    def to_record(self) -> dict[str, Any]:
        return {
            "firmware": self.firmware,
            "image": self.image.to_json(),
            "selection": self.selection,
            "options": self.options,
            "policy": self.policy.to_json(),
        }

    @classmethod
    def from_row(cls, row: BatchRow, daemon_max_parallel: int | None = None) -> Batch:
        data = row.data
        image = data["image"]
        return cls(
            id=row.id,
            created=row.created,
            firmware=str(data["firmware"]),
            image=ImageFacts(str(image["sha256"]), str(image["kind"]), int(image["size"])),
            selection=dict(data.get("selection") or {}),
            options=dict(data.get("options") or {}),
            policy=BatchPolicy.from_json(data["policy"], daemon_max_parallel),
        )


def member_outcome(job: Mapping[str, Any]) -> MemberOutcome:
    outcome = job.get("outcome") or {}
    return MemberOutcome(
        kind=str(outcome.get("kind") or "failed"),
        message=str(outcome.get("message") or job.get("message") or ""),
        failure=outcome.get("failure"),
        advice=str(outcome.get("advice") or job.get("advice") or ""),
        phase=outcome.get("phase") or job.get("phase"),
        firmware_version_after=outcome.get("firmware_version_after"),
    )


def check_options(options: Any) -> dict[str, Any]:
    """The engine timeouts a batch passes to each member's job, checked as a job's own options are."""
    try:
        return check_job_options(options)
    except BadOptions as e:
        raise BatchError(BatchRefusal.BAD_OPTIONS, e.message) from None


def _error_text(error: BaseException) -> str:
    return str(getattr(error, "message", None) or error) or type(error).__name__


_FIRMWARE_REFUSALS = {
    "outside": BatchRefusal.FIRMWARE_OUTSIDE,
    "not_found": BatchRefusal.FIRMWARE_NOT_FOUND,
}


class BatchManager:
    """See the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        queue: BatchQueue,
        prober: BatchProber,
        store: AsyncBatchStore,
        devices: Sequence[str],
        inspect: Callable[[str], Awaitable[ImageFacts]],
        busy: Callable[[str], str | None],
        known_version: Callable[[str], str | None],
        device_tags: Mapping[str, Sequence[str]] | None = None,
        new_id: Callable[[], str] = lambda: uuid.uuid4().hex[:12],
    ) -> None:
        self.clock = clock
        self.queue = queue
        self.prober = prober
        self.store = store
        self.devices = list(devices)
        self.device_tags = {d: list(t) for d, t in (device_tags or {}).items()}
        self.inspect = inspect
        self.busy = busy
        self.known_version = known_version
        self.new_id = new_id
        self.batches: dict[str, Batch] = {}  # the unfinished ones
        # Batches whose latest state is not in the journal (a save failed), ended or not: saved again
        # before any new batch is journaled, so they are never more than were unfinished at once.
        self._unsaved: dict[str, Batch] = {}
        self._saves = 0  # saves begun so far: a save clears a failure only if it began after it
        self.events: EventPublisher[BatchEvent] = EventPublisher()
        self.stopping = False
        self._tasks: set[Deferred[Any]] = set()
        self.recovered = False  # set once recover() carried on the unfinished batches
        self._ready_waiters: list[Deferred[None]] = []

    # ----- queries

    def subscribe(self, subscriber: Callable[[BatchEvent], None]) -> Callable[[], None]:
        return self.events.subscribe(subscriber)

    def batch_of_job(self, job_id: str) -> str | None:
        """The unfinished batch a job belongs to (finished ones: the job's own ``batch``)."""
        for batch in self.batches.values():
            if any(job_id in m.jobs for m in batch.policy.members.values()):
                return batch.id
        return None

    def job_ids(self, batch_id: str) -> set[str]:
        """Every job of an unfinished batch's members (empty for an ended or unknown batch)."""
        batch = self.batches.get(batch_id)
        if batch is None:
            return set()
        return {job for m in batch.policy.members.values() for job in m.jobs}

    def is_active(self, batch_id: str) -> bool:
        return batch_id in self.batches

    def batch_of_device(self, device: str) -> str | None:
        for batch in self.batches.values():
            member = batch.policy.members.get(device)
            if member is not None and not member.ended:
                return batch.id
        return None

    def _in_memory(self, batch_id: str) -> Batch | None:
        """An unfinished batch, or an ended one whose end is not journaled yet."""
        return self.batches.get(batch_id) or self._unsaved.get(batch_id)

    async def get(self, batch_id: str) -> dict[str, Any]:
        batch = self._in_memory(batch_id) if isinstance(batch_id, str) else None
        if batch is not None:
            return batch.to_json()
        row = await self.store.get(batch_id) if isinstance(batch_id, str) else None
        if row is None:
            raise BatchError(BatchRefusal.UNKNOWN_BATCH, f"no batch {batch_id!r}")
        return Batch.from_row(row).to_json()

    async def page(self, limit: int, cursor: str | None = None) -> dict[str, Any]:
        try:
            found = await self.store.page(limit, cursor)
        except ValueError as e:
            raise BatchError(BatchRefusal.BAD_QUERY, str(e)) from None
        batches = []
        for row in found.rows:
            live = self._in_memory(row.id)
            batches.append((live or Batch.from_row(row)).summary_json())
        return {"batches": batches, "next_cursor": found.next_cursor}

    # ----- commands

    def _select(self, body: Mapping[str, Any]) -> tuple[list[str], dict[str, Any]]:
        given = [key for key in ("devices", "all", "tag") if key in body]
        if len(given) != 1:
            raise BatchError(
                BatchRefusal.MISSING_FIELD if not given else BatchRefusal.BAD_FIELD,
                "give exactly one of devices (a list of names), all (true) or tag (a name)",
            )
        if "devices" in body:
            names = body["devices"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise BatchError(BatchRefusal.BAD_FIELD, "devices must be a non-empty list of device names")
            names = list(dict.fromkeys(names))
            unknown = [n for n in names if n not in self.devices]
            if unknown:
                raise BatchError(
                    BatchRefusal.UNKNOWN_DEVICE,
                    f"no such device(s) {', '.join(unknown)} (known: {', '.join(self.devices) or 'none'})",
                )
            return names, {"devices": names}
        if "all" in body:
            if body["all"] is not True:
                raise BatchError(BatchRefusal.BAD_FIELD, "all must be true (or leave it out)")
            if not self.devices:
                raise BatchError(BatchRefusal.UNKNOWN_DEVICE, "the daemon has no devices configured")
            return list(self.devices), {"all": True}
        tag = body["tag"]
        if not isinstance(tag, str) or not tag:
            raise BatchError(BatchRefusal.BAD_FIELD, "tag must be a non-empty string")
        names = [d for d in self.devices if tag in self.device_tags.get(d, ())]
        if not names:
            known = sorted({t for tags in self.device_tags.values() for t in tags})
            raise BatchError(
                BatchRefusal.UNKNOWN_TAG,
                f"no device has the tag {tag!r} (tags in the configuration: {', '.join(known) or 'none'})",
            )
        return names, {"tag": tag}

    async def create(self, body: Any) -> dict[str, Any]:
        """Accept a batch (``POST /v1/batches``): check everything, journal it, then start it. Raises
        :class:`BatchError`; nothing is journaled or started for a refused request."""
        if self.stopping:
            raise BatchError(BatchRefusal.SHUTTING_DOWN, "the daemon is shutting down")
        if not self.recovered:  # the unfinished batches' devices are not known yet
            waiter: Deferred[None] = Deferred()
            self._ready_waiters.append(waiter)
            await waiter
        if not isinstance(body, dict):
            raise BatchError(BatchRefusal.BAD_FIELD, "the request body must be a JSON object")
        unknown = sorted(set(body) - BATCH_FIELDS)
        if unknown:
            raise BatchError(
                BatchRefusal.UNKNOWN_FIELD,
                f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(BATCH_FIELDS))})",
            )
        firmware = body.get("firmware")
        if firmware is None:
            raise BatchError(BatchRefusal.MISSING_FIELD, "missing field firmware")
        if not isinstance(firmware, str):
            raise BatchError(BatchRefusal.BAD_FIELD, "firmware must be a string")
        devices, selection = self._select(body)
        try:
            rollout = RolloutPolicy.from_json(body.get("policy"), self.queue.max_parallel)
        except PolicyError as e:
            raise BatchError(BatchRefusal.BAD_POLICY, str(e)) from None
        target_version = body.get("target_version")
        if target_version is not None and (not isinstance(target_version, str) or not target_version.strip()):
            raise BatchError(BatchRefusal.BAD_FIELD, "target_version must be a non-empty string")
        options = check_options(body.get("options"))
        self._refuse_taken(devices)
        image = await self._inspect(firmware)
        target = TargetVersion(target_version.strip()) if target_version else None
        if target is None and rollout.skip_current:
            target = target_version_from_jobs(image.sha256, await self.queue.earlier_jobs(image.sha256))
        await self._save_unsaved()
        if self.stopping:
            raise BatchError(BatchRefusal.SHUTTING_DOWN, "the daemon is shutting down")
        self._refuse_taken(devices)  # another request may have taken one meanwhile: nothing waits from here on
        policy = BatchPolicy(
            devices,
            rollout,
            image.kind if image.kind in IMAGE_KINDS else "unknown",
            self.queue.max_parallel,
            target=target,
            known_versions={d: self.known_version(d) for d in devices},
        )
        batch = Batch(
            id=self.new_id(),
            created=self.clock.seconds(),
            firmware=firmware,
            image=image,
            selection=selection,
            options=options,
            policy=policy,
        )
        actions = policy.begin(batch.created)
        self.batches[batch.id] = batch  # its devices are taken from here on ...
        try:
            row = BatchRow(batch.id, batch.created, firmware, policy.state.value, batch.to_record())
            await self.store.create(row)
        except Exception as e:
            del self.batches[batch.id]  # ... and free again: nothing was journaled or started
            self._log_save_failed(batch, e, "it is refused")
            raise BatchError(
                BatchRefusal.JOURNAL_UNAVAILABLE, f"the batch can't be journaled: {_error_text(e)}"
            ) from None
        log.info(
            "batch {batch}: {count} device(s) with firmware {firmware} ({kind}), policy {policy}",
            batch=batch.id,
            count=len(devices),
            firmware=firmware,
            kind=image.kind,
            policy=rollout.to_json(),
        )
        self._publish_changes(batch, created=True)
        self._carry_out(batch, actions)
        return batch.to_json()

    def _refuse_taken(self, devices: Iterable[str]) -> None:
        taken = {d: b for d in devices if (b := self.batch_of_device(d))}
        if taken:
            raise BatchError(
                BatchRefusal.BUSY,
                "; ".join(f"device {d} belongs to the unfinished batch {b}" for d, b in taken.items()),
            )

    async def cancel(self, batch_id: str, reason: str = CANCEL_REASON) -> dict[str, Any]:
        batch = self.batches.get(batch_id)
        if batch is None:
            data = await self.get(batch_id)  # UNKNOWN_BATCH, or it ended
            raise BatchError(BatchRefusal.NOT_ACTIVE, f"batch {batch_id} already ended ({data['result']})")
        if self.stopping:
            raise BatchError(BatchRefusal.SHUTTING_DOWN, "the daemon is shutting down")
        log.info("batch {batch}: cancelling ({reason})", batch=batch_id, reason=reason)
        problem = await self._decide(batch, batch.policy.cancel(reason, self.clock.seconds()))
        if problem is not None:
            raise BatchError(
                BatchRefusal.JOURNAL_UNAVAILABLE,
                f"the cancel of batch {batch_id} can't be journaled ({problem}): the batch starts nothing more, "
                "but its running jobs were not stopped (netota cancel JOB stops one)",
            )
        return batch.to_json()

    # ----- carrying out decisions

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], batch: Batch, what: str) -> None:
        d = defer.ensureDeferred(coroutine)
        self._tasks.add(d)

        def done(result: Any) -> None:
            self._tasks.discard(d)
            if isinstance(result, Failure) and not isinstance(result.value, defer.CancelledError):
                log.failure("batch {batch}: {what} failed", result, batch=batch.id, what=what)

        d.addBoth(done)

    async def _decide(self, batch: Batch, actions: list[Action]) -> str | None:
        """Journal the batch's state (as it is now), then publish its changes and carry out ``actions``.
        If the state can't be journaled, none of ``actions`` is carried out and the batch is halted:
        the answer is then why (else None)."""
        published = dict(batch._published)
        events = self._changes(batch)
        problem = await self._save(batch)
        if problem is not None:
            batch._published = published  # those events did not go out: the halted state's will
            self._halt(batch, actions, problem)
            return problem
        for event in events:
            self.events.publish(event)
        self._carry_out(batch, actions)
        return None

    async def _save(self, batch: Batch) -> str | None:
        """Save the batch's state as it is now; None, or why it could not be saved."""
        self._saves += 1
        began, state, record = self._saves, batch.policy.state.value, batch.to_record()
        try:
            await self.store.save(batch.id, state, record)
        except Exception as e:
            batch.unsaved_since = self._saves  # a save already under way holds an older state
            self._unsaved[batch.id] = batch
            self._log_save_failed(batch, e, "it starts nothing more")
            return _error_text(e)
        if batch.unsaved_since is not None and began > batch.unsaved_since:
            batch.unsaved_since = None
            self._unsaved.pop(batch.id, None)
            log.info("batch {batch}: its state is journaled again", batch=batch.id)
        return None

    async def _save_unsaved(self) -> None:
        """Before a new batch is journaled: every state that could not be, or a refusal."""
        for batch in list(self._unsaved.values()):
            problem = await self._save(batch)
            if problem is not None:
                raise BatchError(
                    BatchRefusal.JOURNAL_UNAVAILABLE,
                    f"the state of batch {batch.id} can't be journaled ({problem}), so no new batch is",
                )

    @staticmethod
    def _log_save_failed(batch: Batch, error: BaseException, then: str) -> None:
        if isinstance(error, JournalError):
            log.error("batch {batch}: can't journal it: {error}: {then}", batch=batch.id, error=error, then=then)
        else:  # a bug (called while it is handled): with its traceback
            log.failure("batch {batch}: can't journal it: {then}", batch=batch.id, then=then)

    def _halt(self, batch: Batch, not_made: list[Action], problem: str) -> None:
        """A decision that could not be journaled: its actions are not carried out, and the batch
        starts nothing more. What it had not started is skipped, so those devices are free now; what
        runs is free when its job ends. Its end (once every member ended) is carried out: it holds
        nothing then."""
        batch.journal_error = problem
        now = self.clock.seconds()
        message = f"its state could not be journaled ({problem})"
        actions: list[Action] = [a for a in not_made if isinstance(a, Finish)]
        actions += batch.policy.halt(message, not_made, now)
        self._publish_changes(batch)  # what GET shows: the halted batch, with its journal_error
        self._carry_out(batch, [a for a in actions if isinstance(a, Finish)])

    def _event(self, batch: Batch, actions: list[Action]) -> None:
        self._spawn(self._decide(batch, actions), batch, "journaling")

    def _carry_out(self, batch: Batch, actions: Iterable[Action]) -> None:
        for action in actions:
            if self.stopping:
                return
            if isinstance(action, Probe):
                self._spawn(self._probe(batch, action), batch, "the pre-flight probe")
            elif isinstance(action, Start):
                self._spawn(self._start(batch, action.device), batch, f"starting {action.device}")
            elif isinstance(action, Resume):
                self._spawn(self._resume(batch, action), batch, f"resuming {action.device}")
            elif isinstance(action, Cancel):
                self._spawn(self._cancel_job(batch, action), batch, f"cancelling {action.device}")
            elif isinstance(action, Finish):
                self._finished(batch, action)

    async def _probe(self, batch: Batch, action: Probe) -> None:
        probes: dict[str, MemberProbe] = {}
        to_probe = []
        for device in action.devices:
            job = self.busy(device)
            if job is not None:
                probes[device] = MemberProbe(reachable=False, busy_job=job)
            else:
                to_probe.append(device)
        results: Mapping[str, ProbeResult] = {}
        try:
            results = await self.prober.probe(to_probe) if to_probe else {}
        except Exception as e:  # a bug (a device's failure is its result): the batch still goes on
            log.failure("batch {batch}: the pre-flight probe failed", batch=batch.id)
            probes.update(
                {d: MemberProbe(reachable=False, error=f"the probe failed: {_error_text(e)}") for d in to_probe}
            )
        for device in to_probe:
            result = results.get(device)
            if result is None:
                continue  # counted as unreachable ("no probe result"), unless said above
            if result.busy_job is not None:  # a job took the device meanwhile: it was not contacted
                probes[device] = MemberProbe(reachable=False, error=result.error, busy_job=result.busy_job)
            else:
                probes[device] = MemberProbe(
                    reachable=bool(result.ok),
                    mode=result.mode,
                    firmware_version=result.firmware_version,
                    error=result.error,
                )
        if self.stopping:
            return
        self._event(batch, batch.policy.preflight_done(probes, self.clock.seconds()))

    async def _inspect(self, firmware: str) -> ImageFacts:
        try:
            return await self.inspect(firmware)
        except FirmwareProblem as e:
            raise BatchError(_FIRMWARE_REFUSALS.get(e.reason, BatchRefusal.FIRMWARE_INVALID), e.message) from None

    async def _start(self, batch: Batch, device: str) -> None:
        now = self.clock.seconds
        problem: str | None = None
        try:
            image = await self._inspect(batch.firmware)
        except BatchError as e:
            problem = e.message
        else:
            if image.sha256 != batch.image.sha256:
                problem = (
                    f"the firmware file {batch.firmware} changed since the batch began "
                    f"(sha256 {batch.image.sha256[:12]}..., now {image.sha256[:12]}...)"
                )
        if self.stopping:
            return
        if problem is not None:
            log.warn("batch {batch}: {problem}: stopping it", batch=batch.id, problem=problem)
            actions = batch.policy.stop(Reason.IMAGE_CHANGED, problem, now())  # first: nothing else starts
            actions += batch.policy.start_refused(device, problem, now())
            self._event(batch, actions)
            return
        try:
            job = await self.queue.start(device, batch.firmware, batch.options or None, batch.id)
        except Exception as e:
            if self.stopping or (isinstance(e, QueueRefused) and e.code == "shutting_down"):
                return  # after the restart it is started again (start_lost)
            self._event(batch, batch.policy.start_refused(device, self._refusal(batch, device, e), now()))
            return
        self._started(batch, device, job)

    @staticmethod
    def _refusal(batch: Batch, device: str, error: Exception) -> str:
        """What the member is told of a start the queue refused, or that failed (a bug: logged)."""
        if isinstance(error, QueueRefused):
            return error.message
        log.failure("batch {batch}: starting the job of {device} failed", batch=batch.id, device=device)
        return f"internal error: {_error_text(error)}"

    def _started(self, batch: Batch, device: str, job: Mapping[str, Any]) -> None:
        self._event(batch, batch.policy.job_started(device, str(job["id"]), self.clock.seconds()))
        self._spawn(self._follow(batch, device, str(job["id"])), batch, f"following {device}")

    async def _resume(self, batch: Batch, action: Resume) -> None:
        try:
            job = await self.queue.resume(action.job, batch.id)
        except Exception as e:
            if self.stopping or (isinstance(e, QueueRefused) and e.code == "shutting_down"):
                return
            message = self._refusal(batch, action.device, e)
            self._event(batch, batch.policy.start_refused(action.device, message, self.clock.seconds()))
            return
        self._started(batch, action.device, job)

    async def _cancel_job(self, batch: Batch, action: Cancel) -> None:
        try:
            await self.queue.cancel(action.job, f"{CANCEL_REASON} {batch.id}")
        except QueueRefused:
            pass  # it ended meanwhile: its end is reported by _follow

    async def _follow(self, batch: Batch, device: str, job_id: str) -> None:
        """Wait for the member's job to leave the queue and tell the policy how. However that wait
        ends, the member's state moves on: a wait that fails (a journal error, a bug) ends the member."""
        try:
            job = await self.queue.wait(job_id)
        except Exception as e:
            if self.stopping:
                return  # the daemon is stopping: the restart reconciles the member with its job
            if isinstance(e, QueueRefused) and e.code == "shutting_down":
                log.info("batch {batch}: the job queue is shutting down: the batches act no more", batch=batch.id)
                self.shutdown()  # as the daemon's own stop does: carried on after the restart
                return
            if not isinstance(e, QueueRefused):  # a bug: with its traceback
                log.failure("batch {batch}: following job {job} of {device} failed", job=job_id, device=device)
            self._lost(batch, device, job_id, _error_text(e))
            return
        if self.stopping:
            return  # interrupted by the daemon's shutdown: carried on after the restart
        try:
            self._job_left(batch, device, job_id, job)
        except Exception as e:  # a job this code can't read: a bug, but the member still ends
            log.failure("batch {batch}: the end of job {job} of {device} can't be read", job=job_id, device=device)
            self._lost(batch, device, job_id, f"its end can't be read: {_error_text(e)}")

    def _lost(self, batch: Batch, device: str, job_id: str, problem: str) -> None:
        message = (
            f"the daemon could not follow its job {job_id} to its end ({problem}): counted as failed; "
            f"the job itself may still run (netota show {job_id})"
        )
        log.error("batch {batch}: {device}: {message}", batch=batch.id, device=device, message=message)
        self._event(batch, batch.policy.job_lost(device, job_id, message, self.clock.seconds()))

    def _job_left(self, batch: Batch, device: str, job_id: str, job: Mapping[str, Any]) -> None:
        finished = job.get("finished")
        now = (
            float(finished) if isinstance(finished, (int, float)) and math.isfinite(finished) else self.clock.seconds()
        )
        if job.get("state") == "interrupted":
            self._event(batch, batch.policy.job_interrupted(device, job_id, now))
        else:
            self._event(batch, batch.policy.job_ended(device, job_id, member_outcome(job), now))

    def _finished(self, batch: Batch, action: Finish) -> None:
        summary = action.summary
        log.info(
            "batch {batch}: {state}, {result}: {counts}",
            batch=batch.id,
            state=summary["state"],
            result=summary["result"],
            counts={k: v for k, v in summary["counts"].items() if v},
        )
        self.batches.pop(batch.id, None)
        self.events.publish({"type": "batch_end", "batch": batch.id, "snapshot": batch.to_json()})
        pruned = self.store.prune()  # the ended batches kept are bounded
        pruned.addErrback(lambda f: log.warn("batches: pruning old ones failed: {error}", error=f.getErrorMessage()))

    # ----- events

    def _changes(self, batch: Batch, created: bool = False) -> list[BatchEvent]:
        """Events for what changed since the last publication: each member that changed, then the batch."""
        events: list[BatchEvent] = []
        for member in batch.policy.members.values():
            data = member.to_json()
            if batch._published.get(member.device) != data:
                batch._published[member.device] = data
                if not created:
                    events.append({"type": "member", "batch": batch.id, "device": member.device, "member": data})
        summary = batch.policy.summary()
        if batch._published.get("") != summary:
            batch._published[""] = summary
            events.append({"type": "batch", "batch": batch.id, "state": summary["state"], "summary": summary})
        return events

    def _publish_changes(self, batch: Batch, created: bool = False) -> None:
        for event in self._changes(batch, created):
            self.events.publish(event)

    # ----- restarts

    async def recover(self) -> None:
        """At start-up (after the job queue marked the jobs that were running as interrupted): load
        every unfinished batch, reconcile each member with its job, and carry the batch on. New
        batches wait until it is done."""
        try:
            await self._recover()
        finally:
            self.recovered = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)

    async def _recover(self) -> None:
        for row in await self.store.active():
            try:
                batch = Batch.from_row(row, self.queue.max_parallel)
            except (KeyError, TypeError, ValueError) as e:
                log.error("batch {batch} in the journal can't be read ({error}): left as it is", batch=row.id, error=e)
                continue
            self.batches[batch.id] = batch
            actions: list[Action] = []
            for member in list(batch.policy.members.values()):
                actions += await self._reconcile(batch, member.device)
            actions += batch.policy.restart(self.clock.seconds())
            log.info(
                "batch {batch}: carried on after a restart ({state})", batch=batch.id, state=batch.policy.state.value
            )
            await self._decide(batch, actions)

    async def _reconcile(self, batch: Batch, device: str) -> list[Action]:
        policy, member = batch.policy, batch.policy.members[device]
        actions: list[Action] = []
        if not member.active:
            return actions
        now = self.clock.seconds()
        job_id = member.job
        if member.state.value == "starting":
            if job_id is not None:
                previous = await self.queue.get(job_id)
                resumed_by = (previous or {}).get("resumed_by")
                if resumed_by is None:
                    # A resume decided but not made: the old job is still interrupted (or gone, and
                    # then its resume is refused and the member ends refused).
                    return policy.job_interrupted(device, job_id, now)
                job_id = str(resumed_by)
            else:
                found = await self.queue.batch_job(batch.id, device)
                if found is None:
                    return policy.start_lost(device)
                job_id = str(found["id"])
            actions += policy.job_started(device, job_id, now)
        job = await self.queue.get(job_id) if job_id else None
        if job is None or job_id is None:
            return actions + policy.start_lost(device)
        if job.get("state") in ("queued", "running", "cancelling"):
            self._spawn(self._follow(batch, device, job_id), batch, f"following {device}")
            return actions
        if job.get("state") == "interrupted":
            return actions + policy.job_interrupted(device, job_id, now)
        return actions + policy.job_ended(device, job_id, member_outcome(job), now)

    def shutdown(self) -> None:
        """Act no more: the daemon is stopping (its journal has every batch as it stood)."""
        self.stopping = True
