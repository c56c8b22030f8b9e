"""The serving benchmark runs end to end, reports every figure, and its peer really verifies.

No timing is asserted: only that each figure is there and that every byte was checked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import socket
import subprocess
import sys

import pytest

from benchmarks.serve import WINDOW, ScenarioReport
from netota_daemon.wire.ota import HEADER_SIZE, OtaHeader, Status, encode_reply
from tests.conftest import ROOT, subprocess_env

IMAGE_MIB = 0.1  # 104857 bytes: three windows, the last one short


def test_benchmark_reports_every_figure_and_the_peer_verified_every_byte(tmp_path):
    out = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.serve",
            "--streams",
            "2",
            "--image-mib",
            str(IMAGE_MIB),
            "--min-mib",
            "0",
            "--paced-mbps",
            "0",
            "--timeout",
            "30",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verified" in done.stdout and "yes" in done.stdout  # the table

    [report] = json.loads(out.read_text())
    names = {f.name for f in dataclasses.fields(ScenarioReport)}
    assert set(report) == names
    assert [name for name, value in report.items() if value is None] == []

    size = int(IMAGE_MIB * 1024 * 1024)
    windows = math.ceil(size / WINDOW)
    assert report["image_bytes"] == size
    assert report["streams"] == 2 and report["sessions"] == 2 and report["sessions_ok"] == 2
    assert report["bytes_served"] == 2 * size
    assert report["verified"] is True and report["failures"] == []
    for figure in (
        "mb_per_second",
        "app_cpu_seconds_per_gb",
        "reply_latency_p50",
        "reply_latency_p99",
        "wire_latency_p50",
        "wire_latency_p99",
        "rss_before",
        "rss_peak",
    ):
        assert report[figure] > 0, figure
    assert report["reply_latency_p50"] <= report["reply_latency_p99"] <= report["reply_latency_max"]
    # One sample per reply, each matched with the peer's record of its READ.
    assert report["reply_latency_samples"] == report["wire_latency_samples"] == 2 * windows
    assert report["unmatched_sessions"] == 0

    peer = report["peer"]
    # The peer also served and checked the unmeasured warm-up session.
    assert peer["sessions"] == peer["sessions_ok"] == 3
    assert peer["bytes_verified"] == 3 * size
    assert peer["windows_verified"] == 3 * windows
    assert peer["checksum_errors"] == 0 and peer["byte_mismatches"] == 0
    assert peer["failures"] == [] and peer["timed_out"] is False


def _corrupt_payload(request: OtaHeader, payload: bytes) -> bytes:
    wrong = bytearray(payload)
    wrong[len(wrong) // 2] ^= 0x01  # one bit off, with a checksum that matches the wrong bytes
    return encode_reply(request, bytes(wrong))


def _corrupt_checksum(request: OtaHeader, payload: bytes) -> bytes:
    reply = bytearray(encode_reply(request, payload))
    reply[0] ^= 0x01  # the right bytes, the wrong sum
    return bytes(reply)


@pytest.mark.parametrize(
    "corrupt, counter",
    [(_corrupt_payload, "byte_mismatches"), (_corrupt_checksum, "checksum_errors")],
)
def test_peer_refuses_a_wrong_reply_with_err(tmp_path, corrupt, counter):
    image = bytes(range(256)) * 200  # 51200 bytes: two windows
    path = tmp_path / "image.ufw"
    path.write_bytes(image)
    peer = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.peer", "--image", str(path), "--connections", "1", "--timeout", "20"],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        listening = peer.stdout.readline().split()
        assert listening[0] == "LISTENING"
        with socket.create_connection((listening[1], int(listening[2])), timeout=10) as app:
            request = OtaHeader.decode(_receive(app, HEADER_SIZE))
            assert request.is_valid() and request.status == Status.READ
            assert (request.seek_addr, request.read_size) == (0, WINDOW)
            app.sendall(corrupt(request, image[:WINDOW]))
            answer = OtaHeader.decode(_receive(app, HEADER_SIZE))
            assert answer.is_valid() and answer.status == Status.ERR
            assert app.recv(1) == b""  # and it closed
        out, _ = peer.communicate(timeout=20)
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
    assert peer.returncode == 1
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["sessions"] == 1 and result["sessions_ok"] == 0
    assert result[counter] == 1 and result["bytes_verified"] == 0
    assert len(result["failures"]) == 1


def _receive(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        assert chunk, f"connection closed after {len(data)} of {count} bytes"
        data += chunk
    return data
