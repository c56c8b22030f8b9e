"""The simulator's files in ``--state-dir``: ``events.jsonl``, ``phase<N>-received.bin``,
``db-received.bin`` (double backup: the last OTA upload), ``ports.json``.

Tests and users' CI read these to see what the device saw. Writes are small and synchronous.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


class StateWriter:
    """Writes into one directory (created if missing); a writer without a directory writes nothing."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def events_path(self) -> Path | None:
        return self.directory / "events.jsonl" if self.directory else None

    def append_event(self, event: dict[str, Any]) -> None:
        if self.directory is None:
            return
        with open(self.directory / "events.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(event, sort_keys=True) + "\n")

    def write_received(self, phase: int, data: bytes | bytearray) -> Path | None:
        """Replace ``phase<N>-received.bin`` with what the last session of that phase received."""
        if self.directory is None:
            return None
        return self._replace(f"phase{phase}-received.bin", bytes(data))

    def write_upload(self, data: bytes | bytearray) -> Path | None:
        """Replace ``db-received.bin`` with the bytes of the last OTA upload over FTP, as received."""
        if self.directory is None:
            return None
        return self._replace("db-received.bin", bytes(data))

    def write_ports(self, ports: dict[str, int], listen: str) -> Path | None:
        if self.directory is None:
            return None
        body = json.dumps({"listen": listen, **ports}, sort_keys=True) + "\n"
        return self._replace("ports.json", body.encode())

    def _replace(self, name: str, data: bytes) -> Path:
        assert self.directory is not None
        path = self.directory / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path
