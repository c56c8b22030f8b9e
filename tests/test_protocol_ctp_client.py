"""The CTP client: request/reply by topic, unsolicited frames, errno errors, keep-alive, timeouts."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from netota_daemon.protocols.ctp_client import (
    CtpAccessRefused,
    CtpClientProtocol,
    CtpConnectionLost,
    CtpErrorReply,
    CtpReplyTimeout,
)
from netota_daemon.wire import ctp
from netota_daemon.wire.ctp import CtpDecoder, CtpProtocolError


@pytest.fixture
def session():
    clock = Clock()
    protocol = CtpClientProtocol(clock)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return clock, protocol, transport


def sent_frames(transport: StringTransport) -> list:
    frames = CtpDecoder().feed(transport.value())
    transport.clear()
    return frames


def settle(d):
    results = []
    d.addBoth(results.append)
    return results


def test_app_access_bytes_and_echo_with_unsolicited_frames_around(session):
    clock, protocol, transport = session
    results = settle(protocol.request("APP_ACCESS", "PUT", 10, type="0", ver="20906"))
    assert transport.value() == ctp.encode_frame("APP_ACCESS", {"op": "PUT", "param": {"type": "0", "ver": "20906"}})
    transport.clear()
    protocol.dataReceived(
        ctp.notify("KEEP_ALIVE_INTERVAL", {"timeout": "60000"})
        + ctp.notify("APP_ACCESS", {"type": "0", "ver": "20906"})
        + ctp.notify("SD_STATUS", {"online": "0"})
    )
    (frame,) = results
    assert frame.topic == "APP_ACCESS" and frame.param == {"type": "0", "ver": "20906"}
    assert set(protocol.unsolicited) == {"KEEP_ALIVE_INTERVAL", "SD_STATUS"}


def test_replies_matched_by_topic_not_order(session):
    clock, protocol, transport = session
    a = settle(protocol.request("NET_OTA_SINGLE", "PUT", 10, status="1"))
    b = settle(protocol.request("UUID", "GET", 10))
    protocol.dataReceived(ctp.notify("UUID", {"uuid": "x"}))
    assert a == [] and b[0].param == {"uuid": "x"}
    # a reply split into single bytes
    for byte in ctp.notify("NET_OTA_SINGLE", {"status": "1"}):
        protocol.dataReceived(bytes([byte]))
    assert a[0].param == {"status": "1"}


def test_errno_reply_is_a_typed_error(session):
    clock, protocol, transport = session
    r = settle(protocol.request("FOO", "GET", 10))
    protocol.dataReceived(ctp.notify("FOO", {"msg": "CTP_NO_TOPIC_MSG"}, errno=6))
    err = r[0].value
    assert isinstance(err, CtpErrorReply) and err.errno == 6 and "CTP_NO_TOPIC_MSG" in str(err)
    r = settle(protocol.request("APP_ACCESS", "PUT", 10, type="0", ver="1"))
    protocol.dataReceived(ctp.notify("APP_ACCESS", {"msg": "CTP_ACCESS_RFU_MSG"}, errno=3))
    assert isinstance(r[0].value, CtpAccessRefused)


def test_reply_timeout_uses_the_clock(session):
    clock, protocol, transport = session
    r = settle(protocol.request("NET_OTA_SINGLE", "PUT", 10, status="1"))
    clock.advance(9.9)
    assert r == []
    clock.advance(0.2)
    assert isinstance(r[0].value, CtpReplyTimeout)
    # a late reply is then just unsolicited
    protocol.dataReceived(ctp.notify("NET_OTA_SINGLE", {"status": "1"}))
    assert "NET_OTA_SINGLE" in protocol.unsolicited


def test_connection_lost_fails_pending_requests(session):
    clock, protocol, transport = session
    r = settle(protocol.request("APP_ACCESS", "PUT", 10, type="0", ver="1"))
    protocol.connectionLost(None)
    assert isinstance(r[0].value, CtpConnectionLost)
    assert protocol.closed.called
    assert clock.getDelayedCalls() == []
    assert isinstance(settle(protocol.request("X", "GET", 1))[0].value, CtpConnectionLost)


def test_garbage_is_a_protocol_error_and_aborts(session):
    clock, protocol, transport = session
    r = settle(protocol.request("APP_ACCESS", "PUT", 10, type="0", ver="1"))
    protocol.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert isinstance(r[0].value, CtpProtocolError)
    assert transport.disconnecting


def test_empty_content_reply_accepted(session):
    clock, protocol, transport = session
    r = settle(protocol.request("CTP_KEEP_ALIVE", "PUT", 10))
    protocol.dataReceived(ctp.encode_frame("CTP_KEEP_ALIVE", None))
    assert r[0].content is None


def test_keepalive_every_interval_until_closed(session):
    clock, protocol, transport = session
    protocol.start_keepalive(10)
    assert transport.value() == b""
    clock.advance(10)
    clock.advance(10)
    frames = sent_frames(transport)
    assert [f.topic for f in frames] == ["CTP_KEEP_ALIVE", "CTP_KEEP_ALIVE"]
    assert frames[0].content == {"op": "PUT", "param": {}}
    # replies to keep-alives (or none, as the loader does) never disturb requests
    protocol.dataReceived(ctp.notify("CTP_KEEP_ALIVE"))
    protocol.close()
    assert transport.disconnecting
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


def keepalive_times(clock, transport, until: float) -> list[float]:
    times = []
    while clock.seconds() < until:
        clock.advance(0.5)
        if any(f.topic == "CTP_KEEP_ALIVE" for f in sent_frames(transport)):
            times.append(clock.seconds())
    return times


@pytest.mark.parametrize(
    ("announced_ms", "expected_interval"),
    [(6000, 2.0), (1500, 1.0), (600000, 10.0)],  # a third of the device's idle timeout, never under 1 s
)
def test_the_keepalive_follows_a_short_idle_timeout_the_device_announces(session, announced_ms, expected_interval):
    clock, protocol, transport = session
    protocol.start_keepalive(10.0)
    protocol.dataReceived(ctp.notify("KEEP_ALIVE_INTERVAL", {"timeout": str(announced_ms)}))
    assert protocol.keepalive_interval == expected_interval
    times = keepalive_times(clock, transport, 20.0)
    assert times[:2] == [expected_interval, 2 * expected_interval]


def test_an_announcement_that_is_not_a_number_changes_nothing(session):
    clock, protocol, transport = session
    protocol.start_keepalive(10.0)
    protocol.dataReceived(ctp.notify("KEEP_ALIVE_INTERVAL", {"timeout": "soon"}))
    assert protocol.keepalive_interval == 10.0


def test_unsolicited_frames_are_counted_not_kept_without_bound_and_logged_at_a_bounded_rate(session):
    from twisted.logger import capturedLogs

    from netota_daemon.protocols.ctp_client import MAX_UNSOLICITED_TOPICS

    clock, protocol, transport = session
    with capturedLogs() as events:
        protocol.dataReceived(b"".join(ctp.notify(f"TOPIC_{i}", {"n": str(i)}) for i in range(5000)))
        protocol.connectionLost(None)
    assert protocol.unsolicited_count == 5000
    assert len(protocol.unsolicited) == MAX_UNSOLICITED_TOPICS
    assert len([e for e in events if e.get("log_format") == "CTP unsolicited {topic}"]) == 3
    (summary,) = [e for e in events if e.get("log_format", "").startswith("skipped {count}")]
    assert summary["count"] == 4997
