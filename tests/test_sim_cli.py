"""``netota sim`` and ``netota sim make-image``: options, errors, and the real subprocess."""

from __future__ import annotations

import json
import selectors
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from netota_daemon.cli.main import build_parser, main
from netota_daemon.cli.sim import config_from_args, flash_command
from netota_daemon.sim.config import SimConfig, StallFault
from netota_daemon.sim.image import read_trailer
from netota_daemon.wire.ctp import CtpDecoder, request
from netota_daemon.wire.firmware_kind import FirmwareKind
from tests.conftest import PYTHON, subprocess_env


def parse(*argv: str):
    return build_parser().parse_args(["sim", *argv])


def test_every_option_reaches_the_config(tmp_path):
    args = parse(
        "--listen",
        "127.0.0.3",
        "--ctp-port",
        "0",
        "--http-port",
        "1",
        "--ota-port",
        "2",
        "--mode",
        "loader",
        "--ota-listen-at-start",
        "--time-scale",
        "0.5",
        "--firmware-version",
        "3.0",
        "--image-size",
        "1000",
        "--phase1-all-size",
        "--reject-image",
        "--same-as-installed",
        "--same-status",
        "err",
        "--reboot-seconds",
        "4",
        "--loader-start-seconds",
        "5",
        "--phase2-reboot-seconds",
        "6",
        "--no-reboot",
        "--reboot-command",
        "true",
        "--drop-after-reads",
        "7",
        "--stall-after-reads",
        "8:9.5",
        "--corrupt-header-every",
        "10",
        "--corrupt-header-once",
        "11",
        "--corrupt-reply-check",
        "--fault-phase",
        "2",
    )
    config = config_from_args(args, tmp_path)
    assert (config.listen, config.ctp_port, config.http_port, config.ota_port) == ("127.0.0.3", 0, 1, 2)
    assert (config.mode, config.ota_listen_at_start, config.time_scale, config.double_backup) == (
        "loader",
        True,
        0.5,
        False,
    )
    assert (config.firmware_version, config.image_size, config.reject_image) == ("3.0", 1000, True)
    assert config.phase1_all_size is True
    assert (config.same_as_installed, config.same_status) == (True, "err")
    assert (config.reboot_seconds, config.loader_start_seconds, config.phase2_reboot_seconds) == (4, 5, 6)
    assert (config.no_reboot, config.reboot_command) == (True, "true")
    assert (config.drop_after_reads, config.stall_after_reads) == (7, StallFault(8, 9.5))
    assert (config.corrupt_header_every, config.corrupt_reply_check, config.fault_phase) == (10, True, 2)
    assert config.corrupt_header_once == 11
    assert config.state_dir == tmp_path


def test_every_double_backup_option_reaches_the_config(tmp_path):
    args = parse(
        "--double-backup",
        "--ftp-port",
        "0",
        "--no-ota-type",
        "--stupid-ftpd",
        "--pasv-base",
        "20000",
        "--fixed-version",
        "--burn-seconds",
        "3",
        "--flash-kbps",
        "64",
        "--ftp-drop-after-bytes",
        "1000",
        "--ftp-stall-after-bytes",
        "2000:7",
        "--ftp-busy-once",
        "--ftp-reject-login-once",
    )
    config = config_from_args(args, tmp_path)
    assert (config.double_backup, config.ftp_port, config.ota_type_in_description, config.stupid_ftpd) == (
        True,
        0,
        False,
        True,
    )
    assert (config.pasv_base, config.fixed_version, config.burn_seconds, config.flash_kbps) == (20000, True, 3, 64)
    assert (config.ftp_drop_after_bytes, config.ftp_stall) == (1000, StallFault(2000, 7))
    assert (config.ftp_busy_once, config.ftp_reject_login_once) == (True, True)
    defaults = config_from_args(parse(), tmp_path)
    assert (defaults.ftp_port, defaults.pasv_base, defaults.ota_type_in_description) == (21, 4096, True)


def test_the_double_backup_banner_names_the_ftp_port():
    config = SimConfig(double_backup=True, ctp_port=0, http_port=0, ftp_port=0)
    lines = flash_command(config, {"ctp": 4000, "http": 4001, "ftp": 4002}, accepted={"--ftp-port"})
    assert lines[0].endswith("netota sim make-image update-ota.ufw --version 2.0.0 --size 300000 --kind double")
    assert lines[1].endswith(
        "netota flash update-ota.ufw --host 127.0.0.1 --ctp-port 4000 --http-port 4001 --ftp-port 4002"
    )
    older = flash_command(config, {"ctp": 4000, "http": 4001, "ftp": 4002}, accepted=set())
    assert "no FTP route yet" in older[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["--pasv-base", "40000"],
        ["--ftp-stall-after-bytes", "9"],
        ["--flash-kbps", "0"],
        ["--ftp-drop-after-bytes", "0"],
        ["--time-scale", "0"],
        ["--ctp-port", "70000"],
        ["--stall-after-reads", "5"],
        ["--drop-after-reads", "0"],
        ["--mode", "boot"],
        ["--fault-phase", "3"],
        ["--time-scale", "nan"],
        ["--time-scale", "inf"],
        ["--reboot-seconds", "-1"],
        ["--stall-after-reads", "2:nan"],
    ],
)
def test_bad_options_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(*argv)
    assert exc.value.code == 64
    assert "error:" in capsys.readouterr().err


def test_help_documents_every_event():
    text = build_parser()._subparsers._group_actions[0].choices["sim"].format_help()
    for event in (
        "session_end",
        "checksum_error",
        "stop_received",
        "ftp_crash",
        "ftp_protocol_error",
        "db_burn",
        "db-received.bin",
        "reboot",
        "mode",
        "watchdog_reset",
        "ctp_connect",
        "http_request",
        "phase<N>-received.bin",
        "events.jsonl",
    ):
        assert event in text


def test_make_image_command(tmp_path, capsys):
    out = tmp_path / "image.bin"
    assert main(["sim", "make-image", str(out), "--version", "4.5.6", "--size", "5000"]) == 0
    assert out.stat().st_size == 5000 and read_trailer(out).version == "4.5.6"
    assert main(["sim", "make-image", str(out), "--version", "4.5.6", "--size", "10"]) == 64
    assert "at least 88 bytes" in capsys.readouterr().err
    double = tmp_path / "update-ota.ufw"
    assert main(["sim", "make-image", str(double), "--version", "4.5.7", "--size", "5000", "--kind", "double"]) == 0
    assert "double-backup test image, version 4.5.7" in capsys.readouterr().out
    assert (read_trailer(double).version, read_trailer(double).kind) == ("4.5.7", FirmwareKind.DOUBLE_BACKUP)
    assert read_trailer(out).kind is FirmwareKind.SINGLE_BACKUP


def test_netota_sim_subprocess_runs_until_sigterm_and_removes_its_own_state_dir():
    process = subprocess.Popen(
        [
            PYTHON,
            "-m",
            "netota_daemon",
            "sim",
            "--ctp-port",
            "0",
            "--http-port",
            "0",
            "--ota-port",
            "0",
            "--time-scale",
            "0.01",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        text=True,
    )
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        assert selector.select(timeout=20), "no ready line within 20 s"
        lines = [process.stdout.readline() for _ in range(4)]  # one print: all four are there
        assert lines[0].startswith("netota sim: main firmware 1.0.0 on 127.0.0.1")
        state = Path(lines[1].split("state in ", 1)[1].split(" ", 1)[0])
        assert "removed at exit" in lines[1] and state.name.startswith("netota-sim-")
        ports = json.loads((state / "ports.json").read_text())
        assert f"ctp {ports['ctp']}" in lines[0] and f"ota {ports['ota']}" in lines[0]
        flash = shlex.split(lines[3].split("then upgrade it:", 1)[1])
        assert flash == [
            "netota",
            "flash",
            "update.ufw",
            "--host",
            "127.0.0.1",
            "--ctp-port",
            str(ports["ctp"]),
            "--http-port",
            str(ports["http"]),
            "--ota-port",
            str(ports["ota"]),
        ]
        with socket.create_connection(("127.0.0.1", ports["ctp"]), timeout=10) as sock:
            sock.sendall(request("APP_ACCESS", "PUT", type="0", ver="20906"))
            decoder = CtpDecoder()
            frames = []
            while not frames:
                frames = decoder.feed(sock.recv(4096))
            assert frames[0].param == {"type": "0", "ver": "20906"}
        events = [json.loads(line)["event"] for line in (state / "events.jsonl").read_text().splitlines()]
        assert events[:2] == ["start", "mode"]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
    assert not state.exists()


def test_usage_does_not_make_make_image_look_required(capsys):
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert out.startswith(
        "usage: netota sim [OPTIONS]\n       netota sim make-image OUT --version V --size N [--kind single|double]\n"
    )
    assert max(len(line) for line in out.split("\n\n", 3)[1].splitlines()) < 80  # the description


@pytest.mark.parametrize(
    "argv, prog",
    [
        (["sim", "--bogus"], "netota sim"),
        (["sim", "make-image", "x", "--version", "1", "--size", "100", "-z"], "netota sim make-image"),
    ],
)
def test_an_unknown_option_names_the_subcommand(argv, prog, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 64
    err = capsys.readouterr().err
    assert f"{prog}: error: unrecognized arguments:" in err and "netota: error" not in err


def test_the_printed_flash_command_is_one_netota_flash_accepts(tmp_path):
    config = SimConfig(listen="127.0.0.5", ctp_port=0, http_port=8080, ota_port=0)
    lines = flash_command(config, {"ctp": 4000, "http": 8080, "ota": 4001})
    assert lines[0].endswith("netota sim make-image update.ufw --version 2.0.0 --size 300000")
    command = shlex.split(lines[1].split("then upgrade it:", 1)[1])
    assert command == [
        "netota",
        "flash",
        "update.ufw",
        "--host",
        "127.0.0.5",
        "--ctp-port",
        "4000",
        "--ota-port",
        "4001",
    ]
    args = build_parser().parse_args(command[1:])
    assert (args.host, args.ctp_port, args.http_port, args.ota_port) == ("127.0.0.5", 4000, 8080, 4001)


def test_unusable_state_dir_is_a_clear_error(tmp_path, capsys):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert main(["sim", "--state-dir", str(not_a_dir), "--ctp-port", "0", "--http-port", "0", "--ota-port", "0"]) == 64
    err = capsys.readouterr().err
    assert f"can't use the state directory {not_a_dir}" in err and "Traceback" not in err
