"""The reconnect-command runner: with real processes (``sh -c``) its exit code, environment, bounded
output, the timeout kill and cancellation; on a Clock with a fake process, the order of the
shell's exit and its last output."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from netota_daemon.protocols.reconnect_hook import MAX_OUTPUT, run_hook
from netota_daemon.protocols.shell_process import OUTPUT_DRAIN

ENV = {"PATH": "/usr/bin:/bin", "NETOTA_DEVICE": "shelf-3", "NETOTA_PHASE": "reboot"}


@pytest_twisted.ensureDeferred
async def test_the_command_gets_exactly_its_environment_and_its_exit_code_is_reported(reactor):
    result = await run_hook(reactor, reactor, 'echo "$NETOTA_DEVICE $NETOTA_PHASE ${HOME:-nohome}"; exit 3', ENV, 30.0)
    assert (result.exit_code, result.ok, result.timed_out) == (3, False, False)
    assert result.output == "shelf-3 reboot nohome"


@pytest_twisted.ensureDeferred
async def test_output_is_bounded(reactor):
    result = await run_hook(reactor, reactor, "head -c 100000 /dev/zero | tr '\\0' x", ENV, 30.0)
    assert result.ok and len(result.output) == MAX_OUTPUT


@pytest_twisted.ensureDeferred
async def test_a_command_that_runs_too_long_is_killed_at_its_timeout(reactor):
    result = await run_hook(reactor, reactor, "echo started; exec sleep 60", ENV, 0.5)
    assert result.timed_out and result.exit_code is None and result.output == "started"


@pytest_twisted.ensureDeferred
async def test_cancelling_kills_the_command_and_leaves_no_timer(reactor):
    d = run_hook(reactor, reactor, "exec sleep 60", ENV, 30.0)
    d.cancel()
    with pytest.raises(defer.CancelledError):
        await d
    assert [c for c in reactor.getDelayedCalls() if "kill_after_timeout" in repr(c)] == []


@pytest_twisted.ensureDeferred
async def test_the_timeout_kills_what_the_command_started_too(reactor, tmp_path):
    marker = tmp_path / "still-running"
    command = f"(sleep 60; touch {marker}) & sleep 60 | cat"
    result = await run_hook(reactor, reactor, command, ENV, 0.5).addTimeout(20, reactor)
    assert result.timed_out and result.exit_code is None
    # its children were killed with it: the pipeline and the background job no longer hold anything
    out = subprocess.run(["pgrep", "-f", f"touch {marker}"], capture_output=True, text=True)
    assert out.stdout.strip() == ""


@pytest_twisted.ensureDeferred
async def test_the_result_comes_when_the_shell_exits_even_if_a_child_keeps_its_pipe(reactor):
    result = await run_hook(reactor, reactor, "echo done; sleep 30 & echo $!", ENV, 30.0).addTimeout(20, reactor)
    done, child = result.output.split()
    os.kill(int(child), signal.SIGKILL)  # what the command left running is its own business; the test cleans up
    assert result.ok and done == "done"


class FakeProcessTransport:
    pid = 4242

    def __init__(self) -> None:
        self.closed = False
        self.signals: list[str] = []

    def loseConnection(self) -> None:
        self.closed = True

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeProcessReactor(Clock):
    """spawnProcess hands the protocol a fake transport; the test plays the process's side."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol = None
        self.transport = FakeProcessTransport()

    def spawnProcess(self, protocol, executable, args, env=None, *rest, **kwargs):
        self.protocol = protocol
        protocol.makeConnection(self.transport)
        return self.transport


def test_output_that_arrives_just_after_the_shells_exit_is_kept():
    reactor = FakeProcessReactor()
    results = []
    run_hook(reactor, reactor, "echo rejoined", ENV, 30.0).addCallback(results.append)
    reactor.protocol.processExited(Failure(ProcessDone(0)))
    assert results == [] and not reactor.transport.closed  # its pipes are still read
    reactor.protocol.childDataReceived(1, b"rejoined\n")
    reactor.protocol.processEnded(Failure(ProcessDone(0)))  # every pipe closed: the result at once
    (result,) = results
    assert (result.exit_code, result.output) == (0, "rejoined") and reactor.transport.closed
    assert reactor.getDelayedCalls() == []


def test_a_pipe_held_open_by_a_child_delays_the_result_by_the_drain_only():
    reactor = FakeProcessReactor()
    results = []
    run_hook(reactor, reactor, "echo ok; sleep 999 &", ENV, 30.0).addCallback(results.append)
    reactor.protocol.childDataReceived(1, b"ok\n")
    reactor.protocol.processExited(Failure(ProcessTerminated(exitCode=2)))
    reactor.advance(OUTPUT_DRAIN * 0.9)
    reactor.protocol.childDataReceived(2, b"late\n")
    assert results == []
    reactor.advance(OUTPUT_DRAIN * 0.2)  # processEnded never comes: the child keeps the pipe
    (result,) = results
    assert (result.exit_code, result.output) == (2, "ok\nlate") and reactor.transport.closed
    assert reactor.transport.signals == []  # what it left running is not killed on a normal exit
    assert reactor.getDelayedCalls() == []
