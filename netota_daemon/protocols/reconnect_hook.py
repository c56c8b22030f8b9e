"""Running the reconnect command: ``sh -c COMMAND`` with a bounded run time and bounded output.

After each reboot a device's WiFi access point goes away and comes back; on some racks the
interface must be rejoined by a script. :func:`run_hook` runs it, kills it after ``timeout``
seconds (or when cancelled), keeps at most :data:`MAX_OUTPUT` bytes of what it printed, and always
fires with a :class:`HookResult`: whether the hook worked is for the caller to judge (the engine
logs a failure and lets the poll that follows decide).

The command runs in a session (and process group) of its own (``setsid``, where the system has
it), so a kill on timeout or cancel reaches everything it started (``sleep 60 | cat`` included),
and the result is given when the shell exits (and what it printed is read, :data:`OUTPUT_DRAIN`
at most), not when the last holder of its output pipes lets go.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: Bytes of the command's output kept for the log.
MAX_OUTPUT = 4096
#: Seconds the output pipes are still read after the shell exited: what it printed last may still be
#: in them (the exit and the data arrive in any order). Closed earlier once every pipe is closed.
OUTPUT_DRAIN = 0.5


@dataclass(frozen=True)
class HookResult:
    """How the command ended: ``exit_code`` (None when killed or not started), its output (bounded),
    ``timed_out`` when it was killed for running too long, ``error`` when it could not start."""

    exit_code: int | None
    output: str = ""
    timed_out: bool = False
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


#: ``setsid``: the command gets a process group of its own, so a kill reaches its children too.
SETSID = shutil.which("setsid")


class _HookProcess(ProcessProtocol):
    def __init__(self, clock: IReactorTime, own_group: bool) -> None:
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.output = bytearray()
        self.own_group = own_group
        self._clock = clock
        self._drain: IDelayedCall | None = None
        self._code: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data[: max(0, MAX_OUTPUT - len(self.output))]

    errReceived = outReceived

    def processExited(self, reason: Failure) -> None:
        # The shell is gone: the result is known once what it printed is read. Then our ends of its
        # pipes are closed, so something it left running in the background can't hold the result
        # back (a kill, on timeout or cancel, reaches its whole group; a normal exit leaves what it
        # started alone).
        code = getattr(reason.value, "exitCode", None)
        self._code = code if isinstance(code, int) else None
        if self._drain is None and not self.ended.called:
            self._drain = self._clock.callLater(OUTPUT_DRAIN, self._finish)

    def processEnded(self, reason: Failure) -> None:
        # Every pipe is closed too: nothing more to read.
        if self._drain is None:  # (processExited always comes first; this is only in case)
            code = getattr(reason.value, "exitCode", None)
            self._code = code if isinstance(code, int) else None
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        self._finish()

    def _finish(self) -> None:
        self._drain = None
        if self.ended.called:
            return
        transport: IProcessTransport | None = self.transport
        if transport is not None:
            transport.loseConnection()
        self.ended.callback(self._code)

    def kill(self) -> None:
        transport: IProcessTransport | None = self.transport
        if transport is None:
            return
        self._kill_group()
        try:
            transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

    def _kill_group(self) -> None:
        transport: IProcessTransport | None = self.transport
        pid = getattr(transport, "pid", None)
        if self.own_group and isinstance(pid, int):
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:  # already gone
                pass

    def text(self) -> str:
        return bytes(self.output).decode("utf-8", "replace").strip()


def run_hook(
    reactor: IReactorProcess, clock: IReactorTime, command: str, env: Mapping[str, str], timeout: float
) -> defer.Deferred[HookResult]:
    """Run ``command`` with ``/bin/sh -c`` and exactly ``env`` as its environment."""
    process = _HookProcess(clock, own_group=SETSID is not None)
    argv = ["/bin/sh", "-c", command]
    if SETSID is not None:
        argv = [SETSID, *argv]  # the child is no group leader, so setsid starts a session in place
    try:
        reactor.spawnProcess(process, argv[0], argv, env=dict(env))
    except Exception as e:  # no /bin/sh, no process support
        return defer.succeed(HookResult(exit_code=None, error=f"could not start: {e}"))
    timed_out = False

    def kill_after_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        process.kill()

    timer = clock.callLater(timeout, kill_after_timeout)

    def cancel(_: Any) -> None:
        if timer.active():
            timer.cancel()
        process.kill()  # the reactor reaps it; the cancelled Deferred fails at once

    result: defer.Deferred[HookResult] = defer.Deferred(cancel)

    def ended(code: int | None) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(
                HookResult(exit_code=None if timed_out else code, output=process.text(), timed_out=timed_out)
            )

    process.ended.addCallback(ended)
    return result
