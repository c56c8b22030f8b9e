"""The description document: main firmware, the loader's fixed document, missing fields."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netota_daemon.wire.description import (
    LOADER_DOCUMENT,
    DescriptionError,
    main_firmware_document,
    parse_description,
)


def test_loader_document_is_454_bytes_and_means_phase_2():
    assert len(LOADER_DOCUMENT) == 454
    description = parse_description(LOADER_DOCUMENT)
    assert description.single_backup and description.in_loader
    assert description.firmware_version == "1.0.1"
    assert description.raw["match_app_type"] == "DVRunning2"


def test_main_document_with_spaces_means_phase_1():
    description = parse_description(main_firmware_document("2.3.4"))
    assert (description.ota_type, description.ota_step, description.firmware_version) == ("1", "0", "2.3.4")
    assert description.single_backup and not description.in_loader


def test_absent_ota_type_means_double_backup():
    description = parse_description(b'{"firmware_version":"1.0"}')
    assert description.ota_type is None and not description.single_backup and not description.in_loader


def test_double_backup_document():
    assert not parse_description(main_firmware_document("1", single_backup=False)).single_backup


def test_trailing_nul_and_whitespace_are_tolerated():
    assert parse_description(main_firmware_document("1") + b"\x00\r\n").ota_step == "0"


def test_numbers_instead_of_strings_are_read_as_text():
    description = parse_description(b'{"ota_type":1,"ota_step":1}')
    assert description.in_loader


@pytest.mark.parametrize("body", [b"", b"Error unexpected end of transmission", b"[]", b"\xff\xfe"])
def test_garbage_is_a_clear_error(body):
    with pytest.raises(DescriptionError):
        parse_description(body)


@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_description_error(body):
    try:
        parse_description(body)
    except DescriptionError:
        pass


def test_deeply_nested_json_is_a_clear_error():
    with pytest.raises(DescriptionError, match="nested too deeply"):
        parse_description(b"[" * 100_000)


@pytest.mark.parametrize("version", ['2.0"beta', "back\\slash", "\u00e9t\u00e9"])
def test_main_document_carries_any_version_text(version):
    description = parse_description(main_firmware_document(version, uuid='u"1'))
    assert description.firmware_version == version and description.raw["uuid"] == 'u"1'


def test_main_document_bytes_for_an_ordinary_version_are_unchanged():
    assert b' "firmware_version": "1.0.1","match_app_type": "DVRunning 2","uuid": "xxxxxx"}' in main_firmware_document(
        "1.0.1"
    )
