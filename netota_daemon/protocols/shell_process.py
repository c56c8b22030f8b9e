"""A hook's shell command (``/bin/sh -c COMMAND``) in a process group of its own, for whoever runs one
(the reconnect hook, the daemon's job-end command).

- :func:`shell_argv` runs the command under ``setsid`` where the system has it (:data:`SETSID`): the
  spawned child is no group leader, so ``setsid`` starts a session (and process group) in place and
  the shell's pid is the group's id. Without ``setsid`` the command shares the daemon's group and
  only the shell itself can be signalled.
- :meth:`ShellProcess.signal` sends a signal to that whole group (``os.killpg``, or the callable
  given), so a kill reaches everything the command started (``sleep 60 | cat``, a background
  child), not just the shell.
- :attr:`ShellProcess.ended` fires with the exit code when the shell exits, once what it printed is
  read (:data:`OUTPUT_DRAIN` seconds at most), not when the last holder of its output pipes lets go:
  something it left running in the background can't hold the result back.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

#: ``setsid``: the command gets a process group of its own, so a signal reaches its children too.
SETSID = shutil.which("setsid")
SHELL = "/bin/sh"
#: Seconds the output pipes are still read after the shell exited: what it printed last may still be
#: in them (the exit and the data arrive in any order). Closed earlier once every pipe is closed.
OUTPUT_DRAIN = 0.5

#: ``signal_group(pgid, signum)``: ``os.killpg``, or a test's recorder.
GroupSignal = Callable[[int, int], None]


def shell_argv(command: str, setsid: str | None = SETSID) -> list[str]:
    """The argv that runs ``command`` with ``/bin/sh -c``, under ``setsid`` when it is given."""
    argv = [SHELL, "-c", command]
    return [setsid, *argv] if setsid else argv


class ShellProcess(ProcessProtocol):
    """The shell's process: keeps the first ``output_limit`` bytes of its stdout and stderr, gets
    ``stdin`` (then end of file) when it is given, and fires :attr:`ended` with the exit code (None
    when killed by a signal) once the shell exited and its output is read.

    ``own_group`` says the command runs in a process group of its own (under ``setsid``), whose id
    is the shell's pid.
    """

    def __init__(
        self,
        clock: IReactorTime,
        own_group: bool,
        output_limit: int,
        stdin: bytes | None = None,
        signal_group: GroupSignal = os.killpg,
        drain: float = OUTPUT_DRAIN,
    ) -> None:
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.output = bytearray()
        self.own_group = own_group
        self.output_limit = output_limit
        self.stdin = stdin
        self.pid: int | None = None
        #: The shell exited (it may have left something running that holds its pipes).
        self.exited = False
        #: The shell exited and every pipe was closed from its side before the result was taken:
        #: nothing the command started is known to be running, so it is never signalled again.
        self.gone = False
        self._signal_group = signal_group
        self._clock = clock
        self._drain_time = drain
        self._drain: IDelayedCall | None = None
        self._code: int | None = None
        self._gone_waiters: list[defer.Deferred[None]] = []

    def connectionMade(self) -> None:
        transport: IProcessTransport | None = self.transport
        assert transport is not None
        # Kept: the transport forgets the pid once the shell is reaped, its group may live on.
        pid = getattr(transport, "pid", None)
        self.pid = pid if isinstance(pid, int) else None
        if self.stdin is not None:
            transport.write(self.stdin)
            transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.output += data[: max(0, self.output_limit - len(self.output))]

    errReceived = outReceived

    def processExited(self, reason: Failure) -> None:
        # The shell is gone: the result is known once what it printed is read. Then our ends of its
        # pipes are closed, so something it left running in the background can't hold it back.
        self.exited = True
        self._code = _exit_code(reason)
        if self._drain is None and not self.ended.called:
            self._drain = self._clock.callLater(self._drain_time, self._finish)

    def processEnded(self, reason: Failure) -> None:
        # Every pipe is closed too. Before the result was taken, that was the command's doing:
        # nothing of it holds them any more. After, it was ours (see _finish): that says nothing.
        self.exited = True
        if self._drain is None and not self.ended.called:  # (processExited always comes first)
            self._code = _exit_code(reason)
        if not self.ended.called:
            self.gone = True
            waiters, self._gone_waiters = self._gone_waiters, []
            for waiter in waiters:
                waiter.callback(None)
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

    def when_ended(self) -> defer.Deferred[None]:
        """A new Deferred that fires with :attr:`ended`: a wait that gives up on it (cancels it)
        leaves :attr:`ended` alone."""
        d: defer.Deferred[None] = defer.Deferred()

        def fired(result: Any) -> Any:
            if not d.called:
                d.callback(None)
            return result

        self.ended.addBoth(fired)
        return d

    def when_gone(self) -> defer.Deferred[None]:
        """A new Deferred that fires once :attr:`gone` is true (at once if it is); never when the
        result was taken with the pipes still held."""
        if self.gone:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(lambda d: self._gone_waiters.remove(d))
        self._gone_waiters.append(d)
        return d

    def signal(self, name: str) -> None:
        """Send signal ``name`` (``"TERM"``, ``"KILL"``) to the command: to its whole process group
        when it has one, else (or when that group is no more) to the shell, if it still runs."""
        if self.gone:
            return
        if self.own_group and self.pid is not None:
            try:
                self._signal_group(self.pid, getattr(signal, "SIG" + name))
                return
            except OSError:  # no such group any more
                pass
        transport: IProcessTransport | None = self.transport
        if transport is not None and not self.exited:
            try:
                transport.signalProcess(name)
            except Exception:  # already gone (ProcessExitedAlready)
                pass

    def text(self) -> str:
        return bytes(self.output).decode("utf-8", "replace").strip()


def _exit_code(reason: Failure) -> int | None:
    code = getattr(reason.value, "exitCode", None)
    return code if isinstance(code, int) else None
