"""The daemon's configuration: a TOML file read with :mod:`tomllib` into typed values.

Every problem (unknown key, wrong type, a value out of range, missing value, bad TOML, a directory
the daemon can't use) is a :class:`ConfigError` that names the file, the line, the key and what is
wrong, so start-up stops with one line a person can act on. Every value is checked for type and
range before anything uses it: no TOML the parser accepts ends in a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netota_daemon.endpoint_strings import (
    DEFAULT_BACKLOG,
    NETWORK_KINDS,
    is_loopback,
    server_endpoint_problem,
    split_endpoint,
    tcp_interface,
    with_default,
)
from netota_daemon.engine.settings import DeviceTarget, UpgradeBehaviour, UpgradeTimeouts

DEFAULT_CONFIG_PATH = "/etc/netota/netota.toml"
DEFAULT_CONTROL = "unix:/run/netota/control.sock:mode=660:lockfile=1"
DEFAULT_STATE_DIR = "/var/lib/netota"
DEFAULT_FIRMWARE_DIR = "/var/lib/netota/firmware"
DEFAULT_MAX_PARALLEL = 4
DEFAULT_SHUTDOWN_GRACE = 15.0
DEFAULT_RETENTION_DAYS = 365.0
DEFAULT_RETENTION_JOBS = 100_000
DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_MAX_CONNECTIONS = 256
#: The largest firmware upload (PUT /v1/firmware/NAME) unless daemon.firmware_max_upload says otherwise.
DEFAULT_MAX_UPLOAD = 64 * 1024 * 1024
DEFAULT_NOTIFY_TIMEOUT = 30.0
DEFAULT_WEBHOOK_ATTEMPTS = 4
DEFAULT_RESCUE_INTERVAL = 300.0
MAX_TAGS = 32
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

#: The longest any engine wait may be set to (a week); longer is a typo, and would overflow timers.
MAX_SECONDS = 7 * 24 * 3600.0
#: The largest count (retries, receive timeouts) a config or a job's options may give.
MAX_COUNT = 1_000_000
MAX_PATH = 4096
MAX_DEVICE_NAME = 64


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
    tags: tuple[str, ...] = ()  # for batches (netota batch start --tag T)

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
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE  # seconds to wait for running jobs to stop (STOP sent)
    journal_retention_days: float = DEFAULT_RETENTION_DAYS  # ended jobs older than this are pruned (0: no age limit)
    journal_retention_jobs: int = DEFAULT_RETENTION_JOBS  # at most this many jobs are kept (0: no count limit)
    control_idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # an idle or incomplete control connection is closed
    control_max_connections: int = DEFAULT_MAX_CONNECTIONS  # open control connections at once
    web: str | None = None  # the dashboard's endpoint (and the API beside it), if any
    metrics: str | None = None  # an endpoint serving only /metrics, if any
    firmware_max_upload: int = DEFAULT_MAX_UPLOAD  # bytes a PUT /v1/firmware/NAME may carry
    on_job_end: str | None = None  # a command run (sh -c) with each ended job as JSON on stdin
    webhook: str | None = None  # a URL POSTed each ended job as JSON
    notify_timeout: float = DEFAULT_NOTIFY_TIMEOUT  # the command's time, and each webhook attempt's
    webhook_attempts: int = DEFAULT_WEBHOOK_ATTEMPTS  # webhook attempts in all (retries + 1)
    rescue: bool = False  # probe idle devices periodically and rescue those found in their loader
    rescue_interval: float = DEFAULT_RESCUE_INTERVAL  # seconds between two rescue probes
    timeouts: UpgradeTimeouts = field(default_factory=UpgradeTimeouts)
    behaviour: UpgradeBehaviour = field(default_factory=UpgradeBehaviour)
    devices: dict[str, DeviceConfig] = field(default_factory=dict)


@dataclass(frozen=True)
class _Spec:
    """What a key takes: its types (a bool is never a number), their name in messages, and for
    numbers the range (inclusive; ``above`` makes the lower bound exclusive)."""

    types: tuple[type, ...]
    description: str
    minimum: float | None = None
    maximum: float | None = None
    above: bool = False
    unit: str = ""


_STRING = _Spec((str,), "a string")
_BOOL = _Spec((bool,), "true or false")
# Kept for check_value's callers: key -> (accepted types, description used in messages).
_INT = ((int,), "an integer")
_NUMBER = ((int, float), "a number")

_DAEMON_KEYS: dict[str, _Spec] = {
    "control": _STRING,
    "state_dir": _STRING,
    "firmware_dir": _STRING,
    "max_parallel": _Spec((int,), "an integer", 1, 1024),
    "control_token": _STRING,
    "shutdown_grace": _Spec((int, float), "a number", 0, 3600, unit=" seconds"),
    "journal_retention_days": _Spec((int, float), "a number", 0, 36500, unit=" days"),
    "journal_retention_jobs": _Spec((int,), "an integer", 0, 100_000_000),
    "control_idle_timeout": _Spec((int, float), "a number", 0, 86400, above=True, unit=" seconds"),
    "control_max_connections": _Spec((int,), "an integer", 16, 65536),
    "web": _STRING,
    "metrics": _STRING,
    "firmware_max_upload": _Spec((int,), "an integer", 1024, 4 * 1024**3, unit=" bytes"),
    "on_job_end": _STRING,
    "webhook": _STRING,
    "notify_timeout": _Spec((int, float), "a number", 0, 3600, above=True, unit=" seconds"),
    "webhook_attempts": _Spec((int,), "an integer", 1, 20),
    "rescue": _BOOL,
    "rescue_interval": _Spec((int, float), "a number", 10, 86400, unit=" seconds"),
}

_DEVICE_KEYS: dict[str, _Spec] = {
    "host": _STRING,
    "ctp_port": _Spec((int,), "an integer"),
    "http_port": _Spec((int,), "an integer"),
    "ota_port": _Spec((int,), "an integer"),
    "interface": _STRING,
    "source_address": _STRING,
    "reconnect_command": _STRING,
    "expected_ssid": _STRING,
    "ftp_port": _Spec((int,), "an integer"),
    "ftp_user": _STRING,
    "ftp_password": _STRING,
}


def _keys_of(cls: type[UpgradeTimeouts] | type[UpgradeBehaviour]) -> dict[str, tuple[tuple[type, ...], str]]:
    keys: dict[str, tuple[tuple[type, ...], str]] = {}
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, bool):
            keys[f.name] = (_BOOL.types, _BOOL.description)
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


def check_value(source: str, key: str, value: Any, spec: tuple[tuple[type, ...], str] | _Spec) -> Any:
    """``value`` if it has the type ``spec`` asks for (a bool is never a number) and, for a
    :class:`_Spec` with a range, lies in it; else ConfigError. Numbers are compared exactly (a
    400-digit integer is out of range, never an overflow)."""
    if isinstance(spec, _Spec):
        types, description = spec.types, spec.description
    else:
        types, description = spec
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(source, key, f"must be {description}, not {value!r}")
    if not isinstance(value, types):
        raise ConfigError(source, key, f"must be {description}, not {type(value).__name__} {_short(value)}")
    if isinstance(spec, _Spec) and isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_range(source, key, value, spec)
    return value


def _short(value: Any) -> str:
    """``repr(value)``, cut short: a message fits a line even for a 400-digit number."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"{str(value)[:12]}... ({len(str(abs(value)))} digits)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_range(source: str, key: str, value: float, spec: _Spec) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"must be a finite number, not {value!r}")
    low, high = spec.minimum, spec.maximum
    too_low = low is not None and (value <= low if spec.above else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        bounds = []
        if low is not None:
            bounds.append(f"more than {low:g}" if spec.above else f"at least {low:g}")
        if high is not None:
            bounds.append(f"at most {high:g}")
        raise ConfigError(source, key, f"must be {' and '.join(bounds)}{spec.unit}, not {_short(value)}")


#: Timeouts that may be 0 (0 turns the keep-alive off); every other duration must be positive.
MAY_BE_ZERO = {"keepalive_interval"}


def check_timeout(source: str, key: str, name: str, value: Any) -> Any:
    """``value`` as the timeout ``name`` (full key ``key`` in messages) takes it, or ConfigError: the
    right type, finite (TOML and JSON both allow nan and inf, which would break the reactor's timers),
    a count from 0 to MAX_COUNT, a duration positive and at most MAX_SECONDS. Durations come back as
    floats."""
    types, description = TIMEOUT_KEYS[name]
    value = check_value(source, key, value, (types, description))
    if types == _BOOL.types:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(source, key, f"must be a finite number, not {value!r}")
    if types == _INT[0]:
        if value < 0:
            raise ConfigError(source, key, f"must not be negative, not {_short(value)}")
        if value > MAX_COUNT:
            raise ConfigError(source, key, f"must be at most {MAX_COUNT}, not {_short(value)}")
        return value
    if value < 0 or (value == 0 and name not in MAY_BE_ZERO):
        raise ConfigError(source, key, f"must be a positive number of seconds, not {_short(value)}")
    if value > MAX_SECONDS:
        raise ConfigError(source, key, f"must be at most {MAX_SECONDS:g} seconds (a week), not {_short(value)}")
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


def _has_control_characters(text: str) -> bool:
    return any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in text)


def check_text(source: str, key: str, value: str, max_length: int = MAX_PATH) -> str:
    """A string value a person wrote: not empty, no control characters (a NUL would break every
    path and socket call), at most ``max_length`` characters."""
    if not value.strip():
        raise ConfigError(source, key, "must not be empty (leave it out instead)")
    if _has_control_characters(value):
        raise ConfigError(source, key, f"must not contain control characters, not {_short(value)}")
    if len(value) > max_length:
        raise ConfigError(source, key, f"must be at most {max_length} characters long, not {len(value)}")
    return value


def _port(source: str, key: str, value: int) -> int:
    if not 1 <= value <= 65535:
        raise ConfigError(source, key, f"must be a TCP port between 1 and 65535, not {_short(value)}")
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


#: Longest value of a device's string keys (a host name is at most 253 characters).
_MAX_DEVICE_TEXT = {"host": 253, "source_address": 15, "expected_ssid": 32}


def _parse_device(
    source: str, name: str, table: Any, timeouts: UpgradeTimeouts, behaviour: UpgradeBehaviour
) -> DeviceConfig:
    prefix = f"devices.{name}"
    if not isinstance(table, dict):
        raise ConfigError(source, prefix, "must be a table ([devices.NAME])")
    values: dict[str, Any] = {}
    tags: tuple[str, ...] = ()
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
        if key == "tags":
            tags = _parse_tags(source, full, value)
            continue
        if key not in _DEVICE_KEYS:
            raise ConfigError(
                source, full, f"unknown key (known: {', '.join(sorted(_DEVICE_KEYS))}, tags, timeouts, behaviour)"
            )
        value = check_value(source, full, value, _DEVICE_KEYS[key])
        if key.endswith("_port"):
            _port(source, full, value)
            values[key] = value
            continue
        check_text(source, full, value, _MAX_DEVICE_TEXT.get(key, MAX_PATH))
        if key == "interface":
            _interface_name(source, full, value)
        elif key == "source_address":
            _ipv4_address(source, full, value)
        elif key == "expected_ssid" and len(value.encode("utf-8")) > 32:
            raise ConfigError(source, full, f"an SSID is at most 32 bytes, not {len(value.encode('utf-8'))}")
        values[key] = value
    if "host" not in values:
        raise ConfigError(source, f"{prefix}.host", 'missing (the device\'s address, e.g. "192.168.1.1")')
    return DeviceConfig(
        target=DeviceTarget(name=name, **values), timeouts=device_timeouts, behaviour=device_behaviour, tags=tags
    )


def _parse_tags(source: str, key: str, value: Any) -> tuple[str, ...]:
    """A device's ``tags``: a list of short names (letters, digits, ``_ . : -``), each once."""
    if not isinstance(value, list):
        raise ConfigError(
            source, key, f'must be a list of tag names (tags = ["shelf1", "camera"]), not {_short(value)}'
        )
    if len(value) > MAX_TAGS:
        raise ConfigError(source, key, f"must have at most {MAX_TAGS} tags, not {len(value)}")
    tags: list[str] = []
    for tag in value:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise ConfigError(
                source,
                key,
                f"{_short(tag)} is not a tag name (1 to 64 letters, digits, '_', '.', ':' or '-', starting "
                "with a letter or digit)",
            )
        if tag in tags:
            raise ConfigError(source, key, f"the tag {tag!r} is given twice")
        tags.append(tag)
    return tuple(tags)


def check_control_endpoint(source: str, description: str, token: str | None, key: str = "daemon.control") -> str:
    """The control endpoint to listen on, checked with the parser the daemon listens with. A UNIX
    socket without ``mode=`` gets ``mode=660``; UNIX and TCP sockets get a listen backlog of
    DEFAULT_BACKLOG unless the string sets one. A TCP endpoint (or any other network one) is refused
    unless it binds loopback or a bearer token is configured: the control API can reflash every
    device. ``key``: the config key it came from (``daemon.web`` and ``daemon.metrics`` follow the
    same rule)."""
    kind, args, kwargs = split_endpoint(description)
    _check_control_access(source, description, token, key)
    problem = server_endpoint_problem(description)
    if problem is not None:
        raise ConfigError(source, key, f"{description!r} is not a usable endpoint string: {problem}")
    if kind == "unix":
        description = with_default(description, "mode", "660")
        return with_default(description, "backlog", DEFAULT_BACKLOG)
    if kind in NETWORK_KINDS:
        return with_default(description, "backlog", DEFAULT_BACKLOG)
    return description


def _check_control_access(source: str, description: str, token: str | None, key: str) -> None:
    """Without a token, only endpoints a remote host can't reach."""
    if token is not None:
        return
    kind, args, kwargs = split_endpoint(description)
    if kind == "unix":
        return
    if kind == "systemd":
        if kwargs.get("domain", "").upper() != "UNIX":  # "unix" is UNIX mistyped: the parser says so
            raise ConfigError(
                source,
                key,
                f"{description!r}: a systemd socket with domain={kwargs.get('domain', '?')} may be reachable from "
                "the network; use domain=UNIX or set daemon.control_token",
            )
        return
    if kind in NETWORK_KINDS:
        interface = tcp_interface(args, kwargs)
        if not is_loopback(interface):
            raise ConfigError(
                source,
                key,
                f"{description!r} listens on {interface or 'every address'}: a TCP endpoint must "
                "bind loopback (interface=127.0.0.1) unless daemon.control_token is set",
            )
        return
    raise ConfigError(
        source,
        key,
        f"{description!r}: only unix:, systemd:domain=UNIX and loopback tcp: endpoints are allowed "
        "without daemon.control_token",
    )


#: The characters a bearer token may have: visible ASCII (RFC 6750's b64token is a subset), so the
#: header a client sends and the configured token are the same bytes.
_TOKEN = re.compile(r"[\x21-\x7e]{1,1024}")


def check_token(source: str, token: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise ConfigError(
            source,
            "daemon.control_token",
            "must be 1 to 1024 visible ASCII characters (letters, digits, punctuation; no spaces or accents), "
            "e.g. the output of `openssl rand -hex 32`",
        )
    return token


def _check_device_name(source: str, name: str) -> None:
    if not name or "/" in name or name.strip() != name or _has_control_characters(name) or len(name) > MAX_DEVICE_NAME:
        raise ConfigError(
            source,
            f"devices.{name}",
            f"a device name must be 1 to {MAX_DEVICE_NAME} characters, without '/', control characters or "
            "spaces around it",
        )


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
        check_text(source, f"daemon.{key}", values[key])
    token = values.get("control_token")
    if token is not None:
        if not token.strip():
            raise ConfigError(source, "daemon.control_token", "must not be empty (leave it out instead)")
        check_token(source, token)
    control = check_control_endpoint(source, values["control"], token)
    extra_endpoints: dict[str, str] = {}
    for key in ("web", "metrics"):
        if key in values:
            check_text(source, f"daemon.{key}", values[key])
            extra_endpoints[key] = check_control_endpoint(source, values[key], token, f"daemon.{key}")
    on_job_end = values.get("on_job_end")
    if on_job_end is not None:
        check_text(source, "daemon.on_job_end", on_job_end)
    webhook = values.get("webhook")
    if webhook is not None:
        from netota_daemon.daemon.notify import NotifyConfigError, check_webhook_url

        try:
            check_webhook_url(webhook)
        except NotifyConfigError as e:
            raise ConfigError(source, "daemon.webhook", str(e)) from None

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
        _check_device_name(source, name)
        devices[name] = _parse_device(source, name, table, timeouts, behaviour)

    return DaemonConfig(
        source=source,
        control=control,
        state_dir=(base_dir / values["state_dir"]),
        firmware_dir=(base_dir / values["firmware_dir"]),
        max_parallel=values.get("max_parallel", DEFAULT_MAX_PARALLEL),
        control_token=token,
        shutdown_grace=float(values.get("shutdown_grace", DEFAULT_SHUTDOWN_GRACE)),
        journal_retention_days=float(values.get("journal_retention_days", DEFAULT_RETENTION_DAYS)),
        journal_retention_jobs=values.get("journal_retention_jobs", DEFAULT_RETENTION_JOBS),
        control_idle_timeout=float(values.get("control_idle_timeout", DEFAULT_IDLE_TIMEOUT)),
        control_max_connections=values.get("control_max_connections", DEFAULT_MAX_CONNECTIONS),
        web=extra_endpoints.get("web"),
        metrics=extra_endpoints.get("metrics"),
        firmware_max_upload=values.get("firmware_max_upload", DEFAULT_MAX_UPLOAD),
        on_job_end=on_job_end,
        webhook=webhook,
        notify_timeout=float(values.get("notify_timeout", DEFAULT_NOTIFY_TIMEOUT)),
        webhook_attempts=values.get("webhook_attempts", DEFAULT_WEBHOOK_ATTEMPTS),
        rescue=values.get("rescue", False),
        rescue_interval=float(values.get("rescue_interval", DEFAULT_RESCUE_INTERVAL)),
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
    except ValueError as e:  # an integer Python won't convert from text
        problem = "an integer has more than 4300 digits" if "digits" in str(e) else str(e)
        raise ConfigError(source, None, f"not valid TOML: {problem}") from None
    except RecursionError:
        raise ConfigError(source, None, "not valid TOML: arrays or tables nested too deep") from None
    try:
        return parse_config(data, source, base_dir=Path(source).resolve().parent)
    except ConfigError as e:
        raise with_line(e) from None


def with_line(error: ConfigError) -> ConfigError:
    """``error`` with the line of its key in its source file (``file:LINE``), when the file has one."""
    if not error.key:
        return error
    try:
        text = Path(error.source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError):
        return error
    line = locate_key(text, error.key)
    if line is None:
        return error
    return ConfigError(f"{error.source}:{line}", error.key, error.problem)


def _user() -> str:
    import pwd

    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_directories(config: DaemonConfig, access: Callable[[Path, int], bool] | None = None) -> None:
    """Check, at start-up, that the daemon's user can use its directories: ``state_dir`` (created
    if missing) readable and writable, ``firmware_dir`` an existing readable directory. A failure is a
    ConfigError naming the file, the line, the key and the reason. ``access`` is :func:`os.access`
    (a test passes its own to play a user without rights)."""
    allowed = access or (lambda path, mode: os.access(path, mode))
    source = config.source

    def refuse(key: str, problem: str) -> ConfigError:
        return with_line(ConfigError(source, f"daemon.{key}", problem))

    state = config.state_dir
    if not state.exists():
        try:
            state.mkdir(parents=True)
        except OSError as e:
            raise refuse("state_dir", f"{state} does not exist and can't be created: {e.strerror}") from None
    if not state.is_dir():
        raise refuse("state_dir", f"{state} is not a directory")
    if not allowed(state, os.R_OK | os.W_OK | os.X_OK):
        raise refuse("state_dir", f"{state} is not readable and writable by {_user()}")
    firmware = config.firmware_dir
    if not firmware.exists():
        raise refuse("firmware_dir", f"{firmware} does not exist (create it and put the images there)")
    if not firmware.is_dir():
        raise refuse("firmware_dir", f"{firmware} is not a directory")
    if not allowed(firmware, os.R_OK | os.X_OK):
        raise refuse("firmware_dir", f"{firmware} can't be read by {_user()}")


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
