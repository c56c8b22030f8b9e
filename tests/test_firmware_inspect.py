"""``netota firmware inspect``: the kind, size, digest and version of an image, in words or JSON."""

from __future__ import annotations

import hashlib
import json

from netota_daemon.cli.main import main
from netota_daemon.wire.firmware_kind import build_ufw_header
from tests.images import image_bytes_of


def inspect(capsys, path, *extra):
    code = main(["firmware", "inspect", str(path), *extra])
    return code, capsys.readouterr()


def test_a_double_backup_test_image_is_told_with_its_version(tmp_path, capsys):
    path = tmp_path / "update-ota.ufw"
    path.write_bytes(image_bytes_of("double", version="3.1.4"))
    code, out = inspect(capsys, path, "--json")
    report = json.loads(out.out)
    assert code == 0
    assert (report["kind"], report["version"], report["intact"]) == ("double_backup", "3.1.4", True)
    assert report["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "FTP upload" in report["for"] and "best effort" in report["limits"]


def test_a_ufw_container_is_single_backup_and_its_limits_are_said(tmp_path, capsys):
    path = tmp_path / "update.ufw"
    path.write_bytes(build_ufw_header(4096, 3, "AC791N") + bytes(4096 - 64))
    code, out = inspect(capsys, path)
    assert code == 0
    assert "kind:        single_backup (single-backup image (UFW container for 'AC791N', 3 entries))" in out.out
    assert "not carried by this format" in out.out and "reverse engineering" in out.out


def test_an_unknown_file_says_so_and_a_missing_one_is_a_usage_error(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello, world\n" * 10)
    code, out = inspect(capsys, path, "--json")
    assert code == 0 and json.loads(out.out)["kind"] == "unknown"
    code, out = inspect(capsys, tmp_path / "missing.ufw")
    assert code == 64 and "does not exist" in out.err and out.out == ""
