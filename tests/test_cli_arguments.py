"""The shared argument types: every bad value is one clear argparse error."""

from __future__ import annotations

import argparse
import re

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


def choices(words: tuple[str, ...], capsys) -> list[str]:
    """The subcommands of ``netota WORDS``, from the error argparse gives for an unknown one."""
    from netota_daemon.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*words, "no-such-command"])
    error = capsys.readouterr().err
    if "invalid choice" not in error:
        return []  # no subcommands: the word was taken as an argument
    return re.findall(r"'([a-z-]+)'", error.split("choose from", 1)[1])


def subcommand_paths(capsys, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every ``netota`` subcommand, as its words (``("batch", "start")``)."""
    paths = []
    for name in choices(prefix, capsys):
        paths.append((*prefix, name))
        if name in ("batch", "firmware", "sim"):  # the commands with subcommands of their own
            paths += subcommand_paths(capsys, (*prefix, name))
    return paths


def help_text(words: tuple[str, ...], capsys) -> str:
    from netota_daemon.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args([*words, "--help"])
    return capsys.readouterr().out


def test_every_commands_help_fits_80_columns(monkeypatch, capsys):
    columns = 80
    monkeypatch.setenv("COLUMNS", str(columns))
    paths = subcommand_paths(capsys)
    assert {("batch", "start"), ("firmware", "add"), ("sim", "make-image"), ("flash",)} <= set(paths)
    for words in paths:
        text = help_text(words, capsys)
        long = [line for line in text.splitlines() if len(line) > columns]
        assert long == [], f"netota {' '.join(words)} --help at {columns} columns"


def test_a_wrapped_epilog_keeps_every_word_and_the_exit_code_list(monkeypatch, capsys):
    from netota_daemon.cli.flash import EPILOG

    monkeypatch.setenv("COLUMNS", "80")
    text = help_text(("flash",), capsys)
    assert " ".join(EPILOG.split()) in " ".join(text.split())
    # The list keeps one item per code, each continued under its text.
    lines = text.splitlines()
    first = lines.index("  64  bad arguments (missing, empty, unreadable or over-4-GiB firmware,")
    assert lines[first + 1].startswith("      unknown interface")


def test_the_formatter_fills_prose_and_keeps_headings_and_lists(monkeypatch):
    monkeypatch.setenv("COLUMNS", "42")  # argparse fills to COLUMNS - 2
    parser = argparse.ArgumentParser(
        prog="p",
        formatter_class=arguments.WrappingHelpFormatter,
        epilog="exit codes:\n  0   all went well, and this line is long enough to wrap\n  64  bad arguments\n\n"
        "A paragraph of prose with --an-option-name and unix:/a/long/path/that/stays/whole in it.",
    )
    epilog = parser.format_help().split("\n\n", 2)[2]
    assert epilog.splitlines() == [
        "exit codes:",
        "  0   all went well, and this line is",
        "      long enough to wrap",
        "  64  bad arguments",
        "",
        "A paragraph of prose with",
        "--an-option-name and",  # broken at spaces only: an option and a path stay whole
        "unix:/a/long/path/that/stays/whole in",
        "it.",
    ]
