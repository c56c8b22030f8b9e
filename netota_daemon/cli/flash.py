"""``netota flash``: upgrade one device in the foreground, without the daemon.

Every argument is checked (the firmware opened, the interface probed) before any packet is sent.
The job runs on the reactor through ``twisted.internet.task.react``; Ctrl-C (SIGINT) or SIGTERM
cancels it cleanly: STOP on an open stream, outcome "aborted", the recovery advice.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TextIO

from twisted.internet import defer
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from netota_daemon.cli import arguments
from netota_daemon.cli.exit_codes import (
    EXIT_ALREADY_CURRENT_STRICT,
    EXIT_BROKEN_PIPE,
    EXIT_CANT_CREATE,
    EXIT_CODES,
    EXIT_USAGE,
    exit_code,
)
from netota_daemon.cli.junit import JUnitError, case_from_outcome, check_junit_path, write_junit
from netota_daemon.cli.output import bad_argument_json, silence_stdout
from netota_daemon.cli.progress import ProgressRenderer, colour_wanted
from netota_daemon.cli.text import human_text, outcome_text
from netota_daemon.engine.outcome import Outcome, OutcomeKind, Phase, phase_label
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts
from netota_daemon.firmware import FirmwareError, FirmwareImage, open_image
from netota_daemon.logs import json_file_log_observer
from netota_daemon.protocols.endpoints import EndpointError, check_interface

DEFAULTS = UpgradeTimeouts()

#: What ``--json`` prints for a bad argument (a real one has the message).
BAD_ARGUMENT_EXAMPLE = '{"error": "bad_argument", "message": "...", "exit_code": 64}'

EPILOG = f"""\
exit codes:
  {EXIT_CODES[OutcomeKind.SUCCEEDED]}   succeeded (the new firmware answered), or already current (the device
      answered SAME) unless --strict
  {EXIT_CODES[OutcomeKind.FAILED]}   failed (device refused, device error, timeout, protocol error, firmware
      file, connection); the advice says what to do
  {EXIT_CODES[OutcomeKind.UNVERIFIED]}   unverified: the device was flashed but its new firmware did not answer in time
  {EXIT_ALREADY_CURRENT_STRICT}   already current, with --strict
  {EXIT_CODES[OutcomeKind.ABORTED]}   aborted (Ctrl-C, SIGTERM); the advice says what state the device is in
  {EXIT_USAGE}  bad arguments (missing, empty, unreadable or over-4-GiB firmware, unknown interface, ...),
      or an image of the other kind for this device's build (not applicable): nothing was sent
  {EXIT_CANT_CREATE}  the upgrade ended (its outcome is printed) but the --junit report could not be written

--json prints one JSON object on stdout: the outcome (kind, message, phase, failure, advice,
point_of_no_return, firmware_version_before, firmware_version_after, details) and exit_code; for a
bad argument (a missing --host, a bad number, a firmware that can't be opened, an unknown
interface), {BAD_ARGUMENT_EXAMPLE}.
The progress goes to stderr, one line per phase (percent, bytes, rate, an ETA once there is one,
"device working" while the device writes, the point of no return in red); --quiet turns it off,
--no-color (or NO_COLOR) turns its colour off. --log-file writes the engine's log as JSON lines
(time, level, message, job, device, phase and the event's fields), as the daemon's
--log-format json does. --junit FILE writes a JUnit XML report for a CI system (Jenkins, GitLab,
GitHub Actions): one test case named after the device, its duration, and a failure element with the
outcome, failure class and advice when it did not succeed.
"""


_positive_float = arguments.seconds(positive=True)
_port = arguments.tcp_port()
_count = arguments.whole_number(0)


def add_parser(subparsers: arguments.Subcommands) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "flash",
        help="Upgrade one device in the foreground, without the daemon.",
        description="Upgrade one device's firmware, showing progress, and exit with a code that says how it "
        "ended: a single-backup build (ota_type 1) over the 3335 stream in two phases, a double-backup build "
        "(ota_type 0) by an FTP upload; the route is chosen from the device's description document.",
        epilog=EPILOG,
        formatter_class=arguments.WrappingHelpFormatter,
    )
    parser.add_argument(
        "firmware", metavar="FIRMWARE", help="the upgrade file (update.ufw, or update-ota.ufw for double backup)"
    )
    parser.add_argument("--host", required=True, help="the device's address (192.168.1.1 on a real device)")
    parser.add_argument("--ctp-port", type=_port, default=3333, help="CTP port (default 3333)")
    parser.add_argument("--http-port", type=_port, default=8080, help="description document port (default 8080)")
    parser.add_argument("--ota-port", type=_port, default=3335, help="OTA data port (default 3335)")
    parser.add_argument("--interface", help="leave on this network interface (SO_BINDTODEVICE; needs CAP_NET_RAW)")
    parser.add_argument("--ftp-port", type=_port, default=21, help="double backup: the device's FTP port (default 21)")
    parser.add_argument("--ftp-user", default="FTPX", help="double backup: the FTP user (default FTPX)")
    parser.add_argument("--ftp-password", default="12345678", help="double backup: the FTP password (default 12345678)")
    parser.add_argument("--source-address", help="connect from this local address")
    parser.add_argument("--name", help="the device's name in logs and output (default: HOST)")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULTS.deadline,
        help=f"the whole upgrade's deadline in seconds (default {DEFAULTS.deadline:g})",
    )
    parser.add_argument(
        "--reboot-timeout",
        type=_positive_float,
        default=DEFAULTS.reboot,
        help=f"after phase 1, how long to wait for the update loader (default {DEFAULTS.reboot:g})",
    )
    parser.add_argument(
        "--verify-timeout",
        type=_positive_float,
        default=DEFAULTS.verify,
        help=f"after phase 2, how long to wait for the new firmware (default {DEFAULTS.verify:g})",
    )
    parser.add_argument(
        "--receive-timeout",
        type=_positive_float,
        default=DEFAULTS.receive,
        help=f"one OTA receive timeout in seconds (default {DEFAULTS.receive:g})",
    )
    parser.add_argument(
        "--max-receive-timeouts",
        type=_count,
        default=DEFAULTS.max_receive_timeouts,
        help=f"give up after more than this many in a row (default {DEFAULTS.max_receive_timeouts})",
    )
    parser.add_argument(
        "--reconnect-command",
        metavar="CMD",
        help="run CMD (sh -c) after each reboot to rejoin the device's WiFi; it gets NETOTA_DEVICE, "
        "NETOTA_INTERFACE, NETOTA_SSID and NETOTA_PHASE (reboot|verify)",
    )
    parser.add_argument("--ssid", help="the device's SSID, passed to the reconnect command as NETOTA_SSID")
    parser.add_argument(
        "--echo-final-notice",
        action="store_true",
        help="answer the device's final 100%% notice (ends its 5 s wait early; off by default)",
    )
    parser.add_argument(
        "--strict", action="store_true", help=f"exit {EXIT_ALREADY_CURRENT_STRICT} when already current"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    parser.add_argument("--no-color", action="store_true", help="no colour in the progress display (also: NO_COLOR)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log the engine's steps to stderr")
    parser.add_argument(
        "--log-file", help="append the engine's log to this file as JSON lines (the daemon's --log-format json)"
    )
    parser.add_argument(
        "--junit",
        metavar="FILE",
        help="write a JUnit XML report (one test case: the device, its duration, the outcome) for a CI system",
    )

    parser.set_defaults(func=run_flash_command)
    # argparse's own usage errors (a missing --host) are a JSON object too with --json (cli.main).
    parser.json_usage_errors = True  # type: ignore[attr-defined]
    return parser


class UsageError(Exception):
    """A bad argument found before anything was sent."""


Prepared = tuple[DeviceTarget, FirmwareImage, UpgradeTimeouts, UpgradeBehaviour]


def prepare(args: argparse.Namespace) -> Prepared:
    """Everything ``netota flash`` needs, checked; raises :class:`UsageError` (nothing sent yet)."""
    if not args.host or not args.host.strip():
        raise UsageError("--host is empty")
    if not args.firmware:
        raise UsageError("the firmware path is empty")
    try:
        image = open_image(args.firmware)
    except FirmwareError as e:
        raise UsageError(str(e)) from None
    if args.interface:
        try:
            check_interface(args.interface)
        except EndpointError as e:
            raise UsageError(str(e)) from None
    if getattr(args, "junit", None):
        try:
            check_junit_path(args.junit)
        except JUnitError as e:
            raise UsageError(str(e)) from None
    target = DeviceTarget(
        name=args.name or args.host,
        host=args.host.strip(),
        ctp_port=args.ctp_port,
        http_port=args.http_port,
        ota_port=args.ota_port,
        interface=args.interface,
        source_address=args.source_address,
        reconnect_command=args.reconnect_command,
        expected_ssid=args.ssid,
        ftp_port=args.ftp_port,
        ftp_user=args.ftp_user,
        ftp_password=args.ftp_password,
    )
    timeouts = DEFAULTS.replaced(
        deadline=args.timeout,
        reboot=args.reboot_timeout,
        verify=args.verify_timeout,
        receive=args.receive_timeout,
        max_receive_timeouts=args.max_receive_timeouts,
    )
    return target, image, timeouts, UpgradeBehaviour(echo_final_notice=args.echo_final_notice)


def usage_error(error: UsageError, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """A bad argument found before anything was sent: one line on ``err`` and, with ``--json``, one
    JSON object on ``out`` (``{"error": "bad_argument", "message": ..., "exit_code": 64}``); 64."""
    err.write(f"netota flash: error: {error}\n")
    if getattr(args, "json", False):
        out.write(bad_argument_json(str(error), EXIT_USAGE) + "\n")
        out.flush()
    return EXIT_USAGE


def abort_line(signal_name: str, phase: Phase) -> str:
    """What ``netota flash`` says when a signal aborts it, in ``phase``: what the abort does to the
    device there (the outcome, printed at the end, says what state it was left in)."""
    if phase in (Phase.PHASE1, Phase.PHASE2):
        what = "STOP to the device's stream if one is open"
    elif phase is Phase.UPLOAD:
        what = "the upload's data connection is reset, not closed"
    else:
        what = "nothing more is sent to the device"
    return f"{signal_name}: aborting in {phase_label(phase)} ({what})..."


def abort_on_signal(reactor: Any, job: Any, err: TextIO) -> Callable[[int, Any], None]:
    """The SIGINT / SIGTERM handler of a running flash: it says on ``err`` what the abort does in the
    job's phase (:func:`abort_line`) and cancels the job on the reactor (a handler runs between the
    reactor's steps: ``callFromThread`` wakes it)."""

    def on_signal(signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        err.write(f"\n{abort_line(name, job.phase)}\n")
        reactor.callFromThread(job.cancel, f"interrupted ({name})")

    return on_signal


def result_json(outcome: Outcome, code: int) -> str:
    return json.dumps({**outcome.to_json(), "exit_code": code}, sort_keys=True)


def print_outcome(outcome: Outcome, code: int, args: argparse.Namespace, out: TextIO) -> None:
    """The result on ``out``: one JSON object with ``--json``, else the outcome line and the advice."""
    if args.json:
        out.write(result_json(outcome, code) + "\n")
        out.flush()
        return
    versions = ""
    if outcome.firmware_version_before or outcome.firmware_version_after:
        versions = f" (firmware {outcome.firmware_version_before or '?'} -> {outcome.firmware_version_after or '?'})"
    failure = outcome.failure.value if outcome.failure else None
    out.write(outcome_text(outcome.kind.value, outcome.message, failure) + versions + "\n")
    if outcome.advice:
        out.write(f"advice: {human_text(outcome.advice)}\n")
    out.flush()


async def flash(
    reactor: Any,
    args: argparse.Namespace,
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_job: Any = None,
    prepared: Prepared | None = None,
) -> int:
    """Run one flash job on ``reactor`` and print its result; returns the exit code.
    ``on_job(job)`` is called once the job exists (the command uses it to hook signals);
    ``prepared`` is :func:`prepare`'s result when the caller already checked the arguments."""
    from netota_daemon.engine.job import UpgradeJob  # imports the protocols; keep --help fast

    out = out or sys.stdout
    err = err or sys.stderr
    if prepared is None:
        try:
            prepared = prepare(args)
        except UsageError as e:
            return usage_error(e, args, out, err)
    target, image, timeouts, behaviour = prepared
    job = UpgradeJob(reactor, target, image, timeouts, job_id=f"flash-{uuid.uuid4().hex[:8]}", behaviour=behaviour)
    renderer = None
    if not args.quiet:
        renderer = ProgressRenderer(err, colour=colour_wanted(err, getattr(args, "no_color", False)), reactor=reactor)
        job.events.subscribe(renderer)
    if on_job is not None:
        on_job(job)
    began = reactor.seconds()
    try:
        outcome = await job.run()
    finally:
        if renderer is not None:
            renderer.close()
    code = exit_code(outcome.kind, strict=args.strict)
    print_outcome(outcome, code, args, out)
    if getattr(args, "junit", None):
        try:
            write_junit(
                args.junit,
                "netota flash",
                [case_from_outcome(target.name, outcome, reactor.seconds() - began, job.job_id)],
                timestamp=time.time() - (reactor.seconds() - began),
                classname="netota.flash",
                properties={"firmware": args.firmware, "host": target.host},
            )
        except JUnitError as e:
            err.write(f"netota flash: {e}\n")
            return EXIT_CANT_CREATE
    return code


def start_logging(args: argparse.Namespace) -> None:
    """Engine log to stderr (errors only, or every step with --verbose) and, with --log-file, every
    event as JSON lines. Raises :class:`UsageError` when the log file can't be opened."""
    observers: list[ILogObserver] = []
    level = LogLevel.info if args.verbose else LogLevel.critical
    observers.append(
        FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)])
    )
    if args.log_file:
        try:
            log_file = open(args.log_file, "a")
        except OSError as e:
            raise UsageError(f"can't open the log file {args.log_file}: {e.strerror or e}") from None
        observers.append(json_file_log_observer(log_file))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)


#: Runs the reactor with ``main(reactor)`` until its Deferred ends, then exits: ``task.react``.
ReactorRunner = Callable[[Callable[[Any], defer.Deferred[None]]], object]
#: Runs one flash job: :func:`flash`.
FlashRunner = Callable[..., Awaitable[int]]


def run_flash_command(
    args: argparse.Namespace,
    *,
    begin_logging: Callable[[argparse.Namespace], None] = start_logging,
    react: ReactorRunner | None = None,
    run_job: FlashRunner = flash,
) -> int:
    """The ``netota flash`` entry point: checks the arguments and opens the firmware, starts the
    log (``begin_logging``), then runs the reactor (``react``, default ``task.react``) until the job
    (``run_job``, given what was checked) ends, and exits with its code."""
    if react is None:
        from twisted.internet import task

        react = task.react
    try:
        prepared = prepare(args)  # fail on bad arguments before the reactor starts
        begin_logging(args)
    except UsageError as e:
        return usage_error(e, args, sys.stdout, sys.stderr)

    def hook_signals(reactor: Any, job: Any) -> None:
        on_signal = abort_on_signal(reactor, job, sys.stderr)

        def install() -> None:  # after the reactor installed its own handlers
            signal.signal(signal.SIGINT, on_signal)
            signal.signal(signal.SIGTERM, on_signal)

        reactor.callWhenRunning(install)

    async def main(reactor: Any) -> None:
        try:
            code = await run_job(reactor, args, on_job=lambda job: hook_signals(reactor, job), prepared=prepared)
        except BrokenPipeError:  # whoever read stdout went away (| head): end quietly
            silence_stdout()
            code = EXIT_BROKEN_PIPE
        raise SystemExit(code)

    react(lambda reactor: defer.ensureDeferred(main(reactor)))
    return 0  # not reached: react exits
