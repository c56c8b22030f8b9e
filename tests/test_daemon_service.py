"""NetotaService in-process: journal recovery before listening, READY/STOPPING notifications,
shutdown interrupting jobs; the twistd plugin and its options."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python import usage

from netota_daemon.cli.control_client import ControlClient
from netota_daemon.daemon.journal import JobJournal, JobRecord, JobState
from netota_daemon.engine.outcome import Outcome, OutcomeKind, Phase
from netota_daemon.logs import json_log_observer
from netota_daemon.tap import Options
from tests.conftest import ROOT, subprocess_env
from tests.daemon_fakes import AutoJobFactory, make_service, short_socket_dir
from tests.live_rig import TWISTD
from tests.waiting import Changes


@pytest.fixture
def notify():
    path = os.path.join(short_socket_dir(), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    yield path, sock
    sock.close()


def received(sock) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


@pytest_twisted.ensureDeferred
async def test_recovery_ready_and_stopping(tmp_path, reactor, notify):
    notify_path, notify_sock = notify
    # A previous daemon died with a job running in phase 2.
    journal = JobJournal(tmp_path / "state")
    journal.create(
        JobRecord(
            id="older",
            device="a",
            firmware="v1.bin",
            created=0.5,
            state=JobState.FINISHED,
            outcome=Outcome(kind=OutcomeKind.SUCCEEDED, message="ok", phase=Phase.DONE, firmware_version_after="1.5.0"),
        )
    )
    journal.create(JobRecord(id="old", device="a", firmware="v2.bin", created=1.0))
    journal.update("old", "running", state=JobState.RUNNING, started=2.0, phase=Phase.PHASE2, point_of_no_return=True)
    journal.close()

    service = make_service(
        tmp_path, reactor, AutoJobFactory(hold_in=Phase.PHASE1), environ={"NOTIFY_SOCKET": notify_path}
    )
    service.privilegedStartService()
    assert received(notify_sock) == []  # listening, but the reactor has not started the service yet
    service.startService()
    assert received(notify_sock)[0].startswith(b"READY=1")
    client = ControlClient(reactor, f"unix:{service.socket_path}")
    old = (await client.request("GET", "/v1/jobs/old"))["job"]
    assert old["state"] == "interrupted" and old["phase"] == "phase2" and old["resumable"]
    assert "loader" in old["advice"]
    devices = (await client.request("GET", "/v1/devices"))["devices"]
    # The last job is the interrupted one; the firmware version is the newest any job read.
    assert devices[0]["last_outcome"] == "interrupted" and devices[0]["last_job"] == "old"
    assert devices[0]["firmware_version"] == "1.5.0"

    resumed = (await client.request("POST", "/v1/jobs/old/resume", {}))["job"]
    await service.stopService()
    messages = received(notify_sock)
    assert messages and messages[0].startswith(b"STOPPING=1")
    after = JobJournal(tmp_path / "state").get(resumed["id"])
    assert after.state is JobState.INTERRUPTED and after.outcome.kind.value == "aborted"
    assert not os.path.exists(service.socket_path)


def test_options_report_config_errors_with_file_and_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[daemon]\ncontrol = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\nmax_parallel = "two"\n')
    with pytest.raises(SystemExit) as info:  # one line, not twistd's usage text (that is for UsageError)
        Options().parseOptions(["--config", str(path)])
    assert str(info.value.code) == f"netota: {path}:5: daemon.max_parallel: must be an integer, not str 'two'"
    with pytest.raises(usage.UsageError, match="log-format"):
        Options().parseOptions(["--config", str(ROOT / "etc" / "netota.toml"), "--log-format", "xml"])


def test_json_log_format_installs_twistds_logger():
    parent: dict = {"logger": None}
    options = Options()
    options.parent = parent
    options.parseOptions(["--config", str(ROOT / "etc" / "netota.toml"), "--log-format", "json"])
    assert parent["logger"] == "netota_daemon.logs.json_log_observer"
    from twisted.python.reflect import namedAny

    assert namedAny(parent["logger"]) is json_log_observer
    assert options.config.max_parallel == 4


def test_twistd_lists_the_netota_plugin():
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(ROOT),
    )
    assert result.returncode == 0
    assert "netota" in result.stdout
    plugin_dir = ROOT / "twisted"
    assert not (plugin_dir / "__init__.py").exists() and not (plugin_dir / "plugins" / "__init__.py").exists()


def twistd(config: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", TWISTD, "-n", "--pidfile=", "netota", "--config", str(config)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(cwd),
    )


@pytest.mark.parametrize(
    "daemon, line",
    [
        ('control = "tcp:8700"\nstate_dir = "s"\nfirmware_dir = "f"\n', "3: daemon.control: 'tcp:8700' listens on"),
        (
            'control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\nmax_parallel = 1' + "0" * 400 + "\n",
            "6: daemon.max_parallel",
        ),
        (
            'control = "tcp:P:127.0.0.1:interface=127.0.0.1"\nstate_dir = "s"\nfirmware_dir = "f"\n',
            "3: daemon.control:",
        ),
        ('control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "missing"\n', "5: daemon.firmware_dir: "),
    ],
)
def test_twistd_stops_at_a_bad_config_with_one_line_and_no_usage_text(tmp_path, daemon, line):
    path = tmp_path / "bad.toml"
    path.write_text("# netota\n[daemon]\n" + daemon)
    result = twistd(path, tmp_path)
    assert result.returncode != 0
    output = (result.stdout + result.stderr).strip()
    assert output.startswith(f"netota: {path}:{line}"), output
    assert len(output.splitlines()) == 1 and "Usage:" not in output and "Traceback" not in output


def test_twistd_stops_at_an_unreadable_journal_in_one_line(tmp_path):
    state = tmp_path / "state"
    journal = JobJournal(state)
    journal.create(JobRecord(id="j1", device="x", firmware="v2.bin", created=1.0))
    journal.close()
    with sqlite3.connect(state / "journal.sqlite3") as db:  # as a newer version might have left it
        db.execute("UPDATE jobs SET state = 'paused'")
    path = tmp_path / "netota.toml"
    path.write_text(
        f'[daemon]\ncontrol = "unix:{short_socket_dir()}/c.sock"\nstate_dir = "{state}"\n'
        f'firmware_dir = "{tmp_path}"\n[devices.x]\nhost = "127.0.0.1"\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "netota",
            "--config",
            str(path),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "netota: job 'j1' in the journal can't be read" in output and "newer netota" in output
    assert "Traceback" not in output


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate is not installed")
@pytest_twisted.ensureDeferred
async def test_socket_activation_with_a_systemd_endpoint(tmp_path, reactor):
    """As with etc/systemd/netota.socket: systemd owns the socket, the daemon adopts it on the first
    connection (``control = "systemd:domain=UNIX:index=0"``)."""
    socket_path = os.path.join(short_socket_dir(), "activated.sock")
    config = tmp_path / "netota.toml"
    config.write_text(
        f'[daemon]\ncontrol = "systemd:domain=UNIX:index=0"\nstate_dir = "{tmp_path}/state"\n'
        f'firmware_dir = "{tmp_path}"\n[devices.x]\nhost = "127.0.0.1"\n'
    )
    env = subprocess_env()
    activator = subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            socket_path,
            "--fdname=control",
            "-E",
            f"PYTHONPATH={env['PYTHONPATH']}",
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "netota",
            "--config",
            str(config),
        ],
        env=env,
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    changes = Changes(reactor)
    changes.watch_directory(Path(socket_path).parent)
    try:
        # The activator binds at once: wait for the socket file to appear (inotify), bounded.
        await changes.until(
            lambda: os.path.exists(socket_path) or activator.poll() is not None, "the activator's socket", timeout=20
        )
        assert activator.poll() is None, "the activator exited before listening"
        d = getProcessOutputAndValue(
            sys.executable,
            ["-m", "netota_daemon", "devices", "--json", "--control", f"unix:{socket_path}"],
            env=env,
            path=str(ROOT),
        )
        d.addTimeout(30, reactor)
        out, err, code = await d
        assert code == 0, err
        assert [d["name"] for d in json.loads(out)["devices"]] == ["x"]
    finally:
        changes.close()
        activator.terminate()
        activator.wait(15)


def test_packaging_installs_the_twistd_plugin(tmp_path):
    """``pip install`` must ship twisted/plugins/netota_plugin.py (and no twisted/__init__.py), or
    ``twistd netota`` does not exist on an installed system. Built from a copy of the tree."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("netota_daemon", "twisted"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns("__pycache__", "dropin.cache"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, tree / name)
        else:
            (tree / name).write_text("")
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, setuptools; sys.argv = ['setup.py', '-q', 'build_py', '--build-lib', 'out']; "
            "setuptools.setup()",
        ],
        cwd=str(tree),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    out = tree / "out"
    assert (out / "twisted" / "plugins" / "netota_plugin.py").exists()
    assert not (out / "twisted" / "__init__.py").exists() and not (out / "twisted" / "plugins" / "__init__.py").exists()
    assert (out / "netota_daemon" / "service.py").exists() and (out / "netota_daemon" / "daemon" / "jobs.py").exists()
    assert (out / "netota_daemon" / "tap.py").exists()


def test_a_control_endpoint_that_cannot_listen_stops_start_up_with_one_clear_line(tmp_path, reactor):
    from tests.daemon_fakes import FakeJobFactory

    path = os.path.join(short_socket_dir(), "missing", "control.sock")
    service = make_service(tmp_path, reactor, FakeJobFactory(), control=f"unix:{path}")
    with pytest.raises(SystemExit) as info:
        service.privilegedStartService()
    message = str(info.value.code)
    assert message.startswith("netota: can't listen on the control endpoint") and "daemon.control" in message
    assert path in message and "No such file or directory" in message
    service.journal_store.close()


def test_the_file_descriptor_limit_is_raised_to_what_the_connections_need_or_start_up_stops():
    from netota_daemon.service import DescriptorLimitError, raise_file_limit

    class Limits:
        RLIMIT_NOFILE, RLIM_INFINITY = 7, -1

        def __init__(self, soft: int, hard: int) -> None:
            self.limits = (soft, hard)

        def getrlimit(self, which: int) -> tuple[int, int]:
            assert which == self.RLIMIT_NOFILE
            return self.limits

        def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
            self.limits = limits

    low = Limits(256, 4096)
    assert raise_file_limit(1000, "f", low) == 1000 and low.limits == (1000, 4096)
    high = Limits(2048, 4096)
    assert raise_file_limit(1000, "f", high) == 2048 and high.limits == (2048, 4096)  # never lowered
    with pytest.raises(DescriptorLimitError, match=r"daemon.control_max_connections: .* needs 9000 .* at most 4096"):
        raise_file_limit(9000, "f", Limits(256, 4096))


@pytest_twisted.ensureDeferred
async def test_a_jobs_latest_progress_is_shown_after_a_restart(tmp_path, reactor):
    """The journal keeps the progress at phase changes, no return and the end: GET /v1/jobs/ID after
    a restart shows where the job had got to."""
    service = make_service(tmp_path, reactor, AutoJobFactory(step=0.002, hold_in=Phase.VERIFY))
    service.privilegedStartService()
    service.startService()
    client = ControlClient(reactor, f"unix:{service.socket_path}")
    job = (await client.request("POST", "/v1/jobs", {"device": "a", "firmware": "v2.bin"}))["job"]
    changes = Changes(reactor)
    # Wait for the event that matters (verify reached), each published event poking the wait.
    unsubscribe = service.queue.subscribe(changes.poke)
    await changes.until(lambda: service.registry.get("a").phase is Phase.VERIFY, "the job to reach verify", timeout=20)
    unsubscribe()
    await service.stopService()  # interrupted in verify: the last progress is phase 2's 100 %

    again = make_service(tmp_path, reactor, AutoJobFactory())
    again.privilegedStartService()
    again.startService()
    try:
        client = ControlClient(reactor, f"unix:{again.socket_path}")
        shown = (await client.request("GET", f"/v1/jobs/{job['id']}"))["job"]
        assert shown["state"] == "interrupted" and shown["phase"] == "verify"
        assert shown["progress"]["phase"] == "phase2" and shown["progress"]["percent"] == 100.0
        assert shown["progress"]["point_of_no_return"] is True and shown["waiting"] is None
    finally:
        await again.stopService()
