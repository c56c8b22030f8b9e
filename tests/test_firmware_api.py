"""``/v1/firmware``: list, upload, remove through a real daemon, and every bad input refused with a
clear 4xx; an upload cut off half way leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import urllib.error
import urllib.request

import pytest_twisted

from netota_daemon.control.openapi import document
from tests.live_rig import LiveRig


def call(rig: LiveRig, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(rig.url + path, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest_twisted.ensureDeferred
async def test_upload_list_remove_and_refusals(rig):
    rig.make_image("v2.bin", "2.0.0", 50_000)
    await rig.start_sim("dev1", "--stall", "4:3000")
    await rig.start_daemon("firmware_max_upload = 300000")
    data = os.urandom(200_000)

    status, body = call(rig, "PUT", "/v1/firmware/new.ufw", data)
    assert status == 201, body
    assert body["firmware"]["sha256"] == hashlib.sha256(data).hexdigest() and body["firmware"]["size"] == 200_000
    assert (rig.firmware_dir / "new.ufw").read_bytes() == data
    status, body = call(rig, "GET", "/v1/firmware")
    assert status == 200
    assert [(f["name"], f["size"]) for f in body["firmware"]] == [("new.ufw", 200_000), ("v2.bin", 50_000)]

    refusals = [
        ("PUT", "/v1/firmware/big.bin", b"x" * 300_001, 413, "too_large"),
        ("PUT", "/v1/firmware/..", b"x", 403, "firmware_outside"),
        ("PUT", "/v1/firmware/..%2Fescape.bin", b"x", 403, "firmware_outside"),
        ("PUT", "/v1/firmware/.hidden", b"x", 400, "bad_firmware_name"),
        ("PUT", "/v1/firmware/empty.bin", b"", 400, "firmware_invalid"),
        ("DELETE", "/v1/firmware/missing.bin", None, 404, "firmware_not_found"),
        ("GET", "/v1/firmware/missing.bin", None, 404, "firmware_not_found"),
        ("POST", "/v1/firmware/new.ufw", b"x", 405, "method_not_allowed"),
    ]
    for method, path, payload, want_status, want_code in refusals:
        status, body = call(rig, method, path, payload)
        assert (status, body["error"]["code"]) == (want_status, want_code), (method, path, body)
        assert body["error"]["message"]

    # In use by a running job: neither replaced nor removed.
    job = rig.api("POST", "/v1/jobs", {"device": "dev1", "firmware": "v2.bin"})["job"]
    for method, payload in (("DELETE", None), ("PUT", b"other")):
        status, body = call(rig, method, "/v1/firmware/v2.bin", payload)
        assert (status, body["error"]["code"]) == (409, "firmware_in_use"), body
    rig.api("POST", f"/v1/jobs/{job['id']}/cancel", {})
    await rig.wait_for(
        lambda: rig.api("GET", f"/v1/jobs/{job['id']}")["job"]["state"] == "finished", "the cancelled job's end"
    )
    status, body = call(rig, "DELETE", "/v1/firmware/v2.bin")
    assert status == 200 and body["removed"]["name"] == "v2.bin"
    assert sorted(os.listdir(rig.firmware_dir)) == ["new.ufw"]
    # The API's own description is served.
    status, served = call(rig, "GET", "/v1/openapi.json")
    assert status == 200 and served["paths"] == document()["paths"]


@pytest_twisted.ensureDeferred
async def test_an_interrupted_upload_leaves_nothing_behind(rig):
    await rig.start_sim("dev1")
    await rig.start_daemon()
    with socket.create_connection(("127.0.0.1", rig.web_port), timeout=30) as s:
        s.sendall(b"PUT /v1/firmware/half.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n\r\n" + b"x" * 200_000)
    # The daemon still answers, and nothing of the upload is in firmware_dir.
    status, body = call(rig, "GET", "/v1/firmware")
    assert status == 200 and body["firmware"] == []
    assert os.listdir(rig.firmware_dir) == []
