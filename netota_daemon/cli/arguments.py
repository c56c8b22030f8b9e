"""Argument types shared by the ``netota`` subcommands: each turns a bad value into one clear
argparse error (``netota flash: error: argument --timeout: ...``)."""

from __future__ import annotations

import argparse
import math
import re
import textwrap
from collections.abc import Callable
from typing import TypeAlias

#: What each subcommand module's ``add_parser`` is given: the result of ``parser.add_subparsers()``.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def whole_number(minimum: int = 0) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} must be at least {minimum}")
        return value

    return parse


def seconds(positive: bool = True) -> Callable[[str], float]:
    """A finite number of seconds: greater than 0 when ``positive``, else 0 or more (nan and inf are
    refused either way)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (0 < value < math.inf if positive else 0 <= value < math.inf):
            rule = "greater than 0" if positive else "0 or more"
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number {rule}")
        return value

    return parse


def tcp_port(allow_zero: bool = False) -> Callable[[str], int]:
    """A TCP port, 1..65535; 0 too ("any free port") for a listener when ``allow_zero``."""
    low = 0 if allow_zero else 1

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
        if not low <= value <= 65535:
            raise argparse.ArgumentTypeError(f"port {value} is outside {low}..65535")
        return value

    return parse


class WrappingHelpFormatter(argparse.HelpFormatter):
    """Help whose description and epilog are filled to the terminal's width (argparse's own width:
    ``$COLUMNS``, else the terminal's, less 2) paragraph by paragraph, as argparse fills an
    option's help, but keeping their layout: blank lines between paragraphs stay, and an indented
    paragraph is a list whose items (the lines at its least indentation, each with the deeper lines
    after it) are filled one by one, their continuation lines indented as written. A first line
    less indented than the rest is the list's heading, a line of its own ("exit codes:")."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", text.strip("\n")) if p.strip()]
        return "\n\n".join(_fill_paragraph(p.splitlines(), width, indent) for p in paragraphs) + "\n"


def _indent_of(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _fill_paragraph(lines: list[str], width: int, indent: str) -> str:
    if not any(_indent_of(line) for line in lines):  # prose
        return _fill(" ".join(lines), width, indent, indent)
    if len(lines) > 1 and len(_indent_of(lines[0])) < min(len(_indent_of(line)) for line in lines[1:]):
        heading = _fill(lines[0].strip(), width, indent + _indent_of(lines[0]), indent + _indent_of(lines[0]))
        return heading + "\n" + _fill_paragraph(lines[1:], width, indent)
    least = min(len(_indent_of(line)) for line in lines)
    items: list[list[str]] = []
    for line in lines:
        if not items or len(_indent_of(line)) == least:
            items.append([line])
        else:
            items[-1].append(line)
    filled = []
    for item in items:
        lead = _indent_of(item[0])
        after = _indent_of(item[1]) if len(item) > 1 else lead + "    "
        text = " ".join(line.strip() for line in item)
        filled.append(_fill(text, width, indent + lead, indent + after))
    return "\n".join(filled)


def _fill(text: str, width: int, first: str, rest: str) -> str:
    """``text`` filled to ``width``, broken only at spaces: an option (``--no-color``) or a path
    stays whole."""
    return textwrap.fill(
        text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False, break_long_words=False
    )
