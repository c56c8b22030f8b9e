"""CTP frames: byte-exact examples from the research, the incremental decoder and its errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.wire import ctp
from netota_daemon.wire.ctp import CtpDecoder, CtpProtocolError


def test_app_access_request_is_byte_exact():
    frame = ctp.request("APP_ACCESS", "PUT", type="0", ver="20906")
    assert frame == (
        b"CTP:"
        + bytes.fromhex("0a00")
        + b"APP_ACCESS"
        + bytes.fromhex("2f000000")
        + b'{"op":"PUT","param":{"type":"0","ver":"20906"}}'
    )
    assert len(frame) == 67
    assert frame[0x14:].startswith(b'{"op"')  # the vendor client reads the JSON at offset 0x14


def test_net_ota_single_frames_are_byte_exact():
    assert ctp.request("NET_OTA_SINGLE", "PUT", status="1") == (
        b"CTP:\x0e\x00NET_OTA_SINGLE\x23\x00\x00\x00" + b'{"op":"PUT","param":{"status":"1"}}'
    )
    reply = ctp.notify("NET_OTA_SINGLE", {"status": "1"})
    assert reply == b"CTP:\x0e\x00NET_OTA_SINGLE\x26\x00\x00\x00" + b'{"op":"NOTIFY","param":{"status":"1"}}'
    assert len(reply) == 62


def test_error_notify_carries_errno_and_msg_success_has_none():
    (error,) = CtpDecoder().feed(ctp.notify("FOO", {"msg": "CTP_NO_TOPIC_MSG"}, errno=6))
    assert error.errno == 6 and error.param == {"msg": "CTP_NO_TOPIC_MSG"}
    (success,) = CtpDecoder().feed(ctp.notify("APP_ACCESS", {"type": "0", "ver": "1"}))
    assert success.errno is None and success.op == "NOTIFY"


def test_empty_content_decodes_to_none():
    (frame,) = CtpDecoder().feed(ctp.encode_frame("CTP_KEEP_ALIVE"))
    assert frame.topic == "CTP_KEEP_ALIVE" and frame.content is None and frame.param == {}


def test_bad_magic_is_a_clear_error_and_sticks():
    decoder = CtpDecoder()
    with pytest.raises(CtpProtocolError, match="bad CTP magic"):
        decoder.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(CtpProtocolError, match="bad CTP magic"):
        decoder.feed(ctp.encode_frame("X"))


def test_bad_magic_detected_from_first_byte():
    with pytest.raises(CtpProtocolError):
        CtpDecoder().feed(b"G")


def test_absurd_content_length_is_refused_before_buffering():
    header = b"CTP:\x04\x00ABCD" + (10_000_000).to_bytes(4, "little")
    with pytest.raises(CtpProtocolError, match="exceeds"):
        CtpDecoder().feed(header)


def test_zero_topic_length_is_refused():
    with pytest.raises(CtpProtocolError, match="topic length"):
        CtpDecoder().feed(b"CTP:\x00\x00")


def test_invalid_json_and_non_object_are_refused():
    with pytest.raises(CtpProtocolError, match="not valid JSON"):
        CtpDecoder().feed(ctp.encode_frame("T", b"{nope"))
    with pytest.raises(CtpProtocolError, match="not an object"):
        CtpDecoder().feed(ctp.encode_frame("T", b"[1,2]"))


def test_partial_frames_wait_for_more():
    frame = ctp.notify("UUID", {"uuid": "abc"})
    decoder = CtpDecoder()
    assert decoder.feed(frame[:-1]) == []
    assert decoder.pending == len(frame) - 1
    (got,) = decoder.feed(frame[-1:])
    assert got.param == {"uuid": "abc"} and decoder.pending == 0


topics = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
params = st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=4)


@given(st.lists(st.tuples(topics, params), max_size=8), st.data())
def test_split_anywhere_decodes_the_same_as_whole(frames, data):
    stream = b"".join(ctp.encode_frame(t, {"op": "NOTIFY", "param": p}) for t, p in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    decoder = CtpDecoder()
    got = []
    previous = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[previous:cut])
        previous = cut
    assert [(f.topic, f.param) for f in got] == frames


@given(st.binary(max_size=300))
def test_random_bytes_give_frames_or_the_codecs_own_error(data):
    decoder = CtpDecoder()
    try:
        decoder.feed(data)
    except CtpProtocolError:
        pass


@given(topics, params)
def test_round_trip_content_is_json_with_string_values(topic, param):
    (frame,) = CtpDecoder().feed(ctp.request(topic, "PUT", **param) if "op" not in param else ctp.notify(topic, param))
    assert json.loads(frame.raw_content)["param"] == {k: str(v) for k, v in param.items()}


def test_deeply_nested_content_is_the_codecs_own_error():
    with pytest.raises(CtpProtocolError, match="nested too deeply"):
        CtpDecoder().feed(ctp.encode_frame("APP_ACCESS", b"[" * 60_000))
