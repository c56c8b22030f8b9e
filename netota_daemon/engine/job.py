"""``UpgradeJob``: one upgrade of one device, from detection to the new version.

The flow, as one readable coroutine (``docs/engine.md`` draws it)::

    DETECT  description document -> double backup: NOT_APPLICABLE; ota_step 1: straight to PHASE2
    PHASE1  CTP APP_ACCESS, NET_OTA_SINGLE, keep-alive, OTA stream (forward reads)  -> OK / SAME
    REBOOT  optional reconnect hook; poll the description document until the loader answers
    PHASE2  CTP APP_ACCESS, description document, OTA stream; retried from the start after a
            dropped session or a timeout (the loader allows it) until the overall deadline
    VERIFY  optional reconnect hook; poll until the main firmware answers; read firmware_version

The job talks to its device only through a :class:`~netota_daemon.engine.link.DeviceLink` (the real
one by default; tests pass a scripted fake). Its lifecycle (created, running, stopping, finishing,
finished) is one explicit :class:`~netota_daemon.engine.lifecycle.JobLifecycle`; every wait goes
through it, so a cancel or the deadline always wins over whatever the step was doing. Every step has
its own timeout (:class:`~netota_daemon.engine.settings.UpgradeTimeouts`) inside one overall
deadline. ``run()`` never fails: every error becomes an :class:`Outcome`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from netota_daemon.engine.events import EventPublisher, Finished, JobEvent, PhaseChanged, Waiting
from netota_daemon.engine.lifecycle import JobLifecycle, JobStopped, LifecycleState, StopKind
from netota_daemon.engine.link import CtpSession, DeviceLink, OtaSession
from netota_daemon.engine.outcome import (
    FailureClass,
    Happened,
    Outcome,
    OutcomeKind,
    Phase,
    UpgradeFailed,
    advice,
    phase_label,
)
from netota_daemon.engine.progress import ProgressMeter
from netota_daemon.engine.retry import RetriesExhausted, retry_until_deadline
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ctp_client import CtpConnectionLost, CtpErrorReply, CtpReplyTimeout
from netota_daemon.protocols.description_fetch import DescriptionFetchError
from netota_daemon.protocols.device_link import DevicePorts, TwistedDeviceLink
from netota_daemon.protocols.endpoints import (
    RETRYABLE_ERRORS,
    DeviceConnector,
    EndpointError,
    connection_error_message,
)
from netota_daemon.protocols.ota_stream import StreamEnd, StreamProgress, StreamResult, StreamSettings
from netota_daemon.wire.ctp import CtpProtocolError
from netota_daemon.wire.description import DeviceDescription

log = Logger()

T = TypeVar("T")

#: How long closing the job's own connections may take before they are aborted.
CLEANUP_GRACE = 3.0


class _NotYet(Exception):
    """A poll reached the device, but not in the wanted state yet."""


@dataclass
class JobFacts:
    """What the job has learnt so far: the data its outcome and advice are made from."""

    version_before: str | None = None
    phase1_completed: bool = False  # phase 1 ended OK: the device reboots into its loader
    old_firmware_back: bool = False  # phase 2 found the main firmware before any all_size notice
    phase2_attempts: int = 0
    last_problem: str = ""  # the last failed attempt's error, for a deadline's message
    streams: list[dict[str, Any]] = field(default_factory=list)


def default_link(
    reactor: Any, target: DeviceTarget, image: FirmwareImage, log_context: dict[str, Any]
) -> TwistedDeviceLink:
    """The real link to ``target``: sockets through its interface and source address."""
    connector = DeviceConnector(reactor, target.host, target.interface, target.source_address)
    ports = DevicePorts(ctp=target.ctp_port, http=target.http_port, ota=target.ota_port)
    return TwistedDeviceLink(reactor, connector, ports, image, log_context)


class UpgradeJob:
    """One upgrade of one device. See the module docstring.

    ``reactor`` is the job's clock (``IReactorTime``); the default link also uses it for its
    connections and processes. ``verify_only`` resumes a job that ended while its device rebooted
    into the new firmware: phase 2 is done, so only the version is read back.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        target: DeviceTarget,
        image: FirmwareImage,
        timeouts: UpgradeTimeouts,
        job_id: str,
        log_context: dict[str, Any] | None = None,
        verify_only: bool = False,
        behaviour: UpgradeBehaviour | None = None,
        link: DeviceLink | None = None,
    ) -> None:
        self.clock = reactor
        self.target = target
        self.image = image
        self.timeouts = timeouts
        self.behaviour = behaviour or UpgradeBehaviour()
        self.job_id = job_id
        self.verify_only = verify_only
        self.log_context: dict[str, Any] = {**(log_context or {}), "job": job_id, "device": target.name}
        self.link: DeviceLink = link or default_link(reactor, target, image, self.log_context)
        self.events: EventPublisher[JobEvent] = EventPublisher()
        self.lifecycle = JobLifecycle(reactor)
        self.phase = Phase.DETECT
        self.point_of_no_return = False
        self.outcome: Outcome | None = None
        self.facts = JobFacts()
        self._meters = {phase: ProgressMeter(phase) for phase in (Phase.PHASE1, Phase.PHASE2)}
        self._task: defer.Deferred[Outcome] | None = None
        self._waiters: list[defer.Deferred[Outcome]] = []
        self._deadline_call: IDelayedCall | None = None
        self._ctp_sessions: set[CtpSession] = set()
        self._streams: set[OtaSession] = set()

    # -- public API ----------------------------------------------------------------------------
    def run(self) -> defer.Deferred[Outcome]:
        """Start the job (once); fires with its :class:`Outcome` and never fails."""
        if self.lifecycle.state is LifecycleState.CREATED:
            self.lifecycle.start()
            self._deadline_call = self.clock.callLater(self.timeouts.deadline, self._deadline_passed)
            self._task = defer.Deferred.fromCoroutine(self._run())
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
        """Abort the job: the running step is stopped (STOP on an open stream); ``run()`` then fires
        with an ABORTED outcome. A no-op before the job runs and once its outcome is known."""
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
            outcome = await self._upgrade()
        except JobStopped:
            outcome = self._stopped_outcome()
        except UpgradeFailed as e:
            outcome = self._stopped_outcome() if self.lifecycle.stop else self._failed(e.failure, e.message)
        except Exception as e:
            if self.lifecycle.stop is not None:  # a stop that a step reported as another error
                outcome = self._stopped_outcome()
            else:  # a bug: still an outcome, never an errback
                log.failure("the upgrade job failed unexpectedly", **self.log_context)
                outcome = self._failed(FailureClass.PROTOCOL_ERROR, f"internal error: {type(e).__name__}: {e}")
        self.lifecycle.finishing()
        await self._cleanup()
        return outcome

    def _deliver(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._deadline_call = None
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
        self._set_phase(Phase.DETECT, f"reading the description document of {self.link.describe()}")
        try:
            self.link.check()
        except EndpointError as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None
        if self.verify_only:
            return await self._verify_outcome()
        description = await self._fetch_description_retrying(
            self.timeouts.connect_window, "reading the device description"
        )
        # The loader's fixed document always says 1.0.1: it tells nothing of the installed firmware.
        self.facts.version_before = None if description.in_loader else description.firmware_version
        if not description.single_backup:
            return self._outcome(
                OutcomeKind.NOT_APPLICABLE,
                f"the device runs a double-backup build (ota_type {description.ota_type or 'absent'}); "
                "this single-backup flow does not apply",
                Happened.NOT_APPLICABLE,
            )
        if description.in_loader:
            log.info("the device is already in its update loader: resuming at phase 2", **self.log_context)
        else:
            if await self._phase1() is StreamEnd.SAME:
                return self._already_current()
            await self._wait_for_loader()
        await self._phase2()
        return await self._verify_outcome()

    async def _verify_outcome(self) -> Outcome:
        version = await self._verify()
        if version is None:
            return self._outcome(
                OutcomeKind.UNVERIFIED,
                f"the device was flashed but its new firmware did not answer within {self.timeouts.verify:g} s",
                Happened.UNVERIFIED,
            )
        self._set_phase(Phase.DONE, f"the device runs firmware {version}")
        message = f"the device now runs firmware {version}"
        if version == self.facts.version_before:
            message += " (the same version it reported before)"
        return self._outcome(OutcomeKind.SUCCEEDED, message, Happened.SUCCEEDED, after=version)

    # -- phase 1 -------------------------------------------------------------------------------
    async def _phase1(self) -> StreamEnd:
        self._set_phase(Phase.PHASE1, "main firmware: NET_OTA_SINGLE, then the first stream")
        ctp = await self._open_ctp()
        try:
            await self._ctp_step(ctp.app_access(self.timeouts.ctp_reply), "APP_ACCESS")
            status = await self._ctp_step(ctp.net_ota_single(self.timeouts.ctp_reply), "NET_OTA_SINGLE")
            if status != "1":
                raise UpgradeFailed(
                    FailureClass.DEVICE_REFUSED,
                    f"the device refused NET_OTA_SINGLE (status {status!r}): it can't start a single-backup upgrade",
                )
            ctp.start_keepalive(self.timeouts.keepalive_interval)
            result = await self._stream(Phase.PHASE1)
            self.facts.phase1_completed = result.end is StreamEnd.OK  # the device now reboots into its loader
        finally:
            await self._close_ctp(ctp)
        if result.end is StreamEnd.OK or result.end is StreamEnd.SAME:
            return result.end
        if result.end is StreamEnd.ERR:
            raise UpgradeFailed(
                FailureClass.DEVICE_ERROR,
                "the device ended phase 1 with ERR: it rejected the image (current firmware also answers "
                "ERR when this image is the one already installed)",
            )
        raise UpgradeFailed(_stream_failure_class(result.end), f"phase 1: {result.message}")

    # -- reboot --------------------------------------------------------------------------------
    async def _wait_for_loader(self) -> None:
        self._set_phase(Phase.REBOOT, "the device reboots into its update loader")
        await self._run_reconnect_hook()
        try:
            await self._poll_description(lambda d: d.in_loader, self.timeouts.reboot, "waiting for the update loader")
        except RetriesExhausted as e:
            raise UpgradeFailed(
                FailureClass.TIMEOUT,
                f"the device did not come back in its update loader within {self.timeouts.reboot:g} s "
                f"(last: {connection_error_message(e.last_error)})",
            ) from None

    # -- phase 2 -------------------------------------------------------------------------------
    async def _phase2(self) -> None:
        self._set_phase(Phase.PHASE2, "update loader: the second stream rewrites flash")
        errors_left = self.behaviour.phase2_error_retries
        while True:
            self._raise_if_stopping()
            self.facts.phase2_attempts += 1
            if self.facts.phase2_attempts > 1:
                self._meters[Phase.PHASE2].new_attempt()
                self._set_phase(
                    Phase.PHASE2,
                    f"attempt {self.facts.phase2_attempts}: the loader reads the image again from the start "
                    f"(the last attempt: {self.facts.last_problem})",
                )
            try:
                result = await self._phase2_attempt()
            except UpgradeFailed as e:
                if e.failure not in (FailureClass.CONNECTION, FailureClass.TIMEOUT):
                    raise
                self.facts.last_problem = e.message
            else:
                if result.end is StreamEnd.OK:
                    return
                if result.end is StreamEnd.SAME:
                    # The loader's code never sends SAME (a zero-length update is its ERR): whatever it
                    # means here, the device stays in its loader, so it is no "already current".
                    when = "after the all_size notice" if self.point_of_no_return else "before rewriting flash"
                    raise UpgradeFailed(
                        FailureClass.DEVICE_ERROR,
                        f"the update loader answered SAME {when}, which its code never sends; the device "
                        "stays in its loader",
                    )
                if result.end is StreamEnd.ERR:
                    if errors_left <= 0:
                        raise UpgradeFailed(
                            FailureClass.DEVICE_ERROR,
                            f"the update loader ended phase 2 with ERR ({self.facts.phase2_attempts} attempt(s)): "
                            "it rejected the image",
                        )
                    errors_left -= 1
                elif result.end is StreamEnd.PROTOCOL_ERROR:
                    raise UpgradeFailed(FailureClass.PROTOCOL_ERROR, f"phase 2: {result.message}")
                self.facts.last_problem = result.message
            log.info(
                "phase 2 attempt {attempt} failed ({problem}); starting again",
                attempt=self.facts.phase2_attempts,
                problem=self.facts.last_problem,
                **self.log_context,
            )
            await self._sleep(self.timeouts.poll_interval)

    async def _phase2_attempt(self) -> StreamResult:
        ctp = await self._open_ctp()
        try:
            await self._ctp_step(ctp.app_access(self.timeouts.ctp_reply), "APP_ACCESS")
        finally:
            await self._close_ctp(ctp)  # the loader answers one frame per connection, then ignores it
        description = await self._fetch_description_retrying(
            self.timeouts.connect_window, "reading the loader's description"
        )
        if description.single_backup and description.ota_step == "0":
            if not self.point_of_no_return:
                # No phase-2 stream got as far as the all_size notice, so the loader never began to
                # rewrite flash: the device fell back to its old firmware, nothing was upgraded.
                self.facts.old_firmware_back = True
                raise UpgradeFailed(
                    FailureClass.DEVICE_ERROR,
                    "the device left its update loader before phase 2 began rewriting flash: it runs its main "
                    f"firmware again (version {description.firmware_version or 'unknown'}); no phase-2 session of "
                    "this job reached the all_size notice, so this job upgraded nothing",
                )
            # The loader was rewriting flash, and now the main firmware answers: the loader finished
            # (its OK was lost with the connection) and rebooted. VERIFY reads the version back.
            log.warn("the device left its update loader between two phase-2 attempts", **self.log_context)
            return StreamResult(StreamEnd.OK, "the device left its update loader: phase 2 completed")
        if not description.in_loader:
            raise UpgradeFailed(
                FailureClass.PROTOCOL_ERROR,
                f"expected the update loader (ota_type 1, ota_step 1), the device answered ota_type "
                f"{description.ota_type!r} ota_step {description.ota_step!r}",
            )
        return await self._stream(Phase.PHASE2)

    # -- verify --------------------------------------------------------------------------------
    async def _verify(self) -> str | None:
        self._set_phase(Phase.VERIFY, "waiting for the new firmware")
        await self._run_reconnect_hook()
        try:
            description = await self._poll_description(
                lambda d: not d.in_loader, self.timeouts.verify, "waiting for the new firmware"
            )
        except RetriesExhausted:
            return None
        return description.firmware_version or "unknown"

    # -- waits ---------------------------------------------------------------------------------
    async def _wait(self, d: defer.Deferred[T], on_late: Callable[[T], object] | None = None) -> T:
        """Await ``d``; a stop of the job ends the wait at once (``d`` is cancelled; a result it still
        gives goes to ``on_late``)."""
        return await self.lifecycle.guard(d, on_late)

    async def _sleep(self, seconds: float) -> None:
        await self._wait(deferLater(self.clock, seconds, lambda: None))

    def _raise_if_stopping(self) -> None:
        stop = self.lifecycle.stop
        if stop is not None and self.lifecycle.state is LifecycleState.STOPPING:
            raise JobStopped(stop)

    async def _retry(
        self,
        attempt: Callable[[], Coroutine[Any, Any, T] | defer.Deferred[T]],
        window: float,
        attempt_timeout: float,
        what: str,
        policy: Callable[[int], float] | None = None,
        retryable: tuple[type[BaseException], ...] = RETRYABLE_ERRORS,
        on_late: Callable[[T], object] | None = None,
    ) -> T:
        """``attempt`` retried within ``window`` (:func:`retry_until_deadline`), stopped by a stop of
        the job; each failed attempt is published as a :class:`Waiting` event."""

        def failed(number: int, e: BaseException) -> None:
            problem = connection_error_message(e)
            self.facts.last_problem = f"{what}: {problem}"
            self.events.publish(Waiting(self.phase, what, attempt=number, last_error=problem))

        retrying = defer.Deferred.fromCoroutine(
            retry_until_deadline(
                self.clock,
                attempt,
                window,
                attempt_timeout,
                what,
                policy=policy,
                retryable=retryable,
                log_context=self.log_context,
                stop_check=self._raise_if_stopping,
                on_attempt_failed=failed,
            )
        )
        return await self._wait(retrying, on_late)

    # -- steps ---------------------------------------------------------------------------------
    async def _connect(
        self, connect: Callable[[float], defer.Deferred[T]], what: str, on_late: Callable[[T], object]
    ) -> T:
        """One connection, retried within the connection window; a window with no connection is a
        CONNECTION failure."""
        try:
            return await self._retry(
                lambda: connect(self.timeouts.connect),
                self.timeouts.connect_window,
                self.timeouts.connect,
                what,
                on_late=on_late,
            )
        except RetriesExhausted as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None

    async def _open_ctp(self) -> CtpSession:
        ctp = await self._connect(
            self.link.connect_ctp,
            f"connecting to the CTP port {self.target.ctp_port}",
            on_late=lambda late: late.close(CLEANUP_GRACE),
        )
        self._ctp_sessions.add(ctp)
        return ctp

    async def _close_ctp(self, ctp: CtpSession) -> None:
        """Close a CTP session (bounded: aborted after CLEANUP_GRACE); not cut short by a stop."""
        await ctp.close(CLEANUP_GRACE)
        self._ctp_sessions.discard(ctp)

    async def _ctp_step(self, request: defer.Deferred[T], what: str) -> T:
        """Await a CTP request, turning its errors into :class:`UpgradeFailed`."""
        try:
            return await self._wait(request)
        except CtpErrorReply as e:
            raise UpgradeFailed(FailureClass.DEVICE_REFUSED, str(e)) from None
        except CtpReplyTimeout as e:
            raise UpgradeFailed(FailureClass.TIMEOUT, str(e)) from None
        except CtpConnectionLost as e:
            raise UpgradeFailed(FailureClass.CONNECTION, f"{what}: {e}") from None
        except CtpProtocolError as e:
            raise UpgradeFailed(FailureClass.PROTOCOL_ERROR, f"{what}: {e}") from None

    async def _stream(self, phase: Phase) -> StreamResult:
        settings = StreamSettings(
            first_header_timeout=self.timeouts.ota_accept,
            receive_timeout=self.timeouts.receive,
            max_receive_timeouts=self.timeouts.max_receive_timeouts,
            echo_final_notice=self.behaviour.echo_final_notice,
        )
        meter = self._meters[phase]

        def on_progress(facts: StreamProgress) -> None:
            self.events.publish(meter.from_stream(facts, self.point_of_no_return))

        stream = await self._connect(
            lambda timeout: self.link.connect_ota(
                timeout, settings, on_progress, lambda size: self._on_all_size(phase, size)
            ),
            f"connecting to the OTA port {self.target.ota_port}",
            on_late=lambda late: late.abort(StreamEnd.ABORTED, "the job is stopping"),
        )
        self._streams.add(stream)
        result = await self._wait(stream.done)  # a stop cancels done: STOP, then close
        self._streams.discard(stream)
        self.facts.streams.append(
            {
                "phase": phase.value,
                "end": result.end.value,
                "bytes_served": result.bytes_served,
                "requests": result.requests,
                "bad_headers": result.bad_headers,
                "all_size": result.all_size,
            }
        )
        log.info(
            "{phase} stream ended {end}: {served} bytes in {requests} replies, {bad} bad headers",
            phase=phase_label(phase),
            end=result.end.value,
            served=result.bytes_served,
            requests=result.requests,
            bad=result.bad_headers,
            **self.log_context,
        )
        return result

    async def _fetch_description_retrying(self, window: float, what: str) -> DeviceDescription:
        try:
            return await self._poll_description(lambda d: True, window, what)
        except RetriesExhausted as e:
            if isinstance(e.last_error, DescriptionFetchError):
                failure = FailureClass.PROTOCOL_ERROR
            elif _is_timeout(e.last_error):
                failure = FailureClass.TIMEOUT
            else:
                failure = FailureClass.CONNECTION
            raise UpgradeFailed(failure, str(e)) from None

    async def _poll_description(
        self, wanted: Callable[[DeviceDescription], bool], window: float, what: str
    ) -> DeviceDescription:
        """Fetch the description document until ``wanted`` holds, for at most ``window`` seconds."""

        async def attempt() -> DeviceDescription:
            description = await self.link.fetch_description(self.timeouts.http)
            if not wanted(description):
                raise _NotYet(
                    f"the device answered ota_type {description.ota_type!r} ota_step {description.ota_step!r}"
                )
            return description

        return await self._retry(
            attempt,
            window,
            self.timeouts.http,
            what,
            policy=lambda attempt_number: min(self.timeouts.poll_interval, 0.2 * 1.5**attempt_number),
            retryable=(Exception,),
        )

    async def _run_reconnect_hook(self) -> None:
        """Run ``target.reconnect_command`` (if any) with NETOTA_DEVICE/INTERFACE/SSID/PHASE set, bounded by
        ``timeouts.hook``; its failure is logged, not fatal (the poll that follows decides)."""
        command = self.target.reconnect_command
        if not command:
            return
        env = dict(os.environ)
        env.update(
            NETOTA_DEVICE=self.target.name,
            NETOTA_INTERFACE=self.target.interface or "",
            NETOTA_SSID=self.target.expected_ssid or "",
            NETOTA_PHASE=self.phase.value,
        )
        log.info("running the reconnect command {command!r}", command=command, **self.log_context)
        result = await self._wait(self.link.run_hook(command, env, self.timeouts.hook))
        if result.ok:
            log.info("reconnect command succeeded", **self.log_context)
        elif result.error:
            log.warn("the reconnect command {error}", error=result.error, **self.log_context)
        elif result.timed_out:
            log.warn(
                "reconnect command killed after {seconds:g} s: {output}",
                seconds=self.timeouts.hook,
                output=result.output,
                **self.log_context,
            )
        else:
            log.warn(
                "reconnect command ended with {code}: {output}",
                code=result.exit_code,
                output=result.output,
                **self.log_context,
            )

    async def _cleanup(self) -> None:
        """Close whatever the job still holds (after a stop or a failure), STOP on open streams."""
        reason = self.lifecycle.stop.reason if self.lifecycle.stop else "the job ended"
        waits: list[defer.Deferred[None]] = []
        for stream in list(self._streams):
            stream.abort(StreamEnd.ABORTED, reason)
            waits.append(stream.closed)
        for ctp in list(self._ctp_sessions):
            waits.append(ctp.close(CLEANUP_GRACE))
        pending = [d for d in waits if not d.called]
        if pending:
            together = defer.DeferredList(pending, consumeErrors=True)
            together.addTimeout(2 * CLEANUP_GRACE, self.clock)
            try:
                await together
            except defer.TimeoutError:
                log.warn("some connections did not close in time", **self.log_context)
        self._streams.clear()
        self._ctp_sessions.clear()

    # -- events and outcomes -------------------------------------------------------------------
    def _set_phase(self, phase: Phase, message: str = "") -> None:
        if phase is not Phase.DONE:  # the result is known: a late stop changes nothing
            self._raise_if_stopping()
        self.phase = phase
        log.info("{phase}: {message}", phase=phase_label(phase), message=message, **self.log_context)
        self.events.publish(PhaseChanged(phase, message))

    def _on_all_size(self, phase: Phase, size: int) -> None:
        if phase is Phase.PHASE2 and not self.point_of_no_return:
            self.point_of_no_return = True
            log.warn(
                "point of no return: the loader erases flash for {size} bytes; the old firmware is gone",
                size=size,
                **self.log_context,
            )

    def _stopped_outcome(self) -> Outcome:
        stop = self.lifecycle.stop
        assert stop is not None
        if stop.kind is StopKind.DEADLINE:
            if self.phase is Phase.VERIFY:
                return self._outcome(
                    OutcomeKind.UNVERIFIED,
                    "the device was flashed; the job's deadline passed before its new firmware answered",
                    Happened.UNVERIFIED,
                )
            detail = f" (last: {self.facts.last_problem})" if self.facts.last_problem else ""
            return self._failed(FailureClass.TIMEOUT, f"{stop.reason} during {phase_label(self.phase)}{detail}")
        if self.phase is Phase.VERIFY:
            return self._outcome(
                OutcomeKind.ABORTED, f"{stop.reason}, while waiting for the new firmware", Happened.ABORTED
            )
        return self._outcome(OutcomeKind.ABORTED, f"{stop.reason}, during {phase_label(self.phase)}", Happened.ABORTED)

    def _already_current(self) -> Outcome:
        self._set_phase(Phase.DONE, "the device already runs this firmware")
        return self._outcome(
            OutcomeKind.ALREADY_CURRENT,
            "the device already runs this firmware (it answered SAME): nothing was changed",
            Happened.ALREADY_CURRENT,
        )

    def _failed(self, failure: FailureClass, message: str) -> Outcome:
        return self._outcome(OutcomeKind.FAILED, message, Happened.FAILED, failure=failure)

    def _advice(self, happened: Happened) -> str:
        """The advice for an outcome that ends the job now."""
        if happened in (Happened.FAILED, Happened.ABORTED) and self.facts.old_firmware_back:
            happened = Happened.OLD_FIRMWARE_BACK  # the device is back in its old firmware, not its loader
        phase = self.phase
        if phase is Phase.PHASE1 and self.facts.phase1_completed:
            phase = Phase.REBOOT  # it ended while closing phase 1's session: the device reboots into its loader
        return advice(happened, phase, self.point_of_no_return)

    def _outcome(
        self,
        kind: OutcomeKind,
        message: str,
        happened: Happened,
        failure: FailureClass | None = None,
        after: str | None = None,
    ) -> Outcome:
        return Outcome(
            kind=kind,
            message=message,
            phase=self.phase,
            failure=failure,
            advice=self._advice(happened),
            point_of_no_return=self.point_of_no_return,
            firmware_version_before=self.facts.version_before,
            firmware_version_after=after,
            details={
                "job": self.job_id,
                "device": self.target.name,
                "image": str(self.image.path),
                "image_size": self.image.size,
                "phase2_attempts": self.facts.phase2_attempts,
                "streams": list(self.facts.streams),
            },
        )


def _stream_failure_class(end: StreamEnd) -> FailureClass:
    return {
        StreamEnd.DROPPED: FailureClass.CONNECTION,
        StreamEnd.TIMEOUT: FailureClass.TIMEOUT,
        StreamEnd.PROTOCOL_ERROR: FailureClass.PROTOCOL_ERROR,
        StreamEnd.ERR: FailureClass.DEVICE_ERROR,
    }.get(end, FailureClass.PROTOCOL_ERROR)


def _is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (defer.TimeoutError, error.TimeoutError, _NotYet))
