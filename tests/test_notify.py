"""Job-end hooks: the webhook's retries and bounds on a Clock (treq's StubTreq, in memory) and against
a real HTTP server on loopback; the command with a real ``sh``; its time limit on a Clock."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import Logger, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from netota_daemon.daemon.notify import (
    KILL_GRACE,
    CommandHook,
    JobNotifier,
    Notification,
    NotifyConfigError,
    check_webhook_url,
    default_http_client,
    job_environment,
    url_for_log,
)
from netota_daemon.protocols.log_limit import LogLimiter
from netota_daemon.protocols.shell_process import OUTPUT_DRAIN, SETSID
from tests.waiting import Changes

URL = "http://hooks.example/netota/T0KEN-SECRET?key=abc"

JOB = {
    "id": "3f2a9c0d1e4b",
    "device": "shelf1",
    "firmware": "ac79-2.0.0.ufw",
    "state": "finished",
    "phase": "done",
    "outcome": {"kind": "failed", "failure": "timeout", "phase": "phase2", "message": "no reply", "advice": "wait"},
    "batch": "b-1234",
}


def job(n: int) -> dict:
    return {**JOB, "id": f"job{n}"}


class Recorder(Resource):
    """Answers each POST with the next status of ``statuses`` (then 200); ``hold`` never answers."""

    isLeaf = True

    def __init__(self, statuses=(), hold=False):
        super().__init__()
        self.statuses = list(statuses)
        self.hold = hold
        self.requests: list[tuple[dict, bytes]] = []
        self.arrived: list[defer.Deferred] = []

    def render_POST(self, request):
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((headers, request.content.read()))
        waiters, self.arrived = self.arrived, []
        for d in waiters:
            d.callback(len(self.requests))
        if self.hold:
            return NOT_DONE_YET
        status = self.statuses.pop(0) if self.statuses else 200
        request.setResponseCode(status)
        return b"answer " + str(status).encode() + b" " + b"x" * 5000

    def next_request(self, reactor, timeout=20.0):
        d: defer.Deferred = defer.Deferred()
        self.arrived.append(d)
        return d.addTimeout(timeout, reactor)


def notifier(clock, resource, **kwargs):
    stub = StubTreq(resource)
    kwargs.setdefault("retry_delay", lambda attempt: [1.0, 2.0, 4.0, 8.0][attempt])
    return JobNotifier(clock, webhook=URL, http_client=stub, clock=clock, **kwargs), stub


# ----- the webhook, in memory


def test_the_job_is_posted_as_json_and_retried_with_backoff_until_it_is_taken():
    clock = Clock()
    resource = Recorder(statuses=[503, 500, 429])
    hooks, stub = notifier(clock, resource, attempts=4, timeout=5.0)
    hooks.job_ended(JOB)
    stub.flush()
    assert len(resource.requests) == 1
    headers, body = resource.requests[0]
    assert json.loads(body) == JOB
    assert headers["content-type"] == "application/json"
    assert headers["x-netota-event"] == "job_end"
    assert headers["user-agent"].startswith("netota/")
    for delay, count in ((1.0, 2), (2.0, 3), (4.0, 4)):
        clock.advance(delay - 0.01)
        stub.flush()
        assert len(resource.requests) == count - 1  # not before its delay
        clock.advance(0.01)
        stub.flush()
        assert len(resource.requests) == count
    assert hooks.stats() == {"webhook": {"sent": 1, "failed": 0, "dropped": 0, "attempts": 4, "pending": 0}}
    assert clock.getDelayedCalls() == []


def test_a_refusal_is_not_retried_and_is_logged_without_the_urls_secret():
    clock = Clock()
    resource = Recorder(statuses=[400])
    hooks, stub = notifier(clock, resource, attempts=4)
    with capturedLogs() as events:
        hooks.job_ended(JOB)
        stub.flush()
    assert len(resource.requests) == 1
    assert hooks.stats()["webhook"]["failed"] == 1 and hooks.stats()["webhook"]["sent"] == 0
    warnings = [e for e in events if e["log_format"].startswith("{hook} for job")]
    assert len(warnings) == 1
    text = warnings[0]["log_format"].format(**warnings[0])
    assert text.startswith("webhook http://hooks.example for job 3f2a9c0d1e4b on shelf1 failed: HTTP 400: answer 400")
    assert "(not retried)" in text and "(the job is not affected)" in text
    assert "SECRET" not in text and "key=abc" not in text
    assert len(text) < 400  # the answer's body is cut
    assert clock.getDelayedCalls() == []


def test_every_attempt_is_bounded_and_the_last_error_is_reported():
    clock = Clock()
    resource = Recorder(hold=True)
    hooks, stub = notifier(clock, resource, attempts=3, timeout=5.0)
    with capturedLogs() as events:
        hooks.job_ended(JOB)
        stub.flush()
        for step in (5.0, 1.0, 5.0, 2.0, 5.0):
            assert hooks.stats()["webhook"]["failed"] == 0
            clock.advance(step)
            stub.flush()
    assert len(resource.requests) == 3
    assert hooks.stats()["webhook"] == {"sent": 0, "failed": 1, "dropped": 0, "attempts": 3, "pending": 0}
    (warning,) = [e for e in events if e["log_format"].startswith("{hook} for job")]
    assert warning["error"] == "timed out after 5 s (after 3 attempt(s))"


def test_a_dead_endpoint_cannot_grow_the_queue():
    clock = Clock()
    resource = Recorder(hold=True)
    hooks, stub = notifier(clock, resource, attempts=1, timeout=60.0, max_pending=3)
    with capturedLogs() as events:
        for n in range(10):
            hooks.job_ended(job(n))
        stub.flush()
    stats = hooks.stats()["webhook"]
    assert stats["pending"] == 4  # one being delivered, three waiting
    assert stats["dropped"] == 6
    dropped = [e for e in events if "is dropped" in e["log_format"]]
    assert len(dropped) == 1  # rate-limited
    assert dropped[0]["job"] == "job1"  # the oldest waiting one goes first
    clock.advance(60.0)
    stub.flush()
    bodies = [json.loads(body)["id"] for _, body in resource.requests]
    assert bodies == ["job0", "job7"]  # job0 timed out; the newest ones are kept, in order


def test_failures_are_logged_at_most_once_a_minute_with_a_count():
    clock = Clock()
    resource = Recorder(statuses=[404] * 10)
    hooks, stub = notifier(clock, resource, attempts=1)
    with capturedLogs() as events:
        for n in range(5):
            hooks.job_ended(job(n))
            stub.flush()
            clock.advance(10)
        clock.advance(20)
        hooks.job_ended(job(99))
        stub.flush()
    lines = [e["log_format"].format(**e) for e in events]
    failures = [line for line in lines if line.startswith("webhook http://hooks.example for job")]
    assert len(failures) == 2 and failures[1].startswith("webhook http://hooks.example for job job99")
    count = lines.index(failures[1]) - 1  # the count of those left out, just before the next one
    assert lines[count] == "skipped 4 more failures of the webhook http://hooks.example in the last 70 s"
    assert hooks.stats()["webhook"]["failed"] == 6


def test_stopping_sends_what_it_can_within_the_grace_and_drops_the_rest():
    clock = Clock()
    resource = Recorder(hold=True)
    hooks, stub = notifier(clock, resource, attempts=3, timeout=60.0)
    hooks.job_ended(job(1))
    hooks.job_ended(job(2))
    stub.flush()
    done = hooks.stop(grace=3.0)
    assert not done.called
    clock.advance(3.0)
    assert done.called
    clock.advance(100.0)
    stub.flush()
    assert len(resource.requests) == 1  # no retry, and job 2 is never sent
    assert hooks.stats()["webhook"]["dropped"] == 2 and hooks.stats()["webhook"]["pending"] == 0
    hooks.job_ended(job(3))  # after the stop: counted, not sent
    assert hooks.stats()["webhook"]["dropped"] == 3
    assert clock.getDelayedCalls() == []


def test_drops_and_failures_are_limited_apart_and_the_counts_left_are_logged_at_the_stop():
    clock = Clock()
    resource = Recorder(hold=True)
    hooks, stub = notifier(clock, resource, attempts=1, timeout=60.0, max_pending=1)
    with capturedLogs() as events:
        for n in range(4):  # job0 is being sent; job1 and job2 are dropped in turn for the newer ones
            hooks.job_ended(job(n))
        stub.flush()
        clock.advance(60.0)  # job0 times out: a failure, logged though a drop was just logged
        stub.flush()
        done = hooks.stop(grace=1.0)
        clock.advance(1.0)
    assert done.called
    lines = [e["log_format"].format(**e) for e in events]
    assert [line for line in lines if "is dropped" in line] == [
        "webhook http://hooks.example: 1 notification(s) waiting, the limit: the one for job job1 on shelf1 is dropped"
    ]
    assert [line for line in lines if "for job job0" in line] == [
        "webhook http://hooks.example for job job0 on shelf1 failed: timed out after 60 s (after 1 attempt(s))"
        " (the job is not affected)"
    ]
    assert lines[-1] == "skipped 1 more notifications dropped by the webhook http://hooks.example in the last 61 s"
    assert hooks.stats()["webhook"]["dropped"] == 3  # job1, job2, and job3 at the stop


def test_webhook_urls_are_checked_and_logged_without_their_secrets():
    assert check_webhook_url("https://chat.example:8443/hooks/abc") == "https://chat.example:8443/hooks/abc"
    for bad, message in (
        ("", "not empty"),
        ("ftp://host/x", "only http:// and https://"),
        ("http:///path", "names no host"),
        ("http://host:99999/", "is not a URL"),
        ("http://host/a b", "spaces or control characters"),
        (" http://host/", "spaces"),
    ):
        with pytest.raises(NotifyConfigError, match=message):
            check_webhook_url(bad)
    assert url_for_log("https://user:pw@chat.example:8443/T/secret?token=1") == "https://chat.example:8443"
    assert url_for_log("http://[::1]:8080/x") == "http://[::1]:8080"


def test_the_environment_says_what_ended():
    env = job_environment(JOB)
    assert env == {
        "NETOTA_JOB": "3f2a9c0d1e4b",
        "NETOTA_DEVICE": "shelf1",
        "NETOTA_FIRMWARE": "ac79-2.0.0.ufw",
        "NETOTA_STATE": "finished",
        "NETOTA_OUTCOME": "failed",
        "NETOTA_FAILURE": "timeout",
        "NETOTA_PHASE": "phase2",
        "NETOTA_BATCH": "b-1234",
    }
    interrupted = job_environment(
        {"id": "j", "device": "d", "state": "interrupted", "phase": "phase1", "outcome": None}
    )
    assert (interrupted["NETOTA_OUTCOME"], interrupted["NETOTA_PHASE"], interrupted["NETOTA_BATCH"]) == (
        "interrupted",
        "phase1",
        "",
    )


# ----- the command's process group, time limit and result, on a Clock with a fake process

FAKE_SETSID = "/usr/bin/setsid"  # never run: the spawner is a fake


class FakeProcessTransport:
    def __init__(self, protocol):
        self.protocol = protocol
        self.pid = 4242
        self.stdin = b""
        self.stdin_closed = False
        self.closed = False
        self.signals: list[str] = []

    def write(self, data):
        self.stdin += data

    def closeStdin(self):
        self.stdin_closed = True

    def loseConnection(self):
        self.closed = True

    def signalProcess(self, name):
        self.signals.append(name)


class FakeProcesses:
    """The spawner and the group signaller a hook gets: they record, no process is started or signalled."""

    def __init__(self):
        self.spawned: list[tuple] = []
        self.group_signals: list[tuple[int, int]] = []

    def spawn(self, protocol, executable, args, env):
        transport = FakeProcessTransport(protocol)
        protocol.makeConnection(transport)
        self.spawned.append((protocol, transport, executable, args, env))

    def signal_group(self, pgid, signum):
        self.group_signals.append((pgid, signum))

    @property
    def protocol(self):
        return self.spawned[-1][0]

    @property
    def transport(self):
        return self.spawned[-1][1]


def command_hook(clock, processes, command="notify-chat --room rack", setsid=FAKE_SETSID, **kwargs):
    warnings = LogLimiter(clock, Logger(), burst=1, interval=60.0)
    return CommandHook(
        command,
        processes.spawn,
        clock,
        warnings,
        base_environment={},
        signal_group=processes.signal_group,
        setsid=setsid,
        **kwargs,
    )


def notification(n: int = 1) -> Notification:
    body = json.dumps(job(n), sort_keys=True).encode()
    return Notification(job=f"job{n}", device="shelf1", body=body, environment=job_environment(job(n)))


def stats(hook):
    return hook.counters.to_json(hook.pending)


def failures(events):
    return [e["error"] for e in events if e["log_format"].startswith("{hook} for job")]


def test_a_command_that_overruns_has_its_whole_group_terminated_then_killed():
    clock = Clock()
    processes = FakeProcesses()
    hook = command_hook(clock, processes, timeout=30.0)
    hook.offer(notification())
    ((protocol, transport, executable, args, env),) = processes.spawned
    assert (executable, args) == (FAKE_SETSID, [FAKE_SETSID, "/bin/sh", "-c", "notify-chat --room rack"])
    assert json.loads(transport.stdin) == job(1) and transport.stdin_closed
    assert env["NETOTA_JOB"] == "job1" and env["NETOTA_OUTCOME"] == "failed"
    clock.advance(29.9)
    assert processes.group_signals == []
    with capturedLogs() as events:
        clock.advance(0.1)
        assert processes.group_signals == [(4242, signal.SIGTERM)]  # the group setsid made: the shell's pid
        clock.advance(KILL_GRACE - 0.1)
        assert processes.group_signals == [(4242, signal.SIGTERM)]
        clock.advance(0.1)
        assert processes.group_signals == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)]
    assert transport.signals == []  # the group's signal reached the shell too
    assert failures(events) == ["still running after 30 s: killed"]
    assert stats(hook) == {"sent": 0, "failed": 1, "dropped": 0, "attempts": 1, "pending": 0}
    assert clock.getDelayedCalls() == []


def test_a_command_that_ends_on_sigterm_is_not_killed():
    clock = Clock()
    processes = FakeProcesses()
    hook = command_hook(clock, processes, timeout=1.0)
    hook.offer(notification())
    clock.advance(1.0)
    processes.protocol.processExited(Failure(ProcessTerminated(signal=15)))
    processes.protocol.processEnded(Failure(ProcessTerminated(signal=15)))  # and every pipe closed
    assert stats(hook)["failed"] == 1 and stats(hook)["pending"] == 0  # at once, not after the grace
    clock.advance(KILL_GRACE)
    assert processes.group_signals == [(4242, signal.SIGTERM)]
    assert clock.getDelayedCalls() == []


def test_what_outlives_the_shell_after_sigterm_holding_its_output_is_killed_after_the_grace():
    clock = Clock()
    processes = FakeProcesses()
    hook = command_hook(clock, processes, timeout=1.0)
    hook.offer(notification())
    clock.advance(1.0)
    processes.protocol.processExited(Failure(ProcessTerminated(signal=15)))  # its pipes stay open
    clock.advance(OUTPUT_DRAIN)
    assert processes.transport.closed  # our ends of its pipes: closed
    assert processes.group_signals == [(4242, signal.SIGTERM)] and stats(hook)["pending"] == 1
    clock.advance(KILL_GRACE - OUTPUT_DRAIN)
    assert processes.group_signals == [(4242, signal.SIGTERM), (4242, signal.SIGKILL)]
    assert stats(hook)["failed"] == 1 and stats(hook)["pending"] == 0
    assert clock.getDelayedCalls() == []


def test_without_setsid_the_command_runs_as_before_and_only_the_shell_is_signalled():
    clock = Clock()
    processes = FakeProcesses()
    hook = command_hook(clock, processes, command="x", setsid=None, timeout=1.0)
    hook.offer(notification())
    ((_, transport, executable, args, _),) = processes.spawned
    assert (executable, args) == ("/bin/sh", ["/bin/sh", "-c", "x"])
    clock.advance(1.0)
    assert transport.signals == ["TERM"]
    clock.advance(KILL_GRACE)
    assert transport.signals == ["TERM", "KILL"] and processes.group_signals == []
    assert stats(hook)["failed"] == 1


def test_the_result_comes_when_the_shell_exits_even_if_its_output_stays_held():
    clock = Clock()
    processes = FakeProcesses()
    hook = command_hook(clock, processes, timeout=30.0)
    hook.offer(notification(1))
    hook.offer(notification(2))
    processes.protocol.processExited(Failure(ProcessDone(0)))  # a background child keeps its pipes
    assert stats(hook)["sent"] == 0  # what it printed last may still come
    clock.advance(OUTPUT_DRAIN)
    assert stats(hook)["sent"] == 1 and len(processes.spawned) == 2  # the next one is under way
    first = processes.spawned[0][1]
    assert first.closed and first.signals == [] and processes.group_signals == []  # its child is left alone
    with capturedLogs() as events:
        processes.protocol.childDataReceived(1, b"chat ")
        processes.protocol.processExited(Failure(ProcessTerminated(exitCode=3)))
        processes.protocol.childDataReceived(2, b"is down\n")  # after the exit: still read
        clock.advance(OUTPUT_DRAIN)
    assert failures(events) == ["exited with 3: chat is down"]
    assert stats(hook) == {"sent": 1, "failed": 1, "dropped": 0, "attempts": 2, "pending": 0}
    assert clock.getDelayedCalls() == []


def test_stopping_the_daemon_kills_the_running_commands_group():
    clock = Clock()
    processes = FakeProcesses()
    hooks = JobNotifier(
        clock, on_job_end="x", spawn=processes.spawn, signal_group=processes.signal_group, base_environment={}
    )
    hook = hooks.hooks[0]
    hook.setsid = FAKE_SETSID  # (the system's own may be missing: this test is about the group)
    hooks.job_ended(JOB)
    done = hooks.stop(grace=1.0)
    clock.advance(1.0)
    assert done.called
    assert processes.group_signals == [(4242, signal.SIGKILL)]
    assert stats(hook)["dropped"] == 1 and stats(hook)["pending"] == 0
    assert clock.getDelayedCalls() == []


def test_an_empty_command_is_refused():
    with pytest.raises(NotifyConfigError):
        CommandHook("  ", lambda *a: None, Clock(), LogLimiter(Clock(), Logger()))


# ----- for real: a loopback HTTP server and /bin/sh


@pytest_twisted.ensureDeferred
async def test_the_webhook_against_a_real_http_server_on_loopback(reactor):
    resource = Recorder(statuses=[503])
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/hook/secret"
        hooks = JobNotifier(reactor, webhook=url, timeout=10.0, attempts=3, retry_delay=lambda attempt: 0.01)
        first = resource.next_request(reactor)
        hooks.job_ended(JOB)
        await first
        second = resource.next_request(reactor)
        await second
        await hooks.hooks[0].idle().addTimeout(20, reactor)
        assert [json.loads(body) for _, body in resource.requests] == [JOB, JOB]
        assert hooks.stats()["webhook"] == {"sent": 1, "failed": 0, "dropped": 0, "attempts": 2, "pending": 0}
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_webhook_nobody_listens_on_fails_after_its_attempts(reactor):
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()  # nothing listens there now: every connection is refused
    hooks = JobNotifier(reactor, webhook=f"http://127.0.0.1:{number}/", attempts=2, retry_delay=lambda a: 0.01)
    with capturedLogs() as events:
        hooks.job_ended(JOB)
        await hooks.hooks[0].idle().addTimeout(20, reactor)
    assert hooks.stats()["webhook"]["failed"] == 1 and hooks.stats()["webhook"]["attempts"] == 2
    (warning,) = [e for e in events if e["log_format"].startswith("{hook} for job")]
    assert "refused" in warning["error"].lower()


@pytest_twisted.ensureDeferred
async def test_the_command_gets_the_job_on_stdin_and_in_its_environment(reactor, tmp_path: Path):
    command = 'cat > "$OUT/stdin.json"; env | grep ^NETOTA_ | sort > "$OUT/env"'
    hooks = JobNotifier(
        reactor, on_job_end=command, timeout=20.0, base_environment={**os.environ, "OUT": str(tmp_path)}
    )
    hooks.job_ended(JOB)
    await hooks.hooks[0].idle().addTimeout(30, reactor)
    assert json.loads((tmp_path / "stdin.json").read_text()) == JOB
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines())
    assert env == job_environment(JOB)
    assert hooks.stats()["on_job_end"]["sent"] == 1


@pytest_twisted.ensureDeferred
async def test_a_failing_command_is_logged_with_its_output_and_counted(reactor):
    hooks = JobNotifier(reactor, on_job_end="echo 'chat is down' >&2; exit 3", timeout=20.0)
    with capturedLogs() as events:
        hooks.job_ended(JOB)
        hooks.job_ended(job(2))
        await hooks.hooks[0].idle().addTimeout(30, reactor)
    assert hooks.stats()["on_job_end"] == {"sent": 0, "failed": 2, "dropped": 0, "attempts": 2, "pending": 0}
    warnings = [e for e in events if e["log_format"].startswith("{hook} for job")]
    assert len(warnings) == 1  # the second within the minute is counted, not logged
    assert warnings[0]["error"] == "exited with 3: chat is down"


@pytest_twisted.ensureDeferred
async def test_a_command_that_hangs_is_killed(reactor):
    hooks = JobNotifier(reactor, on_job_end="exec sleep 60", timeout=0.2)
    hooks.job_ended(JOB)
    await hooks.hooks[0].idle().addTimeout(30, reactor)
    assert hooks.stats()["on_job_end"]["failed"] == 1


def still_running(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent, here init, to reap it does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ExitWatch:
    """Pokes ``changes`` when process ``pid`` ends: its pidfd turns readable (a reader on the reactor)."""

    def __init__(self, reactor, pid: int, changes: Changes) -> None:
        self.reactor = reactor
        self.changes = changes
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            self.fd = None
            return
        reactor.addReader(self)

    def fileno(self) -> int:
        return -1 if self.fd is None else self.fd

    def doRead(self) -> None:
        self.close()
        self.changes.poke()

    def close(self) -> None:
        if self.fd is not None:
            self.reactor.removeReader(self)
            os.close(self.fd)
            self.fd = None

    def connectionLost(self, reason) -> None:
        self.close()

    def logPrefix(self) -> str:
        return "pidfd"


@pytest.mark.skipif(SETSID is None, reason="no setsid: the command shares the daemon's process group")
@pytest_twisted.ensureDeferred
async def test_an_overrunning_command_is_killed_with_what_it_started(reactor, tmp_path: Path):
    command = 'sleep 60 & echo $! > "$OUT/child"; sleep 60'
    hooks = JobNotifier(reactor, on_job_end=command, timeout=0.5, base_environment={**os.environ, "OUT": str(tmp_path)})
    with capturedLogs() as events:
        hooks.job_ended(JOB)
        await hooks.hooks[0].idle().addTimeout(30, reactor)
    assert failures(events) == ["still running after 0.5 s: killed"]
    child = int((tmp_path / "child").read_text())
    changes = Changes(reactor)
    watch = ExitWatch(reactor, child, changes)
    try:
        await changes.until(lambda: not still_running(child), "the command's background child to be killed", 20)
    finally:
        watch.close()
    assert stats(hooks.hooks[0]) == {"sent": 0, "failed": 1, "dropped": 0, "attempts": 1, "pending": 0}


@pytest_twisted.ensureDeferred
async def test_a_command_that_leaves_a_child_holding_its_output_is_delivered_when_it_exits(reactor, tmp_path: Path):
    command = 'sleep 60 & echo $! > "$OUT/child"; echo notified'
    hooks = JobNotifier(
        reactor, on_job_end=command, timeout=30.0, base_environment={**os.environ, "OUT": str(tmp_path)}
    )
    hooks.job_ended(JOB)
    try:
        # The child holds the command's stdout for 60 s: the hook's result is the shell's exit.
        await hooks.hooks[0].idle().addTimeout(20, reactor)
        child = int((tmp_path / "child").read_text())
        assert hooks.stats()["on_job_end"] == {"sent": 1, "failed": 0, "dropped": 0, "attempts": 1, "pending": 0}
        assert still_running(child)  # delivered before the child's end, and left alone
    finally:
        if (tmp_path / "child").exists():  # what the command left running is its own business; the test cleans up
            try:
                os.kill(int((tmp_path / "child").read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_the_default_http_client_is_treqs():
    from treq.client import HTTPClient

    assert isinstance(default_http_client(Clock(), 5.0), HTTPClient)
