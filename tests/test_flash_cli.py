"""``netota flash``: argument checks, exit codes, ``--json``, and Ctrl-C, against the simulator.

The command runs as a subprocess (``python -m netota_daemon flash``) against an in-process simulated
device on loopback, or in-process through its ``flash()`` coroutine.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol

from netota_daemon.cli.exit_codes import EXIT_USAGE
from netota_daemon.cli.flash import abort_line, abort_on_signal, flash, run_flash_command
from netota_daemon.cli.main import build_parser
from netota_daemon.engine.outcome import Phase, phase_label
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import make_image
from tests.conftest import PYTHON, subprocess_env
from tests.sim_devices import start_device

FAST_FLAGS = ["--reboot-timeout", "5", "--verify-timeout", "5", "--receive-timeout", "0.2", "--timeout", "30"]


def flash_args(device: SimulatedDevice, firmware: Path | str, *extra: str) -> list[str]:
    ports = device.ports
    return [
        "flash",
        str(firmware),
        "--host",
        "127.0.0.1",
        "--ctp-port",
        str(ports["ctp"]),
        "--http-port",
        str(ports["http"]),
        "--ota-port",
        str(ports["ota"]),
        *FAST_FLAGS,
        *extra,
    ]


class Collect(ProcessProtocol):
    """Collects a subprocess's output; ``ended`` fires with its exit code."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: defer.Deferred[int] = defer.Deferred()
        self.stderr_waiters: list[tuple[bytes, defer.Deferred[None]]] = []

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data
        for waiter in list(self.stderr_waiters):
            if waiter[0] in self.err:
                self.stderr_waiters.remove(waiter)
                waiter[1].callback(None)

    def wait_stderr(self, text: bytes) -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        if text in self.err:
            d.callback(None)
        else:
            self.stderr_waiters.append((text, d))
        return d

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value.exitCode)


def spawn_netota(reactor: Any, args: list[str]) -> Collect:
    process = Collect()
    reactor.spawnProcess(process, PYTHON, [PYTHON, "-m", "netota_daemon", *args], env=subprocess_env())
    return process


@pytest_twisted.ensureDeferred
async def test_flash_subprocess_succeeds_with_json(reactor, tmp_path):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 150_000)
    device = await start_device(reactor, tmp_path)
    log_file = tmp_path / "flash.log"
    try:
        process = spawn_netota(reactor, flash_args(device, image, "--json", "--log-file", str(log_file)))
        code = await process.ended.addTimeout(60, reactor)
    finally:
        await device.stop()
    assert code == 0, process.err.decode()
    result = json.loads(process.out.decode())  # exactly one JSON object on stdout
    assert result["kind"] == "succeeded"
    assert result["exit_code"] == 0
    assert result["firmware_version_before"] == "1.0.0"
    assert result["firmware_version_after"] == "2.0.0"
    assert result["point_of_no_return"] is True
    assert (device.config.state_dir / "phase2-received.bin").read_bytes() == Path(image).read_bytes()
    err = process.err.decode()
    # The progress display: not a terminal, so plain timestamped lines, a line per 10 % of each phase.
    assert "\r" not in err and "\x1b" not in err
    assert re.search(r"^\d\d:\d\d:\d\d phase 1  100\.0%", err, re.M), err
    assert re.search(r"^\d\d:\d\d:\d\d phase 2  100\.0%", err, re.M), err
    assert "point of no return: do not power the device off" in err
    # --log-file: the daemon's JSON log format, every line about this job and device.
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    engine = [line for line in lines if line["namespace"] == "netota_daemon.engine.job"]
    assert engine and all(line["job"].startswith("flash-") and line["device"] == "127.0.0.1" for line in engine)
    assert all({"time", "level", "message", "phase"} <= set(line) for line in lines)
    assert not [key for line in lines for key in line if key.startswith("log_")]


@pytest_twisted.ensureDeferred
async def test_ctrl_c_aborts_with_stop_and_advice(reactor, tmp_path):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 150_000)
    # the device stalls after 3 replies for 10 device minutes: the job sits in phase 1 until Ctrl-C
    device = await start_device(reactor, tmp_path, stall_after_reads="3:60000", fault_phase=1)
    try:
        process = spawn_netota(reactor, flash_args(device, image, "--json", "--max-receive-timeouts", "1000"))
        await device.wait_for_event(lambda e: e["event"] == "fault_stall", timeout=30)
        # the progress display has drawn phase 1: the job (and its signal handler) is running
        await process.wait_stderr(b"phase 1  ").addTimeout(30, reactor)
        process.transport.signalProcess("INT")
        code = await process.ended.addTimeout(30, reactor)
        stop = await device.wait_for_event(lambda e: e["event"] == "stop_received", timeout=10)
    finally:
        await device.stop()
    assert code == 4, process.err.decode()
    result = json.loads(process.out.decode())
    assert result["kind"] == "aborted"
    assert result["phase"] == "phase1"
    assert "reset the device" in result["advice"]
    assert stop["phase"] == 1
    assert b"Ctrl-C" in process.err


def run_flash_in_process(reactor: Any, argv: list[str]) -> tuple[defer.Deferred[int], io.StringIO, io.StringIO]:
    args = build_parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    return defer.ensureDeferred(flash(reactor, args, out=out, err=err)), out, err


def nothing_sent(device: SimulatedDevice) -> bool:
    return not any(e["event"] in ("http_request", "ctp_connect", "session_start") for e in device.events)


@pytest.mark.parametrize("case", ["missing", "empty", "directory", "over_4_gib", "unreadable"])
@pytest_twisted.ensureDeferred
async def test_bad_firmware_fails_before_any_packet(reactor, tmp_path, case):
    path = tmp_path / "update.ufw"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "directory":
        path.mkdir()
    elif case == "over_4_gib":
        with open(path, "wb") as f:
            f.truncate(4 * 1024**3)  # sparse: no disk used
    elif case == "unreadable":
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
        path.write_bytes(b"x" * 100)
        path.chmod(0)
    device = await start_device(reactor, tmp_path)
    try:
        d, out, err = run_flash_in_process(reactor, flash_args(device, path))
        code = await d
    finally:
        await device.stop()
    assert code == EXIT_USAGE
    assert out.getvalue() == ""
    words = {
        "missing": "does not exist",
        "empty": "is empty",
        "directory": "directory",
        "over_4_gib": "addresses at most",
        "unreadable": "not readable",
    }[case]
    assert words in err.getvalue()
    assert nothing_sent(device)


@pytest_twisted.ensureDeferred
async def test_unknown_interface_fails_before_any_packet(reactor, tmp_path):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 10_000)
    device = await start_device(reactor, tmp_path)
    try:
        d, out, err = run_flash_in_process(reactor, flash_args(device, image, "--interface", "netota-nope0"))
        code = await d
    finally:
        await device.stop()
    assert code == EXIT_USAGE
    assert "netota-nope0" in err.getvalue() and "does not exist" in err.getvalue()
    assert nothing_sent(device)


@pytest.mark.parametrize(
    "argv",
    [
        ["flash", "fw.ufw"],
        ["flash", "fw.ufw", "--host", "h", "--ctp-port", "0"],
        ["flash", "fw.ufw", "--host", "h", "--timeout", "-1"],
        ["flash", "fw.ufw", "--host", "h", "--timeout", "nan"],
        ["flash", "fw.ufw", "--host", "h", "--receive-timeout", "inf"],
    ],
)
def test_usage_errors_exit_64(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    assert "error:" in err and out == ""
    # With --json, the same error is one JSON object on stdout too.
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--json"])
    assert e.value.code == EXIT_USAGE
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["error"] == "bad_argument" and answer["exit_code"] == EXIT_USAGE
    assert answer["message"] in err


@pytest.mark.parametrize("strict,expected", [(False, 0), (True, 3)])
@pytest_twisted.ensureDeferred
async def test_already_current_exit_code(reactor, tmp_path, strict, expected):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 50_000)
    device = await start_device(reactor, tmp_path, same_as_installed=True)
    try:
        argv = flash_args(device, image, "--quiet") + (["--strict"] if strict else [])
        d, out, err = run_flash_in_process(reactor, argv)
        code = await d
    finally:
        await device.stop()
    assert code == expected
    assert out.getvalue().startswith("already current: ")
    assert err.getvalue() == ""  # --quiet


@pytest_twisted.ensureDeferred
async def test_a_single_backup_image_for_a_double_backup_device_is_refused_with_nothing_sent(reactor, tmp_path):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 50_000)  # a single-backup test image
    device = await start_device(reactor, tmp_path, double_backup=True, ftp_port=0)
    try:
        d, out, err = run_flash_in_process(reactor, flash_args(device, image, "--json", "-q"))
        code = await d
    finally:
        await device.stop()
    assert code == 64
    result = json.loads(out.getvalue())
    assert result["kind"] == "not_applicable" and "can't be swapped" in result["advice"]
    assert [e["event"] for e in device.events if e["event"].startswith(("ctp", "ftp", "session"))] == []


def test_help_documents_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["flash", "--help"])
    text = capsys.readouterr().out
    flowing = " ".join(text.split())  # the epilog is filled to the terminal's width
    for line in (
        "0   succeeded",
        "1   failed",
        "2   unverified",
        "3   already current",
        "4   aborted",
        "64  bad arguments",
    ):
        assert line in text
    assert "an image of the other kind for this device's build (not applicable): nothing was sent" in flowing


class Command:
    """``run_flash_command``'s hooks, recording: the log started, the reactor run (``main`` given a
    stand-in reactor; it ends with SystemExit(code), as under ``task.react``), the job run with what
    was checked. ``before_reactor`` runs just before the reactor would start."""

    def __init__(self, code: int = 0, before_reactor: Any = None) -> None:
        self.code = code
        self.before_reactor = before_reactor
        self.calls: list[str] = []
        self.prepared: Any = None

    def begin_logging(self, args: Any) -> None:
        self.calls.append("logging")

    def react(self, main: Any) -> None:
        self.calls.append("reactor")
        if self.before_reactor is not None:
            self.before_reactor()
        failures: list[Any] = []
        main(object()).addErrback(failures.append)
        raise failures[0].value

    async def run_job(self, reactor: Any, args: Any, on_job: Any = None, prepared: Any = None) -> int:
        self.calls.append("job")
        self.prepared = prepared
        return self.code

    def __call__(self, argv: list[str]) -> int:
        args = build_parser().parse_args(argv)
        return run_flash_command(args, begin_logging=self.begin_logging, react=self.react, run_job=self.run_job)


def test_flash_command_opens_the_firmware_once_before_the_reactor_starts(tmp_path):
    """The command checks the arguments before the reactor starts and runs the job with what that
    check opened: the file is read once, so the job flashes exactly what was checked, even if the
    file changes on disk afterwards."""
    image = Path(make_image(tmp_path / "update.ufw", "2.0.0", 1000))
    checked = image.read_bytes()
    command = Command(code=3, before_reactor=lambda: image.write_bytes(b"another image entirely"))
    with pytest.raises(SystemExit) as exit_info:
        command(["flash", str(image), "--host", "127.0.0.1"])
    assert exit_info.value.code == 3  # the job's code
    assert command.calls == ["logging", "reactor", "job"]
    target, prepared_image, _, _ = command.prepared
    assert target.host == "127.0.0.1" and prepared_image.path == image
    assert bytes(prepared_image.read(0, prepared_image.size)) == checked


def test_bad_arguments_end_the_command_before_the_log_or_the_reactor_start(tmp_path, capsys):
    command = Command()
    assert command(["flash", str(tmp_path / "missing.ufw"), "--host", "127.0.0.1"]) == EXIT_USAGE
    assert command.calls == []
    assert "does not exist" in capsys.readouterr().err


def test_a_log_file_that_cannot_be_opened_ends_the_command_before_the_reactor_starts(tmp_path, capsys):
    """The real log start: a --log-file in no directory is one clear line and exit 64."""
    image = make_image(tmp_path / "update.ufw", "2.0.0", 1000)
    command = Command()
    args = build_parser().parse_args(
        ["flash", str(image), "--host", "127.0.0.1", "--log-file", str(tmp_path / "no" / "flash.log")]
    )
    assert run_flash_command(args, react=command.react, run_job=command.run_job) == EXIT_USAGE
    assert command.calls == []
    assert capsys.readouterr().err.startswith("netota flash: error: can't open the log file ")


@pytest.mark.parametrize(
    "device_config,extra,code,kind,advice",
    [
        ({"reject_image": True}, [], 1, "failed (device error)", "reset the device"),
        ({"phase2_reboot_seconds": 100_000}, ["--verify-timeout", "0.5"], 2, "unverified", "read its firmware_version"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_failed_and_unverified_exit_codes_with_advice(
    reactor, tmp_path, device_config, extra, code, kind, advice
):
    image = make_image(tmp_path / "update.ufw", "2.0.0", 50_000)
    device = await start_device(reactor, tmp_path, **device_config)
    try:
        d, out, err = run_flash_in_process(reactor, flash_args(device, image, "--quiet", *extra))
        result = await d.addTimeout(30, reactor)
    finally:
        await device.stop()
    assert result == code
    first, second = out.getvalue().splitlines()
    assert first.startswith(f"{kind}: ")
    assert second.startswith("advice: ") and advice in second


@pytest_twisted.ensureDeferred
async def test_junit_report_of_a_flash(reactor, tmp_path):
    import xml.etree.ElementTree as ET

    image = make_image(tmp_path / "update.ufw", "2.0.0", 50_000)
    device = await start_device(reactor, tmp_path, reject_image=True)
    report = tmp_path / "flash.xml"
    try:
        d, out, err = run_flash_in_process(reactor, flash_args(device, image, "--quiet", "--junit", str(report)))
        code = await d
    finally:
        await device.stop()
    assert code == 1
    (case,) = ET.parse(report).getroot().iter("testcase")
    assert case.get("name") == "127.0.0.1" and case.get("classname") == "netota.flash"
    failure = case.find("failure")
    assert failure.get("type") == "device_error" and failure.get("message").startswith("failed: ")
    assert "advice: " in failure.text
    d, out, err = run_flash_in_process(reactor, flash_args(device, image, "--junit", str(tmp_path / "no" / "r.xml")))
    assert await d == 64 and "no such directory" in err.getvalue()


def test_bad_arguments_with_json_give_one_json_error_too(tmp_path, capsys):
    """A script reading --json gets an object for a refused argument as well: its message and 64."""
    command = Command()
    assert command(["flash", str(tmp_path / "missing.ufw"), "--host", "127.0.0.1", "--json"]) == EXIT_USAGE
    assert command.calls == []
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer["error"] == "bad_argument" and answer["exit_code"] == EXIT_USAGE
    assert "does not exist" in answer["message"] and "does not exist" in err


@pytest.mark.parametrize(
    "phase,what",
    [
        (Phase.DETECT, "nothing more is sent to the device"),
        (Phase.PHASE1, "STOP to the device's stream if one is open"),
        (Phase.REBOOT, "nothing more is sent to the device"),
        (Phase.PHASE2, "STOP to the device's stream if one is open"),
        (Phase.UPLOAD, "the upload's data connection is reset, not closed"),
        (Phase.VERIFY, "nothing more is sent to the device"),
    ],
)
def test_a_signal_says_what_the_abort_does_in_each_phase(phase, what):
    line = abort_line("Ctrl-C", phase)
    assert line.startswith(f"Ctrl-C: aborting in {phase_label(phase)} (") and what in line


def test_a_signal_prints_the_line_of_the_jobs_phase_and_cancels_it_on_the_reactor():
    class Job:
        phase = Phase.UPLOAD

        def __init__(self) -> None:
            self.cancelled: list[str] = []

        def cancel(self, reason: str) -> None:
            self.cancelled.append(reason)

    class Reactor:
        def callFromThread(self, f, *args):
            f(*args)

    job, err = Job(), io.StringIO()
    handler = abort_on_signal(Reactor(), job, err)
    handler(signal.SIGTERM, None)
    assert err.getvalue() == "\n" + abort_line("SIGTERM", Phase.UPLOAD) + "\n"
    assert job.cancelled == ["interrupted (SIGTERM)"]
    job.phase = Phase.PHASE2
    handler(signal.SIGINT, None)
    assert err.getvalue().endswith(abort_line("Ctrl-C", Phase.PHASE2) + "\n")
    assert job.cancelled[-1] == "interrupted (Ctrl-C)"
