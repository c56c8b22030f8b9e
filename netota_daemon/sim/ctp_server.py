"""CTP on TCP 3333: the main firmware's command server and the phase-2 loader's one-reply stub.

Main firmware (research §1, §2a):

- ``APP_ACCESS`` must come first; anything else first gets errno 4 (``CTP_REQUEST_MSG``) and the
  connection stays open. The reply echoes ``type``/``ver``, then an unsolicited NOTIFY burst follows.
- One client: a new connection from the holder's IP replaces the old one (closed at accept); a
  client from another IP gets errno 3 (``CTP_ACCESS_RFU_MSG``) and is disconnected.
- ``CTP_KEEP_ALIVE`` is answered ``{"op":"NOTIFY","param":{}}`` (before or after APP_ACCESS).
- ``NET_OTA_SINGLE`` PUT ``{"status":"1"}`` opens 3335 and answers status "1" (status "0" in a
  double-backup build); PUT status "0" answers "0" and does nothing; GET is errno 6.
- Unknown topics: errno 6 (``CTP_NO_TOPIC_MSG``).
- 60 s (scaled) with no frame: the device drops the connection.
- Bad magic, an absurd length or invalid JSON: the simulator logs it and drops the connection (the
  device would read the next 4 bytes and carry on; netota never relies on that).

Loader stub (research §2b): answers only the first chunk of a connection, whatever it holds, with an
``APP_ACCESS`` NOTIFY whose ``ver`` is the digits after ``ver":"`` in that chunk up to its first NUL
byte (so always 20906 for a framed request); ignores everything else; a second concurrent
connection gets no reply at all.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.wire.ctp import CtpDecoder, CtpFrame, CtpProtocolError, encode_frame, notify

if TYPE_CHECKING:
    from netota_daemon.sim.device import SimulatedDevice

log = Logger()

ERRNO_REQUEST = 4
ERRNO_ACCESS_RFU = 3
ERRNO_NO_TOPIC = 6
LOADER_DEFAULT_VER = 20906
_VER_PATTERN = re.compile(rb'ver":"([0-9]*)')


def device_info(device: SimulatedDevice) -> dict[str, dict[str, str]]:
    """The GET topics the main firmware pushes after APP_ACCESS, in order, with their values."""
    interval_ms = max(1, int(device.config.ctp_idle_timeout * device.config.time_scale * 1000))
    return {
        "KEEP_ALIVE_INTERVAL": {"timeout": str(interval_ms)},
        "SD_STATUS": {"online": "0"},
        "BAT_STATUS": {"level": "4"},
        "UUID": {"uuid": device.config.uuid},
    }


class MainCtpProtocol(Protocol):
    """One CTP connection to the main firmware."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.decoder = CtpDecoder()
        self.timers = device.new_timers()
        self._idle: Any = None
        self.peer_host = ""
        self.closing = False

    def connectionMade(self) -> None:
        self.peer_host = self.transport.getPeer().host
        self.device.record("ctp_connect", peer=self.peer_host)
        holder = self.device.ctp_holder
        if holder is not None and holder is not self and holder.peer_host == self.peer_host:
            self.device.record("ctp_replaced", peer=self.peer_host)
            self.device.ctp_holder = None
            holder.close()
        self._reset_idle()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.timers.close()
        if self.device.ctp_holder is self:
            self.device.ctp_holder = None

    def close(self) -> None:
        self.closing = True
        self.transport.abortConnection()

    def _reset_idle(self) -> None:
        self.timers.cancel(self._idle)
        self._idle = self.timers.later(self.device.config.ctp_idle_timeout, self._idle_drop)

    def _idle_drop(self) -> None:
        self.device.record("ctp_idle_drop", peer=self.peer_host)
        self.close()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except CtpProtocolError as e:
            self.device.record("ctp_bad_frame", peer=self.peer_host, error=str(e))
            self.close()
            return
        for frame in frames:
            if self.closing:
                return
            self._reset_idle()
            self._handle(frame)

    def _send(self, data: bytes) -> None:
        self.transport.write(data)

    def _handle(self, frame: CtpFrame) -> None:
        device = self.device
        device.record("ctp_frame", topic=frame.topic, op=frame.op)
        if frame.topic == "CTP_KEEP_ALIVE":
            self._send(notify("CTP_KEEP_ALIVE", {}))
            return
        holder = device.ctp_holder
        if holder is not None and holder is not self:
            self._send(notify(frame.topic, {"msg": "CTP_ACCESS_RFU_MSG"}, errno=ERRNO_ACCESS_RFU))
            device.record("ctp_access_refused", peer=self.peer_host, holder=holder.peer_host)
            self.closing = True
            self.transport.loseConnection()
            return
        if frame.topic == "APP_ACCESS":
            param = frame.param
            device.ctp_holder = self
            self._send(notify("APP_ACCESS", {"type": param.get("type", ""), "ver": param.get("ver", "")}))
            for topic, values in device_info(device).items():
                self._send(notify(topic, values))
            device.record("app_access", peer=self.peer_host, type=param.get("type"), ver=param.get("ver"))
            return
        if holder is not self:
            self._send(notify(frame.topic, {"msg": "CTP_REQUEST_MSG"}, errno=ERRNO_REQUEST))
            return
        op = frame.op
        if frame.topic == "NET_OTA_SINGLE" and op == "PUT":
            wanted = str(frame.param.get("status", ""))
            status = "0"
            if wanted != "0" and not device.config.double_backup:
                status = "1" if device.open_ota_for_phase1() else "0"
            device.record("net_ota_single", requested=wanted, status=status)
            self._send(notify("NET_OTA_SINGLE", {"status": status}))
            return
        info = device_info(device)
        if op == "GET" and frame.topic in info:
            self._send(notify(frame.topic, info[frame.topic]))
            return
        self._send(notify(frame.topic, {"msg": "CTP_NO_TOPIC_MSG"}, errno=ERRNO_NO_TOPIC))


def loader_access_reply(chunk: bytes) -> bytes:
    """The loader's one reply to the first chunk of a CTP connection."""
    text = chunk.split(b"\x00", 1)[0]
    match = _VER_PATTERN.search(text)
    digits = match.group(1) if match else b""
    version = int(digits) if digits else 0
    content = b'{"op":"NOTIFY","param":{"type":"0","ver":"%d"}}' % (version or LOADER_DEFAULT_VER)
    return encode_frame("APP_ACCESS", content)


class LoaderCtpProtocol(Protocol):
    """One CTP connection to the phase-2 loader."""

    def __init__(self, device: SimulatedDevice) -> None:
        self.device = device
        self.first_chunk_seen = False
        self.counted = False

    def connectionMade(self) -> None:
        self.device.record("ctp_connect", peer=self.transport.getPeer().host)

    def dataReceived(self, data: bytes) -> None:
        if self.first_chunk_seen:
            return
        self.first_chunk_seen = True
        if self.device.loader_ctp_answered:
            self.device.record("ctp_ignored", reason="another CTP connection was answered")
            return
        self.device.loader_ctp_answered += 1
        self.counted = True
        self.transport.write(loader_access_reply(data))
        self.device.record("app_access", peer=self.transport.getPeer().host)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.counted:  # never below 0: a reboot may have reset the count already
            self.device.loader_ctp_answered = max(0, self.device.loader_ctp_answered - 1)


class CtpFactory(Factory):
    def __init__(self, device: SimulatedDevice, loader: bool) -> None:
        self.device = device
        self.loader = loader

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = LoaderCtpProtocol(self.device) if self.loader else MainCtpProtocol(self.device)
        return self.device.track(protocol)
