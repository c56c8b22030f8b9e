"""FTP on TCP 21 of a double-backup device: the vendor's lwIP ftpd, sharp edges included.

What it models (the FTP route's research notes: ``lib/net/ftp_server/src/ftpd.c``, ``vfs.c``,
``net_update.c``):

- Greeting ``220 lwIP FTP Server ready.`` (``stupid_ftpd``: ``220 Welcome to Stupid-FTPd server.``,
  and REST/SIZE answered). Replies are the ftpd's own texts, one line each, CRLF.
- **Each received TCP segment is parsed as exactly one command**: trailing CR/LF stripped, the verb
  is its leading letters (at most 4, any case), the argument everything after the verb and one
  character. Two commands in one segment run as the first, with the rest in its argument; a
  command split over two segments runs as two broken commands. Both are recorded as
  ``ftp_protocol_error`` (``coalesced``, ``split``): what a device would make of them, and what a
  client must never send. (A ``dataReceived`` chunk stands for a segment: a client that writes
  two commands without waiting for the reply may see them coalesced by its own TCP stack, which is
  exactly the hazard.)
- Login: USER then PASS compared case-sensitively with ``FTPX`` / ``12345678``; a wrong pair gets
  ``503 Login incorrect. Login failed.`` and the connection is closed. Login is not enforced: STOR
  works without it.
- PASV: a listener on the control connection's local address, on a port from a counter that starts
  at ``pasv_base`` (4096) and is incremented before use (first 4097), wrapping after 32767 back to
  its start; a port in use is skipped, as lwIP's bind loop does. The listener accepts one data
  connection. A second PASV leaks the first listener (it stays open until the device reboots;
  connections to it are refused): ``ftp_protocol_error`` ``second_pasv``.
- ``fsm->passive`` is never reset and the data state is freed after each transfer: a STOR or
  LIST without a fresh PASV, or PORT after PASV, dereferences NULL; ABOR calls ``tcp_abort`` on the
  control connection (no reply) and uses freed memory. The simulator records each as
  ``ftp_crash`` and the device resets at once (nothing burned): the worst case, which a client
  must never cause.
- 502 ``Command not implemented.`` for EPSV, EPRT, FEAT, OPTS, SIZE, REST, APPE, MDTM, MODE and any
  unknown verb; TYPE/NOOP/PORT 200, SYST 214, CWD/CDUP 250, PWD 257, QUIT 221 and close.
- STOR of a name containing ``update-ota.ufw`` (case-sensitive) goes to the dual-bank writer
  (:mod:`netota_daemon.sim.dual_bank`): 550 while an upgrade is running (a burn, or the reset
  after one) or once with ``--ftp-busy-once``; an earlier OTA file left open is cancelled first.
  Other names are the SD card's: no card, 550. RETR, DELE, MKD, RMD, RNTO: 550 (RNFR: 350).
  LIST/NLST: an empty listing (no card) over the data connection, then 226.
- The end of an upload: a clean close of the data connection burns (``burn_seconds``) and then
  sends ``226 Closing data connection.``, the same on success and on failure; a good image resets
  the device 2 s later into the new version. A reset data connection burns nothing, leaves the
  file open and sends no 226. The control connection lost during an upload looks like a clean
  end: the burn is attempted (no 226 can be sent).
- Flash writes throttle TCP (``flash_kbps``): the data connection is not read while the device
  writes flash, as its blocking writes in the network thread do.

Active mode (PORT, then a transfer) is answered but not modelled: the transfer gets 425
(``ftp_not_modelled``). Nothing here limits the number of clients, as on the device; cwd and the
OTA state are global to the server (one per boot).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.interfaces import IAddress, IListeningPort, IProtocolFactory
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon.sim.config import PASV_COUNTER_LAST
from netota_daemon.sim.connections import address_host, connection
from netota_daemon.sim.dual_bank import BurnResult, DualBankWriter
from netota_daemon.sim.host import EventHost
from netota_daemon.sim.timers import DeviceTimers

log = Logger()

OTA_FILE_NAME = "update-ota.ufw"
#: The longest command line the simulator reads from one segment (lwIP's pbuf is smaller).
MAX_SEGMENT = 4096
#: Segments kept while the ftpd is blocked in a burn (TCP would hold them); more are dropped.
MAX_QUEUED = 64

GREETING_LWIP = "220 lwIP FTP Server ready."
GREETING_STUPID = "220 Welcome to Stupid-FTPd server."
R150_LIST = "150 File status okay; about to open data connection."
R150_STOR = "150 Opening BINARY mode data connection for {name}."
R200 = "200 Command okay."
R214_SYST = "214 UNIX system type."
R221 = "221 Goodbye."
R226 = "226 Closing data connection."
R227 = "227 Entering Passive Mode ({h1},{h2},{h3},{h4},{p1},{p2})."
R230 = "230 User logged in, proceed."
R250 = "250 Requested file action okay, completed."
R257_PWD = '257 "/" is current directory.'
R331 = "331 User name okay, need password."
R350 = "350 Requested file action pending further information."
R425 = "425 Can't open data connection."
R502 = "502 Command not implemented."
R503_LOGIN = "503 Login incorrect. Login failed."
R550 = "550 Requested action not taken."
#: Stupid-FTPd's answers to what lwIP's ftpd lacks (texts not known: these are the simulator's).
R350_REST = "350 Restarting at {offset}."
R550_SIZE = "550 Could not get file size."


class FtpCrash(str, enum.Enum):
    """What crashes the device's ftpd (``ftp_crash.cause``)."""

    ABOR = "abor"
    NO_FRESH_PASV = "no_fresh_pasv"  # a transfer without a PASV since the last one
    PORT_AFTER_PASV = "port_after_pasv"


class SegmentProblem(str, enum.Enum):
    """``ftp_protocol_error.kind`` for a segment that is not exactly one command."""

    COALESCED = "coalesced"  # more than one line in one segment
    SPLIT = "split"  # a segment without a line end: the rest comes in another


@dataclass(frozen=True)
class FtpCommand:
    """One segment as the device parses it."""

    verb: str  # upper case, at most 4 letters ("" when the segment starts with none)
    arg: str
    problems: tuple[SegmentProblem, ...] = ()


def parse_segment(segment: bytes) -> FtpCommand:
    """Parse one received TCP segment the way the device's ftpd does: as exactly one command."""
    problems: list[SegmentProblem] = []
    if not segment.endswith(b"\n"):
        problems.append(SegmentProblem.SPLIT)
    text = segment[:MAX_SEGMENT].rstrip(b"\r\n").decode("latin-1")
    if "\r" in text or "\n" in text:
        problems.append(SegmentProblem.COALESCED)
    verb = ""
    for char in text[:4]:
        if not char.isascii() or not char.isalpha():
            break
        verb += char
    return FtpCommand(verb.upper(), text[len(verb) + 1 :], tuple(problems))


class PasvCounter:
    """The ftpd's global PASV port counter: incremented before use, wrapping after 32767."""

    def __init__(self, base: int) -> None:
        self.base = base
        self.value = base

    def next(self) -> int:
        self.value += 1
        if self.value > PASV_COUNTER_LAST:
            self.value = self.base
        return self.value

    @property
    def size(self) -> int:
        return PASV_COUNTER_LAST - self.base + 1


class FtpHost(EventHost, TypingProtocol):
    """What the FTP server needs from its device."""

    def listen_data(self, port: int, factory: IProtocolFactory, interface: str) -> IListeningPort:
        """Listen for a passive data connection (closed by the next reboot at the latest);
        raises ``CannotListenError`` when the port is in use."""
        ...

    def ftp_crashed(self, cause: FtpCrash, verb: str) -> None:
        """The ftpd dereferenced NULL or used freed memory: the device resets."""
        ...

    def upgrade_burned(self, version: str | None) -> None:
        """A good upload was burned: the device resets into the new bank shortly."""
        ...

    def write_upload(self, data: bytes) -> None:
        """Keep the bytes of the last OTA upload (``db-received.bin``)."""
        ...

    def stop_data_listener(self, listener: IListeningPort) -> None:
        """Stop a PASV listener now (it accepted its connection)."""
        ...


class FtpServer(Factory):
    """The device's ftpd for one boot: its global state (PASV counter, the OTA file) and clients."""

    def __init__(self, host: FtpHost) -> None:
        self.host = host
        self.timers = DeviceTimers(host.reactor, host.config.time_scale)  # the burns
        self.pasv = PasvCounter(host.config.pasv_base)
        self.left_open: DualBankWriter | None = None  # an OTA file whose data connection was reset
        self.upgrade_running = False  # a burn, or the reset after a good one: net_fopen refuses

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return FtpControlProtocol(self)

    def shutdown(self) -> None:
        """The device goes down: a burn in progress never ends."""
        self.timers.close()


@dataclass
class Passive:
    """One PASV: its listener and, once connected, its data connection."""

    port: int
    listener: IListeningPort
    data: FtpDataProtocol | None = None
    used: bool = False  # the data state was freed (a transfer ended, or the data connection closed)
    leaked: bool = False  # a later PASV replaced it without freeing it


@dataclass
class Upload:
    """A STOR of the OTA file in progress."""

    name: str
    writer: DualBankWriter
    passive: Passive
    pauses: set[str] = field(default_factory=set)  # why reading the data connection is paused


class FtpControlProtocol(Protocol):
    """One control connection."""

    def __init__(self, server: FtpServer) -> None:
        self.server = server
        self.host = server.host
        self.config = server.host.config
        self.timers = DeviceTimers(self.host.reactor, self.config.time_scale)
        self.user: str | None = None
        self.passive: Passive | None = None
        self.ever_passive = False  # fsm->passive: set by the first PASV, never reset
        self.port_given = False  # PORT was answered (active mode: not modelled)
        self.upload: Upload | None = None
        self.listing = False  # a LIST/NLST waits for its data connection
        self.burning = False  # 226 waits for the burn; segments meanwhile wait in the queue
        self._queued: list[bytes] = []
        self.peer = ""
        self.closed = False

    # -- connection -----------------------------------------------------------------------------
    def connectionMade(self) -> None:
        self.peer = address_host(connection(self.transport).getPeer())
        self.host.record("ftp_connect", peer=self.peer)
        self._reply(GREETING_STUPID if self.config.stupid_ftpd else GREETING_LWIP)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.timers.close()
        upload = self.upload
        if upload is not None:
            # The session's close runs vfs_close(file, 0): it looks like a clean end, so the burn is tried.
            self.upload = None
            if upload.passive.data is not None and upload.passive.data.transport is not None:
                connection(upload.passive.data.transport).abortConnection()
            self._finish_upload(upload, "control_lost")

    def _reply(self, line: str) -> None:
        if not self.closed:
            connection(self.transport).write(line.encode("latin-1") + b"\r\n")

    def _close(self) -> None:
        self.closed = True
        connection(self.transport).loseConnection()

    # -- commands -------------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.burning:
            if len(self._queued) < MAX_QUEUED:
                self._queued.append(data)  # the ftpd is blocked in net_fclose
            else:
                self.host.record("ftp_protocol_error", kind="flood", segment=f"{len(data)} bytes dropped during a burn")
            return
        if not self.closed:
            self._segment(data)

    def _segment(self, data: bytes) -> None:
        command = parse_segment(data)
        for problem in command.problems:
            self.host.record("ftp_protocol_error", kind=problem.value, segment=data[:200].decode("latin-1"))
        reply = self._dispatch(command)
        arg = "*" * len(command.arg) if command.verb == "PASS" else command.arg[:200]
        self.host.record("ftp_command", verb=command.verb, arg=arg, reply=int(reply[:3]) if reply else None)
        if reply:
            self._reply(reply)

    def _dispatch(self, command: FtpCommand) -> str | None:
        """Run one command; the reply line to send (None: none, or already sent)."""
        verb, arg = command.verb, command.arg
        config = self.config
        if verb == "USER":
            self.user = arg
            return R331
        if verb == "PASS":
            return self._login(arg)
        if verb in ("TYPE", "NOOP"):
            return R200
        if verb == "SYST":
            return R214_SYST
        if verb in ("CWD", "CDUP"):
            return R250
        if verb in ("PWD", "XPWD"):
            return R257_PWD
        if verb == "QUIT":
            self._reply(R221)
            self._close()
            return None
        if verb == "ABOR":
            self._crash(FtpCrash.ABOR, verb)
            return None
        if verb == "PORT":
            if self.ever_passive:
                self._crash(FtpCrash.PORT_AFTER_PASV, verb)
                return None
            self.port_given = True
            return R200
        if verb == "PASV":
            return self._pasv()
        if verb in ("LIST", "NLST"):
            return self._list(verb)
        if verb == "STOR":
            return self._stor(arg)
        if verb == "RNFR":
            return R350
        if verb in ("RETR", "RNTO", "DELE", "MKD", "XMKD", "RMD", "XRMD"):
            return R550  # the SD card's (none), or the write-only OTA file
        if config.stupid_ftpd and verb == "REST":
            return R350_REST.format(offset=arg.strip())
        if config.stupid_ftpd and verb == "SIZE":
            return R550_SIZE
        return R502

    def _login(self, password: str) -> str | None:
        faults = self.host.faults
        if self.config.ftp_reject_login_once and not faults.ftp_reject_login_used:
            faults.ftp_reject_login_used = True
            self.host.record("ftp_fault_reject_login", user=self.user)
            ok = False
        else:
            ok = self.user == self.config.ftp_user and password == self.config.ftp_password
        self.host.record("ftp_login", user=self.user, ok=ok)
        if ok:
            return R230
        self._reply(R503_LOGIN)
        self._close()
        return None

    def _crash(self, cause: FtpCrash, verb: str) -> None:
        self.closed = True
        self.upload = None  # the reset comes first: nothing is burned
        self.host.ftp_crashed(cause, verb)

    # -- passive mode ---------------------------------------------------------------------------
    def _pasv(self) -> str | None:
        if self.passive is not None and not self.passive.used:
            self.passive.leaked = True
            self.host.record(
                "ftp_protocol_error", kind="second_pasv", segment=f"PASV while port {self.passive.port} waits (leaked)"
            )
        address = address_host(connection(self.transport).getHost())
        counter = self.server.pasv
        for _ in range(counter.size):
            port = counter.next()
            passive_factory = PassiveFactory(self)
            try:
                listener = self.host.listen_data(port, passive_factory, address)
            except error.CannotListenError:
                continue  # lwIP's bind loop: ERR_USE, try the next port
            self.passive = passive_factory.passive = Passive(port, listener)
            self.ever_passive = True
            self.host.record("ftp_pasv", port=port, address=address)
            h1, h2, h3, h4 = (address.split(".") + ["0"] * 4)[:4]
            return R227.format(h1=h1, h2=h2, h3=h3, h4=h4, p1=port >> 8, p2=port & 0xFF)
        self.host.record("ftp_pasv_failed", reason="every port of the counter is in use")
        return None  # lwIP gives up without a reply

    def _fresh_passive(self, verb: str) -> Passive | None:
        """The passive state a transfer uses; None when there is none fresh (the device crashed)."""
        passive = self.passive
        if passive is not None and not passive.used and not passive.leaked:
            return passive
        self._crash(FtpCrash.NO_FRESH_PASV, verb)
        return None

    def _list(self, verb: str) -> str | None:
        if self.port_given and not self.ever_passive:
            self.host.record("ftp_not_modelled", verb=verb, detail="active mode (PORT)")
            return R425
        passive = self._fresh_passive(verb)
        if passive is None:
            return None
        self.listing = True
        self._reply(R150_LIST)
        if passive.data is not None:
            self.send_listing()
        return None

    def send_listing(self) -> None:
        """The (empty: no SD card) listing, once the data connection is there; then 226."""
        passive = self.passive
        if not self.listing or passive is None or passive.data is None:
            return
        self.listing = False
        passive.used = True
        if passive.data.transport is not None:
            connection(passive.data.transport).loseConnection()
        self._reply(R226)

    # -- STOR -------------------------------------------------------------------------------------
    def _stor(self, name: str) -> str | None:
        if OTA_FILE_NAME not in name:
            return R550  # the SD card (there is none)
        server = self.server
        faults = self.host.faults
        if server.left_open is not None:
            self.host.record("db_cancelled", bytes=server.left_open.total)  # net_fclose(NULL, 1): nothing burned
            server.left_open = None
        if self.config.ftp_busy_once and not faults.ftp_busy_used:
            faults.ftp_busy_used = True
            self.host.record("ftp_fault_busy")
            return R550
        if server.upgrade_running or self.upload is not None:
            return R550  # net_fopen: "err ota update is doing"
        if self.port_given and not self.ever_passive:
            self.host.record("ftp_not_modelled", verb="STOR", detail="active mode (PORT)")
            return R425
        passive = self._fresh_passive("STOR")
        if passive is None:
            return None
        self.upload = Upload(name, DualBankWriter(self.config.flash_kbps), passive)
        self.host.record("ftp_upload_start", name=name)
        return R150_STOR.format(name=name)

    def upload_data(self, passive: Passive, data: bytes) -> None:
        """Bytes from the data connection of ``passive``."""
        upload = self.upload
        if upload is None or upload.passive is not passive:
            self.host.record("ftp_protocol_error", kind="data_before_stor", segment=f"{len(data)} bytes dropped")
            return
        config = self.config
        faults = self.host.faults
        before = upload.writer.total
        drop = config.ftp_drop_after_bytes
        if drop is not None and not faults.ftp_drop_used and before + len(data) >= drop:
            faults.ftp_drop_used = True
            upload.writer.write(data[: max(0, drop - before)])
            self.host.record("ftp_fault_drop", bytes=upload.writer.total)
            if passive.data is not None and passive.data.transport is not None:
                connection(passive.data.transport).abortConnection()
            return
        seconds = upload.writer.write(data)
        if seconds > 0:
            self._pause(upload, "flash", seconds)
        stall = config.ftp_stall
        if stall is not None and not faults.ftp_stall_used and upload.writer.total >= stall.after:
            faults.ftp_stall_used = True
            self.host.record("ftp_fault_stall", bytes=upload.writer.total, seconds=stall.seconds)
            self._pause(upload, "stall", stall.seconds)

    def _pause(self, upload: Upload, why: str, seconds: float) -> None:
        data = upload.passive.data
        if data is None or data.transport is None:
            return
        if not upload.pauses:
            connection(data.transport).pauseProducing()
        upload.pauses.add(why)
        self.timers.later(seconds, self._unpause, upload, why)

    def _unpause(self, upload: Upload, why: str) -> None:
        upload.pauses.discard(why)
        data = upload.passive.data
        if not upload.pauses and data is not None and data.transport is not None and not data.gone:
            connection(data.transport).resumeProducing()

    def data_closed(self, passive: Passive, clean: bool) -> None:
        """The data connection of ``passive`` is gone (clean: a FIN; else a reset)."""
        passive.used = True
        upload = self.upload
        if upload is None or upload.passive is not passive:
            return
        self.upload = None
        if clean:
            self._finish_upload(upload, "closed")
        else:
            # The data state is freed without closing the file: no burn, no 226, the file stays open.
            self.server.left_open = upload.writer
            self._upload_ended(upload, "reset")

    def _upload_ended(self, upload: Upload, outcome: str) -> None:
        writer = upload.writer
        self.host.write_upload(bytes(writer.received))
        self.host.record("ftp_upload_end", name=upload.name, outcome=outcome, bytes=writer.total, sha256=writer.sha256)

    def _finish_upload(self, upload: Upload, outcome: str) -> None:
        """net_fclose: the burn (if nothing failed), then 226 where the control connection still is."""
        self._upload_ended(upload, outcome)
        writer = upload.writer
        if writer.head_error or writer.error:
            self.host.record("db_head_rejected" if writer.head_error else "db_write_error", reason=writer.error)
        if not writer.will_burn:
            self._burned(writer.close())
            return
        self.server.upgrade_running = True
        self.burning = True
        self.server.timers.later(self.config.burn_seconds, self._burn_done, writer)

    def _burn_done(self, writer: DualBankWriter) -> None:
        self.burning = False
        self._burned(writer.close())

    def _burned(self, result: BurnResult) -> None:
        self.host.record(
            "db_burn",
            burned=result.burned,
            reason=result.reason,
            bytes=result.received_bytes,
            image_length=result.image_length,
            version=result.version,
        )
        self.server.upgrade_running = result.burned
        self._reply(R226)  # the same on success and failure
        if result.burned:
            self.host.upgrade_burned(result.version)
        queued, self._queued = self._queued, []
        for segment in queued:
            if self.closed or self.burning:
                self._queued.append(segment)
                continue
            self._segment(segment)


class PassiveFactory(Factory):
    """The PASV listener's factory: one data connection for its :class:`Passive`."""

    def __init__(self, control: FtpControlProtocol) -> None:
        self.control = control
        self.passive: Passive | None = None

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return FtpDataProtocol(self.control, self.passive)


class FtpDataProtocol(Protocol):
    """A passive data connection."""

    def __init__(self, control: FtpControlProtocol, passive: Passive | None) -> None:
        self.control = control
        self.passive = passive
        self.accepted = False
        self.gone = False

    def connectionMade(self) -> None:
        passive = self.passive
        host = self.control.host
        transport = connection(self.transport)
        reason = None
        if passive is None or passive.leaked:
            reason = "a leaked PASV listener"
        elif passive.data is not None or passive.used:
            reason = "a second data connection to one PASV"
        if reason is not None or passive is None:
            host.record("ftp_data_refused", port=passive.port if passive else None, reason=reason)
            transport.abortConnection()
            return
        self.accepted = True
        passive.data = self
        host.record("ftp_data_connect", port=passive.port, peer=address_host(transport.getPeer()))
        host.stop_data_listener(passive.listener)  # one connection per PASV
        self.control.send_listing()

    def dataReceived(self, data: bytes) -> None:
        if self.accepted and self.passive is not None:
            self.control.upload_data(self.passive, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        if self.accepted and self.passive is not None:
            self.control.data_closed(self.passive, clean=isinstance(reason.value, error.ConnectionDone))
