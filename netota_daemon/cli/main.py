"""``netota``: the command-line entry point. Each subcommand lives in its own module, which
provides ``add_parser(subparsers)`` and sets ``func(args) -> int`` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from netota_daemon import __version__
from netota_daemon.cli.exit_codes import EXIT_BROKEN_PIPE, EXIT_USAGE
from netota_daemon.cli.output import bad_argument_json, silence_stdout

COMMAND_MODULES = (
    "netota_daemon.cli.sim",
    "netota_daemon.cli.flash",
    "netota_daemon.cli.client",
    "netota_daemon.cli.batch",
    "netota_daemon.cli.firmware",
)


class NetotaArgumentParser(argparse.ArgumentParser):
    """Usage errors exit 64 (EX_USAGE), for every subcommand: argparse's own 2 would read as the
    outcome "unverified" in the documented exit codes. A subcommand's parser reports an unknown
    option itself (``netota sim: error: unrecognized arguments: --bogus``), with its own usage,
    rather than leaving it to the top-level parser, which would name only ``netota``."""

    #: A parser whose command promises one JSON object on stdout with ``--json`` (``netota flash``)
    #: prints its usage errors as one too (:func:`~netota_daemon.cli.output.bad_argument_json`).
    json_usage_errors = False
    #: The arguments being parsed (what an error is about).
    arguments: Sequence[str] = ()

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        if self.json_usage_errors and "--json" in self.arguments:
            print(bad_argument_json(message, EXIT_USAGE), flush=True)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self.arguments = list(sys.argv[1:] if args is None else args)
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and " " in self.prog:  # a subcommand ("netota sim"), not "netota" itself
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def build_parser() -> argparse.ArgumentParser:
    parser = NetotaArgumentParser(
        prog="netota",
        description="Firmware upgrades for JieLi AC79 WiFi devices (single- and double-backup builds).",
    )
    parser.add_argument("--version", action="version", version=f"netota {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; its exit code. Output whose reader went away (``| head``) ends it
    quietly with 141, wherever that happened (``--help`` too)."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
