"""``ProgressMeter``: one phase's honest progress, from the facts its stream reports.

What a person reads in the bars, the API and the journal comes from here, so the rules are in one
place (``docs/engine.md`` repeats them):

- **percent** only moves forward within an attempt, and reaches 100 only once the device said OK:
  until then it stops at 99.9. A phase-2 retry starts a new attempt (the loader reads the image
  again from the start): the engine announces it with a phase event and the meter starts again.
- **what it counts** (``basis``): ``offset`` in phase 1: the furthest byte the device asked for
  against the image's length (the main firmware reads forward); ``header`` in phase 2 before the
  all_size notice: 0 (the loader first reads the image's header, and does not yet say how much it
  will read); ``all_size`` once the notice came: the bytes the device asked for since, against
  all_size; ``upload`` for a double-backup upload: bytes handed to the network against the image's
  length; ``done`` at OK. Bytes the device reads twice are never counted twice against a total.
- **state**: ``device_working`` while the device, not netota, is busy (before its first request,
  after the all_size notice while it erases, after the final notice while it checks and writes,
  when it has asked for nothing for a second after a reply, after an upload while it burns the
  image), with ``activity`` saying what; ``transferring`` otherwise; ``done`` at OK.
- **eta** only while transferring, from a rate measured over at least :data:`MIN_RATE_SPAN`
  seconds; never while the device works.
"""

from __future__ import annotations

from netota_daemon.engine.events import Progress, TransferState
from netota_daemon.engine.outcome import Phase
from netota_daemon.protocols.ota_stream import DeviceActivity, StreamProgress

#: Until the device says OK, percent stops here.
MAX_PERCENT_BEFORE_OK = 99.9
#: A rate measured over less than this many seconds gives no ETA.
MIN_RATE_SPAN = 1.0


def _activity_text(activity: DeviceActivity, phase: Phase) -> str:
    loader = phase is Phase.PHASE2
    if activity is DeviceActivity.STARTING:
        return "waiting for the device's first request"
    if activity is DeviceActivity.PREPARING:
        return "the loader is erasing flash for the new firmware" if loader else "the device prepares its flash"
    if activity is DeviceActivity.FINISHING:
        return "the loader checks and writes the new firmware" if loader else "the device checks its update loader"
    return "the loader is writing flash" if loader else "the device is writing its update loader"


class ProgressMeter:
    """The progress of one phase (one attempt at a time)."""

    def __init__(self, phase: Phase) -> None:
        self.phase = phase
        self._percent = 0.0

    def new_attempt(self) -> None:
        """The device starts the phase again from the beginning."""
        self._percent = 0.0

    def _forward(self, percent: float) -> float:
        self._percent = max(self._percent, percent)
        return self._percent

    def from_stream(self, facts: StreamProgress, point_of_no_return: bool) -> Progress:
        """The progress event for one snapshot of an OTA stream."""
        activity = ""
        if facts.ok:
            basis, done, total = "done", facts.all_size or facts.image_size, facts.all_size or facts.image_size
        elif facts.all_size:
            basis, done, total = "all_size", min(facts.requested_since_all_size, facts.all_size), facts.all_size
        elif self.phase is Phase.PHASE2:
            basis, done, total = "header", 0, facts.image_size
            activity = "the loader reads the image's header"
        else:
            basis, done, total = "offset", min(facts.furthest, facts.image_size), facts.image_size
        if facts.ok:
            state, percent = TransferState.DONE, self._forward(100.0)
        else:
            raw = 100.0 * done / total if total else 0.0
            percent = self._forward(min(raw, MAX_PERCENT_BEFORE_OK))
            state = TransferState.TRANSFERRING
            if facts.activity is not None:
                state, activity = TransferState.DEVICE_WORKING, _activity_text(facts.activity, self.phase)
        eta = None
        if state is TransferState.TRANSFERRING and basis != "header" and facts.rate > 0:
            if facts.rate_span >= MIN_RATE_SPAN and total > done:
                eta = (total - done) / facts.rate
        return Progress(
            phase=self.phase,
            bytes_served=facts.bytes_served,
            total_bytes=total,
            percent=round(percent, 1),
            device_percent=facts.device_percent,
            rate=facts.rate,
            point_of_no_return=point_of_no_return,
            done_bytes=done,
            basis=basis,
            state=state,
            activity=activity,
            eta=eta,
        )

    def from_upload(
        self, bytes_sent: int, total: int, rate: float, rate_span: float, device_working: bool, ok: bool
    ) -> Progress:
        """The progress event of a double-backup upload."""
        done = min(bytes_sent, total)
        if ok:
            state, percent, activity = TransferState.DONE, self._forward(100.0), ""
        elif device_working:
            state, activity = TransferState.DEVICE_WORKING, "the device writes the image into its second bank"
            percent = self._forward(min(100.0 * done / total if total else 0.0, MAX_PERCENT_BEFORE_OK))
        else:
            state, activity = TransferState.TRANSFERRING, ""
            percent = self._forward(min(100.0 * done / total if total else 0.0, MAX_PERCENT_BEFORE_OK))
        eta = None
        if state is TransferState.TRANSFERRING and rate > 0 and rate_span >= MIN_RATE_SPAN and total > done:
            eta = (total - done) / rate
        return Progress(
            phase=self.phase,
            bytes_served=bytes_sent,
            total_bytes=total,
            percent=round(percent, 1),
            device_percent=0,
            rate=rate,
            point_of_no_return=False,
            done_bytes=done,
            basis="done" if ok else "upload",
            state=state,
            activity=activity,
            eta=eta,
        )
