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

Each server is one factory per boot, holding its own state: :class:`MainCtpServer` the access holder,
:class:`LoaderCtpServer` how many answered connections are open. A reboot builds new ones.
"""

from __future__ import annotations

import re

from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.sim.connections import address_host, connection
from netota_daemon.sim.host import CtpHost, EventHost
from netota_daemon.sim.timers import DeviceTimers
from netota_daemon.wire.ctp import CtpDecoder, CtpFrame, CtpProtocolError, encode_frame, notify

log = Logger()

ERRNO_REQUEST = 4
ERRNO_ACCESS_RFU = 3
ERRNO_NO_TOPIC = 6
LOADER_DEFAULT_VER = 20906
_VER_PATTERN = re.compile(rb'ver":"([0-9]*)')


def device_info(host: EventHost) -> dict[str, dict[str, str]]:
    """The GET topics the main firmware pushes after APP_ACCESS, in order, with their values."""
    interval_ms = max(1, int(host.config.ctp_idle_timeout * host.config.time_scale * 1000))
    return {
        "KEEP_ALIVE_INTERVAL": {"timeout": str(interval_ms)},
        "SD_STATUS": {"online": "0"},
        "BAT_STATUS": {"level": "4"},
        "UUID": {"uuid": host.config.uuid},
    }


class MainCtpServer(Factory):
    """The main firmware's CTP server for one boot: its connections and the one access holder."""

    def __init__(self, host: CtpHost) -> None:
        self.host = host
        self.holder: MainCtpProtocol | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return MainCtpProtocol(self)


class MainCtpProtocol(Protocol):
    """One CTP connection to the main firmware."""

    def __init__(self, server: MainCtpServer) -> None:
        self.server = server
        self.host = server.host
        self.decoder = CtpDecoder()
        self.timers = DeviceTimers(self.host.reactor, self.host.config.time_scale)
        self._idle: IDelayedCall | None = None
        self.peer_host = ""
        self.closing = False

    def connectionMade(self) -> None:
        self.peer_host = address_host(connection(self.transport).getPeer())
        self.host.record("ctp_connect", peer=self.peer_host)
        holder = self.server.holder
        if holder is not None and holder is not self and holder.peer_host == self.peer_host:
            self.host.record("ctp_replaced", peer=self.peer_host)
            self.server.holder = None
            holder.close()
        self._reset_idle()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.timers.close()
        if self.server.holder is self:
            self.server.holder = None

    def close(self) -> None:
        self.closing = True
        connection(self.transport).abortConnection()

    def _reset_idle(self) -> None:
        self.timers.cancel(self._idle)
        self._idle = self.timers.later(self.host.config.ctp_idle_timeout, self._idle_drop)

    def _idle_drop(self) -> None:
        self.host.record("ctp_idle_drop", peer=self.peer_host)
        self.close()

    def dataReceived(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except CtpProtocolError as e:
            self.host.record("ctp_bad_frame", peer=self.peer_host, error=str(e))
            self.close()
            return
        for frame in frames:
            if self.closing:
                return
            self._reset_idle()
            self._handle(frame)

    def _send(self, data: bytes) -> None:
        connection(self.transport).write(data)

    def _handle(self, frame: CtpFrame) -> None:
        host = self.host
        host.record("ctp_frame", topic=frame.topic, op=frame.op)
        if frame.topic == "CTP_KEEP_ALIVE":
            self._send(notify("CTP_KEEP_ALIVE", {}))
            return
        holder = self.server.holder
        if holder is not None and holder is not self:
            self._send(notify(frame.topic, {"msg": "CTP_ACCESS_RFU_MSG"}, errno=ERRNO_ACCESS_RFU))
            host.record("ctp_access_refused", peer=self.peer_host, holder=holder.peer_host)
            self.closing = True
            connection(self.transport).loseConnection()
            return
        if frame.topic == "APP_ACCESS":
            param = frame.param
            self.server.holder = self
            self._send(notify("APP_ACCESS", {"type": param.get("type", ""), "ver": param.get("ver", "")}))
            for topic, values in device_info(host).items():
                self._send(notify(topic, values))
            host.record("app_access", peer=self.peer_host, type=param.get("type"), ver=param.get("ver"))
            return
        if holder is not self:
            self._send(notify(frame.topic, {"msg": "CTP_REQUEST_MSG"}, errno=ERRNO_REQUEST))
            return
        op = frame.op
        if frame.topic == "NET_OTA_SINGLE" and op == "PUT":
            wanted = str(frame.param.get("status", ""))
            status = "0"
            if wanted != "0" and not host.config.double_backup:
                status = "1" if host.open_ota_for_phase1() else "0"
            host.record("net_ota_single", requested=wanted, status=status)
            self._send(notify("NET_OTA_SINGLE", {"status": status}))
            return
        info = device_info(host)
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


class LoaderCtpServer(Factory):
    """The loader's CTP stub for one boot: how many answered connections are open (0 or 1)."""

    def __init__(self, host: EventHost) -> None:
        self.host = host
        self.answered = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return LoaderCtpProtocol(self)


class LoaderCtpProtocol(Protocol):
    """One CTP connection to the phase-2 loader."""

    def __init__(self, server: LoaderCtpServer) -> None:
        self.server = server
        self.first_chunk_seen = False
        self.counted = False

    def connectionMade(self) -> None:
        self.server.host.record("ctp_connect", peer=address_host(connection(self.transport).getPeer()))

    def dataReceived(self, data: bytes) -> None:
        if self.first_chunk_seen:
            return
        self.first_chunk_seen = True
        server = self.server
        if server.answered:
            server.host.record("ctp_ignored", reason="another CTP connection was answered")
            return
        server.answered += 1
        self.counted = True
        transport = connection(self.transport)
        transport.write(loader_access_reply(data))
        server.host.record("app_access", peer=address_host(transport.getPeer()))

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.counted:
            self.server.answered -= 1


def ctp_server(host: CtpHost, loader: bool) -> MainCtpServer | LoaderCtpServer:
    """The CTP server of one boot: the loader's stub or the main firmware's."""
    return LoaderCtpServer(host) if loader else MainCtpServer(host)
