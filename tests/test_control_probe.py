"""``POST /v1/devices/probe`` over the control socket: its errors and the busy rule (fake fetch),
then end to end against simulated devices, through ``netota devices --probe`` too."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol

from netota_daemon.cli.control_client import ControlClient
from netota_daemon.daemon.config import DeviceConfig
from netota_daemon.engine.outcome import Phase
from netota_daemon.engine.settings import DeviceTarget, UpgradeTimeouts
from netota_daemon.service import NetotaService
from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.wire.description import main_firmware_document, parse_description
from tests.conftest import run_netota
from tests.daemon_fakes import AutoJobFactory, FakeJobFactory, make_service


@pytest.fixture
def held(tmp_path, reactor):
    """A daemon whose jobs stay in phase 1; its prober's fetch answers at once with version 9.9."""
    service = make_service(tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1))
    fetched: list[str] = []

    async def fetch(connector: Any, port: int, timeout: float, clock: Any) -> Any:
        fetched.append(port)
        return parse_description(main_firmware_document("9.9"))

    service.prober.fetch = fetch
    service.fetched = fetched
    service.privilegedStartService()
    service.startService()
    yield service
    pytest_twisted.blockon(service.stopService())


def client_for(service: Any, reactor: Any) -> ControlClient:
    return ControlClient(reactor, f"unix:{service.socket_path}")


@pytest_twisted.ensureDeferred
async def test_probe_answers_like_devices_and_get_devices_keeps_the_last_probe(held, reactor):
    client = client_for(held, reactor)
    before = (await client.request("GET", "/v1/devices"))["devices"]
    assert [d["probe"] for d in before] == [None, None, None]
    job = (await client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))["job"]
    answer = await client.request("POST", "/v1/devices/probe")
    devices = {d["name"]: d for d in answer["devices"]}
    assert list(devices) == ["a", "b", "c"]
    assert devices["a"]["probe"]["error"] == f"busy with job {job['id']}" and devices["a"]["state"] == "running"
    assert devices["a"]["probe"]["busy_job"] == job["id"]  # for programs: which job holds it
    assert held.fetched == [8080, 8080]  # b and c; a was not contacted
    assert devices["b"]["probe"]["ok"] and devices["b"]["probe"]["mode"] == "main"
    assert devices["b"]["firmware_version"] == "9.9"
    listed = {d["name"]: d for d in (await client.request("GET", "/v1/devices"))["devices"]}
    assert listed["a"]["probe"] is None  # a busy answer is not a probe
    assert listed["c"]["probe"] == devices["c"]["probe"] and listed["c"]["firmware_version"] == "9.9"
    only = await client.request("POST", "/v1/devices/probe", {"devices": ["c", "c"]})
    assert [d["name"] for d in only["devices"]] == ["c"] and len(held.fetched) == 3


@pytest.mark.parametrize(
    "method, body, status, code",
    [
        ("POST", b'{"devices": ["a", "zz"]}', 404, "unknown_device"),
        ("POST", b'{"device": ["a"]}', 400, "unknown_field"),
        ("POST", b'{"devices": ', 400, "bad_json"),
        ("POST", b'["a"]', 400, "bad_json"),
        ("POST", b'{"devices": "a"}', 400, "bad_field"),
        ("POST", b'{"devices": []}', 400, "bad_field"),
        ("POST", b'{"devices": [1]}', 400, "bad_field"),
        ("POST", b'{"devices": null}', 400, "bad_field"),  # not "every device": leave the field out for that
        ("GET", b"", 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_probe_requests_are_refused_and_contact_nothing(held, reactor, method, body, status, code):
    client = client_for(held, reactor)
    response = await client._http.request(method, "http://netota/v1/devices/probe", data=body, timeout=10)
    answer = json.loads(await treq.content(response))
    assert (response.code, answer["error"]["code"]) == (status, code)
    assert answer["error"]["message"]
    assert held.fetched == []


# ------------------------------------------------------------------ end to end, simulated devices

HTTP_TIMEOUT = 1.0


class Silent(Protocol):
    """Accepts and never answers: an HTTP server that hangs."""


def sim(reactor: Any, tmp_path: Path, name: str, **extra: Any) -> SimulatedDevice:
    return SimulatedDevice(
        reactor,
        SimConfig(
            state_dir=tmp_path / name, listen="127.0.0.1", ctp_port=0, http_port=0, ota_port=0, time_scale=0.02, **extra
        ),
    )


def service_for(tmp_path: Path, reactor: Any, targets: list[DeviceTarget]) -> NetotaService:
    configs = {t.name: DeviceConfig(t, UpgradeTimeouts(http=HTTP_TIMEOUT)) for t in targets}
    return make_service(tmp_path, reactor, FakeJobFactory(), device_configs=configs)


@pytest_twisted.ensureDeferred
async def test_probe_reads_version_and_mode_from_simulated_devices_over_http_only(tmp_path, reactor):
    main = sim(reactor, tmp_path, "main", firmware_version="1.2.3")
    loader = sim(reactor, tmp_path, "loader", firmware_version="1.2.3", mode="loader")
    closed = socket.socket()  # bound, not listening: connections are refused
    closed.bind(("127.0.0.1", 0))
    silent = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Silent))
    service = None
    try:
        for device in (main, loader):
            await device.start()

        def target(name: str, device: SimulatedDevice | None = None, http_port: int = 0) -> DeviceTarget:
            ports = device.ports if device else {"ctp": 1, "ota": 1, "http": http_port}
            return DeviceTarget(
                name=name, host="127.0.0.1", ctp_port=ports["ctp"], http_port=ports["http"], ota_port=ports["ota"]
            )

        service = service_for(
            tmp_path,
            reactor,
            [
                target("main", main),
                target("loader", loader),
                target("refused", http_port=closed.getsockname()[1]),
                target("silent", http_port=silent.getHost().port),
            ],
        )
        service.privilegedStartService()
        service.startService()
        client = ControlClient(reactor, f"unix:{service.socket_path}")
        answer = await client.request("POST", "/v1/devices/probe")
        devices = {d["name"]: d for d in answer["devices"]}
        assert devices["main"]["probe"]["ok"] and devices["main"]["probe"]["mode"] == "main"
        assert devices["main"]["probe"]["firmware_version"] == "1.2.3"
        assert devices["main"]["firmware_version"] == "1.2.3"
        assert devices["loader"]["probe"]["mode"] == "loader" and devices["loader"]["probe"]["ota_step"] == "1"
        refused = devices["refused"]["probe"]
        assert refused["ok"] is False and refused["error"].endswith(": connection refused"), refused
        assert f":{closed.getsockname()[1]}/" in refused["error"]
        hung = devices["silent"]["probe"]
        assert hung["ok"] is False and hung["error"].endswith(f"timed out after {HTTP_TIMEOUT:g} s"), hung
        listed = {d["name"]: d for d in (await client.request("GET", "/v1/devices"))["devices"]}
        assert listed["main"]["firmware_version"] == "1.2.3" and listed["refused"]["probe"] == refused

        # The client: the usual table with a MODE column, a note for each failed probe.
        code, out, err = await run_netota(reactor, f"unix:{service.socket_path}", "devices", "--probe", timeout=30)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[-2:] == ["FIRMWARE", "MODE"]
        rows = {line.split()[0]: line.split() for line in lines[1:5]}
        assert rows["main"][-2:] == ["1.2.3", "main"] and rows["loader"][-1] == "loader"
        assert rows["refused"][-1] == "?"
        assert any(line.startswith("refused: probe failed: GET ") and "connection refused" in line for line in lines)
        assert any(line.startswith("silent: probe failed: ") and "timed out" in line for line in lines)
        code, out, err = await run_netota(
            reactor, f"unix:{service.socket_path}", "devices", "--probe", "main", "--json", timeout=30
        )
        assert code == 0, err
        assert [d["name"] for d in json.loads(out)["devices"]] == ["main"]
        code, out, err = await run_netota(reactor, f"unix:{service.socket_path}", "devices", "main", timeout=30)
        assert code == 64 and "needs --probe" in err

        # HTTP only: the simulated devices saw description requests and never a CTP connection.
        for device in (main, loader):
            events = [e["event"] for e in device.events]
            assert "http_request" in events and "ctp_connect" not in events, events
    finally:
        if service is not None:
            await service.stopService()
        await silent.stopListening()
        closed.close()
        for device in (main, loader):
            await device.stop()
