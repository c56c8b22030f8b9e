"""``UpgradeJob``: one single-backup upgrade of one device, from detection to the new version.

The flow, as one readable coroutine (``docs/engine.md`` draws it)::

    DETECT  description document -> double backup: NOT_APPLICABLE; ota_step 1: straight to PHASE2
    PHASE1  CTP APP_ACCESS, NET_OTA_SINGLE, keep-alive, OTA stream (forward reads)  -> OK / SAME
    REBOOT  optional reconnect hook; poll the description document until the loader answers
    PHASE2  CTP APP_ACCESS, description document, OTA stream; retried from the start after a
            dropped session or a timeout (the loader allows it) until the overall deadline
    VERIFY  optional reconnect hook; poll until the main firmware answers; read firmware_version

Every step has its own timeout (:class:`~netota_daemon.engine.settings.UpgradeTimeouts`) inside one
overall deadline. ``run()`` never fails: every error becomes an :class:`Outcome`. ``cancel()``
cancels whatever step is running (the OTA stream sends STOP) and the outcome is ABORTED.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.engine.events import EventPublisher, Finished, PhaseChanged, Progress
from netota_daemon.engine.outcome import (
    ADVICE_DOUBLE_BACKUP,
    ADVICE_NOTHING_SENT,
    ADVICE_RESET,
    ADVICE_UNVERIFIED,
    FailureClass,
    Outcome,
    OutcomeKind,
    Phase,
    UpgradeFailed,
    recovery_advice,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ctp_client import (
    CtpClientFactory,
    CtpClientProtocol,
    CtpConnectionLost,
    CtpErrorReply,
    CtpReplyTimeout,
)
from netota_daemon.protocols.description_fetch import DescriptionFetchError, fetch_description
from netota_daemon.protocols.endpoints import (
    DeviceConnector,
    EndpointError,
    RetriesExhausted,
    connection_error_message,
    retry_until_deadline,
)
from netota_daemon.protocols.ota_stream import (
    OtaStreamFactory,
    OtaStreamProtocol,
    StreamEnd,
    StreamProgress,
    StreamResult,
    StreamSettings,
)
from netota_daemon.wire.ctp import CtpProtocolError
from netota_daemon.wire.description import DeviceDescription

log = Logger()

T = TypeVar("T")

#: How long closing the job's own connections may take before they are aborted.
CLEANUP_GRACE = 3.0


class _NotYet(Exception):
    """A poll reached the device, but not in the wanted state yet."""


class _HookProcess(ProcessProtocol):
    """The reconnect hook's process: collects a little output, fires ``ended`` with the exit code."""

    def __init__(self) -> None:
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[: max(0, 4096 - len(self.output))]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(getattr(reason.value, "exitCode", None))


class UpgradeJob:
    """One upgrade of one device. See the module docstring."""

    def __init__(
        self,
        reactor: Any,
        target: DeviceTarget,
        image: FirmwareImage,
        timeouts: UpgradeTimeouts,
        job_id: str,
        log_context: dict[str, Any] | None = None,
        verify_only: bool = False,
    ) -> None:
        self.reactor = reactor
        # Resuming a job that ended while its device rebooted into the new firmware: phase 2 is
        # done, so only read the version back (flashing again would only be refused as the same image).
        self.verify_only = verify_only
        self.clock = reactor
        self.target = target
        self.image = image
        self.timeouts = timeouts
        self.job_id = job_id
        self.log_context: dict[str, Any] = {**(log_context or {}), "job": job_id, "device": target.name}
        self.events = EventPublisher()
        self.phase = Phase.DETECT
        self.point_of_no_return = False
        self.outcome: Outcome | None = None
        self.connector = DeviceConnector(reactor, target.host, target.interface, target.source_address)
        self._task: defer.Deferred[Outcome] | None = None
        self._waiters: list[defer.Deferred[Outcome]] = []
        self._cancel_reason: str | None = None
        self._deadline_passed = False
        self._deadline_call: IDelayedCall | None = None
        self._cancel_call: IDelayedCall | None = None
        self._finishing = False
        self._started = False
        self._ctp_sessions: set[CtpClientProtocol] = set()
        self._streams: set[OtaStreamProtocol] = set()
        self._hooks: set[_HookProcess] = set()
        self._version_before: str | None = None
        self._last_problem = ""
        self._phase2_attempts = 0
        self._old_firmware_answers = False  # phase 2 found the main firmware before any all_size
        self._phase1_completed = False  # phase 1 ended OK (the job may still be closing its CTP session)
        self._stream_results: list[dict[str, Any]] = []

    # -- public API ----------------------------------------------------------------------------
    def run(self) -> defer.Deferred[Outcome]:
        """Start the job (once); fires with its :class:`Outcome` and never fails."""
        if not self._started:
            self._started = True
            self._deadline_call = self.clock.callLater(self.timeouts.deadline, self._on_deadline)
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
        """Abort the job: the running step is cancelled (STOP on an open stream); ``run()`` then
        fires with an ABORTED outcome. A no-op once the job is done."""
        if not self._started or self.outcome is not None or self._cancel_reason is not None:
            return
        self._cancel_reason = reason
        log.info("cancelling: {reason}", reason=reason, **self.log_context)
        # Cancel from the reactor, not from inside whatever called us: cancel() is often called
        # by an event subscriber while the job's own code is running.
        self._cancel_call = self.clock.callLater(0, self._cancel_now)

    def _cancel_now(self) -> None:
        self._cancel_call = None
        if self._task is not None and not self._task.called and not self._finishing:
            self._task.cancel()

    # -- the flow ------------------------------------------------------------------------------
    async def _run(self) -> Outcome:
        try:
            outcome = await self._upgrade()
        except defer.CancelledError:
            outcome = self._interrupted_outcome()
        except UpgradeFailed as e:
            outcome = self._failed(e.failure, e.message)
        except Exception as e:
            if self._cancel_reason is not None:  # a cancellation reported as another error
                outcome = self._interrupted_outcome()
            else:  # a bug: still an outcome, never an errback
                log.failure("the upgrade job failed unexpectedly", **self.log_context)
                outcome = self._failed(FailureClass.PROTOCOL_ERROR, f"internal error: {type(e).__name__}: {e}")
        self._finishing = True  # a cancel from now on has nothing left to cancel
        try:
            await self._cleanup()
        except defer.CancelledError:
            pass
        return outcome

    def _deliver(self, outcome: Outcome) -> Outcome:
        self.outcome = outcome
        for call in (self._deadline_call, self._cancel_call):
            if call is not None and call.active():
                call.cancel()
        self._deadline_call = self._cancel_call = None
        log.info(
            "upgrade ended: {kind} in {phase}: {message}",
            kind=outcome.kind.value,
            phase=outcome.phase.value,
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
        self._set_phase(Phase.DETECT, f"reading the description document of {self.connector.describe()}")
        try:
            self.connector.check()
        except EndpointError as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None
        if self.verify_only:
            return await self._verify_outcome()
        description = await self._fetch_description_retrying(
            self.timeouts.connect_window, "reading the device description"
        )
        # The loader's fixed document always says 1.0.1: it tells nothing of the installed firmware.
        self._version_before = None if description.in_loader else description.firmware_version
        if not description.single_backup:
            return self._outcome(
                OutcomeKind.NOT_APPLICABLE,
                f"the device runs a double-backup build (ota_type {description.ota_type or 'absent'}); "
                "this single-backup flow does not apply",
                advice=ADVICE_DOUBLE_BACKUP,
            )
        if description.in_loader:
            log.info("the device is already in its update loader: resuming at phase 2", **self.log_context)
        else:
            if await self._phase1() is StreamEnd.SAME:
                return self._already_current()
            await self._wait_for_loader()
        if await self._phase2() is StreamEnd.SAME:
            return self._already_current()
        return await self._verify_outcome()

    async def _verify_outcome(self) -> Outcome:
        version = await self._verify()
        if version is None:
            return self._outcome(
                OutcomeKind.UNVERIFIED,
                f"the device was flashed but its new firmware did not answer within {self.timeouts.verify:g} s",
                advice=ADVICE_UNVERIFIED,
            )
        self._set_phase(Phase.DONE, f"the device runs firmware {version}")
        message = f"upgraded: the device now runs firmware {version}"
        if version == self._version_before:
            message += " (the same version it reported before)"
        return self._outcome(OutcomeKind.SUCCEEDED, message, after=version)

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
            self._phase1_completed = result.end is StreamEnd.OK  # the device now reboots into its loader
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
                f"({_last_error_text(e)})",
            ) from None

    # -- phase 2 -------------------------------------------------------------------------------
    async def _phase2(self) -> StreamEnd:
        self._set_phase(Phase.PHASE2, "update loader: the second stream rewrites flash")
        errors_left = self.timeouts.phase2_error_retries
        while True:
            self._raise_if_cancelled()
            self._phase2_attempts += 1
            try:
                result = await self._phase2_attempt()
            except UpgradeFailed as e:
                if e.failure not in (FailureClass.CONNECTION, FailureClass.TIMEOUT):
                    raise
                self._last_problem = e.message
            else:
                if result.end is StreamEnd.OK or result.end is StreamEnd.SAME:
                    return result.end
                if result.end is StreamEnd.ERR:
                    if errors_left <= 0:
                        raise UpgradeFailed(
                            FailureClass.DEVICE_ERROR,
                            f"the update loader ended phase 2 with ERR ({self._phase2_attempts} attempt(s)): "
                            "it rejected the image",
                        )
                    errors_left -= 1
                elif result.end is StreamEnd.PROTOCOL_ERROR:
                    raise UpgradeFailed(FailureClass.PROTOCOL_ERROR, f"phase 2: {result.message}")
                self._last_problem = result.message
            log.info(
                "phase 2 attempt {attempt} failed ({problem}); starting again",
                attempt=self._phase2_attempts,
                problem=self._last_problem,
                **self.log_context,
            )
            await deferLater(self.clock, self.timeouts.poll_interval, lambda: None)

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
                self._old_firmware_answers = True
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

    # -- steps ---------------------------------------------------------------------------------
    async def _connect(self, port: int, factory: Any, what: str) -> Any:
        """Connect ``factory`` to the device's ``port``, retried within the connection window;
        a window with no connection is a CONNECTION failure."""
        endpoint = self.connector.endpoint(port, self.timeouts.connect)
        try:
            return await retry_until_deadline(
                self.clock,
                lambda: endpoint.connect(factory),
                self.timeouts.connect_window,
                self.timeouts.connect,
                f"connecting to {what} port {port}",
                log_context=self.log_context,
            )
        except RetriesExhausted as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None

    async def _open_ctp(self) -> CtpClientProtocol:
        factory = CtpClientFactory(self.clock, self.log_context)
        ctp: CtpClientProtocol = await self._connect(self.target.ctp_port, factory, "CTP")
        self._ctp_sessions.add(ctp)
        return ctp

    async def _close_ctp(self, ctp: CtpClientProtocol) -> None:
        """Close a CTP session and wait (bounded) until it is closed; abort it if that takes too long."""
        closed = ctp.close()
        if not closed.called:
            await _bounded(closed, CLEANUP_GRACE, self.clock, ctp.transport.abortConnection)
        self._ctp_sessions.discard(ctp)

    async def _ctp_step(self, awaitable: Awaitable[T], what: str) -> T:
        """Await a CTP request, turning its errors into :class:`UpgradeFailed`."""
        try:
            return await awaitable
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
            echo_final_notice=self.timeouts.echo_final_notice,
        )
        factory = OtaStreamFactory(
            image=self.image,
            clock=self.clock,
            settings=settings,
            on_progress=lambda p: self._on_progress(phase, p),
            on_all_size=lambda size: self._on_all_size(phase, size),
            log_context=self.log_context,
        )
        stream: OtaStreamProtocol = await self._connect(self.target.ota_port, factory, "OTA")
        self._streams.add(stream)
        result = await stream.done
        self._streams.discard(stream)
        self._stream_results.append(
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
            phase=phase.value,
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
        seen: list[DeviceDescription] = []

        async def attempt() -> DeviceDescription:
            description = await fetch_description(self.connector, self.target.http_port, self.timeouts.http, self.clock)
            if not wanted(description):
                seen.append(description)
                raise _NotYet(
                    f"the device answered ota_type {description.ota_type!r} ota_step {description.ota_step!r}"
                )
            return description

        return await retry_until_deadline(
            self.clock,
            attempt,
            window,
            self.timeouts.http,
            what,
            policy=lambda attempt_number: min(self.timeouts.poll_interval, 0.2 * 1.5**attempt_number),
            retryable=(Exception,),
            log_context=self.log_context,
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
        process = _HookProcess()
        self._hooks.add(process)
        log.info("running the reconnect command {command!r}", command=command, **self.log_context)
        try:
            self.reactor.spawnProcess(process, "/bin/sh", ["/bin/sh", "-c", command], env=env)
        except Exception as e:  # no /bin/sh, no process support: the poll that follows decides
            self._hooks.discard(process)
            log.warn("the reconnect command could not start: {error}", error=str(e), **self.log_context)
            return
        try:
            ended = process.ended
            code = await _bounded(ended, self.timeouts.hook, self.clock, lambda: _kill(process))
        finally:
            if not process.ended.called:
                _kill(process)
                await _bounded(process.ended, CLEANUP_GRACE, self.clock, lambda: None)
            self._hooks.discard(process)
        if code == 0:
            log.info("reconnect command succeeded", **self.log_context)
        else:
            log.warn(
                "reconnect command ended with {code}: {output}",
                code=code,
                output=bytes(process.output).decode("utf-8", "replace").strip(),
                **self.log_context,
            )

    async def _cleanup(self) -> None:
        """Close whatever the job still holds (after a cancel or a failure), STOP on open streams."""
        waits: list[defer.Deferred[Any]] = []
        for stream in list(self._streams):
            stream.abort(StreamEnd.ABORTED, self._cancel_reason or "the job ended")
            waits.append(stream.closed)
        for ctp in list(self._ctp_sessions):
            waits.append(ctp.close())
        for process in list(self._hooks):
            _kill(process)
            waits.append(process.ended)
        pending = [d for d in waits if not d.called]
        if pending:
            together = defer.DeferredList(pending, consumeErrors=True)
            together.addTimeout(CLEANUP_GRACE, self.clock)
            try:
                await together
            except defer.TimeoutError:
                for ctp in self._ctp_sessions:
                    if ctp.connected:
                        ctp.transport.abortConnection()
        self._streams.clear()
        self._ctp_sessions.clear()
        self._hooks.clear()

    # -- events and outcomes -------------------------------------------------------------------
    def _set_phase(self, phase: Phase, message: str = "") -> None:
        if phase is not Phase.DONE:  # the result is known: a late cancel changes nothing
            self._raise_if_cancelled()
        self.phase = phase
        log.info("phase {phase}: {message}", phase=phase.value, message=message, **self.log_context)
        self.events.publish(PhaseChanged(phase, message))

    def _raise_if_cancelled(self) -> None:
        """A cancel that arrived while a step was finishing anyway is honoured at the next step."""
        if self._cancel_reason is not None and not self._finishing:
            raise defer.CancelledError(self._cancel_reason)

    def _on_progress(self, phase: Phase, progress: StreamProgress) -> None:
        self.events.publish(
            Progress(
                phase=phase,
                bytes_served=progress.bytes_served,
                total_bytes=progress.total_bytes,
                percent=progress.percent,
                device_percent=progress.device_percent,
                rate=progress.rate,
                point_of_no_return=self.point_of_no_return,
            )
        )

    def _on_all_size(self, phase: Phase, size: int) -> None:
        if phase is Phase.PHASE2 and not self.point_of_no_return:
            self.point_of_no_return = True
            log.warn(
                "point of no return: the loader erases flash for {size} bytes; the old firmware is gone",
                size=size,
                **self.log_context,
            )

    def _on_deadline(self) -> None:
        self._deadline_call = None
        if self._task is not None and not self._task.called and self._cancel_reason is None and not self._finishing:
            self._deadline_passed = True
            self._cancel_reason = f"the job's deadline of {self.timeouts.deadline:g} s passed"
            self._task.cancel()

    def _interrupted_outcome(self) -> Outcome:
        if self._deadline_passed:
            if self.phase is Phase.VERIFY:
                return self._outcome(
                    OutcomeKind.UNVERIFIED,
                    "the device was flashed; the job's deadline passed before its new firmware answered",
                    advice=ADVICE_UNVERIFIED,
                )
            detail = f" (last problem: {self._last_problem})" if self._last_problem else ""
            return self._failed(FailureClass.TIMEOUT, f"{self._cancel_reason} during {self.phase.value}{detail}")
        reason = self._cancel_reason or "cancelled"
        if self.phase is Phase.VERIFY:
            return self._outcome(
                OutcomeKind.ABORTED, f"aborted while waiting for the new firmware: {reason}", advice=ADVICE_UNVERIFIED
            )
        return self._outcome(
            OutcomeKind.ABORTED,
            f"aborted during {self.phase.value}: {reason}",
            advice=self._advice(),
        )

    def _already_current(self) -> Outcome:
        self._set_phase(Phase.DONE, "the device already runs this firmware")
        return self._outcome(
            OutcomeKind.ALREADY_CURRENT,
            "the device already runs this firmware (SAME): nothing was changed",
            advice="Nothing to do.",
        )

    def _failed(self, failure: FailureClass, message: str) -> Outcome:
        return self._outcome(OutcomeKind.FAILED, message, failure=failure, advice=self._advice())

    def _advice(self) -> str:
        """The recovery advice for a job that ends now without success."""
        if self.phase is Phase.DETECT:  # only the description document was read
            return ADVICE_NOTHING_SENT
        if self._old_firmware_answers:  # the device is back in its old firmware, not in its loader
            return ADVICE_RESET
        if self.phase is Phase.PHASE1 and self._phase1_completed:  # ended while closing phase 1's CTP
            return recovery_advice(self.point_of_no_return, Phase.REBOOT)
        return recovery_advice(self.point_of_no_return, self.phase)

    def _outcome(
        self,
        kind: OutcomeKind,
        message: str,
        failure: FailureClass | None = None,
        advice: str = "",
        after: str | None = None,
    ) -> Outcome:
        phase = self.phase
        return Outcome(
            kind=kind,
            message=message,
            phase=phase,
            failure=failure,
            advice=advice,
            point_of_no_return=self.point_of_no_return,
            firmware_version_before=self._version_before,
            firmware_version_after=after,
            details={
                "job": self.job_id,
                "device": self.target.name,
                "image": str(self.image.path),
                "image_size": self.image.size,
                "phase2_attempts": self._phase2_attempts,
                "streams": list(self._stream_results),
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


def _last_error_text(e: RetriesExhausted) -> str:
    return f"last: {connection_error_message(e.last_error)}"


def _kill(process: _HookProcess) -> None:
    try:
        process.transport.signalProcess("KILL")
    except Exception:  # already gone
        pass


async def _bounded(d: defer.Deferred[T], seconds: float, clock: Any, on_timeout: Callable[[], None]) -> T | None:
    """Await ``d`` for at most ``seconds``; on timeout call ``on_timeout`` and return None.
    ``d`` itself is not cancelled (it is a process's end, which only the process decides)."""
    waiter: defer.Deferred[T] = defer.Deferred()

    def relay(result: T) -> T:
        if not waiter.called:
            waiter.callback(result)
        return result

    d.addCallback(relay)
    waiter.addTimeout(seconds, clock)
    try:
        return await waiter
    except defer.TimeoutError:
        on_timeout()
        return None
