"""The simulator's CTP (3333) and HTTP (8080) servers, byte for byte, in memory."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.ctp_server import LoaderCtpServer, MainCtpServer, loader_access_reply
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.http_server import LOADER_RESPONSE, NOT_FOUND_BODY, LoaderHttpServer
from netota_daemon.wire.ctp import CtpDecoder, encode_frame, request
from netota_daemon.wire.description import DESCRIPTION_PATH, LOADER_DOCUMENT, parse_description

# Fake ports: a MemoryReactor binds nothing.
PORTS = dict(ctp_port=13333, http_port=18080, ota_port=13335)


def make_device(**config: Any) -> tuple[SimulatedDevice, MemoryReactorClock]:
    reactor = MemoryReactorClock()
    device = SimulatedDevice(reactor, SimConfig(**{**PORTS, **config}))
    device.start()
    return device, reactor


def connect(device: SimulatedDevice, port: str, host: str = "127.0.0.1") -> tuple[Any, StringTransport]:
    """A connection to ``port`` ("ctp", "http") as the device's listener builds it; returns the
    server's protocol (inside the device's tracking wrapper) and the transport."""
    address = IPv4Address("TCP", host, 40000)
    wrapper = device.server_factory(port).buildProtocol(address)
    transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 13333))
    wrapper.makeConnection(transport)
    return wrapper.wrappedProtocol, transport


def frames(transport: StringTransport) -> list:
    data = transport.value()
    transport.clear()
    return CtpDecoder().feed(data)


APP_ACCESS = request("APP_ACCESS", "PUT", type="0", ver="20906")


# -- CTP, main firmware ---------------------------------------------------------------------------
def test_app_access_is_echoed_then_the_notify_burst():
    device, _ = make_device(time_scale=0.5)
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(APP_ACCESS)
    data = transport.value()
    echo = b'CTP:\n\x00APP_ACCESS2\x00\x00\x00{"op":"NOTIFY","param":{"type":"0","ver":"20906"}}'
    assert data.startswith(echo)
    burst = CtpDecoder().feed(data[len(echo) :])
    assert [(f.topic, f.param) for f in burst] == [
        ("KEEP_ALIVE_INTERVAL", {"timeout": "30000"}),  # 60 s scaled by 0.5
        ("SD_STATUS", {"online": "0"}),
        ("BAT_STATUS", {"level": "4"}),
        ("UUID", {"uuid": "xxxxxx"}),
    ]
    assert all(f.errno is None for f in burst)


def test_app_access_must_come_first():
    device, _ = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(request("NET_OTA_SINGLE", "PUT", status="1"))
    (reply,) = frames(transport)
    assert (reply.topic, reply.errno, reply.param) == ("NET_OTA_SINGLE", 4, {"msg": "CTP_REQUEST_MSG"})
    assert "ota" not in device.listening and not transport.disconnecting


@pytest.mark.parametrize("content", [None, {"op": "PUT", "param": {}}])
def test_keep_alive_is_answered_with_an_empty_notify(content):
    device, _ = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(encode_frame("CTP_KEEP_ALIVE", content))
    assert transport.value() == b'CTP:\x0e\x00CTP_KEEP_ALIVE\x1a\x00\x00\x00{"op":"NOTIFY","param":{}}'


def test_net_ota_single_opens_3335_and_answers_status_1():
    device, reactor = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(APP_ACCESS)
    transport.clear()
    assert [p[0] for p in reactor.tcpServers] == [13333, 18080]
    protocol.dataReceived(request("NET_OTA_SINGLE", "PUT", status="1"))
    # the research's 62-byte example
    assert transport.value() == (b'CTP:\x0e\x00NET_OTA_SINGLE&\x00\x00\x00{"op":"NOTIFY","param":{"status":"1"}}')
    assert [p[0] for p in reactor.tcpServers] == [13333, 18080, 13335]


def test_net_ota_single_status_0_and_double_backup_answer_0():
    device, reactor = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(APP_ACCESS + request("NET_OTA_SINGLE", "PUT", status="0"))
    assert frames(transport)[-1].param == {"status": "0"}
    double, reactor2 = make_device(double_backup=True)
    protocol, transport = connect(double, "ctp")
    protocol.dataReceived(APP_ACCESS + request("NET_OTA_SINGLE", "PUT", status="1"))
    assert frames(transport)[-1].param == {"status": "0"}
    assert [p[0] for p in reactor.tcpServers] == [13333, 18080]
    assert [p[0] for p in reactor2.tcpServers] == [13333, 18080, 21]  # FTP, never 3335


@pytest.mark.parametrize("frame", [request("NET_OTA_SINGLE", "GET"), request("NO_SUCH_TOPIC", "PUT", a="1")])
def test_unknown_topic_or_op_is_errno_6(frame):
    device, _ = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(APP_ACCESS)
    transport.clear()
    protocol.dataReceived(frame)
    topic = frame[6 : 6 + frame[4]].decode()
    assert transport.value() == encode_frame(topic, b'{"op":"NOTIFY","errno":6,"param":{"msg":"CTP_NO_TOPIC_MSG"}}')


def test_get_of_an_info_topic_is_answered():
    device, _ = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(APP_ACCESS)
    transport.clear()
    protocol.dataReceived(request("BAT_STATUS", "GET"))
    assert [(f.topic, f.param) for f in frames(transport)] == [("BAT_STATUS", {"level": "4"})]


def test_another_ip_gets_errno_3_and_is_disconnected_same_ip_replaces():
    device, _ = make_device()
    first, first_transport = connect(device, "ctp")
    first.dataReceived(APP_ACCESS)
    other, other_transport = connect(device, "ctp", host="127.0.0.2")
    other.dataReceived(APP_ACCESS)
    (refusal,) = frames(other_transport)
    assert (refusal.errno, refusal.param) == (3, {"msg": "CTP_ACCESS_RFU_MSG"})
    assert other_transport.disconnecting and not first_transport.disconnecting
    server = device.ctp_server
    assert isinstance(server, MainCtpServer) and server.holder is first
    replacement, _ = connect(device, "ctp")
    assert first_transport.disconnected  # aborted
    assert server.holder is None
    replacement.dataReceived(APP_ACCESS)
    assert server.holder is replacement


def test_idle_drop_after_60_s_without_a_frame_any_frame_resets_it():
    device, reactor = make_device()
    protocol, transport = connect(device, "ctp")
    reactor.advance(59)
    protocol.dataReceived(encode_frame("CTP_KEEP_ALIVE"))
    reactor.advance(59)
    assert not transport.disconnecting
    reactor.advance(1)
    assert transport.disconnected
    assert device.events[-1]["event"] == "ctp_idle_drop"


def test_bad_magic_drops_the_connection():
    device, _ = make_device()
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert transport.disconnected and transport.value() == b""
    assert device.events[-1]["event"] == "ctp_bad_frame"


# -- CTP, loader stub -------------------------------------------------------------------------------
def test_loader_answers_the_first_chunk_only_with_ver_20906_for_framed_requests():
    device, _ = make_device(mode="loader")
    protocol, transport = connect(device, "ctp")
    protocol.dataReceived(request("APP_ACCESS", "PUT", type="1", ver="31234"))
    assert transport.value() == b'CTP:\n\x00APP_ACCESS2\x00\x00\x00{"op":"NOTIFY","param":{"type":"0","ver":"20906"}}'
    transport.clear()
    protocol.dataReceived(encode_frame("CTP_KEEP_ALIVE") + APP_ACCESS)
    assert transport.value() == b""


@pytest.mark.parametrize(
    "chunk, ver",
    [(b'{"ver":"1.0"}', b"1"), (b'xx ver":"31234"', b"31234"), (b"hello", b"20906"), (b'ver":"', b"20906")],
)
def test_loader_echoes_digits_of_unframed_text(chunk, ver):
    assert loader_access_reply(chunk).endswith(b'"ver":"' + ver + b'"}}')


def test_loader_second_concurrent_connection_gets_nothing():
    device, _ = make_device(mode="loader")
    first, first_transport = connect(device, "ctp")
    first.dataReceived(APP_ACCESS)
    second, second_transport = connect(device, "ctp")
    second.dataReceived(APP_ACCESS)
    assert second_transport.value() == b""
    assert isinstance(device.ctp_server, LoaderCtpServer) and device.ctp_server.answered == 1
    first.connectionLost(None)
    assert device.ctp_server.answered == 0
    third, third_transport = connect(device, "ctp")
    third.dataReceived(APP_ACCESS)
    assert third_transport.value().startswith(b"CTP:")


# -- HTTP ----------------------------------------------------------------------------------------------
def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n".encode()


def test_main_document_with_spaced_headers_then_close():
    device, _ = make_device(firmware_version="1.2.3")
    protocol, transport = connect(device, "http")
    request_bytes = get(DESCRIPTION_PATH)
    protocol.dataReceived(request_bytes[:10])
    assert transport.value() == b""
    protocol.dataReceived(request_bytes[10:])
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head == (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=UTF-8\r\n"
        b"Content-Length: %d\r\nAccept-Ranges: bytes\r\nConnection: close" % len(body)
    )
    doc = parse_description(body)
    assert (doc.ota_type, doc.ota_step, doc.firmware_version) == ("1", "0", "1.2.3")
    assert b'"DVRunning 2"' in body and transport.disconnecting


@pytest.mark.parametrize(
    "method, path, answer",
    [
        ("GET", "/other.txt", NOT_FOUND_BODY),
        ("GET", DESCRIPTION_PATH[1:], NOT_FOUND_BODY),
        ("POST", DESCRIPTION_PATH, b"HTTP/1.1 501 Not Implemented\r\nConnection: close\r\n\r\n"),
        ("PUT", DESCRIPTION_PATH, b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n"),
    ],
)
def test_main_other_requests(method, path, answer):
    device, _ = make_device()
    protocol, transport = connect(device, "http")
    protocol.dataReceived(get(path, method))
    assert transport.value() == answer and transport.disconnecting


def test_loader_answers_every_chunk_and_counts_requests():
    device, _ = make_device(mode="loader", firmware_version="7.7.7")
    protocol, transport = connect(device, "http")
    server = device.http_server
    assert isinstance(server, LoaderHttpServer) and server.requests == 0
    protocol.dataReceived(b"x")
    protocol.dataReceived(get("/whatever"))
    assert transport.value() == LOADER_RESPONSE * 2
    assert LOADER_RESPONSE.endswith(LOADER_DOCUMENT) and len(LOADER_DOCUMENT) == 454
    assert b"Content-Type:text\r\nContent-Length:454\r\n" in LOADER_RESPONSE
    assert server.requests == 2 and not transport.disconnecting
