"""How every ``netota`` client command runs: its common options, its reactor, its errors.

A command is a coroutine function ``(client, args) -> exit code`` that talks to the daemon through
a :class:`~netota_daemon.cli.control_client.ControlClient`. :func:`add_common_options` gives its
parser ``--control``, ``--token`` and ``--json`` (and ``--no-color`` for one that draws progress);
:func:`command_runner` makes it the parser's ``func`` (:func:`add_client_command` does both, with the
command's help): it runs the command on a reactor of its own
and turns each way it can end (the daemon away, a refusal, a bad argument, a closed stdout, Ctrl-C,
a bug) into one plain line on stderr and its exit code (:mod:`netota_daemon.cli.exit_codes`).
The commands themselves live in :mod:`netota_daemon.cli.client`, :mod:`netota_daemon.cli.batch`
and :mod:`netota_daemon.cli.firmware`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import ensureDeferred

from netota_daemon.cli import arguments
from netota_daemon.cli.control_client import ApiRefused, ControlClient, DaemonUnavailable
from netota_daemon.cli.exit_codes import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_SOFTWARE,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
)
from netota_daemon.cli.output import silence_stdout

DEFAULT_CONTROL = "unix:/run/netota/control.sock"
Command = Callable[[Any, argparse.Namespace], Awaitable[int]]


def refusal_text(error: ApiRefused) -> str:
    """A refusal as a person reads it: the daemon's message, then its code (for scripts and searches)."""
    return f"{error.message} ({error.code})" if error.code and error.code not in error.message else error.message


async def run_command(command: Command, client: Any, args: argparse.Namespace, stopping: list[bool]) -> int | None:
    """``command``'s exit code, every error it can end with turned into one plain line on stderr and
    its code; None when our own shutdown (Ctrl-C) ended it (``stopping`` is set)."""
    try:
        return await command(client, args)
    except BrokenPipeError:
        silence_stdout()  # whoever read stdout stopped (| head): end quietly
        return EXIT_BROKEN_PIPE
    except DaemonUnavailable as e:
        if stopping:
            return None  # our own shutdown (Ctrl-C) closed the connection, not the daemon
        sys.stderr.write(f"netota: {e}\n")
        return EXIT_UNAVAILABLE
    except ApiRefused as e:
        sys.stderr.write(f"netota: {refusal_text(e)}\n")
        return e.exit_code
    except ValueError as e:
        sys.stderr.write(f"netota: {e}\n")
        return EXIT_USAGE
    except Exception:  # a bug, or an answer this client does not understand: never "interrupted"
        import traceback

        sys.stderr.write(f"netota: internal error:\n{traceback.format_exc()}")
        return EXIT_SOFTWARE


def command_runner(command: Command) -> Callable[[argparse.Namespace], int]:
    """``command`` as a parser's ``func``: run on a reactor of its own, its exit code returned."""

    def func(args: argparse.Namespace) -> int:
        from twisted.internet import task

        codes: list[int] = []
        stopping: list[bool] = []

        async def main(reactor: Any) -> None:
            reactor.addSystemEventTrigger("before", "shutdown", stopping.append, True)
            try:
                client = ControlClient(reactor, args.control, args.token)
            except ValueError as e:
                sys.stderr.write(f"netota: {e}\n")
                codes.append(EXIT_USAGE)
                return
            code = await run_command(command, client, args, stopping)
            if code is not None:
                codes.append(code)

        try:
            task.react(lambda reactor: ensureDeferred(main(reactor)))
        except SystemExit:
            pass
        if not codes:
            # Ctrl-C (or SIGTERM) stopped the reactor before the command finished: a job being
            # watched carries on in the daemon.
            sys.stderr.write(
                "netota: interrupted; any job started keeps running in the daemon (netota jobs, netota watch JOB)\n"
            )
            return EXIT_INTERRUPTED
        return codes[0]

    return func


def add_client_command(
    subparsers: Any, name: str, help_text: str, command: Command, epilog: str, draws: bool = False
) -> argparse.ArgumentParser:
    """The parser of one client command: its help (filled to the terminal), the common options, and
    ``command`` run by :func:`command_runner` as its ``func``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=epilog,
        formatter_class=arguments.WrappingHelpFormatter,
    )
    add_common_options(parser, draws)
    parser.set_defaults(func=command_runner(command), command=command)
    return parser


def add_common_options(parser: argparse.ArgumentParser, draws: bool = False) -> None:
    """``--control``, ``--token``, ``--json``; ``--no-color`` too for a command that ``draws`` progress."""
    parser.add_argument(
        "--control",
        default=os.environ.get("NETOTA_CONTROL", DEFAULT_CONTROL),
        help="the daemon's control address (default: $NETOTA_CONTROL or %(default)s)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("NETOTA_TOKEN"),
        help="bearer token for a daemon that requires one (default: $NETOTA_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of text")
    if draws:
        parser.add_argument(
            "--no-color", action="store_true", help="no colour in the progress display (also: NO_COLOR set)"
        )
