"""Which kind of upgrade image a file is, from its first bytes: best effort, no I/O.

Single-backup devices (``ota_type`` "1") take a UFW container (``update.ufw``) over the 3335 stream;
double-backup devices (``ota_type`` "0") take ``db_update_files_data.bin`` (uploaded over FTP as
``update-ota.ufw``). The two can't cross-upgrade, so the app checks the kind before it sends anything.
:func:`identify` looks at the first :data:`HEAD_BYTES` bytes; :func:`identify_file_bytes` looks at a
whole file, which also reads the version of a simulator test image from its trailer.

Recognised, in this order:

``single_backup`` / simulator test image
    ``b"NOTASIM\\x01"`` | u32 total length | u32 0, then the body, then a 72-byte trailer
    ``b"NOTATRL\\x01"`` | version (32 bytes, NUL-padded ASCII) | SHA-256 of every byte before the
    trailer. Made by ``netota sim make-image`` (``--kind single``, the default).

``double_backup`` (a JL file head named ``update_data``; the simulator's ``--kind double`` images too)
    32 bytes, little-endian, ``<HHIIBBH16s``: head CRC16 (over bytes 2..31), data CRC16, offset,
    size, attr, reserved, index, name (NUL-padded). The dual-bank writer checks this head's CRC and
    its name ``update_data`` on the first write (research notes on the FTP route, ``update.a``). The
    field layout is that of the JL file entries in kagaimiq/jl-misctools
    (``firmware/fwunpack_newfw.py``, ``JLFSEntry``). A simulator test image of this kind is that
    head (size = the file's length, data CRC over the body between the head and the trailer)
    followed by the body and the same trailer as above.

``single_backup`` (a UFW container)
    No plaintext magic: the 0x40-byte header is XOR-scrambled with JieLi's "ENC" cipher (key
    0xFFFF; see :func:`enc_cipher`). Descrambled: u16 header CRC16 (over bytes 2..0x3F), u16 entry
    list CRC, u32 image size, u16 entry count, u16 ?, u32 ?, char chip name[48]. Recognised by the
    header CRC and an entry count of at least 1.

``unknown``
    Anything else (including a file too short to tell).

Limits (say them wherever a kind is shown):

- The UFW layout and the cipher are third-party reverse engineering (kagaimiq/jl-misctools at
  ``0a5b12db``: ``firmware/fwunpack_newfw.py``, ``jltech/cipher.py``, ``jltech/crc.py``), **not
  checked against an AC79 file**. Only the header CRC is checked; the entry list is not parsed.
- The ``update_data`` head is checked as the device's writer is described to check it (head CRC,
  name); no real ``db_update_files_data.bin`` was available. Whether the head is stored scrambled in
  some builds is not known: a scrambled head reads as ``unknown``. Its size and data CRC are not
  checked against the file, except in simulator test images, whose meaning of them is our own.
- A 16-bit CRC matches random bytes once in 65 536 tries: ``unknown`` is never proof that a file is
  not an image, and a recognised kind is strong evidence, not proof.

JieLi's CRC16 is CRC-16/XMODEM (polynomial 0x1021, initial value 0, not reflected), which is
:func:`binascii.crc_hqx` with a start value of 0.
"""

from __future__ import annotations

import binascii
import enum
import hashlib
import struct
from dataclasses import dataclass

#: How many first bytes :func:`identify` needs to tell every kind it knows (the UFW header).
HEAD_BYTES = 0x40

# -- JieLi's CRC16 and "ENC" cipher -----------------------------------------------------------------
ENC_KEY = 0xFFFF
_ENC_POLY = 0x1021


def crc16(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """JieLi's CRC16 (CRC-16/XMODEM): ``crc16(b"123456789") == 0x31C3``."""
    return binascii.crc_hqx(data, crc)


def enc_cipher(data: bytes | bytearray | memoryview, key: int = ENC_KEY) -> bytes:
    """JieLi's "ENC" scrambling: each byte is XORed with the low byte of a 16-bit key, and the key
    is then shifted left once, XORed with 0x1021 when its top bit was set. Its own inverse."""
    out = bytearray(data)
    for i in range(len(out)):
        out[i] ^= key & 0xFF
        key = ((key << 1) ^ (_ENC_POLY if key & 0x8000 else 0)) & 0xFFFF
    return bytes(out)


# -- the simulator's test images ------------------------------------------------------------------
TEST_HEAD_MAGIC = b"NOTASIM\x01"
TEST_TRAILER_MAGIC = b"NOTATRL\x01"
TEST_HEAD = struct.Struct("<8sII")  # magic, total length, 0
TEST_TRAILER = struct.Struct("<8s32s32s")  # magic, version (NUL-padded ASCII), SHA-256
TEST_VERSION_BYTES = 32


@dataclass(frozen=True)
class TestTrailer:
    """What a simulator test image's trailer says."""

    __test__ = False  # not a pytest test class, whatever its name

    version: str
    sha256: str  # hex, of every byte before the trailer


def parse_test_trailer(data: bytes | bytearray | memoryview) -> TestTrailer | None:
    """The trailer at the end of ``data``, or None when there is none."""
    if len(data) < TEST_TRAILER.size:
        return None
    magic, version, digest = TEST_TRAILER.unpack_from(data, len(data) - TEST_TRAILER.size)
    if magic != TEST_TRAILER_MAGIC:
        return None
    return TestTrailer(bytes(version).rstrip(b"\x00").decode("ascii", "replace"), bytes(digest).hex())


# -- the JL file head (double backup) -------------------------------------------------------------
JL_FILE_HEAD = struct.Struct("<HHIIBBH16s")
JL_FILE_HEAD_SIZE = JL_FILE_HEAD.size  # 32
DOUBLE_BACKUP_HEAD_NAME = "update_data"


@dataclass(frozen=True)
class JlFileHead:
    """A decoded 32-byte JL file head whose head CRC checked out."""

    head_crc: int
    data_crc: int
    offset: int
    size: int
    attr: int
    reserved: int
    index: int
    name: str


def build_jl_file_head(
    name: str, size: int, data_crc: int, offset: int = 0, attr: int = 0, reserved: int = 0, index: int = 0
) -> bytes:
    """A 32-byte JL file head with a valid head CRC (for test images and tests)."""
    encoded = name.encode("ascii")
    if len(encoded) > 16:
        raise ValueError(f"a JL file head name has at most 16 bytes, got {name!r}")
    body = JL_FILE_HEAD.pack(0, data_crc, offset, size, attr, reserved, index, encoded)[2:]
    return crc16(body).to_bytes(2, "little") + body


def parse_jl_file_head(head: bytes | bytearray | memoryview) -> JlFileHead | None:
    """The JL file head at the start of ``head``, or None when its CRC does not check out."""
    if len(head) < JL_FILE_HEAD_SIZE:
        return None
    raw = bytes(head[:JL_FILE_HEAD_SIZE])
    head_crc, data_crc, offset, size, attr, reserved, index, name = JL_FILE_HEAD.unpack(raw)
    if crc16(raw[2:]) != head_crc:
        return None
    text = name.split(b"\x00", 1)[0].decode("latin-1")
    return JlFileHead(head_crc, data_crc, offset, size, attr, reserved, index, text)


# -- the UFW container header (single backup) -----------------------------------------------------
UFW_HEADER = struct.Struct("<HHIHHI48s")
UFW_HEADER_SIZE = UFW_HEADER.size  # 0x40


@dataclass(frozen=True)
class UfwHeader:
    """A descrambled UFW header whose CRC checked out (fields as reverse-engineered)."""

    header_crc: int
    list_crc: int
    image_size: int
    entry_count: int
    chip_name: str


def build_ufw_header(image_size: int, entry_count: int, chip_name: str, list_crc: int = 0) -> bytes:
    """A scrambled 0x40-byte UFW header with a valid CRC (for tests: no real file was available)."""
    body = UFW_HEADER.pack(0, list_crc, image_size, entry_count, 0, 0, chip_name.encode("ascii"))[2:]
    return enc_cipher(crc16(body).to_bytes(2, "little") + body)


def parse_ufw_header(head: bytes | bytearray | memoryview) -> UfwHeader | None:
    """The UFW header at the start of ``head``, or None when it does not descramble to one."""
    if len(head) < UFW_HEADER_SIZE:
        return None
    plain = enc_cipher(head[:UFW_HEADER_SIZE])
    header_crc, list_crc, image_size, entry_count, _, _, chip = UFW_HEADER.unpack(plain)
    if crc16(plain[2:]) != header_crc or entry_count < 1:
        return None
    text = chip.split(b"\x00", 1)[0].decode("ascii", "replace")
    return UfwHeader(header_crc, list_crc, image_size, entry_count, text)


# -- identification -------------------------------------------------------------------------------
class FirmwareKind(str, enum.Enum):
    """The kind of an upgrade image."""

    SINGLE_BACKUP = "single_backup"  # a UFW container, served on 3335
    DOUBLE_BACKUP = "double_backup"  # db_update_files_data.bin, uploaded over FTP
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class FirmwareKindInfo:
    """What :func:`identify` or :func:`identify_file_bytes` found.

    ``version``: only where the format carries one (a test image's trailer, which only
    :func:`identify_file_bytes` reads). ``declared_size``: the length the head declares (a test
    image's head, a JL file head), else None. ``intact``: whether a simulator test image checked out
    whole (length, data CRC, SHA-256), as :func:`identify_file_bytes` judges it; None where nothing
    was checked (real images: nothing here can check them)."""

    kind: FirmwareKind
    description: str
    version: str | None = None
    test_image: bool = False
    declared_size: int | None = None
    intact: bool | None = None


def identify(head: bytes | bytearray | memoryview) -> FirmwareKindInfo:
    """The kind of the image that starts with ``head`` (pass at least :data:`HEAD_BYTES` bytes;
    fewer can only recognise the shorter heads). Never raises for any bytes."""
    head = bytes(head[:HEAD_BYTES])
    if len(head) >= TEST_HEAD.size:
        magic, length, _ = TEST_HEAD.unpack_from(head, 0)
        if magic == TEST_HEAD_MAGIC:
            return FirmwareKindInfo(
                FirmwareKind.SINGLE_BACKUP,
                f"simulator test image, single backup ({length} bytes)",
                test_image=True,
                declared_size=length,
            )
    jl_head = parse_jl_file_head(head)
    if jl_head is not None:
        if jl_head.name == DOUBLE_BACKUP_HEAD_NAME:
            return FirmwareKindInfo(
                FirmwareKind.DOUBLE_BACKUP,
                f"double-backup image (JL file head {DOUBLE_BACKUP_HEAD_NAME!r}, {jl_head.size} bytes)",
                declared_size=jl_head.size,
            )
        return FirmwareKindInfo(FirmwareKind.UNKNOWN, f"a JL file head named {jl_head.name!r}, not an upgrade image")
    ufw = parse_ufw_header(head)
    if ufw is not None:
        chip = f" for {ufw.chip_name!r}" if ufw.chip_name else ""
        return FirmwareKindInfo(
            FirmwareKind.SINGLE_BACKUP, f"single-backup image (UFW container{chip}, {ufw.entry_count} entries)"
        )
    if len(head) < HEAD_BYTES:
        return FirmwareKindInfo(FirmwareKind.UNKNOWN, f"too short to recognise ({len(head)} bytes)")
    return FirmwareKindInfo(FirmwareKind.UNKNOWN, "not a recognised image (no UFW header, no update_data head)")


def identify_file_bytes(data: bytes | bytearray | memoryview) -> FirmwareKindInfo:
    """The kind of the whole file ``data``: :func:`identify`, plus what only the whole file can
    tell: a test image's version and integrity (length, data CRC, SHA-256 of its trailer), and a
    JL file head whose declared size differs from the file's. Never raises for any bytes."""
    info = identify(data[:HEAD_BYTES])
    size = len(data)
    if info.kind is FirmwareKind.UNKNOWN:
        return info
    trailer = parse_test_trailer(data)
    if info.test_image:
        if info.declared_size != size:
            return _damaged(info, info.description, f"the head says {info.declared_size} bytes, the file has {size}")
        if trailer is None:
            return _damaged(info, info.description, "its trailer is missing")
        return _check_test_image(info, info.description, data, trailer)
    if info.kind is FirmwareKind.DOUBLE_BACKUP:
        head = parse_jl_file_head(data)
        assert head is not None  # identify() just parsed it
        if trailer is not None:
            description = f"simulator test image, double backup ({head.size} bytes)"
            test_info = FirmwareKindInfo(info.kind, description, test_image=True, declared_size=head.size)
            if head.size != size:
                return _damaged(test_info, description, f"the head says {head.size} bytes, the file has {size}")
            if crc16(memoryview(data)[JL_FILE_HEAD_SIZE : size - TEST_TRAILER.size]) != head.data_crc:
                return _damaged(test_info, description, "data CRC mismatch")
            return _check_test_image(test_info, description, data, trailer)
        if head.size != size:
            return FirmwareKindInfo(
                info.kind,
                f"{info.description}; the head declares {head.size} bytes, the file has {size}",
                declared_size=head.size,
            )
    return info


def _check_test_image(
    info: FirmwareKindInfo, description: str, data: bytes | bytearray | memoryview, trailer: TestTrailer
) -> FirmwareKindInfo:
    digest = hashlib.sha256(memoryview(data)[: len(data) - TEST_TRAILER.size]).hexdigest()
    if digest != trailer.sha256:
        return _damaged(info, f"{description}, version {trailer.version}", "SHA-256 mismatch")
    return FirmwareKindInfo(
        info.kind, f"{description}, version {trailer.version}", trailer.version, True, info.declared_size, True
    )


def _damaged(info: FirmwareKindInfo, description: str, why: str) -> FirmwareKindInfo:
    return FirmwareKindInfo(info.kind, f"{description}; damaged: {why}", None, True, info.declared_size, False)
