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
from netota_daemon.sim.config import SimConfig, SimConfigError, StallFault

EVENTS_HELP = """\
state directory (--state-dir DIR):
  ports.json             {"listen", "ctp", "http", "ota"}: the ports actually used (written at start)
  events.jsonl           one JSON object per line, appended as things happen
  phase<N>-received.bin  after every OTA session of phase N: the bytes received, placed by offset,
                         image length long (zeros where nothing arrived)

events (every one has "event", "time" (Unix seconds) and "mode" (main|loader|down)):
  start            firmware_version, listen
  mode             the device now runs in "mode"; firmware_version, ports (absent when going down)
  stop             the simulator is shutting down
  ctp_connect      peer                      (CTP connection accepted)
  ctp_frame        topic, op                 (main firmware: one frame received)
  app_access       peer[, type, ver]         (APP_ACCESS answered)
  ctp_access_refused peer, holder            (another IP holds access: errno 3, disconnected)
  ctp_replaced     peer                      (a new connection from the holder's IP replaced it)
  ctp_idle_drop    peer                      (no frame for 60 s, scaled)
  ctp_bad_frame    peer, error               (bad magic/length/JSON: connection dropped)
  ctp_ignored      reason                    (loader: a second concurrent CTP connection)
  net_ota_single   requested, status         (NET_OTA_SINGLE PUT answered)
  ota_listening    port                      (3335 opened by NET_OTA_SINGLE)
  ota_refused      reason                    (3335 connection closed at once: busy, or loader
                                              before any HTTP request)
  http_request     method, path, status | request, status (loader)
  session_start    phase
  all_size_sent    phase, all_size
  header_corrupted phase, seek               (--corrupt-header-every/-once: sent with a wrong sum)
  checksum_error   phase, seek, read_size, injected (a reply with a bad sum: dropped)
  reply_timeout_ignored phase, seek, read_size (phase 1: no valid reply in 5 s; the V1.2 firmware
                                              goes on with a buffer never filled)
  notice_echo      phase                     (the app echoed the 100 % notice: wait ended early)
  stop_received    phase                     (STOP from the app)
  fault_drop       phase, replies            (--drop-after-reads fired)
  fault_stall      phase, replies, seconds   (--stall-after-reads fired)
  session_end      phase, outcome, reason, bytes (payload bytes received), image_length,
                   sha256 (of phase<N>-received.bin), stop_received, all_size_sent, replies,
                   checksum_errors
                   outcome: ok | err (device sent ERR) | same (SAME, or ERR with --same-status err)
                            | dropped (--drop-after-reads) | aborted (the app closed first)
                            | watchdog (loader watchdog reset) | stopped (reboot or shutdown)
  watchdog_reset   seconds                   (loader: no read progress during an attempt)
  reboot           reason, to (loader|main|down)
  power_up         to                        (WiFi back; the servers listen a little later)
  reboot_command   direction (down|up), exit_code | error
  listen_failed    error
"""


DESCRIPTION = """\
Play one JieLi AC79 device: the main firmware (CTP 3333, HTTP 8080, OTA 3335
after NET_OTA_SINGLE) and, after a successful phase 1, the phase-2 loader.
Runs in the foreground until SIGINT/SIGTERM and prints, at start, the
netota flash command that upgrades it. Every delay is the device's real one
times --time-scale."""

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


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
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
        help="a double-backup build: ota_type 0, NET_OTA_SINGLE answers status 0",
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
