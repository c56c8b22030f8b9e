"""``FirmwareCatalog``: listing, adding and removing images in a real temporary ``firmware_dir``."""

from __future__ import annotations

import binascii
import hashlib
import importlib.util
import io
import os
import struct

import pytest

from netota_daemon.daemon.firmware_catalog import CatalogError, FirmwareCatalog, check_name

# wire/firmware_kind.py comes with the simulator's image kinds; until it is in the tree the catalogue
# lists no kind (None), which is what these tests then expect.
HAVE_KIND = importlib.util.find_spec("netota_daemon.wire.firmware_kind") is not None


def jl_file_head(name: str, size: int) -> bytes:
    """A 32-byte JL file head (double backup) with a valid CRC-16/XMODEM over bytes 2..31."""
    body = struct.pack("<HHIIBBH16s", 0, 0, 0, size, 0, 0, 0, name.encode())[2:]
    return binascii.crc_hqx(body, 0).to_bytes(2, "little") + body


class Interrupted(Exception):
    pass


class BrokenBody(io.RawIOBase):
    """A body that ends in an error after ``good`` bytes (the client went away mid-upload)."""

    def __init__(self, good: int) -> None:
        self.left = good

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise Interrupted("connection lost")
        chunk = min(self.left, 100_000 if n < 0 else n)
        self.left -= chunk
        return b"x" * chunk


def visible(directory) -> list[str]:
    return sorted(os.listdir(directory))


def test_list_names_sizes_hashes_and_kinds(tmp_path):
    single = b"NOTASIM\x01" + (100).to_bytes(4, "little") + bytes(4) + b"y" * 84
    (tmp_path / "a.bin").write_bytes(single)
    (tmp_path / "b.bin").write_bytes(jl_file_head("update_data", 64) + b"z" * 32)
    (tmp_path / "junk.txt").write_bytes(b"hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".upload-x.partial").write_bytes(b"half")
    (tmp_path / "link.bin").symlink_to(tmp_path / "a.bin")
    items = {i.name: i for i in FirmwareCatalog(tmp_path).list()}
    assert sorted(items) == ["a.bin", "b.bin", "junk.txt"]
    assert items["a.bin"].size == 100 and items["a.bin"].sha256 == hashlib.sha256(single).hexdigest()
    assert items["a.bin"].modified == pytest.approx(os.stat(tmp_path / "a.bin").st_mtime)
    kinds = {name: item.kind for name, item in items.items()}
    if HAVE_KIND:
        assert kinds == {"a.bin": "single_backup", "b.bin": "double_backup", "junk.txt": "unknown"}
    else:
        assert kinds == {"a.bin": None, "b.bin": None, "junk.txt": None}
    assert set(items["a.bin"].to_json()) == {"name", "size", "sha256", "modified", "kind", "description", "version"}


def test_add_writes_the_whole_body_under_its_name_and_nothing_else(tmp_path):
    catalog = FirmwareCatalog(tmp_path)
    data = os.urandom(1_000_000)
    item = catalog.add("new.ufw", io.BytesIO(data))
    assert (tmp_path / "new.ufw").read_bytes() == data
    assert item.sha256 == hashlib.sha256(data).hexdigest() and item.size == len(data)
    assert visible(tmp_path) == ["new.ufw"]
    catalog.add("new.ufw", io.BytesIO(b"second"))  # PUT replaces
    assert (tmp_path / "new.ufw").read_bytes() == b"second"


def test_an_interrupted_or_oversized_upload_leaves_nothing_behind(tmp_path):
    catalog = FirmwareCatalog(tmp_path, max_upload=500_000)
    (tmp_path / "keep.bin").write_bytes(b"old")
    with pytest.raises(Interrupted):
        catalog.add("keep.bin", BrokenBody(300_000))
    with pytest.raises(CatalogError) as e:
        catalog.add("big.bin", io.BytesIO(b"x" * 500_001))
    assert e.value.reason == "too_large"
    with pytest.raises(CatalogError) as e:
        catalog.add("empty.bin", io.BytesIO(b""))
    assert e.value.reason == "empty"
    assert visible(tmp_path) == ["keep.bin"]
    assert (tmp_path / "keep.bin").read_bytes() == b"old"


def test_a_file_in_use_is_neither_replaced_nor_removed(tmp_path):
    (tmp_path / "v2.bin").write_bytes(b"image")
    in_use = {"v2.bin"}
    catalog = FirmwareCatalog(tmp_path, in_use=lambda: in_use)
    for action in (lambda: catalog.remove("v2.bin"), lambda: catalog.add("v2.bin", io.BytesIO(b"new"))):
        with pytest.raises(CatalogError) as e:
            action()
        assert e.value.reason == "in_use" and "v2.bin" in e.value.message
    assert (tmp_path / "v2.bin").read_bytes() == b"image"
    in_use.clear()
    assert catalog.remove("v2.bin").name == "v2.bin"
    assert visible(tmp_path) == []
    with pytest.raises(CatalogError) as e:
        catalog.remove("v2.bin")
    assert e.value.reason == "not_found"


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../etc/passwd",
        "a/b.bin",
        "/abs.bin",
        "..\\x",
        ".hidden",
        "a\x00b",
        "tab\tname",
        "x" * 256,
        "\ud800",
    ],
)
def test_bad_names_are_refused_before_anything_is_touched(tmp_path, name):
    with pytest.raises(CatalogError) as e:
        FirmwareCatalog(tmp_path).add(name, io.BytesIO(b"data"))
    leaves = "/" in name or "\\" in name or name in (".", "..")
    assert e.value.reason == ("outside" if leaves else "bad_name")
    assert visible(tmp_path) == []
    with pytest.raises(CatalogError):
        check_name(name)


def test_a_symlink_or_directory_name_is_not_replaced(tmp_path):
    outside = tmp_path.parent / (tmp_path.name + "-outside.bin")
    outside.write_bytes(b"outside")
    (tmp_path / "link.bin").symlink_to(outside)
    (tmp_path / "dir.bin").mkdir()
    catalog = FirmwareCatalog(tmp_path)
    for name in ("link.bin", "dir.bin"):
        with pytest.raises(CatalogError) as e:
            catalog.add(name, io.BytesIO(b"data"))
        assert e.value.reason == "bad_name"
    assert outside.read_bytes() == b"outside"


def test_partials_left_by_a_crash_are_removed_at_start(tmp_path):
    (tmp_path / ".upload-abc.partial").write_bytes(b"half")
    (tmp_path / "v1.bin").write_bytes(b"x")
    assert FirmwareCatalog(tmp_path).remove_partials() == [".upload-abc.partial"]
    assert visible(tmp_path) == ["v1.bin"]
