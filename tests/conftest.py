"""Shared fixtures. End-to-end tests use the real reactor through pytest-twisted."""

from __future__ import annotations

import gc
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

ROOT = Path(__file__).resolve().parent.parent

# Property tests assert behaviour, never time: Hypothesis's per-example deadline (200 ms) and its
# too-slow health check would make them fail on a machine whose cores are busy.
settings.register_profile("netota", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("netota")


@pytest.fixture
def reactor():
    """The global reactor pytest-twisted runs (it has no fixture of its own)."""
    from twisted.internet import reactor as _reactor

    return _reactor


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (prefer listening on port 0 where the API allows)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """An environment in which ``python -m netota_daemon`` and ``python -m twisted netota`` run this
    source tree (and find its twistd plugin)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


PYTHON = sys.executable


def start_netota(reactor: Any, control: str, *args: str, timeout: float = 60) -> Any:
    """``netota ARGS`` as a child process against the daemon at ``control`` ($NETOTA_CONTROL): a
    Deferred of (stdout, stderr, exit code), failing after ``timeout`` seconds."""
    from twisted.internet.utils import getProcessOutputAndValue

    d = getProcessOutputAndValue(
        PYTHON, ["-m", "netota_daemon", *args], env=subprocess_env(NETOTA_CONTROL=control), path=str(ROOT)
    )
    d.addTimeout(timeout, reactor)
    return d


async def run_netota(reactor: Any, control: str, *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``netota ARGS`` against the daemon at ``control``."""
    out, err, code = await start_netota(reactor, control, *args, timeout=timeout)
    return code, out.decode(), err.decode()


@pytest.fixture
def rig(tmp_path, reactor):
    """A :class:`tests.live_rig.LiveRig`: real simulators and a real daemon, stopped at the end."""
    import pytest_twisted
    from twisted.internet.defer import Deferred

    from tests.live_rig import LiveRig

    rig = LiveRig(tmp_path, reactor)
    yield rig
    pytest_twisted.blockon(Deferred.fromCoroutine(rig.stop()))


async def one_reactor_turn(reactor) -> None:
    """Let the reactor run once: the zero-delay calls Twisted schedules for itself (a cancelled
    connection attempt's cleanup) run, so a test can then check that nothing is left scheduled.
    Not a wait for an event: nothing else can happen in a zero-delay turn."""
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0, lambda: None)


class _NoSockets(socket.socket):
    def __init__(self, *args, **kwargs):
        raise AssertionError("this test must not open a socket")


@pytest.fixture
def no_sockets_or_processes(monkeypatch):
    """Tests of decisions run on a Clock with fakes: opening a socket or starting a process fails them."""

    def no_process(*args, **kwargs):
        raise AssertionError("this test must not start a process")

    monkeypatch.setattr(socket, "socket", _NoSockets)
    monkeypatch.setattr(socket, "create_connection", no_process)
    monkeypatch.setattr(os, "fork", no_process)
    monkeypatch.setattr(os, "posix_spawn", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)


@pytest.fixture(autouse=True)
def fail_on_unhandled_deferred_errors():
    """An error nobody handled in a Deferred fails the test that caused it (as magic-wormhole does)."""
    errors: list[dict] = []

    def observer(event: dict) -> None:
        if event.get("log_failure") is not None and "Unhandled error in Deferred" in str(event.get("log_format", "")):
            errors.append(event)

    globalLogPublisher.addObserver(observer)
    yield
    gc.collect()
    globalLogPublisher.removeObserver(observer)
    if errors:
        failures = "\n".join(e["log_failure"].getTraceback() for e in errors)
        pytest.fail(f"{len(errors)} unhandled error(s) in Deferreds:\n{failures}")
