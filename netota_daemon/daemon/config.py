"""The daemon's configuration: a TOML file read with :mod:`tomllib` into typed values.

Every problem (unknown key, wrong type, missing value, bad TOML) is a :class:`ConfigError` that names
the file, the key and what is wrong, so start-up stops with a message a person can act on.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts

DEFAULT_CONFIG_PATH = "/etc/netota/netota.toml"
DEFAULT_CONTROL = "unix:/run/netota/control.sock:mode=660:lockfile=1"
DEFAULT_STATE_DIR = "/var/lib/netota"
DEFAULT_FIRMWARE_DIR = "/var/lib/netota/firmware"
DEFAULT_MAX_PARALLEL = 4


class ConfigError(Exception):
    """The configuration can't be used; the message names the file and the key."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


@dataclass(frozen=True)
class DeviceConfig:
    """One device entry: where it is reached and how long each of its steps may take."""

    target: DeviceTarget
    timeouts: UpgradeTimeouts
    behaviour: UpgradeBehaviour = field(default_factory=UpgradeBehaviour)

    @property
    def name(self) -> str:
        return self.target.name


@dataclass(frozen=True)
class DaemonConfig:
    """The whole configuration of one daemon."""

    source: str
    control: str = DEFAULT_CONTROL
    state_dir: Path = Path(DEFAULT_STATE_DIR)
    firmware_dir: Path = Path(DEFAULT_FIRMWARE_DIR)
    max_parallel: int = DEFAULT_MAX_PARALLEL
    control_token: str | None = None  # bearer token required on the control API when set
    shutdown_grace: float = 15.0  # seconds to wait for running jobs to stop (STOP sent) on shutdown
    timeouts: UpgradeTimeouts = field(default_factory=UpgradeTimeouts)
    behaviour: UpgradeBehaviour = field(default_factory=UpgradeBehaviour)
    devices: dict[str, DeviceConfig] = field(default_factory=dict)


# key -> (accepted types, description used in messages)
_INT = ((int,), "an integer")
_NUMBER = ((int, float), "a number")
_STRING = ((str,), "a string")
_BOOL = ((bool,), "true or false")

_DAEMON_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "control": _STRING,
    "state_dir": _STRING,
    "firmware_dir": _STRING,
    "max_parallel": _INT,
    "control_token": _STRING,
    "shutdown_grace": _NUMBER,
}

_DEVICE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "host": _STRING,
    "ctp_port": _INT,
    "http_port": _INT,
    "ota_port": _INT,
    "interface": _STRING,
    "source_address": _STRING,
    "reconnect_command": _STRING,
    "expected_ssid": _STRING,
    "ftp_port": _INT,
    "ftp_user": _STRING,
    "ftp_password": _STRING,
}


def _keys_of(cls: type[UpgradeTimeouts] | type[UpgradeBehaviour]) -> dict[str, tuple[tuple[type, ...], str]]:
    keys: dict[str, tuple[tuple[type, ...], str]] = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, bool):
            keys[f.name] = _BOOL
        elif isinstance(default, int):
            keys[f.name] = _INT
        else:
            keys[f.name] = _NUMBER
    return keys


#: The engine's behaviour switches (``[behaviour]``, ``[devices.NAME.behaviour]``).
BEHAVIOUR_KEYS = _keys_of(UpgradeBehaviour)
#: Keys a ``[timeouts]`` table and a job's options take: every duration, and (their old place,
#: still read) the behaviour switches.
TIMEOUT_KEYS = {**_keys_of(UpgradeTimeouts), **BEHAVIOUR_KEYS}


def split_settings(
    changes: dict[str, Any], timeouts: UpgradeTimeouts, behaviour: UpgradeBehaviour
) -> tuple[UpgradeTimeouts, UpgradeBehaviour]:
    """``timeouts`` and ``behaviour`` with checked ``changes`` (of either kind) applied."""
    behaviour_changes = {k: v for k, v in changes.items() if k in BEHAVIOUR_KEYS}
    timeout_changes = {k: v for k, v in changes.items() if k not in BEHAVIOUR_KEYS}
    return (
        timeouts.replaced(**timeout_changes) if timeout_changes else timeouts,
        behaviour.replaced(**behaviour_changes) if behaviour_changes else behaviour,
    )


def check_value(source: str, key: str, value: Any, spec: tuple[tuple[type, ...], str]) -> Any:
    """``value`` if it has the type ``spec`` asks for (a bool is never a number), else ConfigError."""
    types, description = spec
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(source, key, f"must be {description}, not {value!r}")
    if not isinstance(value, types):
        raise ConfigError(source, key, f"must be {description}, not {type(value).__name__} {value!r}")
    return value


#: Timeouts that may be 0 (0 turns the keep-alive off); every other duration must be positive.
_MAY_BE_ZERO = {"keepalive_interval"}


def check_timeout(source: str, key: str, name: str, value: Any) -> Any:
    """``value`` as the timeout ``name`` (full key ``key`` in messages) takes it, or ConfigError: the
    right type, finite (TOML and JSON both allow nan and inf, which would break the reactor's timers),
    a count not negative, a duration positive. Durations come back as floats."""
    spec = TIMEOUT_KEYS[name]
    value = check_value(source, key, value, spec)
    if spec is _BOOL:
        return value
    if not math.isfinite(value):
        raise ConfigError(source, key, f"must be a finite number, not {value!r}")
    if spec is _INT:
        if value < 0:
            raise ConfigError(source, key, f"must not be negative, not {value!r}")
        return value
    if value < 0 or (value == 0 and name not in _MAY_BE_ZERO):
        raise ConfigError(source, key, f"must be a positive number of seconds, not {value!r}")
    return float(value)


def parse_timeouts(
    source: str, prefix: str, table: Any, base: UpgradeTimeouts, behaviour: UpgradeBehaviour
) -> tuple[UpgradeTimeouts, UpgradeBehaviour]:
    """``base`` and ``behaviour`` with the overrides of a ``timeouts`` table applied (each checked)."""
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "must be a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in TIMEOUT_KEYS:
            raise ConfigError(source, full, f"unknown key (known: {', '.join(sorted(TIMEOUT_KEYS))})")
        changes[key] = check_timeout(source, full, key, value)
    return split_settings(changes, base, behaviour)


def parse_behaviour(source: str, prefix: str, table: Any, base: UpgradeBehaviour) -> UpgradeBehaviour:
    """``base`` with the switches of a ``behaviour`` table applied (each checked)."""
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "must be a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key not in BEHAVIOUR_KEYS:
            raise ConfigError(source, full, f"unknown key (known: {', '.join(sorted(BEHAVIOUR_KEYS))})")
        changes[key] = check_timeout(source, full, key, value)
    return base.replaced(**changes)


def _port(source: str, key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(source, key, f"must be a TCP port between 1 and 65535, not {value}")
    return value


def _interface_name(source: str, key: str, name: str) -> None:
    """A Linux interface name: at most 15 bytes (IFNAMSIZ - 1), no '/', ':' or whitespace. Whether
    it exists is checked when a job starts (it may come up later)."""
    if len(name.encode()) > 15 or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise ConfigError(
            source, key, f"{name!r} is not a network interface name (at most 15 characters, no '/', ':' or spaces)"
        )


def _ipv4_address(source: str, key: str, address: str) -> None:
    try:
        ipaddress.IPv4Address(address)
    except ValueError:
        raise ConfigError(source, key, f"{address!r} is not an IPv4 address") from None


def _parse_device(
    source: str, name: str, table: Any, timeouts: UpgradeTimeouts, behaviour: UpgradeBehaviour
) -> DeviceConfig:
    prefix = f"devices.{name}"
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "must be a table ([devices.NAME])")
    values: dict[str, Any] = {}
    device_timeouts, device_behaviour = timeouts, behaviour
    if "behaviour" in table:
        device_behaviour = parse_behaviour(source, f"{prefix}.behaviour", table["behaviour"], behaviour)
    for key, value in table.items():
        full = f"{prefix}.{key}"
        if key == "behaviour":
            continue
        if key == "timeouts":
            device_timeouts, device_behaviour = parse_timeouts(source, full, value, timeouts, device_behaviour)
            continue
        if key not in _DEVICE_KEYS:
            raise ConfigError(
                source, full, f"unknown key (known: {', '.join(sorted(_DEVICE_KEYS))}, timeouts, behaviour)"
            )
        value = check_value(source, full, value, _DEVICE_KEYS[key])
        if key.endswith("_port"):
            _port(source, full, value)
        elif not value.strip():
            raise ConfigError(source, full, "must not be empty (leave it out instead)")
        elif key == "interface":
            _interface_name(source, full, value)
        elif key == "source_address":
            _ipv4_address(source, full, value)
        values[key] = value
    if "host" not in values:
        raise ConfigError(source, f"{prefix}.host", 'missing (the device\'s address, e.g. "192.168.1.1")')
    return DeviceConfig(target=DeviceTarget(name=name, **values), timeouts=device_timeouts, behaviour=device_behaviour)


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


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_control_endpoint(source: str, description: str, token: str | None) -> str:
    """The control endpoint to listen on. A UNIX socket without ``mode=`` gets ``mode=660``; a TCP
    endpoint (or any other network one) is refused unless it binds loopback or a bearer token is
    configured, because the control API can reflash every device."""
    key = "daemon.control"
    kind, args, kwargs = split_endpoint(description)
    if kind == "unix":
        if not args and "address" not in kwargs:
            raise ConfigError(source, key, f"{description!r} names no socket path")
        if "mode" not in kwargs:
            description += ":mode=660"
        else:
            try:
                int(kwargs["mode"], 8)
            except ValueError:
                raise ConfigError(source, key, f"mode={kwargs['mode']!r} is not an octal file mode") from None
        return description
    if kind == "systemd":
        domain = kwargs.get("domain", "").upper()
        if domain != "UNIX" and token is None:
            raise ConfigError(
                source,
                key,
                f"{description!r}: a systemd socket with domain={domain or '?'} may be reachable from the "
                "network; use domain=UNIX or set daemon.control_token",
            )
        return description
    if kind in ("tcp", "tcp6", "ssl"):
        interface = kwargs.get("interface", args[1] if len(args) > 1 else "")
        if token is None and not _is_loopback(interface):
            raise ConfigError(
                source,
                key,
                f"{description!r} listens on {interface or 'every address'}: a TCP control endpoint must "
                "bind loopback (interface=127.0.0.1) unless daemon.control_token is set",
            )
        return description
    if token is None:
        raise ConfigError(
            source,
            key,
            f"{description!r}: only unix:, systemd:domain=UNIX and loopback tcp: endpoints are allowed "
            "without daemon.control_token",
        )
    return description


def parse_config(data: Mapping[str, Any], source: str, base_dir: Path | None = None) -> DaemonConfig:
    """A :class:`DaemonConfig` from parsed TOML ``data``; relative paths are taken from ``base_dir``."""
    base_dir = base_dir or Path.cwd()
    for key in data:
        if key not in ("daemon", "timeouts", "behaviour", "devices"):
            raise ConfigError(source, key, "unknown section (known: daemon, timeouts, behaviour, devices)")
    daemon = data.get("daemon")
    if daemon is None:
        raise ConfigError(source, "daemon", "missing section [daemon]")
    if not isinstance(daemon, dict):
        raise ConfigError(source, "daemon", "must be a table")
    values: dict[str, Any] = {}
    for key, value in daemon.items():
        full = f"daemon.{key}"
        if key not in _DAEMON_KEYS:
            raise ConfigError(source, full, f"unknown key (known: {', '.join(sorted(_DAEMON_KEYS))})")
        values[key] = check_value(source, full, value, _DAEMON_KEYS[key])
    for key in ("control", "state_dir", "firmware_dir"):
        if key not in values:
            raise ConfigError(source, f"daemon.{key}", "missing (required)")
        if not values[key].strip():
            raise ConfigError(source, f"daemon.{key}", "must not be empty")
    max_parallel = values.get("max_parallel", DEFAULT_MAX_PARALLEL)
    if max_parallel < 1:
        raise ConfigError(source, "daemon.max_parallel", f"must be at least 1, not {max_parallel}")
    token = values.get("control_token")
    if token is not None and not token.strip():
        raise ConfigError(source, "daemon.control_token", "must not be empty (leave it out instead)")
    control = check_control_endpoint(source, values["control"], token)
    grace = float(values.get("shutdown_grace", 15.0))
    if not math.isfinite(grace) or grace < 0:
        raise ConfigError(
            source, "daemon.shutdown_grace", f"must be a finite number of seconds, at least 0, not {grace!r}"
        )

    timeouts, behaviour = UpgradeTimeouts(), UpgradeBehaviour()
    if "behaviour" in data:
        behaviour = parse_behaviour(source, "behaviour", data["behaviour"], behaviour)
    if "timeouts" in data:
        timeouts, behaviour = parse_timeouts(source, "timeouts", data["timeouts"], timeouts, behaviour)

    devices_table = data.get("devices", {})
    if not isinstance(devices_table, dict):
        raise ConfigError(source, "devices", "must be a table of [devices.NAME] tables")
    devices: dict[str, DeviceConfig] = {}
    for name, table in devices_table.items():
        if not name or "/" in name or name.strip() != name:
            raise ConfigError(
                source, f"devices.{name}", "a device name must be non-empty, without '/' or spaces around it"
            )
        devices[name] = _parse_device(source, name, table, timeouts, behaviour)

    return DaemonConfig(
        source=source,
        control=control,
        state_dir=(base_dir / values["state_dir"]),
        firmware_dir=(base_dir / values["firmware_dir"]),
        max_parallel=max_parallel,
        control_token=token,
        shutdown_grace=grace,
        timeouts=timeouts,
        behaviour=behaviour,
        devices=devices,
    )


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and check the TOML file at ``path``."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(source, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(source, None, "is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(source, None, "not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as e:
        # tomllib's message carries the line and column: keep it.
        raise ConfigError(source, None, f"not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, f"not valid UTF-8 TOML: {e}") from None
    try:
        return parse_config(data, source, base_dir=Path(source).resolve().parent)
    except ConfigError as e:
        line = locate_key(Path(path).read_text(encoding="utf-8"), e.key) if e.key else None
        if line is None:
            raise
        raise ConfigError(f"{source}:{line}", e.key, e.problem) from None


_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _dotted(path: str) -> str:
    """``devices."shelf 1" . host`` -> ``devices.shelf 1.host``."""
    parts = re.findall(r"\"([^\"]*)\"|'([^']*)'|([^.\s]+)", path)
    return ".".join(next(p for p in groups if p) if any(groups) else "" for groups in parts)


def locate_key(text: str, key: str) -> int | None:
    """The 1-based line of ``key`` (dotted, as in ConfigError) in TOML ``text``: the line that sets it,
    else the header of the nearest table above it that the file has (for a missing key), else None."""
    table = ""
    keys: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        header = _TABLE_HEADER.match(line)
        if header:
            table = _dotted(header.group(1))
            keys.setdefault(table, number)
            continue
        assignment = _KEY_LINE.match(line)
        if assignment:
            full = f"{table}.{_dotted(assignment.group(1))}" if table else _dotted(assignment.group(1))
            keys.setdefault(full, number)
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        found = keys.get(".".join(parts[:end]))
        if found is not None:
            return found
    return None
