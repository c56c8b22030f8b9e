"""``netota firmware``: upgrade images, on this machine and in the daemon's ``firmware_dir``.

- ``inspect FILE`` (local, no daemon): which kind of upgrade image a file is, before it is sent
  anywhere. The kind comes from the file's first bytes (``netota_daemon/wire/firmware_kind.py``): a
  UFW container is a single-backup image (served over the 3335 stream), a JL file head named
  ``update_data`` a double-backup one (uploaded over FTP); the two can't cross-upgrade, and the
  engine refuses an image of the other kind before it sends anything. Recognition is best effort:
  its limits are printed with the answer.
- ``list``, ``add FILE [--name NAME] [--replace]``, ``rm NAME``: the daemon's catalogue, through
  ``GET /v1/firmware``, ``PUT /v1/firmware/NAME`` and ``DELETE /v1/firmware/NAME`` (the control
  client, :mod:`netota_daemon.cli.control_client`, with the other client commands' ``--control``,
  ``--token``, ``--json``, refusals and exit codes). ``add`` streams the file (never read whole
  into memory), hashing what it sends, and checks the daemon's SHA-256 of what it stored against
  that; it never overwrites an image of the same name unless told to (``If-None-Match: *``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
import sys
import time
from typing import Any, BinaryIO
from urllib.parse import quote

from netota_daemon.cli import arguments
from netota_daemon.cli.control_client import ApiRefused
from netota_daemon.cli.exit_codes import EXIT_FAILED, EXIT_USAGE
from netota_daemon.cli.output import print_json
from netota_daemon.cli.runner import add_client_command
from netota_daemon.cli.text import dash, format_bytes, format_short_time, kind_label, table
from netota_daemon.daemon.firmware_catalog import CatalogError, check_name
from netota_daemon.firmware import FirmwareError, FirmwareImage
from netota_daemon.wire.firmware_kind import FirmwareKind

LIMITS = (
    "Recognition is best effort: the UFW header layout is third-party reverse engineering, not "
    "checked against an AC79 file; a known kind is strong evidence, not proof, and 'unknown' is "
    "sent with a warning."
)

ROUTES = {
    FirmwareKind.SINGLE_BACKUP: "single-backup builds (ota_type 1): two phases over the OTA stream",
    FirmwareKind.DOUBLE_BACKUP: "double-backup builds (ota_type 0): an FTP upload",
    FirmwareKind.UNKNOWN: "either kind of build, with a warning: its kind can't be told",
}


EPILOG = """\
list, add and rm talk to the daemon: the control address is --control, else $NETOTA_CONTROL,
else unix:/run/netota/control.sock; a bearer token comes from --token or $NETOTA_TOKEN. --json
prints the API's own answer: {"firmware": [...]} (list), {"firmware": {...}} (add),
{"removed": {...}} (rm).

Exit codes: 0 done, 1 the daemon stored other bytes than add sent (the file changed while it was
sent: add it again), 64 bad arguments or a request refused as bad (a bad name, no such image,
larger than the daemon's firmware_max_upload), 69 the daemon can't be reached, 75 the name is
taken (add without --replace) or used by a queued or running job (409).
"""


def add_parser(subparsers: arguments.Subcommands) -> None:
    parser = subparsers.add_parser(
        "firmware",
        help="Look at firmware images, and list, add or remove the daemon's.",
        description="Look at firmware images (inspect, on this machine), and list, add or remove those\n"
        "in the daemon's firmware_dir (list, add, rm).",
        epilog=EPILOG,
        formatter_class=arguments.WrappingHelpFormatter,
    )
    commands = parser.add_subparsers(dest="firmware_command", metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="Tell which kind of image FILE is (single or double backup), its size, SHA-256 and version.",
        description="Tell which kind of upgrade image FILE is, from its first bytes, and which devices "
        "take it. " + LIMITS,
    )
    inspect.add_argument("file", metavar="FILE", help="the image file")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(func=inspect_command)

    def client_command(name: str, help_text: str, command: Any) -> argparse.ArgumentParser:
        return add_client_command(commands, name, help_text, command, EPILOG)

    client_command("list", "List the images in the daemon's firmware_dir: kind, version, size, SHA-256.", cmd_list)
    add = client_command(
        "add",
        "Upload FILE into the daemon's firmware_dir (streamed; written whole or not at all) and show what "
        "the daemon stored: name, size, SHA-256, kind.",
        cmd_add,
    )
    add.add_argument("file", metavar="FILE", help="the image file")
    add.add_argument("--name", help="the name to store it under (default: FILE's own name)")
    add.add_argument(
        "--replace",
        action="store_true",
        help="replace an image of that name (refused otherwise; never one a queued or running job uses)",
    )
    remove = client_command(
        "rm", "Remove the image NAME from the daemon's firmware_dir (not one a queued or running job uses).", cmd_rm
    )
    remove.add_argument("name", metavar="NAME", help="the image's name in firmware_dir")

    def no_command(args: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return EXIT_USAGE

    parser.set_defaults(func=no_command)


def describe(image: FirmwareImage) -> dict[str, Any]:
    """What ``inspect`` reports about ``image``, as the JSON object it prints."""
    info = image.kind
    return {
        "file": str(image.path),
        "size": image.size,
        "sha256": image.sha256(),
        "kind": info.kind.value,
        "description": info.description,
        "version": info.version,
        "test_image": info.test_image,
        "intact": info.intact,
        "for": ROUTES[info.kind],
        "limits": LIMITS,
    }


def inspect_command(args: argparse.Namespace) -> int:
    try:
        image = FirmwareImage(args.file)
    except FirmwareError as e:
        sys.stderr.write(f"netota firmware inspect: error: {e}\n")
        return EXIT_USAGE
    report = describe(image)
    if args.json:
        print(json.dumps(report, sort_keys=True))
        return 0
    intact = {True: "yes", False: "NO: damaged", None: "not checked (only simulator test images can be)"}
    lines = [
        f"file:        {report['file']}",
        f"kind:        {report['kind']} ({report['description']})",
        f"for:         {report['for']}",
        f"size:        {report['size']} bytes",
        f"sha256:      {report['sha256']}",
        f"version:     {report['version'] or 'not carried by this format'}",
        f"intact:      {intact[report['intact']]}",
        "",
        LIMITS,
    ]
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------- the daemon's catalogue


def _path(name: str) -> str:
    return f"/v1/firmware/{quote(name, safe='')}"


def _kind_text(item: dict[str, Any]) -> str:
    kind = kind_label(item.get("kind"))
    return f"{kind} ({item['description']})" if item.get("description") else kind


async def cmd_list(client: Any, args: argparse.Namespace) -> int:
    answer = await client.request("GET", "/v1/firmware")
    if args.json:
        print_json(answer)
        return 0
    items = answer["firmware"]
    if not items:
        print("no images in the daemon's firmware_dir (add one with netota firmware add FILE)")
        return 0
    now = time.time()
    rows = [
        [
            item["name"],
            kind_label(item.get("kind")),
            dash(item.get("version")),
            format_bytes(item["size"]),
            format_short_time(item.get("modified"), now),
            item["sha256"][:16] + "...",
        ]
        for item in items
    ]
    print(table(rows, ["NAME", "KIND", "VERSION", "SIZE", "MODIFIED", "SHA256"]))
    return 0


class HashingReader:
    """A binary file whose reads also feed a SHA-256 (what an upload sent). Seeking (the body
    producer measures the file's length first) is passed through; reads after a seek back are
    hashed again, so measure before reading."""

    def __init__(self, source: BinaryIO) -> None:
        self.source = source
        self.sha256 = hashlib.sha256()
        self.sent = 0

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        self.sha256.update(data)
        self.sent += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.source.seek(offset, whence)

    def tell(self) -> int:
        return self.source.tell()

    def close(self) -> None:
        self.source.close()


def open_upload(path: str) -> BinaryIO:
    """``path`` opened for an upload; ValueError (in words) if it can't be sent."""
    try:
        source = open(path, "rb")  # closed by the caller
    except OSError as e:
        raise ValueError(f"can't read {path}: {e.strerror or e}") from None
    info = os.fstat(source.fileno())
    if not stat.S_ISREG(info.st_mode):
        source.close()
        raise ValueError(f"{path} is not a regular file")
    if info.st_size == 0:
        source.close()
        raise ValueError(f"{path} is empty: an image has at least one byte")
    return source


async def cmd_add(client: Any, args: argparse.Namespace) -> int:
    name = args.name if args.name is not None else os.path.basename(args.file)
    try:
        check_name(name)  # the daemon's own rule, before any byte is sent
    except CatalogError as e:
        raise ValueError(f"can't store {args.file} as {name!r}: {e.message}") from None
    source = open_upload(args.file)
    headers = {} if args.replace else {b"If-None-Match": [b"*"]}
    with source:
        reader = HashingReader(source)
        try:
            answer = await client.upload(_path(name), reader, headers)
        except ApiRefused as e:
            if e.code != "firmware_exists":
                raise
            raise ApiRefused(e.status, e.code, f"{e.message}: --replace replaces it") from None
    stored = answer["firmware"]
    sent = reader.sha256.hexdigest()
    if stored.get("sha256") != sent or stored.get("size") != reader.sent:
        sys.stderr.write(
            f"netota: the daemon stored {stored.get('name')} with {stored.get('size')} bytes, sha256 "
            f"{stored.get('sha256')}, but {reader.sent} bytes with sha256 {sent} were sent: did {args.file} "
            "change while it was sent? add it again\n"
        )
        return EXIT_FAILED
    if args.json:
        print_json(answer)
        return 0
    print(
        "\n".join(
            [
                f"added:       {stored['name']}",
                f"size:        {stored['size']} bytes",
                f"sha256:      {stored['sha256']}",
                f"kind:        {_kind_text(stored)}",
                f"version:     {stored.get('version') or 'not carried by this format'}",
            ]
        )
    )
    return 0


async def cmd_rm(client: Any, args: argparse.Namespace) -> int:
    answer = await client.request("DELETE", _path(args.name))
    if args.json:
        print_json(answer)
        return 0
    removed = answer["removed"]
    print(f"removed {removed['name']} ({removed['size']} bytes, sha256 {removed['sha256']})")
    return 0
