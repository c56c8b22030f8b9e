"""``ImageFacts``: what the daemon knows of a firmware file before it flashes it (its SHA-256, its
kind, its size), read off the reactor.

A batch records them when it is created and compares them before each member's job (a file changed
under a batch stops it); rescue compares a job's recorded SHA-256 with the file as it is now. The
kind is told by an ``identify(head) -> str`` function from the file's first :data:`HEAD_BYTES`
bytes: :func:`netota_daemon.wire.firmware_kind.identify`, whose limits (recognition is best effort;
``unknown`` is no proof of a wrong image) apply here too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from netota_daemon.daemon.firmware_store import FirmwareRefused, FirmwareStore
from netota_daemon.wire import firmware_kind

#: How many first bytes ``identify`` is given (the UFW header is 0x40 bytes).
HEAD_BYTES = firmware_kind.HEAD_BYTES


@dataclass(frozen=True)
class ImageFacts:
    sha256: str
    kind: str  # single_backup | double_backup | unknown
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "kind": self.kind, "size": self.size}


class FirmwareProblem(Exception):
    """The firmware can't be used: ``reason`` is ``outside`` (leaves firmware_dir), ``not_found`` or
    ``invalid`` (unreadable, empty, not a file)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def identify_kind(head: bytes) -> str:
    """``single_backup``, ``double_backup`` or ``unknown``, from an image's first bytes."""
    return firmware_kind.identify(head).kind.value


def read_image_facts(store: FirmwareStore, name: str, identify: Callable[[bytes], str] | None = None) -> ImageFacts:
    """Open ``name`` in ``store`` and read its facts (blocking: run it off the reactor). The kind is
    the image's own (:attr:`FirmwareImage.kind`, as ``netota firmware inspect`` tells it), or what
    ``identify`` says of its first bytes."""
    try:
        image = store.open(name)
    except FirmwareRefused as e:
        raise FirmwareProblem(e.reason, e.message) from None
    kind = identify(bytes(image.read(0, HEAD_BYTES))) if identify is not None else image.kind.kind.value
    return ImageFacts(image.sha256(), kind if kind in ("single_backup", "double_backup") else "unknown", image.size)


class ImageInspector:
    """``inspect(name) -> Deferred[ImageFacts]`` on a thread of ``reactor``'s pool."""

    def __init__(self, reactor: Any, store: FirmwareStore, identify: Callable[[bytes], str] | None = None) -> None:
        self.reactor = reactor
        self.store = store
        self.identify = identify

    def __call__(self, name: str) -> Deferred[ImageFacts]:
        return deferToThreadPool(
            self.reactor, self.reactor.getThreadPool(), read_image_facts, self.store, name, self.identify
        )
