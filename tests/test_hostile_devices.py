"""Hostile devices against one real ``twistd netota``: none of them can grow the daemon's memory, fill
its log, print tracebacks, or take down the upgrade of a healthy device in the same daemon (issue 9).

The hostile devices live in the test process, on loopback: one floods READs on 3335 and never reads
the replies; one floods unsolicited CTP frames, each with a new topic; one sends garbage on 3335
without end (a valid header now and then, so the stream never ends by itself); one answers the
description document with a body that never ends. A healthy simulated device is upgraded beside
them. The daemon's resident memory is sampled while they attack; what is asserted is memory, the
log's size and content, and every job's outcome (never a timing).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from netota_daemon.sim.config import SimConfig
from netota_daemon.sim.device import SimulatedDevice
from netota_daemon.sim.image import make_image
from netota_daemon.wire import ctp
from netota_daemon.wire.description import main_firmware_document
from netota_daemon.wire.ota import Status, encode_device_header
from tests.conftest import PYTHON, ROOT, subprocess_env
from tests.daemon_fakes import short_socket_dir
from tests.live_rig import Process, spawn_twistd
from tests.waiting import Changes

IMAGE_SIZE = 300_000
#: How much the daemon's resident memory may grow while it is attacked (its baseline is about 70 MiB; measured growth about 7 MiB).
MEMORY_BOUND = 16 * 2**20


@implementer(IPushProducer)
class Flood:
    """Writes ``chunk()`` into a transport as fast as the transport takes it (its own buffer stays
    small: the test process is not what is measured, but it must not balloon either)."""

    def __init__(self, transport: Any, chunk: Any) -> None:
        self.transport = transport
        self.chunk = chunk
        self.paused = False
        self.stopped = False
        transport.registerProducer(self, True)
        self.loop = task.LoopingCall(self._write)
        self.loop.start(0.005)

    def _write(self) -> None:
        if not self.paused and not self.stopped:
            self.transport.write(self.chunk())

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopped = True
        if self.loop.running:
            self.loop.stop()


class HostileHttp(Protocol):
    def dataReceived(self, data: bytes) -> None:
        kind = self.factory.kind
        if kind == "endless_http":
            self.transport.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
            self.flood = Flood(self.transport, lambda: b"{" * 16384)
            return
        document = main_firmware_document("1.0.0")
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(document) + document
        )
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if getattr(self, "flood", None) is not None:
            self.flood.stop()


class HostileCtp(Protocol):
    def connectionMade(self) -> None:
        self.decoder = ctp.CtpDecoder()
        self.flood: Flood | None = None
        self.counter = 0

    def dataReceived(self, data: bytes) -> None:
        for frame in self.decoder.feed(data):
            if frame.topic == "APP_ACCESS":
                self.transport.write(ctp.notify("APP_ACCESS", {"type": "0", "ver": "20906"}))
                if self.factory.kind == "ctp_flood":
                    self.flood = Flood(self.transport, self._frames)
            elif frame.topic == "NET_OTA_SINGLE" and self.factory.kind != "ctp_flood":
                self.transport.write(ctp.notify("NET_OTA_SINGLE", {"status": "1"}))

    def _frames(self) -> bytes:
        frames = []
        for _ in range(200):
            self.counter += 1
            frames.append(ctp.notify(f"TOPIC_{self.counter}", {"value": "x" * 40}))
        return b"".join(frames)

    def connectionLost(self, reason: Any = None) -> None:
        if self.flood is not None:
            self.flood.stop()


class HostileOta(Protocol):
    def connectionMade(self) -> None:
        kind = self.factory.kind
        self.flood: Flood | None = None
        if kind == "read_flood":
            self.transport.pauseProducing()  # never read our replies
            header = encode_device_header(Status.READ, 0, 20436, 0, 1)
            self.flood = Flood(self.transport, lambda: header * 500)
        elif kind == "garbage":
            valid = encode_device_header(Status.DOING, 0, 0, 0, 1)  # harmless: keeps the stream alive
            garbage = bytes(range(1, 21)) * 200 + valid
            self.flood = Flood(self.transport, lambda: garbage)

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self.flood is not None:
            self.flood.stop()


class HostileDevice:
    def __init__(self, reactor: Any, kind: str) -> None:
        self.kind = kind
        self.ports: dict[str, Any] = {}
        for name, protocol in (("http", HostileHttp), ("ctp", HostileCtp), ("ota", HostileOta)):
            factory = Factory.forProtocol(protocol)
            factory.kind = kind
            factory.noisy = False
            self.ports[name] = reactor.listenTCP(0, factory, interface="127.0.0.1")

    def port(self, name: str) -> int:
        return self.ports[name].getHost().port

    async def stop(self) -> None:
        for port in self.ports.values():
            await port.stopListening()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest_twisted.ensureDeferred
async def test_hostile_devices_cannot_grow_the_daemon_or_stop_a_healthy_upgrade(reactor, tmp_path):
    changes = Changes(reactor)
    firmware_dir = tmp_path / "fw"
    firmware_dir.mkdir()
    make_image(firmware_dir / "v2.bin", "2.0.0", IMAGE_SIZE)
    healthy = SimulatedDevice(
        reactor,
        SimConfig(
            state_dir=tmp_path / "healthy",
            ctp_port=0,
            http_port=0,
            ota_port=0,
            time_scale=0.1,
            # Its wait for each reply is 5 s, as a real device's: the floods share this process and
            # its cores, and a reply late by half a second must not fail the healthy upgrade.
            reply_timeout=50.0,
        ),
    )
    await healthy.start()
    hostile = {kind: HostileDevice(reactor, kind) for kind in ("read_flood", "ctp_flood", "garbage", "endless_http")}
    control = os.path.join(short_socket_dir(), "control.sock")
    devices = [
        f'[devices.healthy]\nhost = "127.0.0.1"\nctp_port = {healthy.ports["ctp"]}\n'
        f"http_port = {healthy.ports['http']}\nota_port = {healthy.ports['ota']}\n"
        # its upgrade takes ~4 s: a deadline far above it; the hostile ones end at the daemon-wide 12 s
        "[devices.healthy.timeouts]\ndeadline = 90\n"
    ]
    for kind, device in hostile.items():
        devices.append(
            f'[devices.{kind}]\nhost = "127.0.0.1"\nctp_port = {device.port("ctp")}\n'
            f"http_port = {device.port('http')}\nota_port = {device.port('ota')}\n"
        )
    config = tmp_path / "netota.toml"
    config.write_text(
        f"""
[daemon]
control = "unix:{control}"
state_dir = "{tmp_path / "state"}"
firmware_dir = "{firmware_dir}"
max_parallel = 5

[timeouts]
deadline = 12
connect = 5
ctp_reply = 6
http = 5
connect_window = 8
receive = 2
reboot = 30
verify = 30
poll_interval = 0.1

"""
        + "\n".join(devices)
    )
    log = tmp_path / "daemon.log"
    daemon = spawn_twistd(reactor, changes, config, tmp_path, twistd_options=("--logfile", str(log)))
    sampler = None
    try:
        changes.watch_directory(tmp_path)
        await changes.until(lambda: Path(control).exists() or not daemon.running, "the control socket", 60)
        assert daemon.running, daemon.output.decode()
        pid = daemon.pid
        baseline = rss(pid)
        peak = [baseline]
        sampler = task.LoopingCall(lambda: peak.append(rss(pid)) if daemon.running else None)
        sampler.start(0.1)
        client = Process("client", changes)
        reactor.spawnProcess(
            client,
            PYTHON,
            [PYTHON, "-m", "netota_daemon", "upgrade", "--all", "v2.bin", "--wait", "--json"],
            env=subprocess_env(NETOTA_CONTROL=f"unix:{control}"),
            path=str(ROOT),
        )
        await client.wait(reactor, 120)
        answer = json.loads(client.output.decode()[client.output.decode().index("{") :])
        outcomes = {job["device"]: job["outcome"] for job in answer["jobs"]}
        assert outcomes["healthy"]["kind"] == "succeeded", outcomes["healthy"]
        assert (outcomes["read_flood"]["kind"], outcomes["read_flood"]["failure"]) == ("failed", "protocol_error")
        assert "without reading our replies" in outcomes["read_flood"]["message"]
        assert (outcomes["ctp_flood"]["kind"], outcomes["ctp_flood"]["failure"]) == ("failed", "timeout")
        assert outcomes["garbage"]["kind"] == "failed" and "deadline" in outcomes["garbage"]["message"]
        assert (outcomes["endless_http"]["kind"], outcomes["endless_http"]["failure"]) == ("failed", "protocol_error")
        assert "over 65536 bytes" in outcomes["endless_http"]["message"]
        growth = max(peak) - baseline
        assert growth < MEMORY_BOUND, f"the daemon grew by {growth / 2**20:.1f} MiB under attack"
        text = log.read_text(errors="replace")
        assert len(text) < 300_000, f"the daemon's log is {len(text)} bytes: device warnings are not rate-limited"
        assert "Traceback" not in text and "Unhandled" not in text, text[-3000:]
        assert "skipped" in text and "more OTA headers with a bad checksum" in text  # counted, not each logged
    finally:
        if sampler is not None and sampler.running:
            sampler.stop()
        if daemon.running:
            daemon.kill(signal.SIGTERM)
            await daemon.wait(reactor, 30)
        for device in hostile.values():
            await device.stop()
        await healthy.stop()
        changes.close()
        await defer.succeed(None)
