"""The daemon's TOML config: the example parses, and every kind of mistake names file, key and problem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netota_daemon.daemon.config import (
    ConfigError,
    check_control_endpoint,
    check_directories,
    load_config,
)
from netota_daemon.endpoint_strings import split_endpoint
from netota_daemon.engine.settings import UpgradeBehaviour, UpgradeTimeouts

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[daemon]
control = "unix:/tmp/x.sock"
state_dir = "state"
firmware_dir = "fw"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "netota.toml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return info.value


def test_example_config_parses_with_every_documented_key():
    config = load_config(ROOT / "etc" / "netota.toml")
    assert config.control == "unix:/run/netota/control.sock:mode=660:lockfile=1:backlog=1024"
    assert config.state_dir == Path("/var/lib/netota")
    assert config.firmware_dir == Path("/var/lib/netota/firmware")
    assert config.max_parallel == 4
    shelf1 = config.devices["shelf1"]
    assert (shelf1.target.host, shelf1.target.ctp_port, shelf1.target.http_port, shelf1.target.ota_port) == (
        "192.168.1.1",
        3333,
        8080,
        3335,
    )
    assert shelf1.target.interface == "wlan1"
    assert shelf1.tags == ("top-shelf", "camera") and config.devices["shelf2"].tags == ()
    assert (config.on_job_end, config.webhook, config.rescue, config.rescue_interval) == (None, None, False, 300.0)
    assert shelf1.timeouts.reboot == 180.0  # per-device override
    assert config.devices["shelf2"].timeouts.reboot == 120.0  # daemon-wide value
    # Every engine timeout and every [daemon] key is documented in the example.
    from netota_daemon.daemon.config import _DAEMON_KEYS

    text = (ROOT / "etc" / "netota.toml").read_text()
    for name in UpgradeTimeouts.field_names():
        assert f"\n{name} = " in text, name
    for name in _DAEMON_KEYS:
        assert f"\n{name} = " in text or f"\n# {name} = " in text, name
    for name in UpgradeBehaviour.field_names():
        assert f"\n{name} = " in text.split("\n[behaviour]", 1)[1], name
    assert config.behaviour == UpgradeBehaviour()


def test_minimal_config_has_defaults_and_relative_paths_from_the_file(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.state_dir == tmp_path / "state"
    assert config.firmware_dir == tmp_path / "fw"
    assert config.max_parallel == 4
    assert config.devices == {}
    assert config.control == "unix:/tmp/x.sock:mode=660:backlog=1024"  # 0660, and a listen backlog over Twisted's 50
    assert config.timeouts == UpgradeTimeouts()


def test_behaviour_switches_are_read_from_behaviour_and_still_from_timeouts(tmp_path):
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + "[behaviour]\nphase2_error_retries = 3\n[timeouts]\necho_final_notice = true\n"
            + '[devices.a]\nhost = "h"\n[devices.a.behaviour]\nphase2_error_retries = 0\n'
            + '[devices.b]\nhost = "h"\n',
        )
    )
    assert config.behaviour == UpgradeBehaviour(echo_final_notice=True, phase2_error_retries=3)
    assert config.devices["a"].behaviour == UpgradeBehaviour(echo_final_notice=True, phase2_error_retries=0)
    assert config.devices["b"].behaviour == config.behaviour
    error = error_for(tmp_path, MINIMAL + "[behaviour]\nphase2_error_retries = " + "9" * 400 + "\n")
    assert error.key == "behaviour.phase2_error_retries" and "at most 1000000" in error.problem


def test_timeouts_override_daemon_wide_then_per_device(tmp_path):
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + """
[timeouts]
receive = 2
deadline = 60.5
[devices.a]
host = "127.0.0.1"
ctp_port = 4333
[devices.a.timeouts]
receive = 1.5
echo_final_notice = true
[devices.b]
host = "127.0.0.2"
""",
        )
    )
    a, b = config.devices["a"], config.devices["b"]
    assert (a.timeouts.receive, a.timeouts.deadline, a.behaviour.echo_final_notice) == (1.5, 60.5, True)
    assert (b.timeouts.receive, b.timeouts.deadline, b.behaviour.echo_final_notice) == (2.0, 60.5, False)
    assert a.target.ctp_port == 4333 and a.target.http_port == 8080
    assert a.target.name == "a"


@pytest.mark.parametrize(
    "extra, key, words",
    [
        ("[daemon2]\nx = 1\n", "daemon2", "unknown section"),
        ('[devices.a]\nhost = "h"\nhots = "x"\n', "devices.a.hots", "unknown key"),
        ('[devices.a]\nhost = "h"\nctp_port = "3333"\n', "devices.a.ctp_port", "must be an integer"),
        ('[devices.a]\nhost = "h"\nctp_port = true\n', "devices.a.ctp_port", "must be an integer"),
        ('[devices.a]\nhost = "h"\nctp_port = 70000\n', "devices.a.ctp_port", "between 1 and 65535"),
        ("[devices.a]\nctp_port = 3333\n", "devices.a.host", "missing"),
        ("[devices.a]\nhost = 5\n", "devices.a.host", "must be a string"),
        ('[devices.a]\nhost = " "\n', "devices.a.host", "must not be empty"),
        ('[devices.a]\nhost = "h"\ninterface = ""\n', "devices.a.interface", "must not be empty"),
        ('[devices.a]\nhost = "h"\ninterface = "wlan-with-a-long-name"\n', "devices.a.interface", "interface name"),
        ('[devices.a]\nhost = "h"\ninterface = "wlan/1"\n', "devices.a.interface", "interface name"),
        ('[devices.a]\nhost = "h"\nsource_address = "127.0.0.300"\n', "devices.a.source_address", "IPv4"),
        ("[timeouts]\nrecieve = 5\n", "timeouts.recieve", "unknown key"),
        ('[timeouts]\nreceive = "5"\n', "timeouts.receive", "must be a number"),
        ("[timeouts]\nreceive = -1\n", "timeouts.receive", "must be a positive number of seconds"),
        ("[timeouts]\nreceive = 0\n", "timeouts.receive", "must be a positive number of seconds"),
        ("[timeouts]\ndeadline = nan\n", "timeouts.deadline", "finite"),
        ("[timeouts]\npoll_interval = inf\n", "timeouts.poll_interval", "finite"),
        ("[timeouts]\nphase2_error_retries = -1\n", "timeouts.phase2_error_retries", "must not be negative"),
        ("[timeouts]\nmax_receive_timeouts = 2.5\n", "timeouts.max_receive_timeouts", "must be an integer"),
        ("[timeouts]\necho_final_notice = 1\n", "timeouts.echo_final_notice", "true or false"),
        (
            '[devices.a]\nhost = "h"\n[devices.a.timeouts]\nreboot = "long"\n',
            "devices.a.timeouts.reboot",
            "must be a number",
        ),
        ("[devices]\na = 5\n", "devices.a", "must be a table"),
    ],
)
def test_each_mistake_names_file_key_and_problem(tmp_path, extra, key, words):
    error = error_for(tmp_path, MINIMAL + extra)
    assert error.key == key
    assert words in error.problem
    assert str(tmp_path / "netota.toml") in str(error)
    assert key in str(error)


@pytest.mark.parametrize(
    "daemon, key, words",
    [
        ('state_dir = "s"\nfirmware_dir = "f"\n', "daemon.control", "missing"),
        ('control = "unix:/x"\nfirmware_dir = "f"\n', "daemon.state_dir", "missing"),
        ('control = "unix:/x"\nstate_dir = "s"\n', "daemon.firmware_dir", "missing"),
        (
            'control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\nmax_parallel = 0\n',
            "daemon.max_parallel",
            "at least 1",
        ),
        (
            'control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\nmax_parallel = "4"\n',
            "daemon.max_parallel",
            "integer",
        ),
        ('control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\ncontrl = 1\n', "daemon.contrl", "unknown key"),
        ('control = "unix:/x:mode=abc"\nstate_dir = "s"\nfirmware_dir = "f"\n', "daemon.control", "octal"),
        (
            'control = "unix:/x"\nstate_dir = "s"\nfirmware_dir = "f"\nshutdown_grace = nan\n',
            "daemon.shutdown_grace",
            "finite",
        ),
    ],
)
def test_daemon_section_mistakes(tmp_path, daemon, key, words):
    error = error_for(tmp_path, "[daemon]\n" + daemon)
    assert error.key == key and words in error.problem


def test_missing_daemon_section(tmp_path):
    error = error_for(tmp_path, '[devices.a]\nhost = "h"\n')
    assert error.key == "daemon" and "missing" in error.problem


def test_bad_toml_keeps_tomllib_line_number(tmp_path):
    error = error_for(tmp_path, MINIMAL + "max_parallel = = 3\n")
    assert "not valid TOML" in str(error)
    assert "line 6" in str(error)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8700",
        "tcp:8700:interface=0.0.0.0",
        "tcp:port=8700:interface=192.0.2.1",
        "tcp6:8700:interface=\\:\\:",
        "systemd:domain=INET:index=0",
        "ssl:8443",
    ],
)
def test_network_control_endpoint_is_refused_without_a_token(tmp_path, endpoint):
    error = error_for(
        tmp_path, f'[daemon]\ncontrol = "{endpoint}"\nstate_dir = "s"\nfirmware_dir = "f"\n'.replace("\\", "\\\\")
    )
    assert error.key == "daemon.control"
    assert "control_token" in error.problem


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp:8700:interface=127.0.0.1",
        "tcp:8700:interface=localhost",
        "tcp6:8700:interface=\\:\\:1",
        "systemd:domain=UNIX:index=0",
        "unix:/run/netota/control.sock:mode=600",
    ],
)
def test_local_control_endpoints_are_accepted_without_a_token(endpoint):
    expected = endpoint if endpoint.startswith("systemd") else endpoint + ":backlog=1024"
    assert check_control_endpoint("f", endpoint, None) == expected
    if not endpoint.startswith("systemd"):
        assert check_control_endpoint("f", endpoint + ":backlog=64", None).endswith(":backlog=64")


def test_a_token_allows_a_network_endpoint(tmp_path):
    config = load_config(
        write(
            tmp_path, '[daemon]\ncontrol = "tcp:8700"\nstate_dir = "s"\nfirmware_dir = "f"\ncontrol_token = "sekrit"\n'
        )
    )
    assert config.control == "tcp:8700:backlog=1024" and config.control_token == "sekrit"


def test_split_endpoint_honours_escapes():
    assert split_endpoint("unix:/a\\:b:mode=600:lockfile=1") == ("unix", ["/a:b"], {"mode": "600", "lockfile": "1"})
    assert split_endpoint("TCP:8700:interface=\\:\\:1") == ("tcp", ["8700"], {"interface": "::1"})


@pytest.mark.parametrize(
    "text, line",
    [
        # the line that sets the bad value
        (MINIMAL + "max_parallel = 0\n", 6),
        (MINIMAL + '\n[devices.a]\nhost = "h"\nctp_port = "3333"\n', 9),
        (MINIMAL + '\n[devices."a b"]\nhost = "h"\n  ota_port = 0 # comment\n', 9),
        (MINIMAL + "\n[timeouts]\nreceive = 5\nrecieve = 5\n", 9),
        (MINIMAL + '\n[devices.a]\nhost = "h"\n\n[devices.a.timeouts]\nreboot = "long"\n', 11),
        (MINIMAL + "\n[devices.a]\ntimeouts.reboot = -1\nhost = 'h'\n", 8),
        # a missing key: the header of its table
        ('# netota\n\n[daemon]\nstate_dir = "s"\nfirmware_dir = "f"\n', 3),
        (MINIMAL + "\n[devices.a]\nctp_port = 1\n", 7),
    ],
)
def test_mistakes_name_the_line(tmp_path, text, line):
    error = error_for(tmp_path, text)
    assert str(error).startswith(f"{tmp_path / 'netota.toml'}:{line}: {error.key}: "), str(error)


# ----- every value checked for range: no TOML the parser accepts ends in a traceback

DEVICE = '\n[devices.d]\nhost = "127.0.0.1"\n'
HUGE = "9" * 400


def _every_key() -> list[tuple[str, str]]:
    """(table header, key) for every key the config has."""
    from netota_daemon.daemon.config import _DAEMON_KEYS, _DEVICE_KEYS, TIMEOUT_KEYS

    keys = [("daemon", k) for k in _DAEMON_KEYS]
    keys += [("devices.d", k) for k in _DEVICE_KEYS]
    keys += [("timeouts", k) for k in TIMEOUT_KEYS]
    keys += [("devices.d.timeouts", k) for k in TIMEOUT_KEYS]
    return keys


ODD_VALUES = [
    HUGE,
    "-" + HUGE,
    "1e308",
    "-1e308",
    "inf",
    "-inf",
    "nan",
    "-0",
    "0",
    "-1",
    "3.5",
    "true",
    '""',
    '"\\u0000"',
    '"x\\u0000y"',
    '"\\u202e"',
    '"' + "a" * 5000 + '"',
    "[1, 2]",
    "{x = 1}",
    "1979-05-27T07:32:00Z",
    "07:32:00",
]


@pytest.mark.parametrize("table, key", _every_key())
def test_any_value_for_any_key_is_accepted_or_a_config_error_never_a_traceback(tmp_path, table, key):
    for value in ODD_VALUES:
        base = '[daemon]\ncontrol = "unix:/tmp/x.sock"\nstate_dir = "s"\nfirmware_dir = "f"\n'
        if table == "daemon":
            lines = [line for line in base.splitlines() if not line.startswith(f"{key} =")]
            text = "\n".join(lines) + f"\n{key} = {value}\n" + DEVICE
        elif table == "devices.d":
            text = base + f"\n[devices.d]\n{key} = {value}\n" + ('host = "h"\n' if key != "host" else "")
        else:
            text = base + DEVICE + f"\n[{table}]\n{key} = {value}\n"
        path = write(tmp_path, text.replace("\\\\", "\\"))
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e).startswith(str(path)) and "Traceback" not in str(e)
            assert len(str(e)) < 400, str(e)  # one line, even for a 400-digit number


def test_a_400_digit_number_is_named_shortly(tmp_path):
    error = error_for(tmp_path, MINIMAL + f"max_parallel = {HUGE}\n")
    assert error.key == "daemon.max_parallel" and "(400 digits)" in error.problem
    error = error_for(tmp_path, MINIMAL + f"\n[timeouts]\ndeadline = {HUGE}\n")
    assert "at most 604800 seconds" in error.problem


def test_an_integer_too_long_for_python_is_a_config_error(tmp_path):
    error = error_for(tmp_path, MINIMAL + "max_parallel = " + "9" * 5000 + "\n")
    assert "more than 4300 digits" in str(error)


@pytest.mark.parametrize(
    "endpoint, words",
    [
        ("tcp:P:127.0.0.1:interface=127.0.0.1", "not a TCP port"),
        ("tcp:8700:127.0.0.1:interface=127.0.0.1", "multiple values for argument 'interface'"),
        ("tcp:99999:interface=127.0.0.1", "not a TCP port"),
        ("tcp:8700:interface=127.0.0.1:backlog=lots", "backlog"),
        ("unix:/x:bogus=1", "unexpected keyword argument 'bogus'"),
        ("unix:/x:mode=7777", "not a file mode"),
        ("unix:", "names no socket path"),
        ("nosuch:1", "Unknown endpoint type"),
        ("systemd:domain=unix:index=0", "domain='unix'"),
        ("systemd:domain=UNIX", "exactly one of index= and name="),
        ("systemd:domain=UNIX:index=x", "not a socket index"),
        ("", "must not be empty"),
    ],
)
def test_endpoint_strings_are_checked_with_the_daemons_parser_and_named_with_their_line(tmp_path, endpoint, words):
    text = f'# the daemon\n[daemon]\nstate_dir = "s"\nfirmware_dir = "f"\ncontrol = "{endpoint}"\n'
    error = error_for(tmp_path, text + ('control_token = "t"\n' if endpoint.startswith("nosuch") else ""))
    assert error.key == "daemon.control" and words in error.problem, error.problem
    assert str(error).startswith(f"{tmp_path / 'netota.toml'}:5: daemon.control: ")


@pytest.mark.parametrize("token", ["sécret", "two words", "tab\\there", "x" * 1025])
def test_a_token_that_is_not_visible_ascii_is_refused_at_start_up(tmp_path, token):
    error = error_for(tmp_path, MINIMAL + f'control_token = "{token}"\n')
    assert error.key == "daemon.control_token" and "visible ASCII" in error.problem


def test_the_new_daemon_keys_have_defaults_and_ranges(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert (config.journal_retention_days, config.journal_retention_jobs) == (365.0, 100_000)
    assert (config.control_idle_timeout, config.control_max_connections) == (60.0, 256)
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + "journal_retention_days = 0\njournal_retention_jobs = 0\ncontrol_idle_timeout = 5\n"
            + "control_max_connections = 16\n",
        )
    )
    assert (config.journal_retention_days, config.journal_retention_jobs) == (0.0, 0)
    assert (config.control_idle_timeout, config.control_max_connections) == (5.0, 16)
    for line, words in (
        ("control_idle_timeout = 0", "more than 0"),
        ("control_max_connections = 15", "at least 16"),
        ("journal_retention_days = -1", "at least 0"),
        ("journal_retention_jobs = 1.5", "integer"),
    ):
        assert words in error_for(tmp_path, MINIMAL + line + "\n").problem


def test_device_strings_are_bounded(tmp_path):
    for key, value, words in (
        ("host", "a" * 254, "at most 253"),
        ("host", "bad\\u0000host", "control characters"),
        ("expected_ssid", "s" * 33, "at most 32"),
        ("reconnect_command", "x\\ny", "control characters"),
    ):
        text = MINIMAL + f'\n[devices.a]\nhost = "h"\n{key} = "{value}"\n'
        if key == "host":
            text = MINIMAL + f'\n[devices.a]\nhost = "{value}"\n'
        error = error_for(tmp_path, text)
        assert error.key == f"devices.a.{key}" and words in error.problem, (key, error.problem)


# ----- the directories, checked at start-up


def checked(tmp_path: Path, text: str, access=None) -> ConfigError:
    config = load_config(write(tmp_path, text))
    with pytest.raises(ConfigError) as info:
        check_directories(config, access)
    return info.value


DIRS = """# netota
[daemon]
control = "unix:/tmp/x.sock"
state_dir = "state"
firmware_dir = "fw"
"""


def test_usable_directories_pass_and_a_missing_state_dir_is_created(tmp_path):
    (tmp_path / "fw").mkdir()
    config = load_config(write(tmp_path, DIRS))
    check_directories(config)
    assert (tmp_path / "state").is_dir()


def test_a_firmware_dir_that_does_not_exist_is_a_file_or_is_unreadable_stops_start_up(tmp_path):
    error = checked(tmp_path, DIRS)
    assert (
        str(error)
        == f"{tmp_path / 'netota.toml'}:5: daemon.firmware_dir: {tmp_path / 'fw'} does not exist (create it and put the images there)"
    )
    (tmp_path / "fw").write_text("not a directory")
    assert checked(tmp_path, DIRS).problem == f"{tmp_path / 'fw'} is not a directory"
    (tmp_path / "fw").unlink()
    (tmp_path / "fw").mkdir()
    unreadable = checked(tmp_path, DIRS, access=lambda path, mode: path.name != "fw")
    assert unreadable.key == "daemon.firmware_dir" and "can't be read by user" in unreadable.problem


def test_a_state_dir_that_is_a_file_unwritable_or_impossible_stops_start_up(tmp_path):
    (tmp_path / "fw").mkdir()
    (tmp_path / "state").write_text("a file")
    error = checked(tmp_path, DIRS)
    assert str(error).startswith(f"{tmp_path / 'netota.toml'}:4: daemon.state_dir: ") and "is not a directory" in str(
        error
    )
    (tmp_path / "state").unlink()
    (tmp_path / "state").mkdir()
    error = checked(tmp_path, DIRS, access=lambda path, mode: not (path.name == "state" and mode & os.W_OK))
    assert error.key == "daemon.state_dir" and "not readable and writable by" in error.problem
    (tmp_path / "blocker").write_text("")
    error = checked(tmp_path, DIRS.replace('"state"', '"blocker/state"'))
    assert "does not exist and can't be created" in error.problem


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('\n[devices.d]\nhost = "h"\ntags = "top"\n', "devices.d.tags", "must be a list of tag names"),
        ('\n[devices.d]\nhost = "h"\ntags = ["a b"]\n', "devices.d.tags", "is not a tag name"),
        ('\n[devices.d]\nhost = "h"\ntags = ["a", "a"]\n', "devices.d.tags", "given twice"),
        ('\n[devices.d]\nhost = "h"\ntags = [1]\n', "devices.d.tags", "is not a tag name"),
    ],
)
def test_bad_device_tags_are_refused_with_their_key(tmp_path, text, key, problem):
    error = error_for(tmp_path, MINIMAL + text)
    assert error.key == key and problem in error.problem


@pytest.mark.parametrize(
    ("line", "key", "problem"),
    [
        ('webhook = "ftp://x/y"', "daemon.webhook", "only http:// and https://"),
        ('webhook = "http:///x"', "daemon.webhook", "names no host"),
        ("notify_timeout = 0", "daemon.notify_timeout", "more than 0"),
        ("webhook_attempts = 0", "daemon.webhook_attempts", "at least 1"),
        ("rescue_interval = 1", "daemon.rescue_interval", "at least 10"),
        ('rescue = "yes"', "daemon.rescue", "true or false"),
        ('on_job_end = ""', "daemon.on_job_end", "must not be empty"),
    ],
)
def test_bad_hook_and_rescue_keys_are_refused(tmp_path, line, key, problem):
    error = error_for(tmp_path, MINIMAL + line + "\n")
    assert error.key == key and problem in error.problem


def test_tags_and_hooks_are_read(tmp_path):
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + 'on_job_end = "notify"\nwebhook = "https://h.example/x"\nrescue = true\nrescue_interval = 60\n'
            + '\n[devices.d]\nhost = "h"\ntags = ["top", "cam-1"]\n',
        )
    )
    assert config.devices["d"].tags == ("top", "cam-1")
    assert (config.on_job_end, config.webhook, config.rescue, config.rescue_interval) == (
        "notify",
        "https://h.example/x",
        True,
        60.0,
    )
