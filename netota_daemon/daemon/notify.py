"""``JobNotifier``: tell other systems that a job ended, through ``daemon.on_job_end`` (a command) and
``daemon.webhook`` (a URL), for chat and CI hooks.

- **The command** runs as ``/bin/sh -c COMMAND`` with the job (as ``GET /v1/jobs/ID`` shows it) as
  JSON on its standard input and ``NETOTA_JOB``, ``NETOTA_DEVICE``, ``NETOTA_FIRMWARE``,
  ``NETOTA_STATE``, ``NETOTA_OUTCOME`` (the outcome kind, or ``interrupted``), ``NETOTA_FAILURE``
  (the failure class, or empty), ``NETOTA_PHASE`` (the phase reached) and ``NETOTA_BATCH`` (the
  job's batch, or empty) in its environment, in a process group of its own (under ``setsid``, where
  the system has it: :mod:`~netota_daemon.protocols.shell_process`). Its result is the shell's exit
  (a non-zero one is a failure), taken once its output is read, so something it left running in the
  background can't hold the hook back. It may run ``timeout`` seconds; then its whole group is sent
  SIGTERM, and SIGKILL :data:`KILL_GRACE` seconds later if anything of it is left (the shell, or
  whatever still holds its output). When the daemon stops while it runs, its group is sent SIGKILL.
- **The webhook** gets the same JSON in a POST (``Content-Type: application/json``,
  ``X-Netota-Event: job_end``) through treq. Each attempt is bounded by ``timeout`` seconds (the
  whole request and the first :data:`BODY_LIMIT` bytes of the answer, the rest is not read);
  connection errors, timeouts, 408, 429 and 5xx answers are retried up to ``attempts`` times in
  all, with growing delays (:func:`twisted.application.internet.backoffPolicy`); any other answer
  but 2xx is final. Redirects are not followed.

Nothing here blocks the reactor (processes and HTTP are asynchronous) and nothing grows without
bound: each hook delivers one notification at a time, in order, and keeps at most ``max_pending``
waiting; past that the oldest waiting one is dropped (and counted). A failing hook is logged
(at most one line per hook every :data:`LOG_INTERVAL` seconds, with the count of the lines left
out, in a line of its own: :class:`~netota_daemon.protocols.log_limit.LogLimiter`) and counted
(:meth:`JobNotifier.stats`); it never changes the job. Only the webhook's scheme,
host and port are logged: its path and query often hold a secret. Notifications waiting when the
daemon stops are sent if they can be within its grace time; the rest are dropped and counted.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from twisted.application.internet import backoffPolicy
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.protocol import Protocol as StreamProtocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from netota_daemon import __version__
from netota_daemon.protocols.endpoints import bounded
from netota_daemon.protocols.log_limit import LogLimiter
from netota_daemon.protocols.shell_process import SETSID, GroupSignal, ShellProcess, shell_argv

log = Logger()

#: How many notifications each hook keeps waiting at most (the oldest is dropped past it).
MAX_PENDING = 100
#: A hook's failures are logged at most once per this many seconds (with a count of the rest).
LOG_INTERVAL = 60.0
#: How much of a webhook's answer (or a command's output) is kept for the log.
BODY_LIMIT = 1024
OUTPUT_LIMIT = 4096
#: Seconds between SIGTERM and SIGKILL for a command that overran its time.
KILL_GRACE = 5.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_ATTEMPTS = 4

RETRYABLE_STATUSES = frozenset({408, 429})


class NotifyConfigError(ValueError):
    """A hook setting that can't be used (the config names the key)."""


#: The longest webhook URL taken.
MAX_URL = 2048


def check_webhook_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host, else :class:`NotifyConfigError` (whose
    message shows the URL cut short)."""
    if not isinstance(url, str) or not url.strip():
        raise NotifyConfigError("must be an http:// or https:// URL, not empty")
    shown = repr(url) if len(url) <= 60 else repr(url[:57]) + "..."
    if len(url) > MAX_URL:
        raise NotifyConfigError(f"{shown} is longer than {MAX_URL} characters")
    if url != url.strip() or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise NotifyConfigError(f"{shown} contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise NotifyConfigError(f"{shown} is not a URL: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise NotifyConfigError(f"{shown}: only http:// and https:// URLs are allowed")
    if not parts.hostname:
        raise NotifyConfigError(f"{shown} names no host")
    del port
    return url


def url_for_log(url: str) -> str:
    """``scheme://host[:port]`` of a webhook: its path, query and user info stay out of the log."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def job_environment(job: Mapping[str, Any]) -> dict[str, str]:
    """The ``NETOTA_*`` variables the command gets for ``job`` (a job's JSON)."""
    outcome = job.get("outcome") or {}
    state = str(job.get("state") or "")
    batch = job.get("batch")
    if isinstance(batch, Mapping):
        batch = batch.get("id")
    return {
        "NETOTA_JOB": str(job.get("id") or ""),
        "NETOTA_DEVICE": str(job.get("device") or ""),
        "NETOTA_FIRMWARE": str(job.get("firmware") or ""),
        "NETOTA_STATE": state,
        "NETOTA_OUTCOME": "interrupted" if state == "interrupted" else str(outcome.get("kind") or ""),
        "NETOTA_FAILURE": str(outcome.get("failure") or ""),
        "NETOTA_PHASE": str(outcome.get("phase") or job.get("phase") or ""),
        "NETOTA_BATCH": str(batch or ""),
    }


@dataclass
class HookCounters:
    """What one hook did since the daemon started."""

    sent: int = 0  # delivered (the command exited 0, the webhook answered 2xx)
    failed: int = 0  # given up on (after the retries)
    dropped: int = 0  # never tried: the waiting queue was full, or the daemon stopped
    attempts: int = 0  # command runs and webhook requests made

    def to_json(self, pending: int) -> dict[str, int]:
        return {
            "sent": self.sent,
            "failed": self.failed,
            "dropped": self.dropped,
            "attempts": self.attempts,
            "pending": pending,
        }


class NotSent(Exception):
    """A notification a hook gave up on; the message says why."""


@dataclass(frozen=True)
class Notification:
    """One job's end, ready for every hook."""

    job: str
    device: str
    body: bytes  # the job as JSON
    environment: dict[str, str]


#: What the webhook posts with: ``treq.client.HTTPClient``, or ``treq.testing.StubTreq`` in tests
#: (only ``post(url, data=, headers=, allow_redirects=)`` is used).
HttpPoster = Any


#: ``spawn(protocol, executable, args, env)``: ``reactor.spawnProcess``, or a test's fake.
Spawner = Callable[[ProcessProtocol, str, list[str], dict[str, str]], Any]


class _Hook:
    """One hook: a bounded queue delivered one notification at a time."""

    name = "hook"

    def __init__(self, clock: IReactorTime, warnings: LogLimiter, max_pending: int) -> None:
        self.clock = clock
        self.warnings = warnings
        self.max_pending = max_pending
        self.counters = HookCounters()
        self._queue: deque[Notification] = deque()
        self._current: defer.Deferred[None] | None = None
        self._idle_waiters: list[defer.Deferred[None]] = []
        self.stopped = False

    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._current is not None else 0)

    def describe(self) -> str:
        return self.name

    def offer(self, notification: Notification) -> None:
        if self.stopped:
            self.counters.dropped += 1
            return
        if len(self._queue) >= self.max_pending:
            oldest = self._queue.popleft()
            self.counters.dropped += 1
            self.warnings.warn(
                f"{self.name}:dropped",
                f"notifications dropped by the {self.describe()}",
                "{hook}: {count} notification(s) waiting, the limit: the one for job {job} on {device} is dropped",
                hook=self.describe(),
                count=len(self._queue) + 1,
                job=oldest.job,
                device=oldest.device,
            )
        self._queue.append(notification)
        self._pump()

    def _pump(self) -> None:
        if self._current is not None:
            return
        if not self._queue:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            return
        notification = self._queue.popleft()
        self._current = defer.ensureDeferred(self._deliver_one(notification))
        self._current.addBoth(self._delivered)

    def _delivered(self, result: Any) -> None:
        self._current = None
        if isinstance(result, Failure) and not isinstance(result.value, defer.CancelledError):
            log.failure("{hook}: internal error", result, hook=self.describe())
        self._pump()

    async def _deliver_one(self, notification: Notification) -> None:
        try:
            await self.deliver(notification)
        except NotSent as e:
            self.counters.failed += 1
            self.warnings.warn(
                f"{self.name}:failed",
                f"failures of the {self.describe()}",
                "{hook} for job {job} on {device} failed: {error} (the job is not affected)",
                hook=self.describe(),
                job=notification.job,
                device=notification.device,
                error=str(e),
            )
        else:
            self.counters.sent += 1
            log.debug("{hook} for job {job} on {device} delivered", hook=self.describe(), job=notification.job)

    async def deliver(self, notification: Notification) -> None:
        raise NotImplementedError

    def idle(self) -> defer.Deferred[None]:
        """Fires once nothing is waiting or being delivered."""
        if self.pending == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def stop(self) -> None:
        """Drop what is waiting (counted) and abandon the delivery under way."""
        self.stopped = True
        self.counters.dropped += len(self._queue) + (1 if self._current is not None else 0)
        self._queue.clear()
        if self._current is not None:
            self._current.cancel()
        waiters, self._idle_waiters = self._idle_waiters, []
        for waiter in waiters:
            waiter.callback(None)


class _BoundedBody(StreamProtocol):
    """Keeps the first ``limit`` bytes of a response body, then stops reading it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data[: max(0, self.limit - len(self.data))]
        if len(self.data) >= self.limit and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # a response body's transport is a producer

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:
            self.done.callback(bytes(self.data))


def _error_text(failure: Failure | BaseException) -> str:
    error = failure.value if isinstance(failure, Failure) else failure
    if isinstance(error, defer.TimeoutError):
        return "timed out"
    reasons = getattr(error, "reasons", None)  # twisted.web's ResponseFailed and friends wrap Failures
    if reasons:
        return "; ".join(_error_text(r) for r in reasons)
    text = str(error) or type(error).__name__
    return text


class WebhookHook(_Hook):
    name = "webhook"

    def __init__(
        self,
        url: str,
        client: HttpPoster,
        clock: IReactorTime,
        warnings: LogLimiter,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        retry_delay: Callable[[int], float] | None = None,
        max_pending: int = MAX_PENDING,
    ) -> None:
        super().__init__(clock, warnings, max_pending)
        self.url = check_webhook_url(url)
        self.client = client
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay or backoffPolicy(initialDelay=1.0, maxDelay=30.0, factor=2.0)

    def describe(self) -> str:
        return f"webhook {url_for_log(self.url)}"

    async def _attempt(self, body: bytes) -> tuple[int, bytes]:
        headers = {
            b"Content-Type": [b"application/json"],
            b"User-Agent": [f"netota/{__version__}".encode()],
            b"X-Netota-Event": [b"job_end"],
        }
        response = await self.client.post(self.url, data=body, headers=headers, allow_redirects=False)
        reader = _BoundedBody(BODY_LIMIT)
        response.deliverBody(reader)
        answer = await reader.done
        return int(response.code), answer

    async def deliver(self, notification: Notification) -> None:
        last_error = ""
        for attempt in range(self.attempts):
            if attempt:
                await deferLater(self.clock, self.retry_delay(attempt - 1), lambda: None)
            self.counters.attempts += 1
            request = defer.ensureDeferred(self._attempt(notification.body))
            timed_out: list[bool] = []

            def expire(request: defer.Deferred[tuple[int, bytes]] = request, timed_out: list[bool] = timed_out) -> None:
                timed_out.append(True)
                request.cancel()  # treq aborts the connection

            timer = self.clock.callLater(self.timeout, expire)
            try:
                status, answer = await request
            except Exception as e:
                if self.stopped or (not timed_out and isinstance(e, defer.CancelledError)):
                    raise defer.CancelledError() from None  # the daemon is stopping
                # A cancelled request may come back wrapped (ResponseNeverReceived): the timer says why.
                last_error = f"timed out after {self.timeout:g} s" if timed_out else _error_text(e)
                continue
            finally:
                if timer.active():
                    timer.cancel()
            if 200 <= status < 300:
                return
            text = answer.decode("utf-8", "replace").strip()
            last_error = f"HTTP {status}" + (f": {text[:200]}" if text else "")
            if not (status >= 500 or status in RETRYABLE_STATUSES):
                raise NotSent(f"{last_error} (not retried)")
        raise NotSent(f"{last_error} (after {self.attempts} attempt(s))")


class CommandHook(_Hook):
    name = "on_job_end"

    def __init__(
        self,
        command: str,
        spawn: Spawner,
        clock: IReactorTime,
        warnings: LogLimiter,
        timeout: float = DEFAULT_TIMEOUT,
        max_pending: int = MAX_PENDING,
        base_environment: Mapping[str, str] | None = None,
        signal_group: GroupSignal = os.killpg,
        setsid: str | None = SETSID,
    ) -> None:
        super().__init__(clock, warnings, max_pending)
        if not command.strip():
            raise NotifyConfigError("the command is empty")
        self.command = command
        self.spawn = spawn
        self.timeout = timeout
        self.base_environment = dict(os.environ if base_environment is None else base_environment)
        self.signal_group = signal_group
        self.setsid = setsid

    def describe(self) -> str:
        return "on_job_end command"

    async def deliver(self, notification: Notification) -> None:
        process = ShellProcess(
            self.clock,
            own_group=self.setsid is not None,
            output_limit=OUTPUT_LIMIT,
            stdin=notification.body + b"\n",
            signal_group=self.signal_group,
        )
        env = {**self.base_environment, **notification.environment}
        argv = shell_argv(self.command, self.setsid)
        self.counters.attempts += 1
        try:
            self.spawn(process, argv[0], argv, env)
        except Exception as e:
            raise NotSent(f"could not start {argv[0]}: {e}") from None
        try:
            try:
                await bounded(self.clock, process.when_ended(), self.timeout, "the command")
            except defer.TimeoutError:
                # TERM to its whole group; KILL to what of it is left (the shell, or whatever still
                # holds its output) once the grace is over.
                process.signal("TERM")
                # (In a group of its own, something it started may outlive the shell: wait for all.)
                after_term = process.when_gone() if process.own_group else process.when_ended()
                try:
                    await bounded(self.clock, after_term, KILL_GRACE, "the command after SIGTERM")
                except defer.TimeoutError:
                    process.signal("KILL")
                raise NotSent(f"still running after {self.timeout:g} s: killed") from None
        except defer.CancelledError:  # the daemon is stopping
            process.signal("KILL")
            raise
        code = process.ended.result if process.ended.called else None
        if code == 0:
            return
        output = process.text()
        how = f"exited with {code}" if code is not None else "was killed by a signal"
        raise NotSent(how + (f": {output[:500]}" if output else ""))


def default_http_client(reactor: Any, timeout: float) -> HttpPoster:
    """treq's client on ``reactor``, with no persistent connections (a hook is rare) and a connect
    timeout."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
    return HTTPClient(Agent(reactor, connectTimeout=timeout, pool=pool))  # type: ignore[no-untyped-call]


class JobNotifier:
    """Every hook the config names; :meth:`job_ended` hands each a job's end. See the module docstring."""

    def __init__(
        self,
        reactor: Any,
        on_job_end: str | None = None,
        webhook: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        attempts: int = DEFAULT_ATTEMPTS,
        max_pending: int = MAX_PENDING,
        http_client: HttpPoster | None = None,
        spawn: Spawner | None = None,
        retry_delay: Callable[[int], float] | None = None,
        clock: IReactorTime | None = None,
        base_environment: Mapping[str, str] | None = None,
        signal_group: GroupSignal = os.killpg,
    ) -> None:
        self.clock: IReactorTime = clock or reactor
        self.warnings = LogLimiter(self.clock, log, burst=1, interval=LOG_INTERVAL)
        self.hooks: list[_Hook] = []
        if on_job_end:

            def spawn_process(protocol: ProcessProtocol, executable: str, args: list[str], env: dict[str, str]) -> Any:
                return reactor.spawnProcess(protocol, executable, args, env=env)

            self.hooks.append(
                CommandHook(
                    on_job_end,
                    spawn or spawn_process,
                    self.clock,
                    self.warnings,
                    timeout,
                    max_pending,
                    base_environment,
                    signal_group,
                )
            )
        if webhook:
            self.hooks.append(
                WebhookHook(
                    webhook,
                    http_client or default_http_client(reactor, timeout),
                    self.clock,
                    self.warnings,
                    timeout,
                    attempts,
                    retry_delay,
                    max_pending,
                )
            )

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def job_ended(self, job: Mapping[str, Any]) -> None:
        """Hand the ended ``job`` (its JSON) to every hook. Never raises, never waits."""
        if not self.hooks:
            return
        try:
            notification = Notification(
                job=str(job.get("id")),
                device=str(job.get("device")),
                body=json.dumps(job, sort_keys=True).encode("utf-8"),
                environment=job_environment(job),
            )
        except (TypeError, ValueError) as e:
            log.error("can't notify the end of job {job}: {error}", job=job.get("id"), error=str(e))
            return
        for hook in self.hooks:
            hook.offer(notification)

    def stats(self) -> dict[str, dict[str, int]]:
        """Each hook's counters (``sent``, ``failed``, ``dropped``, ``attempts``, ``pending``)."""
        return {hook.name: hook.counters.to_json(hook.pending) for hook in self.hooks}

    def stop(self, grace: float) -> defer.Deferred[None]:
        """Let the hooks finish what waits for up to ``grace`` seconds, then drop the rest (counted)."""
        idle = defer.DeferredList([hook.idle() for hook in self.hooks], consumeErrors=True)

        async def drain() -> None:
            # At the grace's end the list is cancelled, and so its hooks' idle() waits: it then fires
            # at once (with their failures, consumed). What the hooks still hold is dropped below.
            await bounded(self.clock, idle, grace, "the hooks")
            for hook in self.hooks:
                left = hook.pending
                hook.stop()
                if left:
                    log.warn(
                        "{hook}: {count} notification(s) not sent: the daemon is stopping",
                        hook=hook.describe(),
                        count=left,
                    )
            self.warnings.flush()  # the counts of the lines left out

        return defer.ensureDeferred(drain())
