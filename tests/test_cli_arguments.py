"""The shared argument types: every bad value is one clear argparse error."""

from __future__ import annotations

import argparse

import pytest

from netota_daemon.cli import arguments


@pytest.mark.parametrize(
    "parse,text,words",
    [
        (arguments.seconds(), "0", "greater than 0"),
        (arguments.seconds(), "nan", "finite"),
        (arguments.seconds(positive=False), "-1", "0 or more"),
        (arguments.seconds(positive=False), "inf", "finite"),
        (arguments.seconds(), "soon", "not a number of seconds"),
        (arguments.tcp_port(), "0", "outside 1..65535"),
        (arguments.tcp_port(allow_zero=True), "65536", "outside 0..65535"),
        (arguments.tcp_port(), "http", "not a port number"),
        (arguments.whole_number(1), "0", "at least 1"),
        (arguments.whole_number(), "1.5", "not a whole number"),
    ],
)
def test_bad_values_are_refused_with_the_reason(parse, text, words):
    with pytest.raises(argparse.ArgumentTypeError, match=words):
        parse(text)


def test_good_values_are_converted():
    assert arguments.seconds()("2.5") == 2.5
    assert arguments.seconds(positive=False)("0") == 0.0
    assert arguments.tcp_port(allow_zero=True)("0") == 0
    assert arguments.tcp_port()("3333") == 3333
    assert arguments.whole_number(0)("0") == 0
