"""The ``twistd netota`` plugin's options and service: ``twistd -n netota --config PATH``.

A configuration that can't be used stops start-up with one line (``netota: FILE:LINE: KEY: problem``),
never after twistd's usage text: config errors leave as ``SystemExit`` with that line, which twistd
prints as it is; only a mistake in the command's own options gets the usage text.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

from twisted.application.service import IService
from twisted.logger import ILogObserver, jsonFileLogObserver
from twisted.python import usage

from netota_daemon.daemon.config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    DaemonConfig,
    check_directories,
    load_config,
)
from netota_daemon.daemon.journal import JournalError

LOG_FORMATS = ("text", "json")
JSON_LOGGER = "netota_daemon.logs.json_log_observer"


def json_log_observer() -> ILogObserver:
    """JSON lines on stdout (one event a line), for log collectors."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")


def config_failure(error: ConfigError) -> SystemExit:
    """The one line start-up stops with."""
    return SystemExit(f"netota: {error}")


class Options(usage.Options):
    synopsis = "[--config PATH] [--log-format text|json]"
    longdesc = (
        "Run the netota firmware-upgrade daemon: a job queue for the devices in the config file, "
        "driven through the control API (see `netota --help`)."
    )
    optParameters: ClassVar[list[list[Any]]] = [
        ["config", "c", DEFAULT_CONFIG_PATH, "The TOML configuration file."],
        ["log-format", None, "text", "Log as human-readable text (default) or as JSON lines."],
    ]

    config: DaemonConfig

    def postOptions(self) -> None:
        if self["log-format"] not in LOG_FORMATS:
            raise usage.UsageError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, not {self['log-format']!r}")
        try:
            self.config = load_config(self["config"])
        except ConfigError as e:
            raise config_failure(e) from None
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None and not parent.get("logger"):
            # twistd makes its log observer from its own --logger option (a dotted name it imports
            # after parsing ours): the same as `twistd --logger netota_daemon.tap.json_log_observer`.
            parent["logger"] = JSON_LOGGER


def makeService(options: Any) -> IService:
    """The daemon for twistd, from the config :class:`Options` loaded and checked; directories,
    a journal or a control endpoint that can't be used stop start-up with one line."""
    # Imported here, so that parsing the options (and `twistd netota --help`) does not load the daemon.
    from netota_daemon.service import ControlEndpointError, NetotaService

    try:
        config = options.config if hasattr(options, "config") else load_config(options["config"])
        check_directories(config)
    except ConfigError as e:
        raise config_failure(e) from None
    try:
        return NetotaService(config)
    except (JournalError, ControlEndpointError) as e:
        raise SystemExit(f"netota: {e}") from None
