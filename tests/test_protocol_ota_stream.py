"""The app side of the OTA stream, byte for byte, on a StringTransport with a Clock."""

from __future__ import annotations

import os

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from netota_daemon.firmware import FirmwareImage
from netota_daemon.protocols.ota_stream import DeviceActivity, OtaStreamProtocol, StreamEnd, StreamSettings
from netota_daemon.wire.ota import (
    HEADER_SIZE,
    MAX_READ_SIZE,
    STOP_BYTES,
    OtaHeader,
    Status,
    encode_device_header,
    verify_reply,
)

IMAGE_SIZE = 100_000


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "fw.ufw"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return FirmwareImage(path)


class Session:
    """A stream protocol on a StringTransport, plus helpers to play the device."""

    def __init__(self, image: FirmwareImage, **settings) -> None:
        self.clock = Clock()
        self.progress = []
        self.all_sizes = []
        self.protocol = OtaStreamProtocol(
            image,
            self.clock,
            StreamSettings(**{"first_header_timeout": 30.0, **settings}),
            on_progress=self.progress.append,
            on_all_size=self.all_sizes.append,
        )
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.results = []
        self.protocol.done.addBoth(self.results.append)

    def send(self, status, seek=0, size=0, all_size=0, percent=1) -> None:
        self.protocol.dataReceived(encode_device_header(status, seek, size, all_size, percent))

    def take(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    def close_from_app_side(self) -> None:
        """What the reactor does after loseConnection: the connection ends."""
        if self.transport.disconnecting or self.transport.disconnected:
            self.protocol.connectionLost(None)


def test_read_is_answered_with_echoed_header_and_bytes_in_one_write(image):
    s = Session(image)
    s.send(Status.READ, seek=4096, size=20436, percent=7)
    writes = s.transport.io.getvalue()
    reply = OtaHeader.decode(writes[:HEADER_SIZE])
    payload = writes[HEADER_SIZE:]
    expected = image.read(4096, 20436).tobytes()
    assert payload == expected
    assert (reply.seek_addr, reply.read_size, reply.all_size, reply.status, reply.percent) == (4096, 20436, 0, 4, 7)
    assert verify_reply(reply, payload)
    assert s.protocol.bytes_served == 20436
    assert s.progress[-1].bytes_served == 20436


def test_one_transport_write_per_reply(image):
    s = Session(image)
    writes = []
    s.transport.write = writes.append  # type: ignore[method-assign]
    s.send(Status.READ, seek=0, size=1000)
    s.send(Status.READ, seek=1000, size=1000)
    assert [len(w) for w in writes] == [HEADER_SIZE + 1000, HEADER_SIZE + 1000]


def test_read_past_the_end_is_clamped(image):
    s = Session(image)
    s.send(Status.READ, seek=IMAGE_SIZE - 100, size=40916)
    data = s.take()
    reply = OtaHeader.decode(data[:HEADER_SIZE])
    assert reply.read_size == 100
    assert data[HEADER_SIZE:] == image.read(IMAGE_SIZE - 100, 100).tobytes()
    assert verify_reply(reply, data[HEADER_SIZE:])


def test_bad_checksum_header_is_skipped(image):
    s = Session(image)
    bad = bytearray(encode_device_header(Status.READ, 0, 512, 0, 1))
    bad[0] ^= 0x55
    s.protocol.dataReceived(bytes(bad))
    assert s.take() == b""
    assert s.protocol.bad_headers == 1
    s.send(Status.READ, seek=0, size=512)
    assert s.take()[HEADER_SIZE:] == image.read(0, 512).tobytes()


def test_headers_split_across_chunks(image):
    s = Session(image)
    raw = encode_device_header(Status.READ, 10, 30, 0, 1) + encode_device_header(Status.READ, 40, 5, 0, 1)
    for i in range(0, len(raw), 7):
        s.protocol.dataReceived(raw[i : i + 7])
    data = s.take()
    assert data[HEADER_SIZE : HEADER_SIZE + 30] == image.read(10, 30).tobytes()
    assert data[2 * HEADER_SIZE + 30 :] == image.read(40, 5).tobytes()


@pytest.mark.parametrize(
    "seek,size,words",
    [
        (0, 0, "0 bytes"),
        (0, MAX_READ_SIZE + 1, "limit"),
        (IMAGE_SIZE, 10, "past the end"),
        (IMAGE_SIZE + 5000, 10, "past the end"),
    ],
)
def test_unservable_read_sends_stop_then_closes(image, seek, size, words):
    s = Session(image)
    s.send(Status.READ, seek=seek, size=size)
    assert s.take() == STOP_BYTES
    assert s.transport.disconnecting
    s.close_from_app_side()
    (result,) = s.results
    assert result.end is StreamEnd.PROTOCOL_ERROR
    assert words in result.message
    assert result.stop_sent


def test_max_read_size_is_served(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=MAX_READ_SIZE)
    assert len(s.take()) == HEADER_SIZE + MAX_READ_SIZE


def test_all_size_notice_is_recorded_and_never_answered(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=100)
    s.take()
    s.send(Status.DOING, seek=0, all_size=IMAGE_SIZE, percent=1)
    assert s.take() == b""
    assert s.all_sizes == [IMAGE_SIZE]
    assert s.protocol.all_size == IMAGE_SIZE
    assert s.progress[-1].activity is DeviceActivity.PREPARING  # the device waits, then erases
    # the bytes asked for are counted from the notice on
    s.send(Status.READ, seek=IMAGE_SIZE - 40916, size=40916, percent=1)
    last = s.progress[-1]
    assert (last.all_size, last.requested_since_all_size, last.bytes_served) == (IMAGE_SIZE, 40916, 100 + 40916)
    assert last.furthest == IMAGE_SIZE and last.activity is None


@pytest.mark.parametrize("echo", [False, True])
def test_final_notice_echo_is_optional(image, echo):
    s = Session(image, echo_final_notice=echo)
    s.send(Status.DOING, seek=5, percent=100)
    data = s.take()
    if echo:
        h = OtaHeader.decode(data)
        assert (h.status, h.percent, h.read_size, h.all_size, h.seek_addr) == (0, 100, 0, 0, 5)
        assert h.is_valid()
    else:
        assert data == b""


@pytest.mark.parametrize(
    "status,end", [(Status.OK, StreamEnd.OK), (Status.ERR, StreamEnd.ERR), (Status.SAME, StreamEnd.SAME)]
)
def test_device_result_ends_the_session_without_stop(image, status, end):
    s = Session(image)
    s.send(Status.READ, seek=0, size=10)
    s.take()
    s.send(status, percent=100)
    assert s.take() == b""  # no STOP: the device ended it
    assert s.transport.disconnecting
    assert s.results == []  # done fires once the connection is closed
    s.close_from_app_side()
    (result,) = s.results
    assert result.end is end
    assert result.bytes_served == 10
    assert not result.stop_sent
    assert s.clock.getDelayedCalls() == []


def test_drop_before_result(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=10)
    s.protocol.connectionLost(None)
    (result,) = s.results
    assert result.end is StreamEnd.DROPPED
    assert s.clock.getDelayedCalls() == []


def test_receive_timeouts_are_per_gap_and_counted(image):
    s = Session(image, receive_timeout=5.0, max_receive_timeouts=10)
    s.send(Status.READ, seek=0, size=10)
    s.take()
    # 10 timeouts in a row are tolerated; a header resets the count
    s.clock.pump([5.0] * 10)
    assert s.take() == b""
    s.send(Status.READ, seek=10, size=10)
    s.take()
    s.clock.pump([5.0] * 10)
    assert s.results == [] and s.take() == b""
    # the 11th in a row ends it with STOP
    s.clock.advance(5.0)
    assert s.take() == STOP_BYTES
    s.close_from_app_side()
    (result,) = s.results
    assert result.end is StreamEnd.TIMEOUT
    assert "11 receive timeouts" in result.message


def test_silence_after_connecting_times_out(image):
    s = Session(image, first_header_timeout=30.0)
    s.clock.advance(30)
    assert s.take() == STOP_BYTES
    s.close_from_app_side()
    assert s.results[0].end is StreamEnd.TIMEOUT


def test_cancel_sends_stop_and_closes(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=10)
    s.take()
    s.protocol.done.cancel()
    assert s.take() == STOP_BYTES
    assert s.transport.disconnecting
    assert isinstance(s.results[0].value, defer.CancelledError)
    s.close_from_app_side()
    assert s.protocol.closed.called
    assert s.clock.getDelayedCalls() == []


def test_close_is_forced_when_the_peer_stops_reading(image):
    s = Session(image)
    aborts = []
    s.transport.abortConnection = lambda: aborts.append(True)  # type: ignore[method-assign]
    s.protocol.abort()
    assert s.take() == STOP_BYTES
    assert s.transport.disconnecting and aborts == []  # a polite close first, STOP still queued
    # the reactor never reports the close (the peer doesn't read): after the grace, abort
    s.clock.advance(5)
    assert aborts == [True]
    s.protocol.connectionLost(None)
    assert s.results[0].end is StreamEnd.ABORTED


def test_unknown_status_is_ignored(image):
    s = Session(image)
    s.send(0x40, seek=0)
    assert s.take() == b""
    assert s.results == []


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_PROPERTY_IMAGE = bytes((i * 7 + 3) & 0xFF for i in range(50_000))


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(
        st.tuples(st.integers(0, len(_PROPERTY_IMAGE) - 1), st.integers(1, MAX_READ_SIZE), st.integers(0, 99)),
        min_size=1,
        max_size=6,
    ),
    cuts=st.lists(st.integers(1, 200), max_size=10),
)
def test_replies_do_not_depend_on_how_headers_are_split(tmp_path_factory, requests, cuts):
    path = tmp_path_factory.mktemp("img") / "fw.bin"
    path.write_bytes(_PROPERTY_IMAGE)
    image = FirmwareImage(path)
    stream = b"".join(encode_device_header(Status.READ, seek, size, 0, pct) for seek, size, pct in requests)
    s = Session(image)
    position = 0
    for cut in cuts:
        s.protocol.dataReceived(stream[position : position + cut])
        position += cut
    s.protocol.dataReceived(stream[position:])
    data = s.take()
    for seek, size, pct in requests:
        sent = min(size, len(_PROPERTY_IMAGE) - seek)
        reply = OtaHeader.decode(data[:HEADER_SIZE])
        payload = data[HEADER_SIZE : HEADER_SIZE + sent]
        assert (reply.seek_addr, reply.read_size, reply.percent, reply.all_size) == (seek, sent, pct, 0)
        assert payload == _PROPERTY_IMAGE[seek : seek + sent]
        assert verify_reply(reply, payload)
        data = data[HEADER_SIZE + sent :]
    assert data == b""


class FillingTransport(StringTransport):
    """A transport whose write buffer holds ``limit`` bytes: past that it pauses its producer, as
    Twisted's TCP transports do, until :meth:`drain` (the peer read everything)."""

    def __init__(self, limit: int = 65536) -> None:
        super().__init__()
        self.limit = limit
        self.reading_paused = 0

    def write(self, data):
        super().write(data)
        if len(self.value()) > self.limit and self.producer is not None:
            self.producer.pauseProducing()

    def pauseProducing(self):
        self.reading_paused += 1
        super().pauseProducing()

    def drain(self):
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data


def filling_session(image, limit=65536, **settings) -> Session:
    s = Session.__new__(Session)
    s.clock = Clock()
    s.progress, s.all_sizes, s.results = [], [], []
    s.protocol = OtaStreamProtocol(image, s.clock, StreamSettings(**settings), on_progress=s.progress.append)
    s.transport = FillingTransport(limit)
    s.protocol.makeConnection(s.transport)
    s.protocol.done.addBoth(s.results.append)
    return s


def reads(count: int, size: int = 20436) -> bytes:
    return b"".join(
        encode_device_header(Status.READ, (i * size) % (IMAGE_SIZE - size), size, 0, 1) for i in range(count)
    )


def test_replies_wait_while_the_transport_is_full_and_requests_stay_unread(image):
    s = filling_session(image, limit=50_000)
    s.protocol.dataReceived(reads(5))
    # three replies fill the buffer; the other two requests wait, and reading from the device pauses
    assert len(s.transport.value()) == 3 * (HEADER_SIZE + 20436)
    assert s.transport.reading_paused == 1 and s.protocol.requests == 3
    data = s.transport.drain()
    assert len(data) == 3 * (HEADER_SIZE + 20436)
    assert s.protocol.requests == 5  # answered once the buffer drained
    assert s.results == []


def test_a_device_asking_without_reading_is_a_protocol_error_and_memory_stays_bounded(image):
    s = filling_session(image, limit=65536)
    s.protocol.dataReceived(reads(5000))  # 5000 requests in one chunk, none of our replies read
    buffered = len(s.transport.value())
    assert buffered <= 65536 + HEADER_SIZE + 20436 + HEADER_SIZE  # a full buffer, one reply over, and STOP
    assert s.transport.value().endswith(STOP_BYTES)
    s.close_from_app_side()
    (result,) = s.results
    assert result.end is StreamEnd.PROTOCOL_ERROR
    assert "without reading our replies" in result.message and result.requests <= 4


def test_garbage_on_the_stream_ends_it_and_is_logged_at_a_bounded_rate(image):
    from twisted.logger import capturedLogs

    s = Session(image)
    garbage = bytes(range(1, 21)) * 300  # 300 headers with a wrong checksum
    with capturedLogs() as events:
        s.protocol.dataReceived(garbage)
        s.close_from_app_side()
    assert s.take().endswith(STOP_BYTES)
    (result,) = s.results
    assert result.end is StreamEnd.PROTOCOL_ERROR and "in a row with a bad checksum" in result.message
    bad = [e for e in events if "bad checksum skipped" in e.get("log_format", "")]
    summary = [e for e in events if e.get("log_format", "").startswith("skipped {count}")]
    assert len(bad) == 3  # the first few, then a count
    assert summary and summary[0]["count"] == result.bad_headers - 3


def test_a_device_that_stops_asking_after_a_reply_is_shown_as_working(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=1000)
    assert s.progress[-1].activity is None
    s.clock.advance(1.0)
    assert s.progress[-1].activity is DeviceActivity.QUIET  # writing what it got
    s.send(Status.READ, seek=1000, size=1000)
    assert s.progress[-1].activity is None and s.progress[-1].furthest == 2000


def test_the_final_notice_and_ok_are_told_as_device_work_then_done(image):
    s = Session(image)
    s.send(Status.READ, seek=0, size=1000)
    s.send(Status.DOING, percent=100)
    assert s.progress[-1].activity is DeviceActivity.FINISHING
    s.send(Status.OK, percent=100)
    assert s.progress[-1].ok


def test_the_result_counts_every_receive_timeout_and_says_stop_was_sent(image):
    s = Session(image, receive_timeout=5.0, max_receive_timeouts=10)
    s.send(Status.READ, seek=0, size=10)
    s.clock.pump([5.0] * 3)  # three timeouts, then a header resets the run but not the count
    s.send(Status.READ, seek=10, size=10)
    s.clock.pump([5.0] * 11)
    s.close_from_app_side()
    (result,) = s.results
    assert (result.end, result.receive_timeouts, result.stop_sent) == (StreamEnd.TIMEOUT, 14, True)


def test_the_rate_is_the_transfers_not_diluted_by_the_devices_own_work(image):
    s = Session(image)
    for i in range(3):  # 3 x 20 000 bytes, 0.1 s apart
        s.send(Status.READ, seek=i * 20_000, size=20_000)
        s.clock.advance(0.1)
    s.send(Status.DOING, seek=0, all_size=IMAGE_SIZE, percent=1)  # the device waits 5 s, then erases
    s.clock.advance(5.0)
    s.send(Status.READ, seek=60_000, size=20_000)
    s.clock.advance(0.1)
    s.send(Status.READ, seek=40_000, size=20_000)
    last = s.progress[-1]
    assert last.rate == pytest.approx(200_000, rel=0.01) and last.rate_span == pytest.approx(0.1)
