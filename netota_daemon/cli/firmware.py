"""``netota firmware inspect FILE``: which kind of upgrade image a file is, before it is sent anywhere.

The kind comes from the file's first bytes (``netota_daemon/wire/firmware_kind.py``): a UFW
container is a single-backup image (served over the 3335 stream), a JL file head named
``update_data`` a double-backup one (uploaded over FTP); the two can't cross-upgrade, and the
engine refuses an image of the other kind before it sends anything. Recognition is best effort:
its limits are printed with the answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from netota_daemon.cli import arguments
from netota_daemon.cli.exit_codes import EXIT_USAGE
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


def add_parser(subparsers: arguments.Subcommands) -> None:
    parser = subparsers.add_parser(
        "firmware",
        help="Look at firmware images.",
        description="Look at firmware images.",
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
