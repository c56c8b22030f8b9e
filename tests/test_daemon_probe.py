"""``DeviceProber`` with a fake description fetch and a ``Clock``: results, modes, the busy rule,
the http timeout bound, parallel fetches, and what the registry keeps."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, error
from twisted.internet.task import Clock

from netota_daemon.daemon.config import DeviceConfig
from netota_daemon.daemon.probe import DeviceProber
from netota_daemon.daemon.registry import DeviceRegistry
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.protocols.description_fetch import DescriptionFetchError
from netota_daemon.wire.description import LOADER_DOCUMENT, main_firmware_document, parse_description


class FakeFetch:
    """Records each fetch; answers with the Deferred a test controls (or fires at once)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.pending: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []

    def __call__(self, connector: Any, port: int, timeout: float, clock: Any) -> defer.Deferred:
        self.calls.append(
            {
                "host": connector.host,
                "interface": connector.interface,
                "source_address": connector.source_address,
                "port": port,
                "timeout": timeout,
            }
        )
        d: defer.Deferred = defer.Deferred(lambda _: self.cancelled.append(connector.source_address))
        self.pending[connector.source_address] = d
        return d


def registry(*names: str) -> DeviceRegistry:
    configs = []
    for index, name in enumerate(names):
        target = DeviceTarget(
            name=name, host="127.0.0.1", http_port=8080 + index, interface=f"wl{index}", source_address=name
        )  # the source address identifies the fake's call
        configs.append(DeviceConfig(target, UpgradeTimeouts(http=2.0 + index)))
    return DeviceRegistry(configs)


def run(d: Any) -> Any:
    results: list[Any] = []
    defer.ensureDeferred(d).addBoth(results.append)
    return results


def test_a_main_firmware_probe_reports_version_and_mode_and_updates_the_registry():
    reg, clock, fetch = registry("a"), Clock(), FakeFetch()
    clock.advance(100)
    results = run(DeviceProber(reg, clock, fetch).probe())
    assert fetch.calls == [
        {"host": "127.0.0.1", "interface": "wl0", "source_address": "a", "port": 8080, "timeout": 2.0}
    ]
    fetch.pending["a"].callback(parse_description(main_firmware_document("1.2.3")))
    result = results[0]["a"]
    assert result.to_json() == {
        "ok": True,
        "firmware_version": "1.2.3",
        "ota_type": "1",
        "ota_step": "0",
        "mode": "main",
        "time": 100.0,
    }
    device = reg.to_json()[0]
    assert device["firmware_version"] == "1.2.3"
    assert device["probe"] == result.to_json()


def test_the_loader_and_a_double_backup_device_get_their_modes():
    reg, clock, fetch = registry("a", "b"), Clock(), FakeFetch()
    reg.get("a").firmware_version = "1.0.0"  # known from an earlier job
    results = run(DeviceProber(reg, clock, fetch).probe())
    fetch.pending["a"].callback(parse_description(LOADER_DOCUMENT))
    fetch.pending["b"].callback(parse_description(main_firmware_document("3.0", single_backup=False)))
    loader, double = results[0]["a"].to_json(), results[0]["b"].to_json()
    # The loader's fixed document says 1.0.1 whatever is installed: no version, and the known one stays.
    assert (loader["mode"], loader["firmware_version"], loader["ota_step"]) == ("loader", None, "1")
    assert reg.get("a").firmware_version == "1.0.0"
    assert (double["mode"], double["firmware_version"], double["ota_type"]) == ("double_backup", "3.0", "0")


def test_devices_are_fetched_in_parallel():
    reg, clock, fetch = registry("a", "b", "c"), Clock(), FakeFetch()
    results = run(DeviceProber(reg, clock, fetch).probe(["c", "a"]))
    assert [c["source_address"] for c in fetch.calls] == ["c", "a"]  # both asked before either answers
    assert results == []
    fetch.pending["a"].callback(parse_description(main_firmware_document("1")))
    assert results == []
    fetch.pending["c"].callback(parse_description(main_firmware_document("2")))
    assert list(results[0]) == ["c", "a"]
    assert reg.get("b").probe is None


def test_a_busy_device_is_not_contacted_and_its_last_probe_is_kept():
    reg, clock, fetch = registry("a", "b"), Clock(), FakeFetch()
    reg.get("a").probe = {"ok": True, "firmware_version": "1.0.0"}
    reg.queued("a", "job1", 1)
    reg.running("b", "job2")
    results = run(DeviceProber(reg, clock, fetch).probe())
    assert fetch.calls == []
    assert results[0]["a"].to_json() == {"ok": False, "error": "busy with job job1", "busy_job": "job1", "time": 0.0}
    assert results[0]["b"].to_json()["error"] == "busy with job job2"
    assert (results[0]["a"].busy_job, results[0]["b"].busy_job) == ("job1", "job2")  # for programs
    assert reg.get("a").probe == {"ok": True, "firmware_version": "1.0.0"}


def test_a_device_that_does_not_answer_fails_after_its_http_timeout():
    reg, clock, fetch = registry("a", "b"), Clock(), FakeFetch()
    reg.get("a").firmware_version = "1.0.0"
    results = run(DeviceProber(reg, clock, fetch).probe())
    fetch.pending["b"].callback(parse_description(main_firmware_document("1")))
    clock.advance(1.9)
    assert results == [] and fetch.cancelled == []
    clock.advance(0.1)  # a's http timeout: 2 s
    assert fetch.cancelled == ["a"]
    a = results[0]["a"].to_json()
    assert a["ok"] is False and a["time"] == 2.0
    assert a["error"] == (
        "GET http://127.0.0.1:8080/mnt/spiflash/res/dev_desc.txt (via wl0): "
        "the description document: timed out after 2 s"
    )
    assert reg.get("a").probe == a and reg.get("a").firmware_version == "1.0.0"
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "failure, message",
    [
        (error.ConnectionRefusedError(), "connection refused"),
        (DescriptionFetchError("GET http://x answered HTTP 404"), "GET http://x answered HTTP 404"),
        (ValueError("something odd"), "something odd"),
    ],
)
def test_a_failed_fetch_is_that_device_s_answer_with_a_clear_error(failure, message):
    reg, clock, fetch = registry("a", "b"), Clock(), FakeFetch()
    results = run(DeviceProber(reg, clock, fetch).probe())
    fetch.pending["a"].errback(failure)
    fetch.pending["b"].callback(parse_description(main_firmware_document("1")))
    a = results[0]["a"].to_json()
    assert a["ok"] is False and a["error"].endswith(": " + message)
    assert a["error"].startswith("GET http://127.0.0.1:8080/")
    assert results[0]["b"].ok


def test_an_http_error_is_named_once():
    reg, clock, fetch = registry("a"), Clock(), FakeFetch()
    results = run(DeviceProber(reg, clock, fetch).probe())
    url = "http://127.0.0.1:8080/mnt/spiflash/res/dev_desc.txt"
    fetch.pending["a"].errback(DescriptionFetchError(f"GET {url} answered HTTP 404"))
    assert results[0]["a"].error == f"GET {url} answered HTTP 404 (via wl0)"


def test_an_unknown_name_is_refused_before_anything_is_contacted():
    reg, clock, fetch = registry("a"), Clock(), FakeFetch()
    results = run(DeviceProber(reg, clock, fetch).probe(["a", "zz"]))
    assert results[0].check(KeyError) and fetch.calls == []
