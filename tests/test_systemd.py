"""sd_notify datagrams and the watchdog, against a datagram socket the test binds."""

from __future__ import annotations

import os
import socket
import tempfile

import pytest
from twisted.internet.task import Clock

from netota_daemon.daemon.systemd import SystemdNotifier, WatchdogService, watchdog_interval


@pytest.fixture
def notify_socket():
    directory = tempfile.mkdtemp(prefix="ntn", dir="/tmp")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


def test_ready_stopping_and_status_are_sent_as_datagrams(notify_socket):
    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    assert notifier.ready("listening")
    assert sock.recv(4096) == b"READY=1\nSTATUS=listening"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    notifier.close()


def test_abstract_namespace_address():
    name = f"netota-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(100) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.ready() is False


def test_a_vanished_notify_socket_is_logged_not_fatal(tmp_path):
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert watchdog_interval({"WATCHDOG_USEC": "20000000"}) == 10.0
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "2"}, pid=2) == 1.0


def test_watchdog_service_pings_on_the_clock_until_stopped(notify_socket):
    path, sock = notify_socket
    clock = Clock()
    service = WatchdogService(SystemdNotifier({"NOTIFY_SOCKET": path}), 10.0, clock)
    service.startService()
    assert sock.recv(100) == b"WATCHDOG=1"  # at once
    clock.advance(10.0)
    assert sock.recv(100) == b"WATCHDOG=1"
    service.stopService()
    clock.advance(30.0)
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(100)


def test_a_notify_socket_nobody_reads_never_blocks_the_daemon(notify_socket):
    """The receiver's queue fills up; sends are then dropped (False), never waited on."""
    import threading

    path, sock = notify_socket
    notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
    results: list[bool] = []
    sender = threading.Thread(target=lambda: results.extend(notifier.watchdog() for _ in range(5000)), daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "sendto blocked on a full notify socket"
    assert results[0] is True and results[-1] is False
    notifier.close()


def _unit(name: str) -> dict[str, dict[str, str]]:
    import configparser
    from pathlib import Path

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive in systemd
    parser.read(Path(__file__).resolve().parent.parent / "etc" / "systemd" / name)
    return {section: dict(parser[section]) for section in parser.sections()}


def test_the_units_leave_room_for_the_connections_and_let_the_group_reach_the_socket():
    from netota_daemon.daemon.config import DEFAULT_MAX_CONNECTIONS
    from netota_daemon.endpoint_strings import DEFAULT_BACKLOG
    from netota_daemon.service import DESCRIPTORS_PER_DEVICE, FIXED_DESCRIPTORS

    service = _unit("netota.service")["Service"]
    assert int(service["LimitNOFILE"]) >= DEFAULT_MAX_CONNECTIONS + FIXED_DESCRIPTORS + 64 * DESCRIPTORS_PER_DEVICE
    socket_unit = _unit("netota.socket")["Socket"]
    assert socket_unit["SocketGroup"] == "netota" and int(socket_unit["SocketMode"], 8) == 0o660
    # Created by systemd (root) before the service first ran: the group must be able to traverse it.
    assert int(socket_unit["DirectoryMode"], 8) & 0o011 == 0o011
    assert int(socket_unit["Backlog"]) >= DEFAULT_BACKLOG
    drop_in = _unit("netota.service.d/socket-activation.conf")["Service"]
    assert drop_in["RuntimeDirectoryPreserve"] == "yes"


@pytest.mark.skipif(not __import__("shutil").which("systemd-analyze"), reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units():
    import subprocess
    from pathlib import Path

    units = Path(__file__).resolve().parent.parent / "etc" / "systemd"
    result = subprocess.run(
        ["systemd-analyze", "verify", str(units / "netota.service"), str(units / "netota.socket")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    problems = [
        line for line in (result.stdout + result.stderr).splitlines() if "/opt/netota/bin/twistd" not in line and line
    ]
    assert problems == []
