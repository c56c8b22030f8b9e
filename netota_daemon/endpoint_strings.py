"""Twisted endpoint strings (``unix:/run/netota/control.sock:mode=660``, ``tcp:8700:interface=127.0.0.1``):
split into their parts, checked with the parser the daemon listens with, and told apart as local or not.

Shared by the daemon (its ``daemon.control`` setting) and the client (its ``--control`` address), so
both read a string the same way. No I/O: :func:`server_endpoint_problem` only builds an endpoint
object, it never listens.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

#: Endpoint kinds the daemon's checks know how to judge (anything else is a plugin's).
NETWORK_KINDS = ("tcp", "tcp6", "ssl")

#: The listen backlog the daemon asks for when the string names none (Twisted's default is 50).
DEFAULT_BACKLOG = 1024

_SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """A Twisted endpoint string as (type, positional arguments, keyword arguments), honouring
    backslash escapes of ``:`` and ``=`` as :func:`twisted.internet.endpoints.serverFromString` does."""
    segments: list[list[tuple[str, bool]]] = [[]]
    escaped = False
    for char in description:
        if escaped:
            segments[-1].append((char, True))
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            segments.append([])
        else:
            segments[-1].append((char, False))
    kind = "".join(c for c, _ in segments[0]).lower()
    args: list[str] = []
    kwargs: dict[str, str] = {}
    for segment in segments[1:]:
        split_at = next((i for i, (c, esc) in enumerate(segment) if c == "=" and not esc), None)
        if split_at is None:
            args.append("".join(c for c, _ in segment))
        else:
            key = "".join(c for c, _ in segment[:split_at])
            kwargs[key] = "".join(c for c, _ in segment[split_at + 1 :])
    return kind, args, kwargs


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (IPv4 or IPv6, brackets allowed)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tcp_interface(args: list[str], kwargs: dict[str, str]) -> str:
    """The address a ``tcp:``/``tcp6:``/``ssl:`` server endpoint binds ("" for every address)."""
    return kwargs.get("interface", args[1] if len(args) > 1 else "")


class _NoReactor:
    """Stands in for the reactor while a string is parsed: parsing never uses it."""


def _digits(text: str) -> bool:
    """ASCII digits, at most 10 of them ("²" is a digit to str.isdigit, not to int)."""
    return text.isascii() and text.isdigit() and len(text) <= 10


def _clean(error: Exception) -> str:
    # "_parseTCP() got multiple values for argument 'interface'" -> "got multiple values for ..."
    return re.sub(r"^_?\w+\(\) ", "", str(error)) or type(error).__name__


def server_endpoint_problem(description: str) -> str | None:
    """What is wrong with ``description`` as a server endpoint string, or None if the daemon's
    parser (``serverFromString``) takes it. ``systemd:`` strings are checked for their arguments
    only: the sockets themselves exist only when systemd starts the daemon."""
    from twisted.internet.endpoints import serverFromString

    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in description):
        return "contains a control character"
    kind, args, kwargs = split_endpoint(description)
    for name in ("port", "backlog", "mode"):
        if name in kwargs and not kwargs[name].strip():
            return f"{name}= is empty"
    if kind == "systemd":
        return _systemd_problem(args, kwargs)
    if kind in NETWORK_KINDS:
        port = kwargs.get("port", args[0] if args else "")
        if not _digits(port) or not 0 <= int(port) <= 65535:
            return f"port {port!r} is not a TCP port (0 to 65535)"
    if "backlog" in kwargs and (not _digits(kwargs["backlog"]) or not 1 <= int(kwargs["backlog"]) <= 65535):
        return f"backlog={kwargs['backlog']!r} is not a number from 1 to 65535"
    if kind == "unix":
        if not (kwargs.get("address") or (args[0] if args else "")).strip():
            return "names no socket path"
        if "mode" in kwargs:
            try:
                mode = int(kwargs["mode"], 8)
            except ValueError:
                return f"mode={kwargs['mode']!r} is not an octal file mode"
            if not 0 <= mode <= 0o777:
                return f"mode={kwargs['mode']!r} is not a file mode (000 to 777)"
    try:
        serverFromString(_NoReactor(), description)  # type: ignore[no-untyped-call]
    except Exception as e:  # the parser's own errors: TypeError, ValueError, KeyError, OSError (ssl files)
        return _clean(e)
    return None


def _systemd_problem(args: list[str], kwargs: dict[str, str]) -> str | None:
    if args:
        return f"unexpected argument {args[0]!r} (systemd:domain=UNIX:index=0 or systemd:domain=UNIX:name=NAME)"
    unknown = sorted(set(kwargs) - {"domain", "index", "name"})
    if unknown:
        return f"unknown argument {unknown[0]}= (known: domain, index, name)"
    domain = kwargs.get("domain", "")
    if domain not in _SYSTEMD_DOMAINS:
        return f"domain={domain!r} must be one of {', '.join(_SYSTEMD_DOMAINS)} (upper case)"
    if ("index" in kwargs) == ("name" in kwargs):
        return "give exactly one of index= and name="
    if "index" in kwargs and (not _digits(kwargs["index"]) or int(kwargs["index"]) > 1023):
        return f"index={kwargs['index']!r} is not a socket index (0 to 1023)"
    return None


def with_default(description: str, key: str, value: Any) -> str:
    """``description`` with ``:key=value`` added unless it already sets ``key``."""
    _, _, kwargs = split_endpoint(description)
    return description if key in kwargs else f"{description}:{key}={value}"
