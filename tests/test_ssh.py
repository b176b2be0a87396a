"""How roost drives the OpenSSH client: the argv it builds (pure), and its life cycle."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil

import pytest

from roost.deploy.inventory import Host, parse_host_spec
from roost.deploy.ssh import (
    HOST_KEY_POLICIES,
    SSH,
    CommandResult,
    SSHOptions,
    python_command,
    quote_path,
)
from roost.runtime.errors import RoostError

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")

UNIX_PATH_MAX = 108  # sun_path, including the terminating NUL


def options(argv: list[str]) -> dict[str, str]:
    """The ``-o Key=Value`` pairs of an ssh argv (last one wins, as in ssh)."""
    found = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "-o":
            key, _, val = value.partition("=")
            found[key] = val
    return found


@pytest.fixture
def ssh() -> SSH:
    client = SSH(SSHOptions())
    yield client
    asyncio.run(client.close([]))


@pytest.mark.parametrize(
    ("policy", "value"), [("strict", "yes"), ("accept-new", "accept-new"), ("off", "no")]
)
def test_host_key_policy_mapping(policy: str, value: str) -> None:
    client = SSH(SSHOptions(host_key_policy=policy))
    argv = client.argv(Host("h", "h"), "true")
    assert options(argv)["StrictHostKeyChecking"] == value
    asyncio.run(client.close([]))


def test_strict_host_key_checking_is_the_default(ssh: SSH) -> None:
    assert SSHOptions().host_key_policy == "strict"
    assert options(ssh.argv(Host("h", "h"), "true"))["StrictHostKeyChecking"] == "yes"
    assert set(HOST_KEY_POLICIES) == {"strict", "accept-new", "off"}


def test_unknown_host_key_policy_is_an_error() -> None:
    with pytest.raises(RoostError, match=r"unknown host-key policy 'ask' \(choose strict, "):
        SSH(SSHOptions(host_key_policy="ask"))


def test_missing_client_is_an_error() -> None:
    with pytest.raises(RoostError, match=r"OpenSSH client .* is not installed"):
        SSH(SSHOptions(), executable="/nonexistent/ssh")


def test_argv_user_port_config_and_command() -> None:
    client = SSH(
        SSHOptions(
            config_file="/etc/roost/ssh_config",
            connect_timeout=2.5,
            extra_options=("ProxyJump=bastion",),
        )
    )
    host = parse_host_spec("deploy@web-1:2222")
    argv = client.argv(host, "echo 'a b'")
    assert argv[0] == "ssh"
    assert argv[1:3] == ["-F", "/etc/roost/ssh_config"]
    assert argv[argv.index("-p") + 1] == "2222"
    assert argv[argv.index("-l") + 1] == "deploy"
    # The destination follows "--", so a host name can never be read as an option.
    assert argv[-3:] == ["--", "web-1", "echo 'a b'"]
    opts = options(argv)
    assert opts["BatchMode"] == "yes"  # never a password prompt
    assert opts["ConnectTimeout"] == "2"
    assert opts["ControlMaster"] == "auto"
    assert opts["ProxyJump"] == "bastion"
    assert int(opts["ServerAliveInterval"]) * int(opts["ServerAliveCountMax"]) <= 30
    asyncio.run(client.close([]))


def test_argv_without_user_port_or_config(ssh: SSH) -> None:
    argv = ssh.argv(Host("web", "10.0.0.1"), "true")
    assert "-F" not in argv
    assert "-p" not in argv
    assert "-l" not in argv
    assert argv[-3:] == ["--", "10.0.0.1", "true"]
    # A sub-second connect timeout still means "time out", not "no timeout" (0).
    quick = SSH(SSHOptions(connect_timeout=0.2))
    assert options(quick.argv(Host("h", "h"), "true"))["ConnectTimeout"] == "1"
    asyncio.run(quick.close([]))


def test_ipv6_destination_is_bare(ssh: SSH) -> None:
    argv = ssh.argv(parse_host_spec("[2001:db8::7]:2200"), "true")
    assert argv[-2] == "2001:db8::7"
    assert argv[argv.index("-p") + 1] == "2200"


def test_control_path_fits_a_unix_socket_and_is_private(ssh: SSH) -> None:
    path = options(ssh.argv(Host("h", "h"), "true"))["ControlPath"]
    directory, name = os.path.split(path)
    assert name == "%C"
    expanded = os.path.join(directory, "0" * 40)  # %C: a 40-character hash
    assert len(expanded.encode()) < UNIX_PATH_MAX
    assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700)


def test_control_dir_is_made_lazily_and_removed_by_close() -> None:
    client = SSH(SSHOptions())
    assert client._control_dir is None  # constructing a client leaves nothing behind
    directory = client.control_dir
    assert os.path.isdir(directory)
    asyncio.run(client.close([Host("h", "h")]))
    assert not os.path.exists(directory)
    asyncio.run(client.close([]))  # twice is fine


def test_run_reports_exit_codes_and_timeouts(tmp_path) -> None:
    """A stand-in ``ssh`` (a shell script) shows how results and timeouts are reported."""
    fake = tmp_path / "ssh"
    fake.write_text('#!/bin/sh\nfor last; do :; done\nexec /bin/sh -c "$last"\n')
    fake.chmod(0o755)
    client = SSH(SSHOptions(command_timeout=5), executable=str(fake))
    host = Host("h", "h")

    async def main() -> list[CommandResult]:
        return [
            await client.run(host, "cat; echo out; echo err >&2; exit 3", stdin=b"in:"),
            await client.run(host, "exec sleep 30", timeout=0.3),
            await client.run(host, "exit 0"),
        ]

    done, slow, quiet = asyncio.run(main())
    assert (done.code, done.stdout, done.stderr) == (3, b"in:out\n", b"err\n")
    assert done.error_line == "err"
    assert (slow.code, slow.error_line) == (255, "timed out")
    assert quiet.error_line == "exit status 0"
    asyncio.run(client.close([]))


def test_python_command_and_quote_path() -> None:
    command = python_command("print('hi there')", "a b", "$HOME")
    assert shlex.split(command) == ["python3", "-c", "print('hi there')", "a b", "$HOME"]
    assert quote_path("~/.cache/roost/x y.pyz") == "\"$HOME\"/'.cache/roost/x y.pyz'"
    assert quote_path("/srv/app") == "/srv/app"
    assert quote_path("/srv/my app") == "'/srv/my app'"
