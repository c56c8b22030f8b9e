"""``netota``: the command-line entry point. Each subcommand lives in its own module, which
provides ``add_parser(subparsers)`` and sets ``func(args) -> int`` on its parser."""

from __future__ import annotations

import argparse
import importlib
import sys

from netota_daemon import __version__

COMMAND_MODULES = (
    "netota_daemon.cli.sim",
    "netota_daemon.cli.flash",
    "netota_daemon.cli.client",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netota",
        description="Firmware upgrades for JieLi AC79 WiFi devices (single-backup network upgrade).",
    )
    parser.add_argument("--version", action="version", version=f"netota {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 64
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
