"""A scripted fake of the engine's device link, for the engine's decision tests on a ``Clock``.

:class:`FakeDevice` models what a job meets: the main firmware or the phase-2 loader answering (or
nobody, while it reboots), its CTP answers, what each OTA session does (:class:`StreamPlan`), the
reconnect hook. :class:`FakeLink` is the job's link to it; it records every call (``calls``), every
STOP the job asked for (``stops``), and what is still open (``open_sessions``), so a test checks the
decisions, the wire-level intent and that nothing leaks. No socket is opened and no process started.

Each fake call behaves like the real link's: a connection attempt to a device that is down fails
with ``ConnectionRefusedError``; one that hangs can be cancelled (``ConnectingCancelledError``); a
description fetch is bounded by its own timeout (``defer.TimeoutError``), like the real one; a CTP
request without an answer fails with ``CtpReplyTimeout`` after its timeout; an OTA session plays its
plan on the clock and reports :class:`~netota_daemon.protocols.ota_stream.StreamProgress` facts.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.task import Clock

from netota_daemon.engine.outcome import Outcome
from netota_daemon.protocols.ctp_client import CtpConnectionLost, CtpErrorReply, CtpReplyTimeout
from netota_daemon.protocols.description_fetch import DescriptionFetchError
from netota_daemon.protocols.endpoints import EndpointError
from netota_daemon.protocols.ftp_upload import (
    FtpUploadSettings,
    UploadCancelled,
    UploadEnd,
    UploadProgress,
    UploadResult,
)
from netota_daemon.protocols.ota_stream import (
    DeviceActivity,
    StreamEnd,
    StreamProgress,
    StreamResult,
    StreamSettings,
)
from netota_daemon.protocols.reconnect_hook import HookResult
from netota_daemon.wire.ctp import CtpFrame
from netota_daemon.wire.description import DeviceDescription

IMAGE_SIZE = 100_000


class Mode(str, enum.Enum):
    MAIN = "main"
    LOADER = "loader"
    DOWN = "down"  # rebooting: nothing answers
    GONE = "gone"  # never answers again (connections hang)


@dataclass
class StreamPlan:
    """What one OTA session does, in seconds from its connection.

    ``reads`` READs of ``read_size`` bytes, ``read_interval`` apart (forward from 0; in phase 2
    ``header_reads`` small reads first, then the all_size notice (when ``all_size``), then the rest
    backwards); then ``end``: OK / ERR / SAME after the final notice, or the session is DROPPED,
    TIMEOUT or PROTOCOL_ERROR right after the reads. ``hang_after`` reads: the device goes silent and
    the session never ends by itself (only a stop ends it)."""

    reads: int = 5
    read_size: int = 20_000
    read_interval: float = 0.2
    all_size: bool = False
    header_reads: int = 2
    end: StreamEnd = StreamEnd.OK
    final_wait: float = 1.0
    hang_after: int | None = None
    end_after: float | None = None  # the session ends with ``end`` this long after connecting, whatever it did
    message: str = ""


@dataclass
class UploadPlan:
    """What one FTP upload does: it runs ``seconds``, sends ``fraction`` of the image, and ends with
    ``end`` (``code`` the reply that decided it). When the whole image went out cleanly (COMPLETE,
    or ``clean_close``) and ``accepted``, the device reboots into its new bank 2 s later."""

    end: UploadEnd = UploadEnd.COMPLETE
    code: int | None = 226
    seconds: float = 4.0
    fraction: float = 1.0
    clean_close: bool = False
    accepted: bool = True
    message: str = ""


@dataclass
class CtpPlan:
    """How the device answers CTP in its main firmware."""

    app_access: str = "ok"  # ok | errno | silent | drop
    net_ota_single: str = "1"  # the status it answers, or errno | silent
    errno: int = 3


@dataclass
class Call:
    time: float
    what: str
    detail: dict[str, Any] = field(default_factory=dict)


class FakeDevice:
    """The device the fake link reaches. Its mode changes after a phase's OK, as the real one's."""

    def __init__(
        self,
        clock: Clock,
        mode: Mode = Mode.MAIN,
        version: str = "1.0.0",
        new_version: str = "2.0.0",
        ota_type: str | None = "1",
        reboot_seconds: float = 5.0,
        new_firmware_seconds: float = 3.0,
    ) -> None:
        self.clock = clock
        self.mode = mode
        self.version = version
        self.new_version = new_version
        self.ota_type = ota_type
        self.reboot_seconds = reboot_seconds
        self.new_firmware_seconds = new_firmware_seconds
        self.ctp = CtpPlan()
        self.phase1: deque[StreamPlan] = deque([StreamPlan()])
        self.phase2: deque[StreamPlan] = deque([StreamPlan(all_size=True)])
        self.description_override: Callable[[FakeDevice], DeviceDescription | BaseException | None] | None = None
        self.connect_hangs = False  # connection attempts neither succeed nor fail
        self.refuse: set[str] = set()  # connection kinds ("ctp", "ota") refused even when the device is up
        self.fetch_hangs = False  # description fetches get no answer (bounded by their own timeout)
        self.hook_result = HookResult(exit_code=0, output="rejoined")
        self.hook_seconds = 1.0
        self.hook_hangs = False
        self.ctp_close_seconds = 0.0  # closing a CTP session takes this long
        self.ctp_close_raises = False  # closing a CTP session raises (a bug below the engine)
        self.stays_down = False  # after phase 1's OK it never comes back
        self.new_firmware_silent = False  # after phase 2's OK the new firmware never answers
        self.timers: set[Any] = set()  # the device's own scheduled reboots (not the job's)
        self.uploads: deque[UploadPlan] = deque([UploadPlan()])
        self.fixed_version = False  # a double-backup build's dev_desc carries a fixed version string

    # -- what it answers -------------------------------------------------------------------------
    def description(self) -> DeviceDescription | BaseException:
        if self.description_override is not None:
            answer = self.description_override(self)
            if answer is not None:
                return answer
        if self.mode in (Mode.DOWN, Mode.GONE):
            return error.ConnectionRefusedError()
        if self.mode is Mode.LOADER:
            return DeviceDescription(ota_type="1", ota_step="1", firmware_version="1.0.1")
        return DeviceDescription(ota_type=self.ota_type, ota_step="0", firmware_version=self.version)

    def reboot(self, into: Mode, seconds: float) -> None:
        self.mode = Mode.DOWN

        def up() -> None:
            self.timers.discard(call)
            self.mode = into

        call = self.clock.callLater(seconds, up)
        self.timers.add(call)

    def bank_switched(self) -> None:
        """A double-backup device took the upload: it reboots into the new bank 2 s later."""

        def go() -> None:
            self.timers.discard(call)
            if not self.fixed_version:
                self.version = self.new_version
            self.reboot(Mode.MAIN, self.new_firmware_seconds)

        call = self.clock.callLater(2.0, go)
        self.timers.add(call)

    def phase_ok(self, phase: int) -> None:
        if phase == 1:
            if self.stays_down:
                self.mode = Mode.DOWN
            else:
                self.reboot(Mode.LOADER, self.reboot_seconds)
        else:
            self.version = self.new_version
            if self.new_firmware_silent:
                self.mode = Mode.DOWN
            else:
                self.reboot(Mode.MAIN, self.new_firmware_seconds)


class FakeCtp:
    """A CTP session: answers by the device's plan (the loader always echoes APP_ACCESS)."""

    def __init__(self, link: FakeLink) -> None:
        self.link = link
        self.device = link.device
        self.keepalive: float | None = None
        self.closed_ = False
        self._pending: list[defer.Deferred[Any]] = []

    def _answer(self, topic: str, how: str, timeout: float, value: Any) -> defer.Deferred[Any]:
        self.link.record("ctp", topic=topic, how=how)
        d: defer.Deferred[Any] = defer.Deferred()
        if how == "errno":
            d.errback(CtpErrorReply(topic, self.device.ctp.errno, "CTP_ACCESS_RFU_MSG"))
        elif how == "drop":
            d.errback(CtpConnectionLost("the CTP connection closed: Connection was closed cleanly."))
        elif how == "silent":
            timer = self.device.clock.callLater(
                timeout, lambda: d.called or d.errback(CtpReplyTimeout(f"no reply to {topic} within {timeout:g} s"))
            )
            d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        else:
            d.callback(value)
        return d

    def app_access(self, timeout: float) -> defer.Deferred[CtpFrame]:
        how = "ok" if self.device.mode is Mode.LOADER else self.device.ctp.app_access
        return self._answer("APP_ACCESS", how, timeout, CtpFrame("APP_ACCESS", {"op": "NOTIFY", "param": {}}))

    def net_ota_single(self, timeout: float) -> defer.Deferred[str]:
        plan = self.device.ctp.net_ota_single
        how = plan if plan in ("errno", "silent", "drop") else "ok"
        return self._answer("NET_OTA_SINGLE", how, timeout, plan)

    def start_keepalive(self, interval: float) -> None:
        self.keepalive = interval

    def close(self, grace: float) -> defer.Deferred[None]:
        if self.device.ctp_close_raises:
            self.link.open_sessions.discard(self)
            raise RuntimeError("closing the CTP session raised")
        if self.closed_:
            return defer.succeed(None)
        self.closed_ = True
        self.link.record("ctp_close")
        seconds = min(self.device.ctp_close_seconds, grace)
        if not seconds:
            self.link.open_sessions.discard(self)
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()

        def closed() -> None:
            self.link.open_sessions.discard(self)
            d.callback(None)

        self.device.clock.callLater(seconds, closed)
        return d


class FakeStream:
    """An OTA session playing a :class:`StreamPlan` on the clock."""

    def __init__(
        self,
        link: FakeLink,
        phase: int,
        plan: StreamPlan,
        on_progress: Callable[[StreamProgress], None],
        on_all_size: Callable[[int], None],
    ) -> None:
        self.link = link
        self.clock = link.device.clock
        self.phase = phase
        self.plan = plan
        self.on_progress = on_progress
        self.on_all_size = on_all_size
        self._done: defer.Deferred[StreamResult] = defer.Deferred(self._cancelled)
        self._closed: defer.Deferred[None] = defer.Deferred()
        self.served = 0
        self.requests = 0
        self.furthest = 0
        self.all_size = 0
        self.since_all_size = 0
        self.stop_sent = False
        self.activity: DeviceActivity | None = DeviceActivity.STARTING
        self._timers: list[Any] = []
        self._result: StreamResult | None = None
        self._report()
        self._later(plan.read_interval, self._step, 0)
        if plan.end_after is not None:
            self._later(plan.end_after, self._finish, plan.end)

    @property
    def done(self) -> defer.Deferred[StreamResult]:
        return self._done

    @property
    def closed(self) -> defer.Deferred[None]:
        return self._closed

    def _later(self, seconds: float, f: Callable[..., None], *args: Any) -> None:
        self._timers.append(self.clock.callLater(seconds, f, *args))

    def _report(self, ok: bool = False) -> None:
        self.on_progress(
            StreamProgress(
                bytes_served=self.served,
                image_size=IMAGE_SIZE,
                furthest=self.furthest,
                all_size=self.all_size,
                requested_since_all_size=self.since_all_size,
                device_percent=1,
                rate=self.plan.read_size / self.plan.read_interval,
                rate_span=min(3.0, self.requests * self.plan.read_interval),
                activity=self.activity,
                ok=ok,
            )
        )

    def _step(self, index: int) -> None:
        plan = self.plan
        if plan.hang_after is not None and index >= plan.hang_after:
            self.activity = DeviceActivity.QUIET
            self._report()
            return  # silent for ever
        if self.phase == 2 and plan.all_size and index == plan.header_reads and not self.all_size:
            self.all_size = IMAGE_SIZE
            self.activity = DeviceActivity.PREPARING
            self.on_all_size(IMAGE_SIZE)
            self._report()
            self._later(plan.final_wait, self._step, index)
            return
        if index >= plan.reads:
            self._ending()
            return
        size = min(plan.read_size, IMAGE_SIZE)
        self.requests += 1
        self.served += size
        self.furthest = max(self.furthest, min(IMAGE_SIZE, (index + 1) * size))
        if self.all_size:
            self.since_all_size += size
        self.activity = None
        self._report()
        self._later(plan.read_interval, self._step, index + 1)

    def _ending(self) -> None:
        end = self.plan.end
        if end in (StreamEnd.OK, StreamEnd.ERR, StreamEnd.SAME):
            self.activity = DeviceActivity.FINISHING
            self._report()
            self._later(self.plan.final_wait, self._finish, end)
        else:
            self._finish(end)

    def _finish(self, end: StreamEnd) -> None:
        if self._result is not None:
            return
        if end is StreamEnd.OK:
            self.activity = None
            self._report(ok=True)
            self.link.device.phase_ok(self.phase)
        self._end(
            StreamResult(
                end,
                self.plan.message or f"the device ended with {end.value}",
                self.served,
                self.requests,
                self.all_size,
            )
        )

    def _end(self, result: StreamResult) -> None:
        self._result = result
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        self.link.open_sessions.discard(self)
        self.link.record("ota_end", phase=self.phase, end=result.end.value, stop_sent=self.stop_sent)
        if not self._closed.called:
            self._closed.callback(None)
        if not self._done.called:
            self._done.callback(result)

    def abort(self, end: StreamEnd, message: str) -> None:
        if self._result is not None:
            return
        self.stop_sent = True
        self.link.stops.append((self.clock.seconds(), self.phase, message))
        self._end(StreamResult(end, message, self.served, self.requests, self.all_size, stop_sent=True))

    def _cancelled(self, d: defer.Deferred[StreamResult]) -> None:
        self.abort(StreamEnd.ABORTED, "cancelled")


class FakeLink:
    """The job's :class:`~netota_daemon.engine.link.DeviceLink` to a :class:`FakeDevice`."""

    def __init__(self, device: FakeDevice, check_error: str | None = None) -> None:
        self.device = device
        self.check_error = check_error
        self.calls: list[Call] = []
        self.stops: list[tuple[float, int, str]] = []
        self.open_sessions: set[Any] = set()
        self.hooks: list[dict[str, str]] = []
        self.ota_phases: list[int] = []
        self.streamed_images: list[Any] = []
        self.upload_settings: list[FtpUploadSettings] = []
        self.uploaded_images: list[Any] = []
        self.upload_resets: list[float] = []  # when an upload was cancelled (its data connection reset)

    def record(self, what: str, **detail: Any) -> None:
        self.calls.append(Call(self.device.clock.seconds(), what, detail))

    def names(self) -> list[str]:
        return [c.what for c in self.calls]

    # -- DeviceLink ------------------------------------------------------------------------------
    def describe(self) -> str:
        return "fake-device"

    def check(self) -> None:
        if self.check_error:
            raise EndpointError(self.check_error)

    def _connect(self, what: str, make: Callable[[], Any]) -> defer.Deferred[Any]:
        device = self.device
        self.record(f"connect_{what}", mode=device.mode.value)
        if device.connect_hangs or device.mode is Mode.GONE:

            def cancelled(d: defer.Deferred[Any]) -> None:
                d.errback(error.ConnectingCancelledError(None))

            return defer.Deferred(cancelled)
        if device.mode is Mode.DOWN or what in device.refuse:
            return defer.fail(error.ConnectionRefusedError())
        session = make()
        self.open_sessions.add(session)
        return defer.succeed(session)

    def fetch_description(self, timeout: float) -> defer.Deferred[DeviceDescription]:
        device = self.device
        self.record("fetch", mode=device.mode.value)
        if device.fetch_hangs or device.mode is Mode.GONE:
            d: defer.Deferred[DeviceDescription] = defer.Deferred()
            timer = device.clock.callLater(
                timeout,
                lambda: (
                    d.called
                    or d.errback(defer.TimeoutError(f"the description document: timed out after {timeout:g} s"))
                ),
            )
            d.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
            return d
        answer = device.description()
        if isinstance(answer, BaseException):
            return defer.fail(answer)
        return defer.succeed(answer)

    def connect_ctp(self, timeout: float) -> defer.Deferred[Any]:
        return self._connect("ctp", lambda: FakeCtp(self))

    def connect_ota(
        self,
        timeout: float,
        image: Any,
        settings: StreamSettings,
        on_progress: Callable[[StreamProgress], None],
        on_all_size: Callable[[int], None],
    ) -> defer.Deferred[Any]:
        device = self.device
        phase = 2 if device.mode is Mode.LOADER else 1
        plans = device.phase2 if phase == 2 else device.phase1
        plan = plans.popleft() if len(plans) > 1 else plans[0]
        self.ota_phases.append(phase)
        self.streamed_images.append(image)
        self.settings = settings
        return self._connect("ota", lambda: FakeStream(self, phase, plan, on_progress, on_all_size))

    def run_hook(self, command: str, env: Mapping[str, str], timeout: float) -> defer.Deferred[HookResult]:
        device = self.device
        self.hooks.append({k: v for k, v in env.items() if k.startswith("NETOTA_")})
        self.record("hook", command=command)
        d: defer.Deferred[HookResult] = defer.Deferred()
        if device.hook_hangs:
            timer = device.clock.callLater(timeout, lambda: d.called or d.callback(HookResult(None, timed_out=True)))
        else:
            timer = device.clock.callLater(device.hook_seconds, lambda: d.called or d.callback(device.hook_result))

        def cancel_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(cancel_timer)
        return d


def _upload(
    link: FakeLink, image: Any, settings: FtpUploadSettings, on_progress: Callable[[UploadProgress], None]
) -> defer.Deferred[UploadResult]:
    device = link.device
    clock = device.clock
    plans = device.uploads
    plan = plans.popleft() if len(plans) > 1 else plans[0]
    link.upload_settings.append(settings)
    link.uploaded_images.append(image)
    link.record("upload", mode=device.mode.value)
    total = IMAGE_SIZE
    timers: list[Any] = []
    sent = [0]

    def cancel(d: defer.Deferred[UploadResult]) -> None:
        for timer in timers:
            if timer.active():
                timer.cancel()
        link.upload_resets.append(clock.seconds())
        link.record("upload_reset")
        d.errback(UploadCancelled(sent[0], total, clean_close=False))

    d: defer.Deferred[UploadResult] = defer.Deferred(cancel)
    if device.mode is not Mode.MAIN:
        d.callback(
            UploadResult(UploadEnd.UNREACHABLE, "the FTP control connection to port 21 failed: connection refused")
        )
        return d
    steps = 4
    for i in range(1, steps + 1):

        def tick(i: int = i) -> None:
            sent[0] = int(total * plan.fraction * i / steps)
            working = i == steps and plan.fraction >= 1.0
            on_progress(
                UploadProgress(sent[0], total, total / plan.seconds, "device_working" if working else "transferring")
            )

        timers.append(clock.callLater(plan.seconds * i / (steps + 1), tick))

    def finish() -> None:
        clean = plan.end is UploadEnd.COMPLETE or plan.clean_close
        if clean and plan.accepted:
            device.bank_switched()
        link.record("upload_end", end=plan.end.value)
        d.callback(
            UploadResult(
                plan.end,
                plan.message or f"the upload ended {plan.end.value}",
                bytes_sent=sent[0],
                code=plan.code,
                server="lwip",
                clean_close=clean,
                finished_at=clock.seconds() if plan.end is UploadEnd.COMPLETE else None,
            )
        )

    timers.append(clock.callLater(plan.seconds, finish))
    return d


FakeLink.upload = _upload  # type: ignore[attr-defined]


def run_to_end(clock: Clock, job: Any, limit: float = 10_000.0) -> Outcome:
    """Run ``job`` on ``clock``, jumping from one scheduled call to the next, until it ends (at most
    ``limit`` seconds of clock time); its outcome."""
    results: list[Any] = []
    job.run().addBoth(results.append)
    while not results:
        calls = clock.getDelayedCalls()
        if not calls:
            raise AssertionError(f"the job is stuck at {clock.seconds()} s: nothing is scheduled")
        next_time = min(call.getTime() for call in calls)
        if next_time > limit:
            raise AssertionError(f"the job did not end within {limit} s")
        clock.advance(max(0.0, next_time - clock.seconds()))
    (outcome,) = results
    assert isinstance(outcome, Outcome), outcome
    return outcome


def run_until(clock: Clock, predicate: Callable[[], bool], limit: float = 10_000.0) -> None:
    """Advance ``clock`` call by call until ``predicate()`` holds."""
    while not predicate():
        calls = clock.getDelayedCalls()
        if not calls:
            raise AssertionError(f"nothing is scheduled at {clock.seconds()} s")
        next_time = min(call.getTime() for call in calls)
        if next_time > limit:
            raise AssertionError(f"not reached within {limit} s")
        clock.advance(max(0.0, next_time - clock.seconds()))


__all__ = [
    "IMAGE_SIZE",
    "CtpPlan",
    "DescriptionFetchError",
    "FakeDevice",
    "FakeLink",
    "Mode",
    "StreamPlan",
    "UploadPlan",
    "run_to_end",
    "run_until",
]
