"""The double-backup device's FTP server and dual-bank writer, byte for byte, in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError, ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from netota_daemon.sim.config import DeviceMode, SimConfig
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.dual_bank import FLUSH_BYTES, DualBankWriter
from netota_daemon.sim.ftp_server import FtpServer, SegmentProblem, parse_segment
from netota_daemon.sim.host import FaultState
from netota_daemon.sim.image import build_image
from netota_daemon.wire.ctp import CtpDecoder, request
from netota_daemon.wire.description import DESCRIPTION_PATH, parse_description

PORTS = dict(ctp_port=13333, http_port=18080, ftp_port=2121)
IMAGE = build_image("2.0.0", 50_000, "double")
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
LOCAL = IPv4Address("TCP", "127.0.0.1", 2121)


class Rig:
    """One double-backup device on a MemoryReactorClock, and FTP connections to it."""

    def __init__(self, tmp_path: Path, **config: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.state = tmp_path / "state"
        settings: dict[str, Any] = dict(double_backup=True, state_dir=self.state, **PORTS)
        settings.update(config)
        self.device = SimulatedDevice(self.reactor, SimConfig(**settings))
        assert self.device.start().result is self.device

    def control(self) -> tuple[Any, StringTransport]:
        wrapper = self.device.server_factory("ftp").buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER, hostAddress=LOCAL)
        wrapper.makeConnection(transport)
        return wrapper, transport

    def data(self, port: int) -> tuple[Any, StringTransport]:
        """Connect to the PASV listener on ``port``."""
        (factory,) = [f for p, f, _, _ in self.reactor.tcpServers if p == port]
        wrapper = factory.buildProtocol(PEER)
        transport = StringTransport(peerAddress=PEER, hostAddress=IPv4Address("TCP", "127.0.0.1", port))
        wrapper.makeConnection(transport)
        return wrapper, transport

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.device.events if e["event"] == name]


def said(transport: StringTransport) -> list[str]:
    data = transport.value().decode("latin-1")
    transport.clear()
    assert data == "" or data.endswith("\r\n")
    return data.split("\r\n")[:-1]


def command(protocol: Any, transport: StringTransport, line: str) -> list[str]:
    protocol.dataReceived(line.encode() + b"\r\n")
    return said(transport)


def login(protocol: Any, transport: StringTransport) -> None:
    said(transport)
    assert command(protocol, transport, "USER FTPX") == ["331 User name okay, need password."]
    assert command(protocol, transport, "PASS 12345678") == ["230 User logged in, proceed."]


def pasv(protocol: Any, transport: StringTransport) -> int:
    (reply,) = command(protocol, transport, "PASV")
    assert reply.startswith("227 Entering Passive Mode (127,0,0,1,") and reply.endswith(").")
    p1, p2 = reply[len("227 Entering Passive Mode (") : -2].split(",")[4:]
    return int(p1) * 256 + int(p2)


def start_upload(rig: Rig, name: str = "update-ota.ufw") -> tuple[Any, StringTransport, Any, StringTransport]:
    control, transport = rig.control()
    login(control, transport)
    assert command(control, transport, "TYPE I") == ["200 Command okay."]
    port = pasv(control, transport)
    data, data_transport = rig.data(port)
    assert command(control, transport, f"STOR {name}") == [f"150 Opening BINARY mode data connection for {name}."]
    return control, transport, data, data_transport


def send_all(data: Any, image: bytes, chunk: int = 1460) -> None:
    for i in range(0, len(image), chunk):
        data.dataReceived(image[i : i + chunk])


# -- the rules of the lwIP ftpd -------------------------------------------------------------------
def test_greetings_and_the_simple_replies(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    assert said(transport) == ["220 lwIP FTP Server ready."]
    for line, reply in [
        ("SYST", "214 UNIX system type."),
        ("NOOP", "200 Command okay."),
        ("type i", "200 Command okay."),
        ("PWD", '257 "/" is current directory.'),
        ("CWD /anything", "250 Requested file action okay, completed."),
        ("MODE S", "502 Command not implemented."),
        ("EPSV", "502 Command not implemented."),
        ("FEAT", "502 Command not implemented."),
        ("SIZE update-ota.ufw", "502 Command not implemented."),
        ("REST 100", "502 Command not implemented."),
        ("RETR update-ota.ufw", "550 Requested action not taken."),
        ("STOR photo.jpg", "550 Requested action not taken."),  # the SD card: there is none
    ]:
        assert command(control, transport, line) == [reply], line
    assert command(control, transport, "QUIT") == ["221 Goodbye."] and transport.disconnecting
    stupid = Rig(tmp_path / "b", stupid_ftpd=True)
    control, transport = stupid.control()
    assert said(transport) == ["220 Welcome to Stupid-FTPd server."]
    assert command(control, transport, "REST 100") == ["350 Restarting at 100."]
    assert command(control, transport, "SIZE update-ota.ufw") == ["550 Could not get file size."]


def test_a_wrong_login_is_503_and_the_close_and_login_is_not_enforced(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    said(transport)
    command(control, transport, "USER ftpx")  # case-sensitive
    assert command(control, transport, "PASS 12345678") == ["503 Login incorrect. Login failed."]
    assert transport.disconnecting
    assert [(e["user"], e["ok"]) for e in rig.events("ftp_login")] == [("ftpx", False)]
    assert rig.events("ftp_command")[-1]["arg"] == "********"  # the password is not logged
    control, transport = rig.control()
    said(transport)
    port = pasv(control, transport)  # no USER/PASS at all
    rig.data(port)
    assert command(control, transport, "STOR update-ota.ufw")[0].startswith("150 ")


def test_each_segment_is_exactly_one_command_coalesced_and_split_are_protocol_errors(tmp_path):
    assert parse_segment(b"USER FTPX\r\n") == parse_segment(b"USER FTPX\n")
    assert parse_segment(b"USER FTPX\r\n").verb == "USER"
    rig = Rig(tmp_path)
    control, transport = rig.control()
    said(transport)
    control.dataReceived(b"USER FTPX\r\nPASS 12345678\r\n")  # two commands in one segment
    assert said(transport) == ["331 User name okay, need password."]  # the PASS is lost
    assert rig.events("ftp_command")[-1]["arg"] == "FTPX\r\nPASS 12345678"
    control.dataReceived(b"PA")  # one command in two segments
    control.dataReceived(b"SS 12345678\r\n")
    assert said(transport) == ["502 Command not implemented.", "502 Command not implemented."]
    kinds = [e["kind"] for e in rig.events("ftp_protocol_error")]
    assert kinds == [SegmentProblem.COALESCED.value, SegmentProblem.SPLIT.value]
    assert not rig.events("ftp_login")


def test_pasv_ports_come_from_a_counter_and_listen_on_the_control_address(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    login(control, transport)
    control.dataReceived(b"PASV\r\n")
    assert transport.value() == b"227 Entering Passive Mode (127,0,0,1,16,1).\r\n"  # 16 * 256 + 1 = 4097
    transport.clear()
    port, _, _, interface = rig.reactor.tcpServers[-1]
    assert (port, interface) == (4097, "127.0.0.1")
    other, other_transport = rig.control()  # the counter is global
    said(other_transport)
    assert pasv(other, other_transport) == 4098
    moved = Rig(tmp_path / "b", pasv_base=30000)
    control, transport = moved.control()
    said(transport)
    assert pasv(control, transport) == 30001


class FakeFtpHost:
    """A device, as far as the FTP server sees one; ports in ``busy`` can't be bound."""

    def __init__(self, busy: set[int], **config: Any) -> None:
        self.config = SimConfig(double_backup=True, **config)
        self.reactor = Clock()
        self.faults = FaultState()
        self.busy = busy
        self.events: list[dict[str, Any]] = []
        self.listening: list[int] = []

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        self.events.append({"event": event, **fields})
        return self.events[-1]

    def listen_data(self, port: int, factory: Any, interface: str) -> Any:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError("in use"))
        self.listening.append(port)
        return object()

    def stop_data_listener(self, listener: Any) -> None:
        pass

    def ftp_crashed(self, cause: Any, verb: str) -> None:
        self.record("crash", cause=cause.value)

    def upgrade_burned(self, version: str | None) -> None:
        self.record("burned", version=version)

    def write_upload(self, data: bytes) -> None:
        pass


def test_a_busy_pasv_port_is_skipped_and_the_counter_wraps_after_32767():
    host = FakeFtpHost(busy={32767}, pasv_base=32764)
    control = FtpServer(host).buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER, hostAddress=LOCAL)
    control.makeConnection(transport)
    for _ in range(4):
        control.dataReceived(b"PASV\r\n")
    assert host.listening == [32765, 32766, 32764, 32765]  # 32767 in use: skipped; then the wrap


def test_a_second_pasv_leaks_the_first_listener(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    login(control, transport)
    first = pasv(control, transport)
    second = pasv(control, transport)
    assert second == first + 1
    assert [e["kind"] for e in rig.events("ftp_protocol_error")] == ["second_pasv"]
    _, leaked_transport = rig.data(first)  # still listening (leaked), but it serves nothing
    assert leaked_transport.disconnected and rig.events("ftp_data_refused")[-1]["port"] == first
    rig.data(second)
    assert command(control, transport, "STOR update-ota.ufw")[0].startswith("150 ")


# -- crashes ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, cause",
    [
        (["ABOR"], "abor"),
        (["STOR update-ota.ufw"], "no_fresh_pasv"),
        (["LIST"], "no_fresh_pasv"),
        (["PASV", "PORT 127,0,0,1,200,10"], "port_after_pasv"),
    ],
)
def test_crashes_reset_the_device_and_answer_nothing(tmp_path, script, cause):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    login(control, transport)
    for line in script[:-1]:
        command(control, transport, line)
    assert command(control, transport, script[-1]) == []  # no reply
    assert [(e["cause"], e["verb"]) for e in rig.events("ftp_crash")] == [(cause, script[-1][:4])]
    assert transport.disconnected and rig.device.mode is DeviceMode.DOWN
    assert rig.events("reboot")[-1]["to"] == "main"
    rig.reactor.advance(2.0)
    assert rig.device.mode is DeviceMode.MAIN and rig.device.firmware_version == "1.0.0"


def test_a_second_transfer_without_a_fresh_pasv_crashes(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    login(control, transport)
    port = pasv(control, transport)
    data, data_transport = rig.data(port)
    assert command(control, transport, "LIST") == [
        "150 File status okay; about to open data connection.",
        "226 Closing data connection.",
    ]
    assert data_transport.disconnecting and data_transport.value() == b""  # the empty listing (no SD card)
    data.connectionLost(Failure(ConnectionDone()))
    assert command(control, transport, "STOR update-ota.ufw") == []
    assert rig.events("ftp_crash")[-1]["cause"] == "no_fresh_pasv"


# -- uploads ----------------------------------------------------------------------------------------
def test_a_good_upload_burns_sends_226_and_reboots_2_s_later_into_the_new_version(tmp_path):
    rig = Rig(tmp_path, burn_seconds=1.0)
    control, transport, data, data_transport = start_upload(rig)
    send_all(data, IMAGE)
    data.connectionLost(Failure(ConnectionDone()))  # a clean close (FIN)
    assert said(transport) == []  # the burn takes its time first
    control.dataReceived(b"QUIT\r\n")  # waits: the ftpd is blocked in net_fclose
    assert said(transport) == []
    rig.reactor.advance(1.0)
    assert said(transport) == ["226 Closing data connection.", "221 Goodbye."]
    (burn,) = rig.events("db_burn")
    assert (burn["burned"], burn["bytes"], burn["image_length"], burn["version"]) == (True, 50_000, 50_000, "2.0.0")
    assert (rig.state / "db-received.bin").read_bytes() == IMAGE
    assert rig.events("ftp_upload_end")[-1]["outcome"] == "closed"
    rig.reactor.advance(1.99)
    assert rig.device.mode is DeviceMode.MAIN and not rig.events("reboot")
    rig.reactor.advance(0.01)
    assert rig.device.mode is DeviceMode.DOWN
    rig.reactor.advance(2.0)  # reboot_seconds
    assert rig.device.mode is DeviceMode.MAIN and rig.device.firmware_version == "2.0.0"


def test_fixed_version_keeps_the_reported_version(tmp_path):
    rig = Rig(tmp_path, fixed_version=True)
    control, transport, data, _ = start_upload(rig)
    send_all(data, IMAGE)
    data.connectionLost(Failure(ConnectionDone()))
    rig.reactor.pump([0.5] * 10)  # the burn, the reset 2 s later, the reboot
    assert rig.events("db_burn")[-1]["burned"] and rig.events("reboot")
    assert rig.device.mode is DeviceMode.MAIN and rig.device.firmware_version == "1.0.0"


@pytest.mark.parametrize(
    "image, reason",
    [
        (IMAGE[:30_000], "Upgrade file size not match"),
        (build_image("2.0.0", 50_000), "JL file head check failed"),  # a single-backup image
        (IMAGE[:25_000] + bytes([IMAGE[25_000] ^ 1]) + IMAGE[25_001:], "does not verify"),
    ],
)
def test_a_bad_upload_gets_the_same_226_and_no_reboot(tmp_path, image, reason):
    rig = Rig(tmp_path)
    control, transport, data, _ = start_upload(rig)
    send_all(data, image)
    data.connectionLost(Failure(ConnectionDone()))
    rig.reactor.advance(1.0)
    assert said(transport) == ["226 Closing data connection."]
    (burn,) = rig.events("db_burn")
    assert not burn["burned"] and reason in burn["reason"]
    rig.reactor.advance(30)
    assert not rig.events("reboot") and rig.device.firmware_version == "1.0.0"
    assert (rig.state / "db-received.bin").read_bytes() == image


def test_a_reset_data_connection_burns_nothing_sends_no_226_and_the_next_stor_cancels_the_file(tmp_path):
    rig = Rig(tmp_path)
    control, transport, data, _ = start_upload(rig)
    send_all(data, IMAGE[:20_000])
    data.connectionLost(Failure(ConnectionLost()))  # RST
    rig.reactor.advance(30)
    assert said(transport) == [] and not rig.events("db_burn") and not rig.events("reboot")
    assert rig.events("ftp_upload_end")[-1]["outcome"] == "reset"
    port = pasv(control, transport)
    data, _ = rig.data(port)
    assert command(control, transport, "STOR update-ota.ufw")[0].startswith("150 ")
    assert rig.events("db_cancelled")[-1]["bytes"] == 20_000
    send_all(data, IMAGE)
    data.connectionLost(Failure(ConnectionDone()))
    rig.reactor.advance(1.0)
    assert said(transport) == ["226 Closing data connection."] and rig.events("db_burn")[-1]["burned"]


def test_the_control_connection_lost_mid_upload_still_tries_the_burn(tmp_path):
    rig = Rig(tmp_path)
    control, transport, data, data_transport = start_upload(rig)
    send_all(data, IMAGE)
    control.connectionLost(Failure(ConnectionLost()))
    assert data_transport.disconnected
    rig.reactor.advance(1.0)
    assert rig.events("ftp_upload_end")[-1]["outcome"] == "control_lost"
    assert rig.events("db_burn")[-1]["burned"] is True
    rig.reactor.pump([0.5] * 10)
    assert rig.device.firmware_version == "2.0.0"


def test_data_before_stor_is_dropped_and_recorded(tmp_path):
    rig = Rig(tmp_path)
    control, transport = rig.control()
    login(control, transport)
    data, _ = rig.data(pasv(control, transport))
    data.dataReceived(b"early")
    assert rig.events("ftp_protocol_error")[-1]["kind"] == "data_before_stor"


# -- faults -----------------------------------------------------------------------------------------
def test_busy_once_is_550_then_the_next_stor_works(tmp_path):
    rig = Rig(tmp_path, ftp_busy_once=True)
    control, transport = rig.control()
    login(control, transport)
    rig.data(pasv(control, transport))
    assert command(control, transport, "STOR update-ota.ufw") == ["550 Requested action not taken."]
    assert command(control, transport, "STOR update-ota.ufw")[0].startswith("150 ")
    assert len(rig.events("ftp_fault_busy")) == 1


def test_reject_login_once(tmp_path):
    rig = Rig(tmp_path, ftp_reject_login_once=True)
    control, transport = rig.control()
    said(transport)
    command(control, transport, "USER FTPX")
    assert command(control, transport, "PASS 12345678") == ["503 Login incorrect. Login failed."]
    assert transport.disconnecting
    control, transport = rig.control()
    login(control, transport)
    assert [e["ok"] for e in rig.events("ftp_login")] == [False, True]


def test_drop_after_bytes_resets_the_data_connection_once(tmp_path):
    rig = Rig(tmp_path, ftp_drop_after_bytes=10_000)
    control, transport, data, data_transport = start_upload(rig)
    send_all(data, IMAGE[:12_000], chunk=3000)
    assert data_transport.disconnected  # abortConnection: an RST
    data.connectionLost(Failure(ConnectionLost()))
    assert rig.events("ftp_fault_drop") == [{**rig.events("ftp_fault_drop")[0], "bytes": 10_000}]
    assert (rig.state / "db-received.bin").read_bytes() == IMAGE[:10_000]
    rig.reactor.advance(30)
    assert said(transport) == [] and not rig.events("db_burn")
    data, _ = rig.data(pasv(control, transport))  # the retry
    assert command(control, transport, "STOR update-ota.ufw")[0].startswith("150 ")
    send_all(data, IMAGE)
    data.connectionLost(Failure(ConnectionDone()))
    rig.reactor.advance(1.0)
    assert rig.events("db_burn")[-1]["burned"]


def test_stall_after_bytes_stops_reading_then_goes_on(tmp_path):
    rig = Rig(tmp_path, ftp_stall_after_bytes="8000:30")
    control, transport, data, data_transport = start_upload(rig)
    send_all(data, IMAGE[:9000], chunk=3000)
    assert data_transport.producerState == "paused"
    assert rig.events("ftp_fault_stall")[-1]["seconds"] == 30
    rig.reactor.advance(29.9)
    assert data_transport.producerState == "paused"
    rig.reactor.advance(0.1)
    assert data_transport.producerState == "producing"


def test_flash_writes_throttle_the_data_connection(tmp_path):
    rig = Rig(tmp_path, flash_kbps=4.0)  # one 4 KiB write a second
    control, transport, data, data_transport = start_upload(rig)
    data.dataReceived(IMAGE[:4000])
    assert data_transport.producerState == "producing"  # nothing flushed yet
    data.dataReceived(IMAGE[4000:8200])  # two 4 KiB writes complete
    assert data_transport.producerState == "paused"
    rig.reactor.advance(1.99)
    assert data_transport.producerState == "paused"
    rig.reactor.advance(0.01)
    assert data_transport.producerState == "producing"


def test_dual_bank_writer_costs_and_checks():
    writer = DualBankWriter(flash_kbps=8.0)
    assert writer.write(IMAGE[:100]) == 0.0
    assert writer.write(IMAGE[100 : FLUSH_BYTES * 3]) == pytest.approx(3 * FLUSH_BYTES / 8192)
    assert writer.error is None and writer.image_length == 50_000
    wrong = DualBankWriter(flash_kbps=8.0)
    assert wrong.write(bytes(FLUSH_BYTES)) == 0.0 and wrong.head_error  # a failed writer writes nothing
    too_long = DualBankWriter()
    too_long.write(IMAGE + b"x")
    assert not too_long.close().burned


# -- the rest of a double-backup device -------------------------------------------------------------
def http_document(rig: Rig) -> bytes:
    wrapper = rig.device.server_factory("http").buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(f"GET {DESCRIPTION_PATH} HTTP/1.1\r\n\r\n".encode())
    return transport.value().split(b"\r\n\r\n", 1)[1]


def test_double_backup_document_ctp_and_ports(tmp_path):
    rig = Rig(tmp_path)
    assert rig.device.listening == {"ctp", "http", "ftp"} and set(rig.device.ports) == {"ctp", "http", "ota", "ftp"}
    assert rig.device.port_names == ("ctp", "http", "ftp")
    doc = parse_description(http_document(rig))
    assert (doc.ota_type, doc.ota_step, doc.single_backup) == ("0", "0", False)
    wrapper = rig.device.server_factory("ctp").buildProtocol(PEER)
    transport = StringTransport(peerAddress=PEER)
    wrapper.makeConnection(transport)
    wrapper.dataReceived(request("APP_ACCESS", "PUT", type="0", ver="1") + request("NET_OTA_SINGLE", "PUT", status="1"))
    assert CtpDecoder().feed(transport.value())[-1].param == {"status": "0"}
    assert "ota" not in rig.device.listening
    bare = Rig(tmp_path / "b", ota_type_in_description=False)
    body = http_document(bare)
    assert b"ota_type" not in body and b"ota_step" not in body
    doc = parse_description(body)
    assert doc.ota_type is None and not doc.single_backup and doc.firmware_version == "1.0.0"
