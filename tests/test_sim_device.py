"""SimulatedDevice: modes, reboots and their timing, the watchdog, events and state files (in memory)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from netota_daemon.sim.config import DeviceMode, SimConfig, SimConfigError, StallFault
from netota_daemon.sim.ctp_server import MainCtpServer
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import build_image
from netota_daemon.wire.ctp import request
from netota_daemon.wire.ota import OtaHeader, Status, encode_reply, notice_echo

PORTS = dict(ctp_port=13333, http_port=18080, ota_port=13335)
IMAGE = build_image("2.0.0", 60_000)
ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


def make_device(tmp_path: Any = None, **config: Any) -> tuple[SimulatedDevice, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    state = {"state_dir": tmp_path / "state"} if tmp_path is not None else {}
    device = SimulatedDevice(reactor, SimConfig(**{**PORTS, **state, **config}))
    assert device.start().result is device
    return device, reactor


def connect(device: SimulatedDevice, port: str) -> tuple[Any, StringTransport]:
    """A connection to ``port`` as the device's listener builds it (tracked by the device): the
    wrapper (feed it bytes, lose it) and its transport."""
    wrapper = device.server_factory(port).buildProtocol(ADDRESS)
    transport = StringTransport(peerAddress=ADDRESS)
    wrapper.makeConnection(transport)
    return wrapper, transport


def run_session(device: SimulatedDevice, reactor: MemoryReactorClock, image: bytes = IMAGE) -> str:
    """One OTA session served in memory until the device closes; returns its outcome."""
    session, transport = connect(device, "ota")
    for _ in range(2000):
        reactor.advance(0.05)
        data = transport.value()
        transport.clear()
        for i in range(0, len(data), 20):
            header = OtaHeader.decode(data[i : i + 20])
            if header.status == Status.READ:
                session.dataReceived(
                    encode_reply(header, image[header.seek_addr : header.seek_addr + header.read_size])
                )
            elif header.status == Status.DOING and header.percent == 100:
                session.dataReceived(notice_echo(header))
        if transport.disconnecting:
            session.connectionLost(Failure(ConnectionDone()))
            return session.wrappedProtocol.result.outcome
    raise AssertionError("session never ended")


def answer_first_read(device: SimulatedDevice, reactor: MemoryReactorClock) -> tuple[Any, StringTransport]:
    """Open an OTA session and answer the device's first READ; the session and its transport."""
    session, transport = connect(device, "ota")
    reactor.advance(0.1)
    header = OtaHeader.decode(transport.value()[:20])
    session.dataReceived(encode_reply(header, IMAGE[: header.read_size]))
    return session, transport


def http_get(device: SimulatedDevice) -> None:
    protocol, _ = connect(device, "http")
    protocol.dataReceived(b"GET /mnt/spiflash/res/dev_desc.txt HTTP/1.1\r\n\r\n")


def names(device: SimulatedDevice) -> list[str]:
    return [e["event"] for e in device.events]


def test_start_listens_and_writes_ports_json(tmp_path):
    device, reactor = make_device(tmp_path)
    assert device.mode == "main"
    assert [(p[0], p[3]) for p in reactor.tcpServers] == [(13333, "127.0.0.1"), (18080, "127.0.0.1")]
    assert json.loads((tmp_path / "state" / "ports.json").read_text()) == {
        "listen": "127.0.0.1",
        "ctp": 13333,
        "http": 18080,
        "ota": 13335,
    }
    lines = (tmp_path / "state" / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["start", "mode"]


def test_loader_and_ota_listen_at_start_open_3335():
    _, reactor = make_device(mode="loader")
    assert [p[0] for p in reactor.tcpServers] == [13333, 18080, 13335]
    _, reactor = make_device(ota_listen_at_start=True)
    assert [p[0] for p in reactor.tcpServers] == [13333, 18080, 13335]


def test_phase1_ok_reboots_into_the_loader_with_the_scaled_timing(tmp_path):
    device, reactor = make_device(tmp_path, ota_listen_at_start=True, time_scale=1.0)
    assert run_session(device, reactor) == "ok"
    assert device.mode == "down"
    assert (tmp_path / "state" / "phase1-received.bin").read_bytes() == IMAGE
    reactor.advance(1.9)
    assert "power_up" not in names(device)
    reactor.advance(0.2)
    assert names(device)[-1] == "power_up" and device.mode == "down"
    reactor.advance(2.8)
    assert device.mode == "down"
    reactor.advance(0.2)
    assert device.mode == "loader" and device.events[-1]["ports"] == device.ports
    assert [p[0] for p in reactor.tcpServers[-3:]] == [13333, 18080, 13335]


def test_phase2_ok_reboots_into_main_with_the_new_version(tmp_path):
    device, reactor = make_device(tmp_path, mode="loader")
    http_get(device)
    assert run_session(device, reactor) == "ok"
    assert device.mode == "down" and device.firmware_version == "1.0.0"
    reactor.advance(1.0)
    assert device.mode == "main" and device.firmware_version == "2.0.0"
    assert device.events[-1]["firmware_version"] == "2.0.0"
    assert (tmp_path / "state" / "phase2-received.bin").read_bytes() == IMAGE


def test_failed_phase2_leaves_the_loader_listening_for_a_fresh_session():
    device, reactor = make_device(mode="loader", reject_image=False)
    http_get(device)
    damaged = IMAGE[:-1] + bytes([IMAGE[-1] ^ 1])
    assert run_session(device, reactor, damaged) == "err"
    assert device.mode == "loader"
    assert run_session(device, reactor) == "ok"


def test_loader_watchdog_resets_after_60_s_without_progress():
    device, reactor = make_device(mode="loader", stall_after_reads=StallFault(1, 500))
    http_get(device)
    session, transport = answer_first_read(device, reactor)
    reactor.advance(59.5)
    assert "watchdog_reset" not in names(device)
    reactor.advance(1.0)
    assert names(device)[-3:] == ["watchdog_reset", "reboot", "mode"] and device.mode == "down"
    assert transport.disconnected
    session.connectionLost(Failure(ConnectionDone()))
    assert device.events[-1]["outcome"] == "watchdog"
    reactor.advance(1.5)
    assert device.mode == "down"
    reactor.advance(3.5)
    assert device.mode == "loader"


def test_main_firmware_has_no_watchdog():
    device, reactor = make_device(ota_listen_at_start=True, stall_after_reads="1:100")
    session, transport = answer_first_read(device, reactor)
    reactor.advance(90)
    assert "watchdog_reset" not in names(device) and device.mode == "main"


def test_no_reboot_stays_down_with_nothing_scheduled():
    device, reactor = make_device(ota_listen_at_start=True, no_reboot=True)
    assert run_session(device, reactor) == "ok"
    assert device.mode == "down" and device.events[-2]["to"] == "down"
    assert device.timers.pending == 0


def test_wait_for_event_sees_past_events_new_ones_and_times_out():
    device, reactor = make_device()
    past = device.wait_for_event(lambda e: e["event"] == "mode")
    assert past.result["mode"] == "main"
    new = device.wait_for_event(lambda e: e["event"] == "mode", after=len(device.events))
    assert not new.called
    device.record("mode")
    assert new.result["event"] == "mode"
    never = device.wait_for_event(lambda e: e["event"] == "never", timeout=3)
    reactor.advance(3)
    failures: list = []
    never.addErrback(failures.append)
    assert failures[0].check(defer.TimeoutError)


def test_stop_cancels_every_timer_and_closes_connections():
    device, reactor = make_device(ota_listen_at_start=True)
    session, transport = connect(device, "ota")
    ctp, ctp_transport = connect(device, "ctp")
    d = device.stop()
    assert transport.disconnected and ctp_transport.disconnected and not d.called
    session.connectionLost(Failure(ConnectionDone()))
    assert not d.called  # the CTP connection is not gone yet
    ctp.connectionLost(Failure(ConnectionDone()))
    assert d.called and device.mode == "down"
    assert reactor.getDelayedCalls() == []  # Clock drops a cancelled call from this list
    assert session.wrappedProtocol.result.outcome == "stopped"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mode": "bootloader"}, "mode"),
        ({"mode": "down"}, "mode"),
        ({"mode": "loader", "double_backup": True}, "no update loader"),
        ({"ota_type_in_description": False}, "needs double_backup"),
        ({"pasv_base": 40000}, "pasv_base"),
        ({"corrupt_header_once": 0}, "corrupt_header_once"),
        ({"ftp_stall_after_bytes": "x"}, "--ftp-stall-after-bytes"),
        ({"flash_kbps": 0}, "flash_kbps"),
        ({"time_scale": 0}, "time_scale"),
        ({"fault_phase": 3}, "fault_phase"),
        ({"drop_after_reads": 0}, "drop_after_reads"),
        ({"stall_after_reads": "3"}, "N:SECONDS"),
        ({"ctp_port": 70000}, "ctp_port"),
    ],
)
def test_config_refuses_bad_values(overrides, message):
    with pytest.raises(SimConfigError, match=message):
        SimConfig(**overrides)


@pytest.mark.parametrize("event", ["session_end", "reboot", "all_size_sent", "mode"])
def test_stopping_from_inside_an_event_waiter_leaves_no_timer(event):
    device, reactor = make_device(mode="loader")
    http_get(device)
    stopped: list = []
    waiter = device.wait_for_event(lambda e: e["event"] == event, timeout=10_000, after=len(device.events))
    waiter.addCallback(lambda _: stopped.append(device.stop()))
    session, transport = connect(device, "ota")
    for _ in range(400):
        if stopped:
            break
        reactor.advance(0.05)
        data = transport.value()
        transport.clear()
        for i in range(0, len(data), 20):
            header = OtaHeader.decode(data[i : i + 20])
            if header.status == Status.READ and not transport.disconnecting:
                session.dataReceived(
                    encode_reply(header, IMAGE[header.seek_addr : header.seek_addr + header.read_size])
                )
        if transport.disconnecting and session.wrappedProtocol.result is None:
            session.connectionLost(Failure(ConnectionDone()))
        if not data and not stopped:
            reactor.advance(1)  # through the notice waits and the reboot
    assert stopped
    if session.wrappedProtocol.result is None:
        session.connectionLost(Failure(ConnectionDone()))
    assert [c for c in reactor.getDelayedCalls() if c.active()] == []


def test_modes_are_an_enum_that_reads_as_text():
    device, _ = make_device()
    assert device.mode is DeviceMode.MAIN and device.mode == "main"
    assert device.events[-1]["mode"] == "main" and type(device.events[-1]["mode"]) is str
    assert SimConfig(mode="loader").start_mode is DeviceMode.LOADER


def test_reboot_into_is_the_public_reboot_and_builds_new_servers():
    device, reactor = make_device()
    ctp, transport = connect(device, "ctp")
    ctp.dataReceived(request("APP_ACCESS", "PUT", type="0", ver="1"))
    old_server = device.ctp_server
    assert isinstance(old_server, MainCtpServer) and old_server.holder is ctp.wrappedProtocol
    device.reboot_into("main", 1.0, 0.5, "test: a reboot")
    assert device.mode is DeviceMode.DOWN and device.listening == frozenset() and transport.disconnected
    assert device.ctp_server is None
    assert device.events[-2]["event"] == "reboot" and device.events[-2]["to"] == "main"
    reactor.advance(1.0)
    assert device.events[-1]["event"] == "power_up"
    reactor.advance(0.5)
    assert device.mode is DeviceMode.MAIN and device.listening == {"ctp", "http"}
    assert isinstance(device.ctp_server, MainCtpServer) and device.ctp_server is not old_server
    assert device.ctp_server.holder is None


def test_reboot_into_none_stays_down():
    device, reactor = make_device()
    device.reboot_into(None, 0, 0, "test")
    reactor.advance(100)
    assert device.mode is DeviceMode.DOWN and device.timers.pending == 0
