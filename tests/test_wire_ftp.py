"""FTP replies, commands and the 227 reply, as bytes and values (no I/O)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.wire.ftp import (
    MAX_LINE_LENGTH,
    MAX_REPLY_LINES,
    FtpProtocolError,
    FtpReply,
    FtpReplyParser,
    PassiveAddress,
    encode_command,
    identify_server,
    parse_pasv_reply,
)

#: What the device's lwIP ftpd sends through one upload, byte for byte.
LWIP_SESSION = (
    b"220 lwIP FTP Server ready.\r\n"
    b"331 User name okay, need password.\r\n"
    b"230 User logged in, proceed.\r\n"
    b"200 Command okay.\r\n"
    b"227 Entering Passive Mode (192,168,1,1,16,1).\r\n"
    b"150 Opening BINARY mode data connection for update-ota.ufw.\r\n"
    b"226 Closing data connection.\r\n"
)
MULTI_LINE = b"220-Welcome\r\n  220 this line is free text\r\n220-still inside\r\n220 ready.\r\n"


def parse(data: bytes) -> list[FtpReply]:
    return FtpReplyParser().feed(data)


def test_one_line_replies():
    replies = parse(LWIP_SESSION)
    assert [r.code for r in replies] == [220, 331, 230, 200, 227, 150, 226]
    assert replies[0].lines == ("220 lwIP FTP Server ready.",)
    assert replies[5].is_preliminary and not replies[5].is_final
    assert replies[1].is_intermediate and replies[6].is_completion


def test_multi_line_reply_ends_at_its_code_and_a_space():
    (reply,) = parse(MULTI_LINE)
    assert reply.code == 220
    assert reply.lines == ("220-Welcome", "  220 this line is free text", "220-still inside", "220 ready.")
    assert reply.summary == "220-Welcome |   220 this line is free text | 220-still inside | 220 ready."


def test_multi_line_reply_of_another_code_inside_does_not_end_it():
    (reply,) = parse(b"211-Features:\r\n214 not the end\r\n211 End\r\n")
    assert reply.code == 211 and len(reply.lines) == 3


def test_code_alone_and_bare_lf_are_accepted():
    replies = parse(b"200\n230-a\n230\n")
    assert [(r.code, r.lines) for r in replies] == [(200, ("200",)), (230, ("230-a", "230"))]


def test_incomplete_reply_waits_for_the_rest():
    parser = FtpReplyParser()
    assert parser.feed(b"220 lwIP FTP Ser") == []
    assert parser.feed(b"ver ready.\r") == []
    assert parser.feed(b"\n") == [FtpReply(220, ("220 lwIP FTP Server ready.",))]
    assert parser.feed(b"220-a\r\n") == []
    assert parser.feed(b"220 b\r\n") == [FtpReply(220, ("220-a", "220 b"))]


@given(st.lists(st.integers(min_value=0, max_value=len(LWIP_SESSION + MULTI_LINE)), max_size=12))
def test_split_anywhere_gives_the_same_replies(cuts):
    data = LWIP_SESSION + MULTI_LINE
    parser = FtpReplyParser()
    replies = []
    previous = 0
    for cut in [*sorted(cuts), len(data)]:
        replies += parser.feed(data[previous:cut])
        previous = cut
    assert replies == parse(data)


@given(st.binary(max_size=300))
def test_random_bytes_give_replies_or_a_clear_error(data):
    try:
        replies = parse(data)
    except FtpProtocolError as e:
        assert str(e)
    else:
        assert all(100 <= r.code <= 599 and r.lines for r in replies)


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"\r\n",
        b"2200 x\r\n",
        b"220x\r\n",
        b"620 not a reply class\r\n",
        b"022 no\r\n",
    ],
)
def test_a_line_that_is_not_a_reply_is_an_error(data):
    with pytest.raises(FtpProtocolError, match="not an FTP reply"):
        parse(data)


def test_after_an_error_the_parser_stays_broken():
    parser = FtpReplyParser()
    with pytest.raises(FtpProtocolError):
        parser.feed(b"garbage\r\n")
    with pytest.raises(FtpProtocolError):
        parser.feed(b"220 fine\r\n")


def test_line_length_is_bounded_even_without_a_line_end():
    parser = FtpReplyParser()
    parser.feed(b"220 " + b"x" * (MAX_LINE_LENGTH - 4))  # exactly the limit, unterminated: still fine
    with pytest.raises(FtpProtocolError, match="over 1024 bytes"):
        parser.feed(b"xx")
    with pytest.raises(FtpProtocolError, match="over 1024 bytes"):
        parse(b"220 " + b"x" * MAX_LINE_LENGTH + b"\r\n")
    (reply,) = parse(b"220 " + b"x" * (MAX_LINE_LENGTH - 4) + b"\r\n")
    assert len(reply.lines[0]) == MAX_LINE_LENGTH


def test_multi_line_reply_length_is_bounded():
    body = b"220-start\r\n" + b"line\r\n" * (MAX_REPLY_LINES - 2)
    (reply,) = parse(body + b"220 end\r\n")
    assert len(reply.lines) == MAX_REPLY_LINES
    with pytest.raises(FtpProtocolError, match="over 64 lines"):
        parse(body + b"line\r\n" + b"220 end\r\n")


def test_non_ascii_text_is_decoded_with_replacement():
    (reply,) = parse(b"220 caf\xc3\xa9 \xff\r\n")
    assert reply.lines == ("220 café \ufffd",)


def test_encode_command():
    assert encode_command("USER", "FTPX") == b"USER FTPX\r\n"
    assert encode_command("TYPE", "I") == b"TYPE I\r\n"
    assert encode_command("PASV") == b"PASV\r\n"
    assert encode_command("STOR", "update-ota.ufw") == b"STOR update-ota.ufw\r\n"


@pytest.mark.parametrize(
    "verb, argument",
    [
        ("user", "x"),
        ("US", "x"),
        ("STORE", "x"),
        ("STOR", "a\r\nDELE b"),
        ("STOR", "a\nb"),
        ("STOR", "a\0b"),
        ("STOR", ""),
        ("PASS", "pässword"),
    ],
)
def test_encode_command_refuses_what_would_split_or_garble_a_command(verb, argument):
    with pytest.raises(ValueError):
        encode_command(verb, argument)


@pytest.mark.parametrize(
    "text, address",
    [
        ("227 Entering Passive Mode (192,168,1,1,16,1).", PassiveAddress("192.168.1.1", 4097)),
        ("227 Entering Passive Mode (10,0,0,9,127,255)", PassiveAddress("10.0.0.9", 32767)),
        ("227 =127,0,0,1,0,21", PassiveAddress("127.0.0.1", 21)),
    ],
)
def test_pasv_reply(text, address):
    assert parse_pasv_reply(FtpReply(227, (text,))) == address


@pytest.mark.parametrize(
    "reply, error",
    [
        (FtpReply(502, ("502 Command not implemented.",)), "expected a 227"),
        (FtpReply(227, ("227 Entering Passive Mode.",)), "no address"),
        (FtpReply(227, ("227 Entering Passive Mode (192,168,1,1,16).",)), "no address"),
        (FtpReply(227, ("227 Entering Passive Mode (192,168,1,1,256,1).",)), "over 255"),
        (FtpReply(227, ("227 Entering Passive Mode (192,168,1,1,0,0).",)), "port 0"),
    ],
)
def test_bad_pasv_reply_is_a_clear_error(reply, error):
    with pytest.raises(FtpProtocolError, match=error):
        parse_pasv_reply(reply)


def test_identify_server():
    assert identify_server(FtpReply(220, ("220 lwIP FTP Server ready.",))) == "lwip"
    assert identify_server(FtpReply(220, ("220 Welcome to Stupid-FTPd server.",))) == "stupid-ftpd"
    assert identify_server(FtpReply(220, ("220 (vsFTPd 3.0.5)",))) == "unknown"
