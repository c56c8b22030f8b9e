"""The reconnect-command runner with real processes (``sh -c``): exit code, environment, bounded
output, the timeout kill and cancellation."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer

from netota_daemon.protocols.reconnect_hook import MAX_OUTPUT, run_hook

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
