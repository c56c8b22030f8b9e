"""Running the reconnect command: ``sh -c COMMAND`` with a bounded run time and bounded output.

After each reboot a device's WiFi access point goes away and comes back; on some racks the
interface must be rejoined by a script. :func:`run_hook` runs it, kills it after ``timeout``
seconds (or when cancelled), keeps at most :data:`MAX_OUTPUT` bytes of what it printed, and always
fires with a :class:`HookResult`: whether the hook worked is for the caller to judge (the engine
logs a failure and lets the poll that follows decide).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: Bytes of the command's output kept for the log.
MAX_OUTPUT = 4096


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


class _HookProcess(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.output = bytearray()

    def outReceived(self, data: bytes) -> None:
        self.output += data[: max(0, MAX_OUTPUT - len(self.output))]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        self.ended.callback(code if isinstance(code, int) else None)

    def kill(self) -> None:
        transport: IProcessTransport | None = self.transport
        if transport is None:
            return
        try:
            transport.signalProcess("KILL")
        except Exception:  # already gone
            pass

    def text(self) -> str:
        return bytes(self.output).decode("utf-8", "replace").strip()


def run_hook(
    reactor: IReactorProcess, clock: IReactorTime, command: str, env: Mapping[str, str], timeout: float
) -> defer.Deferred[HookResult]:
    """Run ``command`` with ``/bin/sh -c`` and exactly ``env`` as its environment."""
    process = _HookProcess()
    try:
        reactor.spawnProcess(process, "/bin/sh", ["/bin/sh", "-c", command], env=dict(env))
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
