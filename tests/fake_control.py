"""A stand-in for :class:`netota_daemon.cli.control_client.ControlClient`, for testing the client's
commands in memory: it answers requests from a table and plays event streams from scripts, and
records every request. (ControlClient itself is tested against an in-memory HTTP server, StubTreq.)"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from netota_daemon.cli.main import build_parser
from netota_daemon.cli.runner import run_command

Answer = dict[str, Any] | BaseException | Callable[[Any], dict[str, Any]]
Script = list[tuple[str, dict[str, Any]] | BaseException]


class FakeControl:
    control = "unix:/run/netota/control.sock"

    def __init__(self, answers: dict[tuple[str, str], Answer] | None = None, streams: dict[str, Script] | None = None):
        self.reactor = Clock()
        self.answers = dict(answers or {})
        self.streams = dict(streams or {})
        self.requests: list[tuple[str, str, Any]] = []
        self.uploaded: list[bytes] = []

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        self.requests.append((method, path, copy.deepcopy(body)))
        try:
            answer = self.answers[(method, path)]
        except KeyError:
            raise AssertionError(f"unexpected request {method} {path}") from None
        if isinstance(answer, BaseException):
            raise answer
        if callable(answer):
            answer = answer(body)
        return copy.deepcopy(answer)

    async def upload(self, path: str, source: Any, extra_headers: dict[bytes, list[bytes]] | None = None) -> dict:
        """As ControlClient.upload: ``source`` is read to its end in chunks of the client's size; the
        answer for ("PUT", path) is called with the bytes received, if it is callable."""
        from netota_daemon.cli.control_client import UPLOAD_CHUNK

        chunks = []
        while chunk := source.read(UPLOAD_CHUNK):
            chunks.append(chunk)
        data = b"".join(chunks)
        self.requests.append(("PUT", path, {"bytes": len(data), "headers": dict(extra_headers or {})}))
        self.uploaded.append(data)
        try:
            answer = self.answers[("PUT", path)]
        except KeyError:
            raise AssertionError(f"unexpected upload to {path}") from None
        if isinstance(answer, BaseException):
            raise answer
        return copy.deepcopy(answer(data) if callable(answer) else answer)

    async def stream(self, path: str, on_event: Callable[[str, dict[str, Any]], bool]) -> None:
        self.requests.append(("STREAM", path, None))
        for item in self.streams[path]:
            if isinstance(item, BaseException):
                raise item
            if on_event(item[0], copy.deepcopy(item[1])):
                return


def run(client: FakeControl, *argv: str) -> int:
    """``netota ARGV`` against ``client``, in memory: the command's exit code (its output goes to
    sys.stdout and sys.stderr, for capsys)."""
    args: argparse.Namespace = build_parser().parse_args(list(argv))
    d = Deferred.fromCoroutine(run_command(args.command, client, args, []))
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the command waits for something the fake never gives"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    code = results[0]
    assert isinstance(code, int)
    return code


def job(
    job_id: str = "j1",
    device: str = "a",
    state: str = "running",
    phase: str = "detect",
    kind: str | None = None,
    message: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """A job object as the API has it."""
    data: dict[str, Any] = {
        "id": job_id,
        "device": device,
        "firmware": "v2.bin",
        "state": state,
        "phase": phase,
        "point_of_no_return": False,
        "position": None,
        "progress": None,
        "created": 1_750_000_000.0,
        "started": 1_750_000_000.5,
        "finished": None,
        "outcome": None,
        "message": "",
        "advice": "",
        "resumable": False,
        "resumed_from": None,
        "resumed_by": None,
        "options": {},
    }
    if kind is not None:
        data["outcome"] = {
            "kind": kind,
            "message": message,
            "phase": phase,
            "failure": None,
            "advice": "",
            "point_of_no_return": False,
            "firmware_version_before": "1.0.0",
            "firmware_version_after": "2.0.0" if kind == "succeeded" else None,
            "details": {},
        }
        data["state"] = "finished" if state == "running" else state
        data["finished"] = 1_750_000_035.0
    data.update(extra)
    return data
