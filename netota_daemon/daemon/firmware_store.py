"""``FirmwareStore``: the only place the daemon reads images from (``firmware_dir``).

A client names a file relative to ``firmware_dir``; a name that leaves it (``..``, an absolute path,
a symlink pointing outside) is refused before anything is opened.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from netota_daemon.firmware import FirmwareError, FirmwareImage, open_image


class FirmwareRefused(Exception):
    """A firmware name the daemon will not open. ``reason`` is ``outside`` (leaves firmware_dir),
    ``not_found`` or ``invalid`` (unreadable, empty, not a file)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class FirmwareStore:
    def __init__(self, firmware_dir: str | os.PathLike[str]) -> None:
        self.firmware_dir = Path(firmware_dir)

    def resolve(self, name: str) -> Path:
        """The real path of ``name`` inside ``firmware_dir``, or :class:`FirmwareRefused`."""
        if not isinstance(name, str) or not name.strip():
            raise FirmwareRefused("invalid", "firmware must be a non-empty file name relative to firmware_dir")
        if "\0" in name:
            raise FirmwareRefused("invalid", "firmware name contains a NUL byte")
        pure = PurePosixPath(name)
        if pure.is_absolute() or name.startswith("~"):
            raise FirmwareRefused(
                "outside", f"firmware {name!r} is an absolute path: give a name relative to firmware_dir"
            )
        if ".." in pure.parts:
            raise FirmwareRefused("outside", f"firmware {name!r} leaves firmware_dir ('..' is not allowed)")
        root = os.path.realpath(self.firmware_dir)
        real = os.path.realpath(os.path.join(root, name))
        if os.path.commonpath([root, real]) != root:
            raise FirmwareRefused(
                "outside", f"firmware {name!r} is a symlink that leaves firmware_dir ({self.firmware_dir})"
            )
        if not os.path.exists(real):
            raise FirmwareRefused("not_found", f"firmware {name!r} does not exist in {self.firmware_dir}")
        return Path(real)

    def open(self, name: str) -> FirmwareImage:
        """The shared image for ``name`` (see :func:`netota_daemon.firmware.open_image`)."""
        path = self.resolve(name)
        try:
            return open_image(path)
        except FirmwareError as e:
            raise FirmwareRefused("invalid", str(e)) from None
