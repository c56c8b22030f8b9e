"""``JobSteps``: what an upgrade route does with its device, step by step, under the job's lifecycle.

Both routes (:mod:`~netota_daemon.engine.single_backup`, :mod:`~netota_daemon.engine.double_backup`)
and the job itself are written with these steps: each waits through the lifecycle's guard (so a
stop always wins), retries what may be retried inside its window (publishing a ``Waiting`` event
per failed attempt), turns the link's errors into :class:`~netota_daemon.engine.outcome.UpgradeFailed`,
publishes phase and progress events, and remembers the sessions it opened so the job can close
them whatever happens.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from netota_daemon.engine.events import EventPublisher, JobEvent, PhaseChanged, Waiting
from netota_daemon.engine.lifecycle import JobLifecycle, JobStopped, LifecycleState
from netota_daemon.engine.link import CtpSession, DeviceLink, OtaSession
from netota_daemon.engine.outcome import FailureClass, Phase, Route, UpgradeFailed, phase_label
from netota_daemon.engine.progress import ProgressMeter
from netota_daemon.engine.retry import RetriesExhausted, retry_until_deadline
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ctp_client import CtpConnectionLost, CtpErrorReply, CtpReplyTimeout
from netota_daemon.protocols.description_fetch import DescriptionFetchError
from netota_daemon.protocols.endpoints import RETRYABLE_ERRORS, connection_error_message, is_turned_down
from netota_daemon.protocols.ftp_upload import FtpUploadSettings, UploadEnd, UploadProgress, UploadResult
from netota_daemon.protocols.ota_stream import StreamEnd, StreamProgress, StreamResult, StreamSettings
from netota_daemon.wire.ctp import CtpProtocolError
from netota_daemon.wire.description import DeviceDescription

log = Logger()

T = TypeVar("T")

#: How long closing the job's own connections may take before they are aborted.
CLEANUP_GRACE = 3.0
#: While waiting for a device to go away: a description document not answered within this long is a miss ...
PRESENCE_TIMEOUT = 1.0
#: ... and this many misses in a row say it has gone.
ABSENT_AFTER_MISSES = 2


class RouteEnd(str, enum.Enum):
    """How a route ended when it did not fail."""

    UPGRADED = "upgraded"  # the device should now boot the new firmware: verify it
    ALREADY_CURRENT = "already_current"  # the device said it already runs this image


class NotYet(Exception):
    """A poll reached the device, but not in the wanted state yet."""


@dataclass
class JobFacts:
    """What the job has learnt so far: the data its outcome and advice are made from."""

    route: Route = Route.SINGLE_BACKUP
    version_before: str | None = None
    phase1_completed: bool = False  # phase 1 ended OK: the device reboots into its loader
    old_firmware_back: bool = False  # phase 2 found the main firmware before any all_size notice
    phase2_attempts: int = 0
    upload_attempts: int = 0
    upload_sent_whole: bool = False  # the current upload's image went out whole and was closed cleanly
    last_problem: str = ""  # the last failed attempt's error, for a deadline's message
    streams: list[dict[str, Any]] = field(default_factory=list)
    uploads: list[dict[str, Any]] = field(default_factory=list)


class JobSteps:
    """The steps of one job; the routes and the job use them, nothing else talks to the link."""

    def __init__(
        self,
        clock: IReactorTime,
        link: DeviceLink,
        target: DeviceTarget,
        timeouts: UpgradeTimeouts,
        behaviour: UpgradeBehaviour,
        lifecycle: JobLifecycle,
        events: EventPublisher[JobEvent],
        log_context: dict[str, Any],
    ) -> None:
        self.clock = clock
        self.link = link
        self.target = target
        self.timeouts = timeouts
        self.behaviour = behaviour
        self.lifecycle = lifecycle
        self.events = events
        self.log_context = log_context
        self.phase = Phase.DETECT
        self.point_of_no_return = False
        self.facts = JobFacts()
        self.meters = {phase: ProgressMeter(phase) for phase in (Phase.PHASE1, Phase.PHASE2, Phase.UPLOAD)}
        self.ctp_sessions: set[CtpSession] = set()
        self.streams: set[OtaSession] = set()
        self.uploads: set[defer.Deferred[UploadResult]] = set()

    # -- phases and stops ------------------------------------------------------------------------
    def set_phase(self, phase: Phase, message: str = "") -> None:
        if phase is not Phase.DONE:  # the result is known: a late stop changes nothing
            self.raise_if_stopping()
        self.phase = phase
        log.info("{phase}: {message}", phase=phase_label(phase), message=message, **self.log_context)
        self.events.publish(PhaseChanged(phase, message))

    def begin_attempt(self, phase: Phase, number: int, again: str) -> None:
        """Attempt ``number`` of a phase the device starts again from the beginning: from the second
        on, a phase event says so (with what the last attempt hit) and the phase's progress starts
        again from 0. Stops the job first if it is being stopped."""
        self.raise_if_stopping()
        if number > 1:
            self.meters[phase].new_attempt()
            self.set_phase(phase, f"attempt {number}: {again} (the last attempt: {self.facts.last_problem})")

    def raise_if_stopping(self) -> None:
        stop = self.lifecycle.stop
        if stop is not None and self.lifecycle.state is LifecycleState.STOPPING:
            raise JobStopped(stop)

    # -- waits -----------------------------------------------------------------------------------
    async def wait(self, d: defer.Deferred[T], on_late: Callable[[T], object] | None = None) -> T:
        """Await ``d``; a stop of the job ends the wait at once (``d`` is cancelled; a result it still
        gives goes to ``on_late``)."""
        return await self.lifecycle.guard(d, on_late)

    async def sleep(self, seconds: float) -> None:
        await self.wait(deferLater(self.clock, seconds, lambda: None))

    async def retry(
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
                stop_check=self.raise_if_stopping,
                on_attempt_failed=failed,
            )
        )
        return await self.wait(retrying, on_late)

    # -- connections -----------------------------------------------------------------------------
    async def connect(
        self, connect: Callable[[float], defer.Deferred[T]], what: str, on_late: Callable[[T], object]
    ) -> T:
        """One connection, retried within the connection window; a window with no connection is a
        CONNECTION failure."""
        try:
            return await self.retry(
                lambda: connect(self.timeouts.connect),
                self.timeouts.connect_window,
                self.timeouts.connect,
                what,
                on_late=on_late,
            )
        except RetriesExhausted as e:
            raise UpgradeFailed(FailureClass.CONNECTION, str(e)) from None

    async def open_ctp(self) -> CtpSession:
        ctp = await self.connect(
            self.link.connect_ctp,
            f"connecting to the CTP port {self.target.ctp_port}",
            on_late=lambda late: late.close(CLEANUP_GRACE),
        )
        self.ctp_sessions.add(ctp)
        return ctp

    async def close_ctp(self, ctp: CtpSession) -> None:
        """Close a CTP session (bounded: aborted after CLEANUP_GRACE); not cut short by a stop."""
        await ctp.close(CLEANUP_GRACE)
        self.ctp_sessions.discard(ctp)

    async def ctp_step(self, request: defer.Deferred[T], what: str) -> T:
        """Await a CTP request, turning its errors into :class:`UpgradeFailed`."""
        try:
            return await self.wait(request)
        except CtpErrorReply as e:
            raise UpgradeFailed(FailureClass.DEVICE_REFUSED, str(e)) from None
        except CtpReplyTimeout as e:
            raise UpgradeFailed(FailureClass.TIMEOUT, str(e)) from None
        except CtpConnectionLost as e:
            raise UpgradeFailed(FailureClass.CONNECTION, f"{what}: {e}") from None
        except CtpProtocolError as e:
            raise UpgradeFailed(FailureClass.PROTOCOL_ERROR, f"{what}: {e}") from None

    # -- the OTA stream and the upload ---------------------------------------------------------
    async def stream(self, phase: Phase, image: FirmwareImage) -> StreamResult:
        settings = StreamSettings(
            first_header_timeout=self.timeouts.ota_accept,
            receive_timeout=self.timeouts.receive,
            max_receive_timeouts=self.timeouts.max_receive_timeouts,
            echo_final_notice=self.behaviour.echo_final_notice,
        )
        meter = self.meters[phase]

        def on_progress(facts: StreamProgress) -> None:
            self.events.publish(meter.from_stream(facts, self.point_of_no_return))

        stream = await self.connect(
            lambda timeout: self.link.connect_ota(
                timeout, image, settings, on_progress, lambda size: self._on_all_size(phase, size)
            ),
            f"connecting to the OTA port {self.target.ota_port}",
            on_late=lambda late: late.abort(StreamEnd.ABORTED, "the job is stopping"),
        )
        self.streams.add(stream)
        result = await self.wait(stream.done)  # a stop cancels done: STOP, then close
        self.streams.discard(stream)
        self.facts.streams.append(
            {
                "phase": phase.value,
                "end": result.end.value,
                "bytes_served": result.bytes_served,
                "requests": result.requests,
                "bad_headers": result.bad_headers,
                "all_size": result.all_size,
                "stop_sent": result.stop_sent,
                "receive_timeouts": result.receive_timeouts,
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

    def _on_all_size(self, phase: Phase, size: int) -> None:
        if phase is Phase.PHASE2 and not self.point_of_no_return:
            self.point_of_no_return = True
            log.warn(
                "point of no return: the loader erases flash for {size} bytes; the old firmware is gone",
                size=size,
                **self.log_context,
            )

    async def upload(self, image: FirmwareImage) -> UploadResult:
        """One FTP upload of ``image`` (double backup); a stop resets its data connection."""
        target, timeouts = self.target, self.timeouts
        settings = FtpUploadSettings(
            user=target.ftp_user,
            password=target.ftp_password,
            reply_timeout=timeouts.ftp_reply,
            stall_timeout=timeouts.ftp_stall,
            final_reply_timeout=timeouts.ftp_final_reply,
        )
        meter = self.meters[Phase.UPLOAD]
        total = image.size
        started = self.clock.seconds()

        self.facts.upload_sent_whole = False

        def on_progress(progress: UploadProgress) -> None:
            span = min(3.0, self.clock.seconds() - started)
            working = progress.state == "device_working"
            if working:
                self.facts.upload_sent_whole = True  # closed cleanly: the device attempts the burn
            self.events.publish(
                meter.from_upload(
                    progress.bytes_sent, progress.total_bytes or total, progress.rate, span, working, False
                )
            )

        uploading = self.link.upload(image, settings, on_progress)
        self.uploads.add(uploading)
        try:
            result = await self.wait(uploading)
        except JobStopped:
            raise  # still in self.uploads: cleanup waits until its connections are closed
        except BaseException:
            self.uploads.discard(uploading)
            raise
        self.uploads.discard(uploading)
        if result.end is UploadEnd.COMPLETE:
            self.events.publish(meter.from_upload(result.bytes_sent, total, 0.0, 0.0, False, True))
        return result

    # -- the description document ----------------------------------------------------------------
    async def fetch_description_retrying(self, window: float, what: str) -> DeviceDescription:
        try:
            return await self.poll_description(lambda d: True, window, what)
        except RetriesExhausted as e:
            if isinstance(e.last_error, DescriptionFetchError):
                failure = FailureClass.PROTOCOL_ERROR
            elif is_timeout(e.last_error):
                failure = FailureClass.TIMEOUT
            else:
                failure = FailureClass.CONNECTION
            raise UpgradeFailed(failure, str(e)) from None

    async def poll_description(
        self, wanted: Callable[[DeviceDescription], bool], window: float, what: str
    ) -> DeviceDescription:
        """Fetch the description document until ``wanted`` holds, for at most ``window`` seconds."""

        async def attempt() -> DeviceDescription:
            description = await self.link.fetch_description(self.timeouts.http)
            if not wanted(description):
                raise NotYet(f"the device answered ota_type {description.ota_type!r} ota_step {description.ota_step!r}")
            return description

        return await self.retry(
            attempt,
            window,
            self.timeouts.http,
            what,
            policy=lambda attempt_number: min(self.timeouts.poll_interval, 0.2 * 1.5**attempt_number),
            retryable=(Exception,),
        )

    async def wait_until_gone(
        self, window: float, what: str, back_changed: Callable[[DeviceDescription], bool] | None = None
    ) -> bool:
        """Poll the description document until the device has gone away (it reboots), for at most
        ``window`` seconds; whether it went. A document for which ``back_changed`` is true counts as
        gone and back already (a reboot quicker than the polls: it shows in what the device says).

        It has gone when a fetch is turned down (refused, reset, no route: its network stack or
        its access point is away), or when :data:`ABSENT_AFTER_MISSES` fetches in a row get no
        answer within :data:`PRESENCE_TIMEOUT`. A present device answers its small document in
        milliseconds, and a connection attempt to one that just went away would otherwise sit in
        TCP's SYN retries through the whole absence and succeed once it is back; one slow answer
        (a lost packet on the WiFi) is not an absence."""

        class _StillThere(Exception):
            pass

        presence = min(self.timeouts.http, PRESENCE_TIMEOUT)
        misses = 0

        async def attempt() -> None:
            nonlocal misses
            try:
                description = await self.link.fetch_description(presence)
            except defer.CancelledError:
                raise
            except Exception as e:
                if is_turned_down(e):
                    return  # refused, reset, unroutable: it is rebooting
                misses += 1
                if misses >= ABSENT_AFTER_MISSES:
                    return  # silent, again and again: it is away
                raise _StillThere(f"no answer within {presence:g} s ({misses} in a row)") from None
            misses = 0
            if back_changed is not None and back_changed(description):
                return  # it rebooted between two polls
            raise _StillThere("the device still answers")

        try:
            await self.retry(
                attempt,
                window,
                2 * presence,  # the fetch's own bound comes first and counts as a miss
                what,
                policy=lambda attempt_number: min(self.timeouts.poll_interval, 0.2 * 1.5**attempt_number),
                retryable=(_StillThere,),
            )
        except RetriesExhausted:
            return False
        return True

    # -- the reconnect hook ----------------------------------------------------------------------
    async def run_reconnect_hook(self) -> None:
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
        result = await self.wait(self.link.run_hook(command, env, self.timeouts.hook))
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

    # -- the end ---------------------------------------------------------------------------------
    async def cleanup(self) -> None:
        """Close whatever the job still holds (after a stop or a failure), STOP on open streams."""
        reason = self.lifecycle.stop.reason if self.lifecycle.stop else "the job ended"
        waits: list[defer.Deferred[Any]] = []
        for stream in list(self.streams):
            stream.abort(StreamEnd.ABORTED, reason)
            waits.append(stream.closed)
        for ctp in list(self.ctp_sessions):
            waits.append(ctp.close(CLEANUP_GRACE))
        waits.extend(self.uploads)  # cancelled by the stop: they end once their connections are closed
        pending = [d for d in waits if not d.called]
        if pending:
            together = defer.DeferredList(pending, consumeErrors=True)
            together.addTimeout(2 * CLEANUP_GRACE, self.clock)
            try:
                await together
            except defer.TimeoutError:
                log.warn("some connections did not close in time", **self.log_context)
        self.streams.clear()
        self.ctp_sessions.clear()
        self.uploads.clear()


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, (defer.TimeoutError, error.TimeoutError, NotYet))
