"""The device side of one OTA session on TCP 3335 (phase 1 in the main firmware, phase 2 in the loader).

The device speaks first (100 ms after the accept), sends only 20-byte headers and waits for one reply
per READ. What it reads, and in which windows, is :class:`~netota_daemon.sim.transfer.DeviceReader`'s
job; this protocol adds the clock and the wire: waits, checksums, STOP, notices, faults, the ending.

Session timeline (device seconds; every one multiplied by ``time_scale``)::

    accept -> 0.1 s -> READ ... (5 s per reply, see below)
           [phase 2] -> all_size notice -> 5 s wait (a reply to it is the device's memory fault: ERR)
           -> READ ... -> 100 % notice (status 0) -> 5 s wait, or less if the app echoes it
           -> 0.5 s -> OK -> 0.5 s -> abort (RST)
    failure at any point: ERR (percent 0) -> 0.5 s -> abort (RST)

No valid reply within 5 s (none came, it had a bad sum, or the READ header was corrupted on the way
and the app rightly skipped it): the device sends no NACK and asks nothing again (research §4.2).
The phase-2 loader then fails the session (ERR). The V1.2 main firmware (phase 1) ignores the
timeout and hands its library a buffer that was never filled; the simulator counts every byte the
library reads as covered by its CRC checks, so such a session goes on to the end of the file and
then fails (ERR, "CRC check failed"): the old firmware stays, and a fresh session can succeed.

The session reports how it ended through ``host.ota_session_ended(session)`` once the connection is
gone; ``session.result`` then holds the outcome.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.sim.connections import connection
from netota_daemon.sim.host import EventHost
from netota_daemon.sim.image import HEAD_MAGIC, parse_trailer, verify_image
from netota_daemon.sim.timers import DeviceTimers
from netota_daemon.sim.transfer import (
    DeviceReader,
    ReadRequest,
    ReplyError,
    SizeNotice,
    TransferDone,
    TransferFailed,
)
from netota_daemon.wire.ota import (
    HEADER_SIZE,
    OtaHeader,
    Status,
    encode_device_header,
    verify_reply,
)

log = Logger()


class SessionOutcome(str, enum.Enum):
    """How a session ended (``session_end.outcome``)."""

    OK = "ok"
    ERR = "err"  # the device sent ERR (see the reason)
    SAME = "same"  # SAME, or ERR with --same-status err
    DROPPED = "dropped"  # --drop-after-reads
    ABORTED = "aborted"  # the app closed first
    WATCHDOG = "watchdog"  # the loader's watchdog reset the device
    STOPPED = "stopped"  # a reboot or shutdown cut it


#: Outcomes written in ``session_end`` events.
OUTCOMES = tuple(outcome.value for outcome in SessionOutcome)


class SessionState(str, enum.Enum):
    """Where the device is in a session."""

    STARTING = "starting"  # accepted; the device speaks 0.1 s later
    WAITING_REPLY = "waiting_reply"  # a READ is out
    NOTICE_ALL_SIZE = "notice_all_size"  # the all_size notice is out (5 s wait)
    NOTICE_FINAL = "notice_final"  # the 100 % notice is out (5 s wait, or the echo)
    STALLED = "stalled"  # --stall-after-reads
    RUNNING = "running"  # between two steps (never seen from outside a call)
    ENDING = "ending"  # OK/ERR/SAME sent, or the session is being killed: the device reads nothing
    CLOSED = "closed"


class OtaHost(EventHost, TypingProtocol):
    """What a session needs from the device that owns it."""

    def ota_session_started(self, session: OtaDeviceSession) -> None: ...

    def ota_progress(self, session: OtaDeviceSession) -> None: ...

    def ota_session_ended(self, session: OtaDeviceSession) -> None: ...


@dataclass
class SessionResult:
    """How a session ended."""

    phase: int
    outcome: SessionOutcome
    reason: str
    payload_bytes: int  # payload bytes in accepted replies ("bytes" in the event)
    image_length: int | None
    received: bytes = field(repr=False)
    sha256: str
    stop_received: bool
    all_size_sent: bool
    replies: int
    checksum_errors: int
    new_version: str | None = None  # phase 2 OK with a test image: the version it carries

    def event_fields(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "outcome": self.outcome.value,
            "reason": self.reason,
            "bytes": self.payload_bytes,
            "image_length": self.image_length,
            "sha256": self.sha256,
            "stop_received": self.stop_received,
            "all_size_sent": self.all_size_sent,
            "replies": self.replies,
            "checksum_errors": self.checksum_errors,
        }


class OtaDeviceSession(Protocol):
    """One accepted 3335 connection, from the 100 ms start to the RST."""

    def __init__(self, host: OtaHost, phase: int) -> None:
        self.host = host
        self.config = host.config
        self.phase = phase
        self.timers = DeviceTimers(host.reactor, host.config.time_scale)
        send_all_size = True if phase == 2 else host.config.phase1_all_size
        self.reader = DeviceReader(phase, host.config.image_size, send_all_size)
        self.state = SessionState.STARTING
        self._buffer = bytearray()
        self._wait_call: IDelayedCall | None = None
        self.stop_received = False
        self.all_size_sent = False
        self.checksum_errors = 0
        self.read_headers_sent = 0
        self._outcome: tuple[SessionOutcome, str] | None = None
        self.result: SessionResult | None = None
        self.connected = False

    # -- life -----------------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        self.host.ota_session_started(self)
        self.timers.later(self.config.ota_start_delay, self._begin)

    def _begin(self) -> None:
        self.state = SessionState.RUNNING
        self.host.record("session_start", phase=self.phase)
        self._advance()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.connected = False
        self.timers.close()
        if self._outcome is None:
            self._outcome = (SessionOutcome.ABORTED, "the app closed the connection before the session ended")
        outcome, why = self._outcome
        received = self.reader.assembled()
        new_version = None
        if outcome is SessionOutcome.OK and self.phase == 2:
            trailer = parse_trailer(received)
            new_version = trailer.version if trailer else None
        self.result = SessionResult(
            phase=self.phase,
            outcome=outcome,
            reason=why,
            payload_bytes=self.reader.bytes_received,
            image_length=self.reader.image_length,
            received=received,
            sha256=hashlib.sha256(received).hexdigest(),
            stop_received=self.stop_received,
            all_size_sent=self.all_size_sent,
            replies=self.reader.replies,
            checksum_errors=self.checksum_errors,
            new_version=new_version,
        )
        self.state = SessionState.CLOSED
        self.host.ota_session_ended(self)

    def kill(self, outcome: SessionOutcome, reason: str) -> None:
        """End the session now, without a result header (a reboot, a stop, the watchdog)."""
        if self._outcome is None:
            self._outcome = (outcome, reason)
        self.timers.close()
        self.state = SessionState.ENDING
        if self.connected:
            connection(self.transport).abortConnection()

    # -- sending --------------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        if self.connected:
            connection(self.transport).write(data)

    def _advance(self) -> None:
        step = self.reader.next_step()
        if isinstance(step, ReadRequest):
            self._send_read(step)
        elif isinstance(step, SizeNotice):
            self._send(encode_device_header(Status.DOING, self._last_seek(), 0, step.all_size, step.percent))
            self.all_size_sent = True
            self.host.record("all_size_sent", phase=self.phase, all_size=step.all_size)
            self.state = SessionState.NOTICE_ALL_SIZE
            self._wait_call = self.timers.later(self.config.notice_wait, self._after_all_size)
        elif isinstance(step, TransferDone):
            self._transfer_done()
        elif isinstance(step, TransferFailed):
            self._fail(step.reason)

    def _last_seek(self) -> int:
        """``seek_addr`` of the all_size notice: left over from the last request (research §4.2)."""
        request = self.reader.last_request
        return request.seek if request else 0

    def _corrupt_this_header(self) -> bool:
        """Whether the READ header about to go out is one a corrupt-header fault hits."""
        if not self.config.faults_apply(self.phase):
            return False
        self.read_headers_sent += 1
        faults = self.host.faults
        faults.read_headers_sent += 1
        every = self.config.corrupt_header_every
        if every and self.read_headers_sent % every == 0:
            return True
        once = self.config.corrupt_header_once
        if once and not faults.corrupt_header_used and faults.read_headers_sent >= once:
            faults.corrupt_header_used = True
            return True
        return False

    def _send_read(self, request: ReadRequest) -> None:
        header = encode_device_header(Status.READ, request.seek, request.size, 0, request.percent)
        if self._corrupt_this_header():
            header = ((int.from_bytes(header[:4], "little") + 1) & 0xFFFFFFFF).to_bytes(4, "little") + header[4:]
            self.host.record("header_corrupted", phase=self.phase, seek=request.seek)
        self._send(header)
        self.state = SessionState.WAITING_REPLY
        self._wait_call = self.timers.later(self.config.reply_timeout, self._reply_timeout)

    # -- receiving ------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self._outcome is None and len(self._buffer) >= HEADER_SIZE:
            header = OtaHeader.decode(bytes(self._buffer[:HEADER_SIZE]))
            if header.status == Status.STOP and header.read_size == 0 and header.is_valid():
                del self._buffer[:HEADER_SIZE]
                self.stop_received = True
                self.host.record("stop_received", phase=self.phase)
                self._fail("STOP from the app")
                return
            if self.state is SessionState.WAITING_REPLY:
                if not self._take_reply(header):
                    return
            elif self.state is SessionState.NOTICE_ALL_SIZE:
                self._fail(
                    "a reply to the all_size notice: the device writes it past its receive buffer (memory fault)"
                )
            elif self.state is SessionState.NOTICE_FINAL:
                if header.read_size == 0 and header.is_valid():
                    del self._buffer[:HEADER_SIZE]
                    self.timers.cancel(self._wait_call)
                    self.host.record("notice_echo", phase=self.phase)
                    self._after_final_notice()
                else:
                    self._fail("unexpected data after the final notice")
            elif self.state is SessionState.ENDING:
                # The device is closing and no longer reads: late bytes (an echo that missed the
                # 5 s wait, say) change nothing.
                log.info("OTA phase {phase}: {n} bytes ignored while closing", phase=self.phase, n=len(self._buffer))
                self._buffer.clear()
            else:
                self._fail(f"unsolicited data while the device was {self.state.value}")

    def _take_reply(self, header: OtaHeader) -> bool:
        """Consume one reply from the buffer. False when it is not all here yet."""
        request = self.reader.waiting_for
        assert request is not None
        if header.read_size > request.size:
            self._fail(f"reply longer than asked: {header.read_size} bytes for a {request.size}-byte READ")
            return False
        end = HEADER_SIZE + header.read_size
        if len(self._buffer) < end:
            return False
        payload = bytes(self._buffer[HEADER_SIZE:end])
        del self._buffer[:end]
        if (
            self.config.corrupt_reply_check
            and self.config.faults_apply(self.phase)
            and not self.host.faults.corrupt_reply_used
        ):
            self.host.faults.corrupt_reply_used = True
            self._checksum_error(header, injected=True)
            return True
        if not verify_reply(header, payload):
            self._checksum_error(header, injected=False)
            return True
        try:
            self.reader.deliver(header.seek_addr, payload)
        except ReplyError as e:
            self._fail(f"protocol fault: {e}")
            return False
        self.timers.cancel(self._wait_call)
        self.host.ota_progress(self)
        self._after_reply(len(payload))
        return True

    def _checksum_error(self, header: OtaHeader, injected: bool) -> None:
        """The device drops the reply and keeps waiting (no NACK, no re-request)."""
        self.checksum_errors += 1
        self.host.record(
            "checksum_error", phase=self.phase, seek=header.seek_addr, read_size=header.read_size, injected=injected
        )

    def _after_reply(self, size: int) -> None:
        replies = self.reader.replies
        faults = self.host.faults
        apply = self.config.faults_apply(self.phase)
        if self.phase == 1 and self.config.same_as_installed and replies == 1:
            self._end_same()
            return
        drop = self.config.drop_after_reads
        if apply and drop and not faults.drop_used and replies >= drop:
            faults.drop_used = True
            self.host.record("fault_drop", phase=self.phase, replies=replies)
            self.kill(SessionOutcome.DROPPED, f"--drop-after-reads {drop}: connection aborted after {replies} replies")
            return
        stall = self.config.stall
        if apply and stall and not faults.stall_used and replies >= stall.after:
            faults.stall_used = True
            self.host.record("fault_stall", phase=self.phase, replies=replies, seconds=stall.seconds)
            self.state = SessionState.STALLED
            self.timers.later(stall.seconds, self._resume)
            return
        kbps = self.config.flash_kbps
        if kbps is not None:  # it writes the window to flash before it asks for the next
            self.timers.later(size / (kbps * 1024), self._advance)
            return
        self._advance()

    def _resume(self) -> None:
        self.state = SessionState.RUNNING
        self._advance()

    def _after_all_size(self) -> None:
        self.state = SessionState.RUNNING
        self._advance()

    def _reply_timeout(self) -> None:
        request = self.reader.waiting_for
        if self.phase == 2 or request is None:
            self._fail(f"no valid reply within {self.config.reply_timeout:g} s")
            return
        # V1.2 phase 1: the timeout is ignored; the library gets a buffer that was never filled.
        self.host.record("reply_timeout_ignored", phase=self.phase, seek=request.seek, read_size=request.size)
        self.reader.go_on_without_reply()
        self.state = SessionState.RUNNING
        self._advance()

    # -- ending ---------------------------------------------------------------------------------
    def _transfer_done(self) -> None:
        if self.reader.unfilled_reads:
            self._fail(
                f"the update library's CRC check failed: {self.reader.unfilled_reads} of its reads got a buffer "
                f"that was never filled ({self.reader.unfilled_windows} reply timeouts ignored)"
            )
            return
        if self.config.reject_image:
            self._fail("image rejected (--reject-image)")
            return
        if self.phase == 2:
            received = self.reader.assembled()
            if received[: len(HEAD_MAGIC)] == HEAD_MAGIC:
                ok, why = verify_image(received)
                if not ok:
                    self._fail(f"image verification failed: {why}")
                    return
        self._send(encode_device_header(Status.DOING, 0, 0, 0, 100))
        self.state = SessionState.NOTICE_FINAL
        self._wait_call = self.timers.later(self.config.notice_wait, self._after_final_notice)

    def _after_final_notice(self) -> None:
        self.state = SessionState.ENDING
        self.timers.later(self.config.end_gap, self._send_ok)

    def _send_ok(self) -> None:
        self._send(encode_device_header(Status.OK, 0, 0, 0, 100))
        self._outcome = (SessionOutcome.OK, "upgrade data received and verified")
        self.timers.later(self.config.end_gap, self._close)

    def _end_same(self) -> None:
        status = Status.SAME if self.config.same_status == "same" else Status.ERR
        self._send(encode_device_header(status, 0, 0, 0, 0))
        self._outcome = (SessionOutcome.SAME, f"the image is the one installed (sent {status.name})")
        self.state = SessionState.ENDING
        self.timers.later(self.config.end_gap, self._close)

    def _fail(self, reason: str) -> None:
        if self._outcome is not None:
            return
        log.info("OTA phase {phase} session fails: {reason}", phase=self.phase, reason=reason)
        self.timers.cancel_all()
        self._send(encode_device_header(Status.ERR, 0, 0, 0, 0))
        self._outcome = (SessionOutcome.ERR, reason)
        self.state = SessionState.ENDING
        self.timers.later(self.config.end_gap, self._close)

    def _close(self) -> None:
        if self.connected:
            connection(self.transport).abortConnection()


class RefusedOtaConnection(Protocol):
    """A 3335 connection the device won't serve: closed at once with an RST."""

    def __init__(self, host: EventHost, reason: str) -> None:
        self.host = host
        self.reason = reason

    def connectionMade(self) -> None:
        self.host.record("ota_refused", reason=self.reason)
        connection(self.transport).abortConnection()
