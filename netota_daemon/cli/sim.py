"""``netota sim``: run one simulated device in the foreground; ``netota sim make-image``: a test image."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from netota_daemon.cli import arguments
from netota_daemon.cli.exit_codes import EXIT_USAGE
from netota_daemon.sim.config import PASV_COUNTER_LAST, SimConfig, SimConfigError, StallFault

EVENTS_HELP = """\
state directory (--state-dir DIR):
  ports.json        the ports actually used: listen, ctp, http, then ota
                    (single backup) or ftp (double backup); written at start
  events.jsonl      one JSON object per line, appended as things happen
  phase<N>-received.bin  after every OTA session of phase N: the bytes
                    received, placed by offset, image length long
  db-received.bin   double backup: the bytes of the last OTA upload over FTP,
                    as received (written when the upload ends, however)

events: every one has "event", "time" (Unix seconds), "mode" (main|loader|
down). docs/simulator.md says when each comes and what its fields mean.
  device    start, mode, stop, reboot, power_up, reboot_command,
            listen_failed, watchdog_reset
  CTP       ctp_connect, ctp_frame, app_access, ctp_access_refused,
            ctp_replaced, ctp_idle_drop, ctp_bad_frame, ctp_ignored,
            net_ota_single
  HTTP      http_request
  OTA 3335  ota_listening, ota_refused, session_start, all_size_sent,
            header_corrupted, checksum_error, reply_timeout_ignored,
            notice_echo, stop_received, fault_drop, fault_stall,
            session_end (outcome: ok, err, same, dropped, aborted,
            watchdog, stopped)
  FTP 21    ftp_connect, ftp_command (verb, arg, reply), ftp_login,
            ftp_protocol_error (kind: coalesced, split, second_pasv,
            data_before_stor, flood), ftp_pasv, ftp_pasv_failed,
            ftp_data_connect, ftp_data_refused, ftp_crash (cause: abor,
            no_fresh_pasv, port_after_pasv), ftp_not_modelled,
            ftp_upload_start, ftp_upload_end (outcome: closed, reset,
            control_lost), ftp_fault_busy, ftp_fault_reject_login,
            ftp_fault_drop, ftp_fault_stall
  writer    db_cancelled, db_head_rejected, db_write_error, db_burn
            (burned, reason, bytes, image_length, version)
"""


DESCRIPTION = """\
Play one JieLi AC79 device: the main firmware (CTP 3333, HTTP 8080, OTA 3335
after NET_OTA_SINGLE) and, after a successful phase 1, the phase-2 loader;
with --double-backup, a double-backup build (ota_type 0) upgraded by an FTP
upload on 21. Runs in the foreground until SIGINT/SIGTERM and prints, at
start, the netota flash command that upgrades it. Every delay is the
device's real one times --time-scale."""

USAGE = """netota sim [OPTIONS]
       netota sim make-image OUT --version V --size N [--kind single|double]"""

_positive_int = arguments.whole_number(1)
_port = arguments.tcp_port(allow_zero=True)
_seconds = arguments.seconds(positive=False)
_scale = arguments.seconds(positive=True)


def _stall(text: str) -> StallFault:
    try:
        return StallFault.parse(text)
    except SimConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ftp_stall(text: str) -> StallFault:
    try:
        return StallFault.parse(text, "--ftp-stall-after-bytes", "100000:30")
    except SimConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _pasv_base(text: str) -> int:
    value = arguments.whole_number(0)(text)
    if value >= PASV_COUNTER_LAST:
        raise argparse.ArgumentTypeError(f"{text!r} must be below {PASV_COUNTER_LAST}")
    return value


def add_parser(subparsers: arguments.Subcommands) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sim",
        usage=USAGE,
        help="Run a simulated device: its main firmware and its phase-2 loader.",
        description=DESCRIPTION,
        epilog=EVENTS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = parser.add_argument_group("network")
    net.add_argument("--listen", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    net.add_argument("--ctp-port", type=_port, default=3333, help="CTP port (0: any free port; default 3333)")
    net.add_argument("--http-port", type=_port, default=8080, help="HTTP port (0: any; default 8080)")
    net.add_argument("--ota-port", type=_port, default=3335, help="OTA port (0: any; default 3335)")
    net.add_argument(
        "--state-dir",
        type=Path,
        help="where ports.json, events.jsonl and phase<N>-received.bin go (default: a new temporary directory)",
    )
    dev = parser.add_argument_group("device")
    dev.add_argument("--mode", choices=("main", "loader"), default="main", help="what runs at start (default main)")
    dev.add_argument(
        "--ota-listen-at-start",
        action="store_true",
        help="main firmware opens 3335 without NET_OTA_SINGLE (the vendor's test shortcut)",
    )
    dev.add_argument("--time-scale", type=_scale, default=1.0, help="multiply every delay and timeout (default 1)")
    dev.add_argument(
        "--double-backup",
        action="store_true",
        help="a double-backup build: ota_type 0, NET_OTA_SINGLE answers status 0, no loader; "
        "upgraded by an FTP upload (see 'double backup' below)",
    )
    dev.add_argument("--firmware-version", default="1.0.0", help="the installed version (default 1.0.0)")
    dev.add_argument(
        "--image-size",
        type=_positive_int,
        help="image length for images without a simulator head/trailer (any opaque file)",
    )
    dev.add_argument(
        "--phase1-all-size",
        action="store_true",
        help="phase 1 also sends an all_size notice after its first reads (off by default)",
    )
    dev.add_argument("--reject-image", action="store_true", help="every session ends ERR after the transfer")
    dev.add_argument(
        "--same-as-installed", action="store_true", help="phase 1 ends after the first reply with SAME (16)"
    )
    dev.add_argument(
        "--same-status",
        choices=("same", "err"),
        default="same",
        help="what --same-as-installed sends: same (SDK 1.1, default) or err (V1.2 firmware)",
    )
    rb = parser.add_argument_group("reboots")
    rb.add_argument("--reboot-seconds", type=_seconds, default=2.0, help="down time after phase-1 OK (default 2)")
    rb.add_argument(
        "--loader-start-seconds",
        type=_seconds,
        default=3.0,
        help="after the reboot, until the loader listens (default 3)",
    )
    rb.add_argument(
        "--phase2-reboot-seconds",
        type=_seconds,
        default=1.0,
        help="down time after phase-2 OK or a watchdog reset (default 1)",
    )
    rb.add_argument(
        "--no-reboot",
        action="store_true",
        help="after phase-1 OK the device goes down and stays down (to test a device that never returns)",
    )
    rb.add_argument(
        "--reboot-command",
        metavar="CMD",
        help="shell command run when going down and coming up, with NETOTA_SIM_REBOOT=down|up",
    )
    db = parser.add_argument_group("double backup (with --double-backup)")
    db.add_argument("--ftp-port", type=_port, default=21, help="FTP port (0: any; default 21)")
    db.add_argument(
        "--no-ota-type",
        action="store_true",
        help="the description document has no ota_type (nor ota_step): read as double backup",
    )
    db.add_argument(
        "--stupid-ftpd",
        action="store_true",
        help="the other builds' FTP server: its greeting, and REST/SIZE answered",
    )
    db.add_argument(
        "--pasv-base",
        type=_pasv_base,
        default=4096,
        metavar="N",
        help="the PASV port counter's start: ports N+1, N+2, ... up to 32767, then N (default 4096)",
    )
    db.add_argument(
        "--fixed-version",
        action="store_true",
        help="the reported version stays the same after an upgrade (the SDK's fixed dev_desc string)",
    )
    db.add_argument(
        "--burn-seconds",
        type=_seconds,
        default=1.0,
        help="from the upload's clean close to the 226: writing the boot info (default 1; device allows ~5)",
    )
    db.add_argument(
        "--flash-kbps",
        type=_scale,
        metavar="K",
        help="flash writes K KiB per second: the device asks for its next 3335 window once the last is written, "
        "and stops reading an FTP upload while it writes (default: free)",
    )
    fl = parser.add_argument_group("faults (each fires as described; --fault-phase limits them to one phase)")
    fl.add_argument(
        "--drop-after-reads",
        type=_positive_int,
        metavar="N",
        help="abort the OTA connection after N replies in a session (once overall, so a retry succeeds)",
    )
    fl.add_argument(
        "--stall-after-reads",
        type=_stall,
        metavar="N:SECONDS",
        help="after N replies, wait SECONDS before the next request (once overall)",
    )
    fl.add_argument(
        "--corrupt-header-every",
        type=_positive_int,
        metavar="N",
        help="every Nth READ header of a session goes out with a wrong sum; the device never asks again: "
        "after its 5 s wait the loader sends ERR, the main firmware goes on and fails its CRC check at the end",
    )
    fl.add_argument(
        "--corrupt-header-once",
        type=_positive_int,
        metavar="N",
        help="the Nth READ header of the device's life goes out with a wrong sum, once (so a retry succeeds)",
    )
    fl.add_argument(
        "--corrupt-reply-check",
        action="store_true",
        help="treat the next reply as corrupt (once): dropped, then as --corrupt-header-every after the 5 s wait",
    )
    fl.add_argument("--fault-phase", type=int, choices=(1, 2), help="apply the faults only in this phase")
    fl.add_argument(
        "--ftp-drop-after-bytes",
        type=_positive_int,
        metavar="N",
        help="reset the FTP data connection after N bytes of an upload (once): nothing burned, no 226",
    )
    fl.add_argument(
        "--ftp-stall-after-bytes",
        type=_ftp_stall,
        metavar="N:SECONDS",
        help="after N bytes of an upload, stop reading it for SECONDS (once)",
    )
    fl.add_argument(
        "--ftp-busy-once",
        action="store_true",
        help="the first STOR of the OTA file gets 550 (an earlier upgrade still timing out)",
    )
    fl.add_argument(
        "--ftp-reject-login-once",
        action="store_true",
        help="the first FTP login gets 503 and the close, whatever it says",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every event to stderr")
    parser.set_defaults(func=run_sim)

    sim_commands = parser.add_subparsers(dest="sim_command", title="commands", metavar="make-image")
    make = sim_commands.add_parser(
        "make-image",
        prog="netota sim make-image",
        usage="netota sim make-image OUT --version V --size N [--kind single|double]",
        help="write a test image the simulator verifies",
        description="Write a deterministic test image of exactly SIZE bytes: a head with its length "
        "(--kind single: the simulator's own; --kind double: a JL file head named update_data, as a real "
        "double-backup image starts), pseudo-random bytes and a trailer (magic, VERSION, SHA-256). After a "
        "good upgrade the simulated device reports VERSION.",
    )
    make.add_argument("out", metavar="OUT", type=Path, help="the file to write")
    make.add_argument(
        "--version", required=True, dest="image_version", metavar="V", help="firmware version the image carries"
    )
    make.add_argument(
        "--size", required=True, type=_positive_int, metavar="N", help="total bytes (at least 88; 104 for double)"
    )
    make.add_argument(
        "--kind",
        choices=("single", "double"),
        default="single",
        help="single: a single-backup image for the 3335 stream (default); double: a double-backup image "
        "(a JL file head named update_data) for the FTP upload",
    )
    make.set_defaults(func=run_make_image)
    return parser


def config_from_args(args: argparse.Namespace, state_dir: Path) -> SimConfig:
    return SimConfig(
        state_dir=state_dir,
        listen=args.listen,
        ctp_port=args.ctp_port,
        http_port=args.http_port,
        ota_port=args.ota_port,
        mode=args.mode,
        ota_listen_at_start=args.ota_listen_at_start,
        time_scale=args.time_scale,
        double_backup=args.double_backup,
        firmware_version=args.firmware_version,
        image_size=args.image_size,
        phase1_all_size=args.phase1_all_size,
        reject_image=args.reject_image,
        same_as_installed=args.same_as_installed,
        same_status=args.same_status,
        drop_after_reads=args.drop_after_reads,
        stall_after_reads=args.stall_after_reads,
        corrupt_header_every=args.corrupt_header_every,
        corrupt_header_once=args.corrupt_header_once,
        corrupt_reply_check=args.corrupt_reply_check,
        fault_phase=args.fault_phase,
        reboot_seconds=args.reboot_seconds,
        loader_start_seconds=args.loader_start_seconds,
        phase2_reboot_seconds=args.phase2_reboot_seconds,
        no_reboot=args.no_reboot,
        reboot_command=args.reboot_command,
        ftp_port=args.ftp_port,
        ota_type_in_description=not args.no_ota_type,
        stupid_ftpd=args.stupid_ftpd,
        pasv_base=args.pasv_base,
        fixed_version=args.fixed_version,
        burn_seconds=args.burn_seconds,
        flash_kbps=args.flash_kbps,
        ftp_drop_after_bytes=args.ftp_drop_after_bytes,
        ftp_stall_after_bytes=args.ftp_stall_after_bytes,
        ftp_busy_once=args.ftp_busy_once,
        ftp_reject_login_once=args.ftp_reject_login_once,
    )


def run_make_image(args: argparse.Namespace) -> int:
    from netota_daemon.sim.image import ImageError, make_image

    try:
        path = make_image(args.out, args.image_version, args.size, args.kind)
    except ImageError as e:
        print(f"netota sim make-image: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"netota sim make-image: can't write {args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {path} ({args.size} bytes, {args.kind}-backup test image, version {args.image_version})")
    return 0


def _flash_options() -> set[str]:
    """The options ``netota flash`` accepts (so the command printed at start is one it takes)."""
    from netota_daemon.cli import flash

    subparsers = argparse.ArgumentParser().add_subparsers()
    return set(flash.add_parser(subparsers)._option_string_actions)


def flash_command(config: SimConfig, ports: dict[str, int], accepted: set[str] | None = None) -> list[str]:
    """Lines telling how to upgrade this simulated device by hand: a test image, then ``netota
    flash`` with this device's address and ports (only those that differ from the defaults)."""
    accepted = _flash_options() if accepted is None else accepted
    host = "127.0.0.1" if config.listen in ("", "0.0.0.0") else config.listen
    defaults = {"ctp": 3333, "http": 8080, "ota": 3335, "ftp": 21}
    if config.double_backup:
        image, kind, names = "update-ota.ufw", " --kind double", ("ctp", "http", "ftp")
    else:
        image, kind, names = "update.ufw", "", ("ctp", "http", "ota")
    flags = "".join(
        f" --{name}-port {ports[name]}" for name in names if ports.get(name, defaults[name]) != defaults[name]
    )
    lines = [
        f"netota sim: make a test image:  netota sim make-image {image} --version 2.0.0 --size 300000{kind}",
        f"netota sim: then upgrade it:    netota flash {image} --host {host}{flags}",
    ]
    if config.double_backup and "--ftp-port" not in accepted:
        lines[1] += "  (this netota flash has no FTP route yet: it reports 'not applicable')"
    return lines


def run_sim(args: argparse.Namespace) -> int:
    """Run the device until SIGINT/SIGTERM; a state directory it made itself is removed at the end."""
    if args.state_dir is not None:
        return _run_device(args, args.state_dir, temporary=False)
    state_dir = Path(tempfile.mkdtemp(prefix="netota-sim-"))
    try:
        return _run_device(args, state_dir, temporary=True)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _run_device(args: argparse.Namespace, state_dir: Path, temporary: bool) -> int:
    from twisted.internet import reactor
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from netota_daemon.sim.device import SimulatedDevice

    try:
        config = config_from_args(args, state_dir)
    except SimConfigError as e:
        print(f"netota sim: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        device = SimulatedDevice(reactor, config)  # creates the state directory
    except OSError as e:
        print(f"netota sim: can't use the state directory {state_dir}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USAGE
    level = LogLevel.debug if args.verbose else LogLevel.warn
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)])],
        redirectStandardIO=False,
    )
    exit_code = [0]

    def started(_: Any) -> None:
        ports = device.ports
        listening = ", ".join(f"{name} {ports[name]}" for name in device.port_names)
        removed = ", removed at exit" if temporary else ""
        print(
            f"netota sim: {device.mode.value} firmware {device.firmware_version} on {config.listen}: {listening}\n"
            f"netota sim: state in {state_dir} (ports.json, events.jsonl{removed}); Ctrl-C to stop",
            *flash_command(config, ports),
            sep="\n",
            flush=True,
        )
        reactor.addSystemEventTrigger("before", "shutdown", device.stop)

    def failed(failure: Any) -> None:
        print(f"netota sim: can't start: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
        exit_code[0] = 1
        reactor.stop()

    reactor.callWhenRunning(lambda: device.start().addCallbacks(started, failed))
    reactor.run()
    return exit_code[0]
