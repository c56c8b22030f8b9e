"""End-to-end: the simulator over loopback, driven by tests/appclient.py (real reactor)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, threads
from twisted.internet.error import ConnectionRefusedError

from netota_daemon.sim.config import StallFault
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import build_image
from netota_daemon.wire.ctp import request
from netota_daemon.wire.description import DESCRIPTION_PATH, LOADER_DOCUMENT, parse_description
from netota_daemon.wire.ota import Status
from tests import appclient
from tests.sim_devices import start_device

HOST = "127.0.0.1"
IMAGE = build_image("2.0.0", 150_000)


def session_ends(device: SimulatedDevice, after: int = 0) -> Any:
    return device.wait_for_event(lambda e: e["event"] == "session_end", after=after)


def mode_is(device: SimulatedDevice, mode: str, after: int) -> Any:
    return device.wait_for_event(lambda e: e["event"] == "mode" and e["mode"] == mode, after=after)


async def run_phase1(
    reactor: Any, device: SimulatedDevice, image: bytes = IMAGE, **knobs: Any
) -> appclient.OtaClientResult:
    """CTP handshake, NET_OTA_SINGLE, then one OTA session."""
    ctp = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
    ctp.send(request("NET_OTA_SINGLE", "PUT", status="1"))
    reply = await ctp.wait_for("NET_OTA_SINGLE", reactor)
    assert reply.param == {"status": "1"}
    result = await appclient.run_ota_session(reactor, HOST, device.ports["ota"], image, **knobs)
    await ctp.close()
    return result


async def run_phase2(
    reactor: Any, device: SimulatedDevice, image: bytes = IMAGE, **knobs: Any
) -> appclient.OtaClientResult:
    ctp = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
    assert ctp.frames[0].param == {"type": "0", "ver": "20906"}
    response = await appclient.http_get(reactor, HOST, device.ports["http"], DESCRIPTION_PATH)
    assert parse_description(appclient.split_http(response)[1]).in_loader
    result = await appclient.run_ota_session(reactor, HOST, device.ports["ota"], image, **knobs)
    await ctp.close()
    return result


def events_file(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "state" / "events.jsonl").read_text().splitlines()]


@pytest_twisted.ensureDeferred
async def test_full_upgrade_phase1_reboot_phase2(reactor, tmp_path):
    device = await start_device(reactor, tmp_path)
    try:
        ports = dict(device.ports)
        assert json.loads((tmp_path / "state" / "ports.json").read_text()) == {"listen": HOST, **ports}
        description = await appclient.http_get(reactor, HOST, ports["http"], DESCRIPTION_PATH)
        doc = parse_description(appclient.split_http(description)[1])
        assert (doc.ota_type, doc.ota_step, doc.firmware_version) == ("1", "0", "1.0.0")

        mark = len(device.events)
        result = await run_phase1(reactor, device)
        assert result.final_status == Status.OK
        reads = result.reads
        assert reads[0].seek_addr == 0 and all(r.seek_addr > 0 for r in reads[1:])
        assert all(r.read_size == 20436 and r.percent == 1 for r in reads)
        assert [r.seek_addr for r in reads] == sorted(r.seek_addr for r in reads)  # forward
        assert result.all_size == 0  # no all_size in phase 1
        assert (tmp_path / "state" / "phase1-received.bin").read_bytes() == IMAGE

        await mode_is(device, "loader", mark)
        assert device.ports == ports
        mark = len(device.events)
        result = await run_phase2(reactor, device)
        assert result.final_status == Status.OK
        assert result.all_size == len(IMAGE)
        reads = result.reads
        assert all(r.read_size == 40916 for r in reads)
        backward = reads[1:]
        assert [r.seek_addr for r in backward] == sorted((r.seek_addr for r in backward), reverse=True)
        percents = [r.percent for r in reads]
        assert percents == sorted(percents) and percents[0] == 1 and 1 < percents[-1] <= 99
        assert (tmp_path / "state" / "phase2-received.bin").read_bytes() == IMAGE

        await mode_is(device, "main", mark)
        assert device.firmware_version == "2.0.0"
        assert device.ports == ports
        description = await appclient.http_get(reactor, HOST, ports["http"], DESCRIPTION_PATH)
        assert parse_description(appclient.split_http(description)[1]).firmware_version == "2.0.0"
    finally:
        await device.stop()
    ends = [e for e in events_file(tmp_path) if e["event"] == "session_end"]
    digest = hashlib.sha256(IMAGE).hexdigest()
    assert [(e["phase"], e["outcome"], e["sha256"], e["all_size_sent"], e["stop_received"]) for e in ends] == [
        (1, "ok", digest, False, False),
        (2, "ok", digest, True, False),
    ]
    assert [e["to"] for e in events_file(tmp_path) if e["event"] == "reboot"] == ["loader", "main"]


@pytest_twisted.ensureDeferred
async def test_drop_after_reads_once_then_retry_succeeds(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, drop_after_reads=3)
    try:
        first = await run_phase1(reactor, device)
        assert first.final_status is None and first.closed and len(first.reads) == 3
        end = await session_ends(device)
        assert (end["outcome"], end["replies"]) == ("dropped", 3)
        second = await run_phase1(reactor, device)
        assert second.final_status == Status.OK
    finally:
        await device.stop()
    assert (tmp_path / "state" / "phase1-received.bin").read_bytes() == IMAGE


@pytest_twisted.ensureDeferred
async def test_drop_mid_phase2_only_then_retry_in_loader(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, drop_after_reads=4, fault_phase=2)
    try:
        mark = len(device.events)
        assert (await run_phase1(reactor, device)).final_status == Status.OK
        await mode_is(device, "loader", mark)
        dropped = await run_phase2(reactor, device)
        assert dropped.final_status is None and dropped.all_size == len(IMAGE)
        mark = len(device.events)
        retry = await run_phase2(reactor, device)
        assert retry.final_status == Status.OK
        await mode_is(device, "main", mark)
        assert device.firmware_version == "2.0.0"
    finally:
        await device.stop()
    outcomes = [(e["phase"], e["outcome"]) for e in device.events if e["event"] == "session_end"]
    assert outcomes == [(1, "ok"), (2, "dropped"), (2, "ok")]


@pytest_twisted.ensureDeferred
async def test_stall_after_reads_pauses_and_session_still_succeeds(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, stall_after_reads=StallFault(2, 3.0))
    try:
        result = await run_phase1(reactor, device)
        assert result.final_status == Status.OK
    finally:
        await device.stop()
    stall = [e for e in device.events if e["event"] == "fault_stall"]
    assert [(e["replies"], e["seconds"]) for e in stall] == [(2, 3.0)]


@pytest_twisted.ensureDeferred
async def test_loader_watchdog_resets_after_stall_and_retry_succeeds(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader", stall_after_reads="2:70")
    try:
        mark = len(device.events)
        stalled = await run_phase2(reactor, device)
        assert stalled.final_status is None
        end = await session_ends(device, mark)
        assert end["outcome"] == "watchdog"
        await device.wait_for_event(lambda e: e["event"] == "watchdog_reset", after=mark)
        await mode_is(device, "loader", mark)
        mark = len(device.events)
        result = await run_phase2(reactor, device)
        assert result.final_status == Status.OK
        await mode_is(device, "main", mark)
    finally:
        await device.stop()
    assert device.firmware_version == "2.0.0"


@pytest_twisted.ensureDeferred
async def test_corrupt_headers_are_never_resent_phase1_goes_on_then_fails_its_crc_check(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, corrupt_header_every=3)
    try:
        result = await run_phase1(reactor, device)
    finally:
        await device.stop()
    corrupted = [e["seek"] for e in device.events if e["event"] == "header_corrupted"]
    assert result.skipped == len(corrupted) >= 2
    seeks = [r.seek_addr for r in result.reads]
    assert not set(corrupted) & set(seeks) and seeks == sorted(set(seeks))  # nothing asked twice
    assert result.final_status == Status.ERR
    (end,) = [e for e in device.events if e["event"] == "session_end"]
    assert end["outcome"] == "err" and "CRC check failed" in end["reason"]
    assert [e["seek"] for e in device.events if e["event"] == "reply_timeout_ignored"] == corrupted
    assert not [e for e in device.events if e["event"] == "reboot"]  # the old firmware stays


@pytest_twisted.ensureDeferred
async def test_corrupt_reply_check_fails_once_then_retry_succeeds(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader", corrupt_reply_check=True)
    try:
        first = await run_phase2(reactor, device)
        assert first.final_status == Status.ERR
        second = await run_phase2(reactor, device)
        assert second.final_status == Status.OK
    finally:
        await device.stop()
    errors = [e for e in device.events if e["event"] == "checksum_error"]
    assert [e["injected"] for e in errors] == [True]
    ends = [(e["outcome"], e["checksum_errors"]) for e in device.events if e["event"] == "session_end"]
    assert ends == [("err", 1), ("ok", 0)]


@pytest_twisted.ensureDeferred
async def test_bad_reply_sum_from_app_is_dropped_then_session_fails(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader")
    try:
        result = await run_phase2(reactor, device, corrupt_reply=1)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR
    assert [e["injected"] for e in device.events if e["event"] == "checksum_error"] == [False]


@pytest_twisted.ensureDeferred
async def test_reject_image_ends_err_and_device_stays_in_main(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, reject_image=True)
    try:
        result = await run_phase1(reactor, device)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR
    assert end["outcome"] == "err" and "rejected" in end["reason"]
    assert not [e for e in device.events if e["event"] == "reboot"]


@pytest.mark.parametrize("same_status, wire_status", [("same", Status.SAME), ("err", Status.ERR)])
@pytest_twisted.ensureDeferred
async def test_same_as_installed(reactor, tmp_path, same_status, wire_status):
    device = await start_device(reactor, tmp_path, same_as_installed=True, same_status=same_status)
    try:
        result = await run_phase1(reactor, device)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == wire_status and len(result.reads) == 1
    assert end["outcome"] == "same"


@pytest_twisted.ensureDeferred
async def test_stop_from_app_ends_err(reactor, tmp_path):
    device = await start_device(reactor, tmp_path)
    try:
        result = await run_phase1(reactor, device, stop_after_reads=2)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR
    assert end["stop_received"] is True and end["outcome"] == "err"
    assert [e["event"] for e in device.events].count("stop_received") == 1


@pytest_twisted.ensureDeferred
async def test_reply_to_all_size_notice_is_a_memory_fault(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader")
    try:
        result = await run_phase2(reactor, device, reply_to_all_size=True)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR
    assert "all_size" in end["reason"] and end["all_size_sent"] is True


@pytest_twisted.ensureDeferred
async def test_reply_longer_than_asked_is_a_protocol_fault(reactor, tmp_path):
    device = await start_device(reactor, tmp_path)
    try:
        result = await run_phase1(reactor, device, longer_reply=1)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR and "longer than asked" in end["reason"]


@pytest_twisted.ensureDeferred
async def test_corrupt_phase2_transfer_fails_verification(reactor, tmp_path):
    damaged = bytearray(IMAGE)
    damaged[100_000] ^= 0xFF
    device = await start_device(reactor, tmp_path, mode="loader")
    try:
        result = await run_phase2(reactor, device, image=bytes(damaged))
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR and "verification" in end["reason"]
    assert device.firmware_version == "1.0.0"


@pytest_twisted.ensureDeferred
async def test_opaque_image_uses_image_size(reactor, tmp_path):
    opaque = bytes(range(256)) * 300
    device = await start_device(reactor, tmp_path, mode="loader", image_size=len(opaque))
    try:
        mark = len(device.events)
        result = await run_phase2(reactor, device, image=opaque)
        await mode_is(device, "main", mark)
    finally:
        await device.stop()
    assert result.final_status == Status.OK and result.all_size == len(opaque)
    assert (tmp_path / "state" / "phase2-received.bin").read_bytes() == opaque
    assert device.firmware_version == "1.0.0"  # nothing to read a new version from


@pytest_twisted.ensureDeferred
async def test_opaque_image_without_size_fails_clearly(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, ota_listen_at_start=True)
    try:
        result = await appclient.run_ota_session(reactor, HOST, device.ports["ota"], b"\x01" * 60_000)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.final_status == Status.ERR and "--image-size" in end["reason"]


@pytest_twisted.ensureDeferred
async def test_second_ota_client_is_refused(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, ota_listen_at_start=True, stall_after_reads="1:20")
    try:
        first = defer.ensureDeferred(appclient.run_ota_session(reactor, HOST, device.ports["ota"], IMAGE, timeout=20))
        await device.wait_for_event(lambda e: e["event"] == "fault_stall")
        second = await appclient.run_ota_session(reactor, HOST, device.ports["ota"], IMAGE)
        assert second.closed and not second.headers
        refused = await device.wait_for_event(lambda e: e["event"] == "ota_refused")
        assert refused["reason"] == "another client is being served"
        assert (await first).final_status == Status.OK
    finally:
        await device.stop()


@pytest_twisted.ensureDeferred
async def test_loader_refuses_ota_before_any_http_request(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader")
    try:
        refused = await appclient.run_ota_session(reactor, HOST, device.ports["ota"], IMAGE)
        assert refused.closed and not refused.headers
        event = await device.wait_for_event(lambda e: e["event"] == "ota_refused")
        assert "HTTP" in event["reason"]
        result = await run_phase2(reactor, device)
        assert result.final_status == Status.OK
    finally:
        await device.stop()


@pytest_twisted.ensureDeferred
async def test_double_backup_refuses_single_backup_flow(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, double_backup=True, ftp_port=0)
    try:
        response = await appclient.http_get(reactor, HOST, device.ports["http"], DESCRIPTION_PATH)
        assert parse_description(appclient.split_http(response)[1]).ota_type == "0"
        ctp = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
        ctp.send(request("NET_OTA_SINGLE", "PUT", status="1"))
        reply = await ctp.wait_for("NET_OTA_SINGLE", reactor)
        assert reply.param == {"status": "0"}
        with pytest.raises(ConnectionRefusedError):
            await appclient.run_ota_session(reactor, HOST, device.ports["ota"], IMAGE)
        await ctp.close()
    finally:
        await device.stop()


@pytest_twisted.ensureDeferred
async def test_no_reboot_stays_down_after_phase1(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, no_reboot=True)
    try:
        mark = len(device.events)
        assert (await run_phase1(reactor, device)).final_status == Status.OK
        reboot = await device.wait_for_event(lambda e: e["event"] == "reboot", after=mark)
        assert reboot["to"] == "down"
        assert device.mode == "down" and device.timers.pending == 0
    finally:
        await device.stop()


@pytest_twisted.ensureDeferred
async def test_reboot_command_runs_down_and_up(reactor, tmp_path):
    log_file = tmp_path / "reboots.txt"
    device = await start_device(reactor, tmp_path, reboot_command=f'echo "$NETOTA_SIM_REBOOT" >> {log_file}')
    try:
        mark = len(device.events)
        assert (await run_phase1(reactor, device)).final_status == Status.OK
        await mode_is(device, "loader", mark)
        await device.wait_for_event(lambda e: e["event"] == "reboot_command" and e["direction"] == "down", after=mark)
    finally:
        await device.stop()
    commands = [(e["direction"], e["exit_code"]) for e in device.events if e["event"] == "reboot_command"]
    assert sorted(commands) == [("down", 0), ("up", 0)]
    assert sorted(log_file.read_text().split()) == ["down", "up"]


@pytest_twisted.ensureDeferred
async def test_ctp_second_ip_refused_same_ip_replaces(reactor, tmp_path):
    device = await start_device(reactor, tmp_path)
    try:
        first = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
        other = await appclient.ctp_connect(reactor, HOST, device.ports["ctp"], bind="127.0.0.2")
        other.send(request("APP_ACCESS", "PUT", type="0", ver="1"))
        refusal = await other.wait_for("APP_ACCESS", reactor)
        assert refusal.errno == 3 and refusal.param == {"msg": "CTP_ACCESS_RFU_MSG"}
        await other.closed
        replacement = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
        await first.closed
        await replacement.close()
    finally:
        await device.stop()
    assert [e["event"] for e in device.events].count("ctp_replaced") == 1


@pytest_twisted.ensureDeferred
async def test_ctp_idle_drop(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, time_scale=0.005)
    try:
        client = await appclient.ctp_handshake(reactor, HOST, device.ports["ctp"])
        await client.closed
        drop = await device.wait_for_event(lambda e: e["event"] == "ctp_idle_drop")
        assert drop["peer"] == HOST
    finally:
        await device.stop()


@pytest_twisted.ensureDeferred
async def test_loader_http_answers_every_chunk_with_fixed_document(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader", firmware_version="9.9.9")
    try:
        response = await appclient.http_get(reactor, HOST, device.ports["http"], "/anything", method="POST")
    finally:
        await device.stop()
    head, body = appclient.split_http(response)
    assert (
        head == b"HTTP/1.1 200 OK\r\nContent-Type:text\r\nContent-Length:454\r\nAccept-Ranges:bytes\r\nConnection:close"
    )
    assert body == LOADER_DOCUMENT


# -- the vendor-style blocking client ---------------------------------------------------------------
# A blocking thread reads more slowly than the reactor: keep the device's 0.5 s between OK and its
# RST long enough (0.1 s) that the OK is read before the reset discards it, even on 2 loaded cores.
VENDOR_SCALE = 0.2


@pytest_twisted.ensureDeferred
async def test_vendor_style_client_phase1_against_ota_listen_at_start(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, ota_listen_at_start=True, time_scale=VENDOR_SCALE)
    try:
        result = await threads.deferToThread(appclient.vendor_style_ota_client, HOST, device.ports["ota"], IMAGE)
        end = await session_ends(device)
    finally:
        await device.stop()
    assert result.outcome == "ok" and result.all_size == 0
    assert end["outcome"] == "ok"
    assert (tmp_path / "state" / "phase1-received.bin").read_bytes() == IMAGE


@pytest_twisted.ensureDeferred
async def test_vendor_style_client_phase2_against_loader_after_one_http_get(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, mode="loader", time_scale=VENDOR_SCALE)
    try:
        mark = len(device.events)
        await appclient.http_get(reactor, HOST, device.ports["http"], DESCRIPTION_PATH)
        result = await threads.deferToThread(appclient.vendor_style_ota_client, HOST, device.ports["ota"], IMAGE)
        await mode_is(device, "main", mark)
    finally:
        await device.stop()
    assert result.outcome == "ok" and result.all_size == len(IMAGE)
    assert (tmp_path / "state" / "phase2-received.bin").read_bytes() == IMAGE
    assert device.firmware_version == "2.0.0"


# -- double backup: FTP over loopback, a client that obeys the rules --------------------------------
DOUBLE_IMAGE = build_image("3.0.0", 150_000, "double")


@pytest_twisted.ensureDeferred
async def test_double_backup_upload_then_reboot_into_the_new_version(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, double_backup=True, ftp_port=0)
    try:
        mark = len(device.events)
        result = await threads.deferToThread(appclient.ftp_upload, HOST, device.ports["ftp"], DOUBLE_IMAGE)
        assert result.replies[0] == "220 lwIP FTP Server ready." and result.final == "226 Closing data connection."
        assert result.replies[-1] == "221 Goodbye."
        await mode_is(device, "main", mark)
        response = await appclient.http_get(reactor, HOST, device.ports["http"], DESCRIPTION_PATH)
        doc = parse_description(appclient.split_http(response)[1])
        assert (doc.ota_type, doc.firmware_version) == ("0", "3.0.0")
    finally:
        await device.stop()
    assert (tmp_path / "state" / "db-received.bin").read_bytes() == DOUBLE_IMAGE
    names = [e["event"] for e in device.events]
    assert "ftp_protocol_error" not in names and "ftp_crash" not in names  # the client obeyed the rules
    assert [e["burned"] for e in device.events if e["event"] == "db_burn"] == [True]


@pytest_twisted.ensureDeferred
async def test_double_backup_dropped_upload_then_a_retry_succeeds(reactor, tmp_path):
    device = await start_device(reactor, tmp_path, double_backup=True, ftp_port=0, ftp_drop_after_bytes=50_000)
    try:
        dropped = await threads.deferToThread(appclient.ftp_upload, HOST, device.ports["ftp"], DOUBLE_IMAGE, timeout=2)
        assert dropped.final is None
        mark = len(device.events)
        retry = await threads.deferToThread(appclient.ftp_upload, HOST, device.ports["ftp"], DOUBLE_IMAGE)
        assert retry.final == "226 Closing data connection."
        await mode_is(device, "main", mark)
    finally:
        await device.stop()
    ends = [(e["outcome"], e["bytes"]) for e in device.events if e["event"] == "ftp_upload_end"]
    assert ends == [("reset", 50_000), ("closed", len(DOUBLE_IMAGE))]
    assert device.firmware_version == "3.0.0"
    assert (tmp_path / "state" / "db-received.bin").read_bytes() == DOUBLE_IMAGE
