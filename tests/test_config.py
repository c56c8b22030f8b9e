"""The daemon's TOML config: the example parses, and every kind of mistake names file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from netota_daemon.daemon.config import (
    ConfigError,
    check_control_endpoint,
    load_config,
    split_endpoint,
)
from netota_daemon.engine.settings import UpgradeTimeouts

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
    assert config.control == "unix:/run/netota/control.sock:mode=660:lockfile=1"
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
    assert shelf1.timeouts.reboot == 180.0  # per-device override
    assert config.devices["shelf2"].timeouts.reboot == 120.0  # daemon-wide value
    # Every engine timeout is documented in the example.
    text = (ROOT / "etc" / "netota.toml").read_text()
    for name in UpgradeTimeouts.field_names():
        assert f"\n{name} = " in text, name


def test_minimal_config_has_defaults_and_relative_paths_from_the_file(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.state_dir == tmp_path / "state"
    assert config.firmware_dir == tmp_path / "fw"
    assert config.max_parallel == 4
    assert config.devices == {}
    assert config.control == "unix:/tmp/x.sock:mode=660"  # UNIX sockets default to 0660
    assert config.timeouts == UpgradeTimeouts()


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
    assert check_control_endpoint("f", endpoint, None) == endpoint


def test_a_token_allows_a_network_endpoint(tmp_path):
    config = load_config(
        write(
            tmp_path, '[daemon]\ncontrol = "tcp:8700"\nstate_dir = "s"\nfirmware_dir = "f"\ncontrol_token = "sekrit"\n'
        )
    )
    assert config.control == "tcp:8700" and config.control_token == "sekrit"


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
