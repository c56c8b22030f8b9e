"""Running the reconnect command: ``sh -c COMMAND`` with a bounded run time and bounded output.

After each reboot a device's WiFi access point goes away and comes back; on some racks the
interface must be rejoined by a script. :func:`run_hook` runs it, kills it after ``timeout``
seconds (or when cancelled), keeps at most :data:`MAX_OUTPUT` bytes of what it printed, and always
fires with a :class:`HookResult`: whether the hook worked is for the caller to judge (the engine
logs a failure and lets the poll that follows decide).

The command runs in a session (and process group) of its own (``setsid``, where the system has
it), so a kill on timeout or cancel reaches everything it started (``sleep 60 | cat`` included),
and the result is given when the shell exits (and what it printed is read,
:data:`~netota_daemon.protocols.shell_process.OUTPUT_DRAIN` at most), not when the last holder of
its output pipes lets go: :class:`~netota_daemon.protocols.shell_process.ShellProcess`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorProcess, IReactorTime

from netota_daemon.protocols.shell_process import SETSID, ShellProcess, shell_argv

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


def run_hook(
    reactor: IReactorProcess, clock: IReactorTime, command: str, env: Mapping[str, str], timeout: float
) -> defer.Deferred[HookResult]:
    """Run ``command`` with ``/bin/sh -c`` and exactly ``env`` as its environment."""
    process = ShellProcess(clock, own_group=SETSID is not None, output_limit=MAX_OUTPUT)
    argv = shell_argv(command, SETSID)
    try:
        reactor.spawnProcess(process, argv[0], argv, env=dict(env))
    except Exception as e:  # no /bin/sh, no process support
        return defer.succeed(HookResult(exit_code=None, error=f"could not start: {e}"))
    timed_out = False

    def kill_after_timeout() -> None:
        nonlocal timed_out
        timed_out = True
        process.signal("KILL")

    timer = clock.callLater(timeout, kill_after_timeout)

    def cancel(_: Any) -> None:
        if timer.active():
            timer.cancel()
        process.signal("KILL")  # the reactor reaps it; the cancelled Deferred fails at once

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
