"""FirmwareImage: byte ranges without copies, shared mappings, clear errors for unusable files."""

from __future__ import annotations

import os

import pytest

from netota_daemon.firmware import FirmwareError, FirmwareImage, open_image


def test_read_clamps_at_end_and_sums_ranges(tmp_path):
    path = tmp_path / "fw.ufw"
    data = bytes(range(256)) * 10
    path.write_bytes(data)
    image = FirmwareImage(path)
    assert image.size == 2560
    assert bytes(image.read(2500, 100)) == data[2500:]
    assert image.range_sum(10, 300) == sum(data[10:310])
    assert isinstance(image.read(0, 10), memoryview)


def test_open_image_shares_one_buffer_per_file_version(tmp_path):
    path = tmp_path / "fw.ufw"
    path.write_bytes(b"a" * 100)
    first = open_image(path)
    assert open_image(path) is first
    path.write_bytes(b"b" * 200)  # replaced on disk: a new version, a new buffer
    second = open_image(path)
    assert second is not first and bytes(second.read(0, 1)) == b"b" and second.size == 200


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.write_bytes(b""), "is empty"),
        (lambda p: p.mkdir(), "directory"),
    ],
)
def test_unusable_files_get_clear_errors(tmp_path, make, message):
    path = tmp_path / "fw.ufw"
    make(path)
    with pytest.raises(FirmwareError, match=message):
        open_image(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "fw.ufw"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(FirmwareError, match="not readable"):
        open_image(path)


def test_image_over_4_gib_is_refused_before_mapping(tmp_path):
    path = tmp_path / "huge.ufw"
    with open(path, "wb") as f:
        f.truncate(0xFFFFFFFF + 1)  # sparse: no disk space used
    with pytest.raises(FirmwareError, match="addresses at most"):
        open_image(path)


def test_a_file_truncated_in_place_does_not_change_an_open_image(tmp_path):
    path = tmp_path / "fw.ufw"
    path.write_bytes(b"A" * 5000)
    image = open_image(path)
    with open(path, "r+b") as f:  # someone copies a new image over the old one in place
        f.truncate(10)
        f.write(b"B" * 10)
    assert bytes(image.read(4990, 10)) == b"A" * 10  # the job keeps serving one consistent image
    assert image.range_sum(0, 5000) == ord("A") * 5000


def test_a_fifo_is_refused_without_hanging(tmp_path):
    path = tmp_path / "fw.ufw"
    os.mkfifo(path)
    with pytest.raises(FirmwareError, match="not a regular file"):
        open_image(path)
