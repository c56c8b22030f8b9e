"""Argument types shared by the ``netota`` subcommands: each turns a bad value into one clear
argparse error (``netota flash: error: argument --timeout: ...``)."""

from __future__ import annotations

import argparse
import math
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
