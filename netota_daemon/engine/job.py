"""``UpgradeJob``: one upgrade of one device, from detection to the new version.

The flow, as one readable coroutine (``docs/engine.md`` draws it)::

    DETECT  the description document: ota_type "1" -> the single-backup route (straight to phase 2
            when the loader answers); "0" or absent -> the double-backup route; an image whose
            kind is known and is not the device's -> NOT_APPLICABLE, nothing sent
    ROUTE   single backup (:mod:`~netota_daemon.engine.single_backup`): PHASE1, REBOOT, PHASE2;
            double backup (:mod:`~netota_daemon.engine.double_backup`): UPLOAD, REBOOT
    VERIFY  optional reconnect hook; poll until the new firmware answers; read firmware_version

The job talks to its device only through a :class:`~netota_daemon.engine.link.DeviceLink` (the real
one by default; tests pass a scripted fake), with the steps of :class:`~netota_daemon.engine.steps.JobSteps`.
Its lifecycle (created, running, stopping, finishing, finished) is one explicit
:class:`~netota_daemon.engine.lifecycle.JobLifecycle`; every wait goes through it, so a cancel or
the deadline always wins over whatever the step was doing. ``run()`` never fails: every error
becomes an :class:`Outcome`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.engine.double_backup import upgrade_double_backup
from netota_daemon.engine.events import EventPublisher, Finished, JobEvent
from netota_daemon.engine.lifecycle import JobLifecycle, JobStopped, LifecycleState, StopKind
from netota_daemon.engine.link import DeviceLink
from netota_daemon.engine.outcome import (
    FailureClass,
    Happened,
    Outcome,
    OutcomeKind,
    Phase,
    Route,
    UpgradeFailed,
    advice,
    phase_label,
)
from netota_daemon.engine.retry import RetriesExhausted
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.engine.single_backup import upgrade_single_backup
from netota_daemon.engine.steps import JobFacts, JobSteps, RouteEnd
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.device_link import DevicePorts, TwistedDeviceLink
from netota_daemon.protocols.endpoints import DeviceConnector, EndpointError
from netota_daemon.wire.description import DeviceDescription
from netota_daemon.wire.firmware_kind import FirmwareKind

log = Logger()

__all__ = ["JobFacts", "UpgradeJob", "default_link"]


def default_link(reactor: Any, target: DeviceTarget, log_context: dict[str, Any]) -> TwistedDeviceLink:
    """The real link to ``target``: sockets through its interface and source address. ``reactor``
    provides IReactorTime, IReactorTCP and IReactorProcess at once (typing has no intersection of
    interfaces, hence Any here: the link's parts each use the one interface they need)."""
    connector = DeviceConnector(reactor, target.host, target.interface, target.source_address)
    ports = DevicePorts(ctp=target.ctp_port, http=target.http_port, ota=target.ota_port, ftp=target.ftp_port)
    return TwistedDeviceLink(reactor, connector, ports, log_context)


class UpgradeJob:
    """One upgrade of one device. See the module docstring.

    ``reactor`` is the job's clock (``IReactorTime``); the default link also uses it for its
    connections and processes. ``image`` is one image, or several (for a rack of both kinds of
    build: the job takes the one of its device's kind, see :meth:`_choose_image`). ``verify_only``
    resumes a job that ended while its device rebooted into the new firmware: the image is on the
    device, so only the version is read back.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        target: DeviceTarget,
        image: FirmwareImage | Sequence[FirmwareImage],
        timeouts: UpgradeTimeouts,
        job_id: str,
        log_context: dict[str, Any] | None = None,
        verify_only: bool = False,
        behaviour: UpgradeBehaviour | None = None,
        link: DeviceLink | None = None,
    ) -> None:
        self.clock = reactor
        self.target = target
        self.images: tuple[FirmwareImage, ...] = (image,) if isinstance(image, FirmwareImage) else tuple(image)
        if not self.images:
            raise ValueError("an upgrade job needs an image")
        self.image = self.images[0]  # the one it sends, once chosen
        self.timeouts = timeouts
        self.job_id = job_id
        self.verify_only = verify_only
        self.log_context: dict[str, Any] = {**(log_context or {}), "job": job_id, "device": target.name}
        self.events: EventPublisher[JobEvent] = EventPublisher()
        self.lifecycle = JobLifecycle(reactor)
        self.outcome: Outcome | None = None
        self.steps = JobSteps(
            reactor,
            link or default_link(reactor, target, self.log_context),
            target,
            timeouts,
            behaviour or UpgradeBehaviour(),
            self.lifecycle,
            self.events,
            self.log_context,
        )
        self._task: defer.Deferred[Outcome] | None = None
        self._waiters: list[defer.Deferred[Outcome]] = []
        self._deadline_call: IDelayedCall | None = None

    @property
    def phase(self) -> Phase:
        return self.steps.phase

    @property
    def point_of_no_return(self) -> bool:
        return self.steps.point_of_no_return

    @property
    def facts(self) -> JobFacts:
        return self.steps.facts

    # -- public API ----------------------------------------------------------------------------
    def run(self) -> defer.Deferred[Outcome]:
        """Start the job (once); fires with its :class:`Outcome` and never fails."""
        if self.lifecycle.state is LifecycleState.CREATED:
            self.lifecycle.start()
            self._deadline_call = self.clock.callLater(self.timeouts.deadline, self._deadline_passed)
            self._task = defer.Deferred.fromCoroutine(self._run())
            self._task.addErrback(self._last_net)  # _run() catches bugs; this is the last net
            self._task.addCallback(self._deliver)
        # Cancelling this Deferred cancels the job (it then fails with CancelledError, as Twisted
        # does for every cancelled Deferred; job.cancel() is the way that keeps the outcome).
        d: defer.Deferred[Outcome] = defer.Deferred(lambda _: self.cancel("the caller cancelled the job's Deferred"))
        if self.outcome is not None:
            d.callback(self.outcome)
        else:
            self._waiters.append(d)
        return d

    def cancel(self, reason: str = "cancelled by user") -> None:
        """Abort the job: the running step is stopped (STOP on an open stream, an upload's data
        connection reset); ``run()`` then fires with an ABORTED outcome. A no-op before the job
        runs and once its outcome is known."""
        if self.lifecycle.request_stop(StopKind.CANCEL, reason):
            log.info("cancelling: {reason}", reason=reason, **self.log_context)

    def _deadline_passed(self) -> None:
        self._deadline_call = None
        reason = f"the job's deadline of {self.timeouts.deadline:g} s passed"
        if self.lifecycle.request_stop(StopKind.DEADLINE, reason):
            log.info("{reason}: stopping", reason=reason, **self.log_context)

    # -- the flow ------------------------------------------------------------------------------
    async def _run(self) -> Outcome:
        try:
            outcome = await self._decided_outcome()
        except Exception as e:  # a bug in deciding the outcome: still an outcome, never an errback
            log.failure("the upgrade job failed unexpectedly", **self.log_context)
            outcome = self._outcome_of_a_bug(e)
        self.lifecycle.finishing()
        try:
            await self.steps.cleanup()
        except Exception:  # a bug in closing what the job held: the outcome stands
            log.failure("closing the job's connections failed unexpectedly", **self.log_context)
        return outcome

    async def _decided_outcome(self) -> Outcome:
        try:
            return await self._upgrade()
        except JobStopped:
            outcome = self._stopped_outcome()
        except UpgradeFailed as e:
            outcome = self._stopped_outcome() if self.lifecycle.stop else self._failed(e.failure, e.message)
        except Exception as e:
            if self.lifecycle.stop is not None:  # a stop that a step reported as another error
                outcome = self._stopped_outcome()
            else:  # a bug: still an outcome, never an errback
                log.failure("the upgrade job failed unexpectedly", **self.log_context)
                message = f"internal error: {type(e).__name__}: {e}"
                # A bug, not the device: what it did is unknown, as if the daemon had stopped here.
                outcome = self._outcome(OutcomeKind.FAILED, message, Happened.INTERRUPTED, FailureClass.PROTOCOL_ERROR)
        return outcome

    def _last_net(self, failure: Failure) -> Outcome:
        log.failure("the upgrade job failed unexpectedly", failure, **self.log_context)
        return self._outcome_of_a_bug(failure.value or RuntimeError(failure.getErrorMessage()))

    def _outcome_of_a_bug(self, error: BaseException) -> Outcome:
        """The outcome when the flow itself raised (a bug): run() still fires with an outcome."""
        return Outcome(
            kind=OutcomeKind.FAILED,
            message=f"internal error: {type(error).__name__}: {error}",
            phase=self.phase,
            failure=FailureClass.PROTOCOL_ERROR,
            # A bug, not the device: what it did is unknown, as if the daemon had stopped here.
            advice=advice(Happened.INTERRUPTED, self.phase, self.point_of_no_return, self.facts.route),
            point_of_no_return=self.point_of_no_return,
            firmware_version_before=self.facts.version_before,
            details={"job": self.job_id, "device": self.target.name, "route": self.facts.route.value},
        )

    def _deliver(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
        if self.lifecycle.state is LifecycleState.FINISHING:  # not so only after a bug (see run())
            self.lifecycle.finished()
        log.info(
            "upgrade ended: {kind} in {phase}: {message}",
            kind=outcome.kind.value,
            phase=phase_label(outcome.phase),
            message=outcome.message,
            **self.log_context,
        )
        self.events.publish(Finished(outcome))
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(outcome)
        return outcome

    async def _upgrade(self) -> Outcome:
        steps = self.steps
        steps.set_phase(Phase.DETECT, f"reading the description document of {steps.link.describe()}")
        try:
            steps.link.check()
        except EndpointError as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None
        if self.verify_only:
            return await self._verify_outcome()
        description = await steps.fetch_description_retrying(
            self.timeouts.connect_window, "reading the device description"
        )
        # The loader's fixed document always says 1.0.1: it tells nothing of the installed firmware.
        self.facts.version_before = None if description.in_loader else description.firmware_version
        self.facts.route = Route.SINGLE_BACKUP if description.single_backup else Route.DOUBLE_BACKUP
        refusal = self._choose_image(description)
        if refusal is not None:
            return refusal
        self._tell_downgrade()
        if self.facts.route is Route.SINGLE_BACKUP:
            end = await upgrade_single_backup(steps, description, self.image)
        else:
            end = await upgrade_double_backup(steps, self.image)
        if end is RouteEnd.ALREADY_CURRENT:
            steps.set_phase(Phase.DONE, "the device already runs this firmware")
            return self._outcome(
                OutcomeKind.ALREADY_CURRENT,
                "the device already runs this firmware (it answered SAME): nothing was changed",
                Happened.ALREADY_CURRENT,
            )
        return await self._verify_outcome()

    def _choose_image(self, description: DeviceDescription) -> Outcome | None:
        """Pick the image to send (``self.image``), or the outcome that refuses them all (nothing is
        sent then). One image: it is sent unless its kind is known and is not the device's. Several:
        the one of the device's kind; else the one of unknown kind; else none."""
        route = self.facts.route
        wanted = FirmwareKind.SINGLE_BACKUP if route is Route.SINGLE_BACKUP else FirmwareKind.DOUBLE_BACKUP
        build = f"a {route.value.replace('_', '-')} build (ota_type {description.ota_type or 'absent'})"
        matching = [i for i in self.images if i.kind.kind is wanted]
        unknown = [i for i in self.images if i.kind.kind is FirmwareKind.UNKNOWN]
        if len(matching) > 1 or (not matching and len(unknown) > 1):
            names = ", ".join(i.path.name for i in (matching or unknown))
            return self._outcome(
                OutcomeKind.NOT_APPLICABLE,
                f"more than one of the images could be for {build}: {names}; give one of each kind",
                Happened.NOT_APPLICABLE,
            )
        candidates = matching or unknown
        if not candidates:
            described = "; ".join(f"{i.path.name} is {i.kind.description}" for i in self.images)
            return self._outcome(
                OutcomeKind.NOT_APPLICABLE,
                f"the device runs {build}, but {described}: single- and double-backup images can't "
                "cross-upgrade; nothing was sent",
                Happened.NOT_APPLICABLE,
            )
        chosen = self.image = candidates[0]
        info = chosen.kind
        if len(self.images) > 1:
            log.info("sending {name} to {build}", name=chosen.path.name, build=build, **self.log_context)
        if info.kind is FirmwareKind.UNKNOWN:
            log.warn(
                "the image's kind can't be told from its bytes ({description}): sending it as a {route} image",
                description=info.description,
                route=route.value.replace("_", "-"),
                **self.log_context,
            )
        if info.intact is False:
            return self._failed(
                FailureClass.FIRMWARE_FILE, f"the image is damaged ({info.description}); nothing was sent"
            )
        return None

    def _tell_downgrade(self) -> None:
        """Say so plainly when the image's version (where its format tells it) is older than the device's."""
        before, image_version = self.facts.version_before, self.image.kind.version
        if before and image_version and _version_key(image_version) < _version_key(before):
            self.steps.set_phase(
                Phase.DETECT,
                f"downgrade: the device runs firmware {before}, the image is version {image_version}",
            )
            log.warn(
                "downgrade: the device runs {before}, the image is {image}",
                before=before,
                image=image_version,
                **self.log_context,
            )

    async def _verify_outcome(self) -> Outcome:
        version = await self._verify()
        if version is None:
            return self._outcome(
                OutcomeKind.UNVERIFIED,
                f"the device was flashed but its new firmware did not answer within {self.timeouts.verify:g} s",
                Happened.UNVERIFIED,
            )
        self.steps.set_phase(Phase.DONE, f"the device runs firmware {version}")
        message = f"the device now runs firmware {version}"
        if version == self.facts.version_before:
            if self.facts.route is Route.DOUBLE_BACKUP:
                message = (
                    f"the device rebooted into its new bank and still reports firmware {version}: its description "
                    "document may carry a fixed version, so the version read back can't confirm the upgrade"
                )
            else:
                message += " (the same version it reported before)"
        return self._outcome(OutcomeKind.SUCCEEDED, message, Happened.SUCCEEDED, after=version)

    async def _verify(self) -> str | None:
        steps = self.steps
        steps.set_phase(Phase.VERIFY, "waiting for the new firmware")
        await steps.run_reconnect_hook()
        try:
            description = await steps.poll_description(
                lambda d: not d.in_loader, self.timeouts.verify, "waiting for the new firmware"
            )
        except RetriesExhausted:
            return None
        return description.firmware_version or "unknown"

    # -- outcomes ------------------------------------------------------------------------------
    def _stopped_outcome(self) -> Outcome:
        stop = self.lifecycle.stop
        assert stop is not None
        phase = self.phase
        if stop.kind is StopKind.DEADLINE:
            if phase is Phase.VERIFY:
                return self._outcome(
                    OutcomeKind.UNVERIFIED,
                    "the device was flashed; the job's deadline passed before its new firmware answered",
                    Happened.UNVERIFIED,
                )
            detail = f" (last: {self.facts.last_problem})" if self.facts.last_problem else ""
            return self._failed(FailureClass.TIMEOUT, f"{stop.reason} during {phase_label(phase)}{detail}")
        if phase is Phase.VERIFY:
            return self._outcome(
                OutcomeKind.ABORTED, f"{stop.reason}, while waiting for the new firmware", Happened.ABORTED
            )
        return self._outcome(OutcomeKind.ABORTED, f"{stop.reason}, during {phase_label(phase)}", Happened.ABORTED)

    def _failed(self, failure: FailureClass, message: str) -> Outcome:
        return self._outcome(OutcomeKind.FAILED, message, Happened.FAILED, failure=failure)

    def _advice(self, happened: Happened) -> str:
        """The advice for an outcome that ends the job now."""
        facts = self.facts
        if happened in (Happened.FAILED, Happened.ABORTED) and facts.old_firmware_back:
            happened = Happened.OLD_FIRMWARE_BACK  # the device is back in its old firmware, not its loader
        if facts.route is Route.DOUBLE_BACKUP and self.lifecycle.stop is not None:
            # Stopped (a cancel, the deadline) after the image went out whole: it may be taking it.
            if self.phase is Phase.REBOOT or (self.phase is Phase.UPLOAD and facts.upload_sent_whole):
                happened = Happened.UNSETTLED
        phase = self.phase
        if phase is Phase.PHASE1 and facts.phase1_completed:
            phase = Phase.REBOOT  # it ended while closing phase 1's session: the device reboots into its loader
        return advice(happened, phase, self.point_of_no_return, facts.route)

    def _outcome(
        self,
        kind: OutcomeKind,
        message: str,
        happened: Happened,
        failure: FailureClass | None = None,
        after: str | None = None,
    ) -> Outcome:
        facts = self.facts
        details: dict[str, Any] = {
            "job": self.job_id,
            "device": self.target.name,
            "image": str(self.image.path),
            "image_size": self.image.size,
            "image_kind": self.image.kind.kind.value,
            "route": facts.route.value,
        }
        if facts.route is Route.SINGLE_BACKUP:
            details.update(phase2_attempts=facts.phase2_attempts, streams=list(facts.streams))
        else:
            details.update(upload_attempts=facts.upload_attempts, uploads=list(facts.uploads))
        return Outcome(
            kind=kind,
            message=message,
            phase=self.phase,
            failure=failure,
            advice=self._advice(happened),
            point_of_no_return=self.point_of_no_return,
            firmware_version_before=facts.version_before,
            firmware_version_after=after,
            details=details,
        )


def _version_key(version: str) -> tuple[int, ...]:
    """``"2.10.1"`` -> (2, 10, 1); the digits of each dot-separated part (0 where there are none)."""
    return tuple(int(m.group()) if (m := re.search(r"\d+", part)) else 0 for part in version.split("."))
