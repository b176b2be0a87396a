"""Running commands on hosts through the system OpenSSH client.

OpenSSH honours everything an operator already set up (``~/.ssh/config``,
keys, the agent, jump hosts), so roost adds only what a fleet tool needs:
batch mode (never a password prompt), a host-key policy (strict by default),
connect and command timeouts, keep-alives that notice a dead host, and one
multiplexed connection per host (``ControlMaster``) so the several commands of
a deploy pay for one handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from roost.deploy.inventory import Host
from roost.runtime.errors import RoostError

HOST_KEY_POLICIES = {"strict": "yes", "accept-new": "accept-new", "off": "no"}


@dataclass(frozen=True)
class SSHOptions:
    config_file: str | None = None
    host_key_policy: str = "strict"
    connect_timeout: float = 10.0
    command_timeout: float = 600.0
    extra_options: tuple[str, ...] = ()


@dataclass
class CommandResult:
    code: int
    stdout: bytes
    stderr: bytes

    @property
    def error_line(self) -> str:
        """The last meaningful line of stderr, for a one-line report."""
        lines = [ln for ln in self.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit status {self.code}"


class SSHError(RoostError):
    """A host could not be reached or a command on it failed."""


@dataclass
class SSH:
    """The OpenSSH client, configured once for a whole deploy."""

    options: SSHOptions = field(default_factory=SSHOptions)
    executable: str = "ssh"

    def __post_init__(self) -> None:
        if self.options.host_key_policy not in HOST_KEY_POLICIES:
            raise RoostError(
                f"unknown host-key policy {self.options.host_key_policy!r}"
                f" (choose {', '.join(HOST_KEY_POLICIES)})"
            )
        if shutil.which(self.executable) is None:
            raise RoostError(f"the OpenSSH client ({self.executable}) is not installed")
        self._control_dir: str | None = None

    @property
    def control_dir(self) -> str:
        """Where the multiplexing sockets live; made on first use, removed by ``close``.

        A short path under /tmp: a ControlPath must fit in a unix socket address
        (108 bytes), and ``%C`` below is 40 characters.
        """
        if self._control_dir is None:
            self._control_dir = tempfile.mkdtemp(prefix="roost-ssh-", dir="/tmp")
        return self._control_dir

    def argv(self, host: Host, command: str) -> list[str]:
        """The ssh command line that runs ``command`` (a remote shell line) on ``host``."""
        o = self.options
        args = [self.executable]
        if o.config_file:
            args += ["-F", o.config_file]
        args += [
            "-o", "BatchMode=yes",
            "-o", f"StrictHostKeyChecking={HOST_KEY_POLICIES[o.host_key_policy]}",
            "-o", f"ConnectTimeout={max(1, int(o.connect_timeout))}",
            "-o", "ServerAliveInterval=5",
            "-o", "ServerAliveCountMax=3",
            "-o", "ControlMaster=auto",
            "-o", f"ControlPath={self.control_dir}/%C",
            "-o", "ControlPersist=120",
            "-o", "LogLevel=ERROR",
        ]  # fmt: skip
        for option in o.extra_options:
            args += ["-o", option]
        if host.port:
            args += ["-p", str(host.port)]
        if host.user:
            args += ["-l", host.user]
        return [*args, "--", host.address, command]

    async def run(
        self, host: Host, command: str, *, stdin: bytes | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run ``command`` (a shell command line) on ``host``; never raises for exit codes."""
        process = await asyncio.create_subprocess_exec(
            *self.argv(host, command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(stdin or b""), timeout or self.options.command_timeout
            )
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            return CommandResult(255, b"", b"timed out")
        assert process.returncode is not None
        return CommandResult(process.returncode, stdout, stderr)

    async def start(self, host: Host, command: str) -> asyncio.subprocess.Process:
        """Start a long-running command; the caller talks to its stdin and stdout."""
        return await asyncio.create_subprocess_exec(
            *self.argv(host, command),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

    async def close(self, hosts: list[Host]) -> None:
        """Stop the multiplexing masters (all at once) and remove their sockets."""
        if self._control_dir is None:
            return
        limit = asyncio.Semaphore(64)

        async def stop(host: Host) -> None:
            args = self.argv(host, "true")[:-1]  # no remote command
            split = args.index("--")
            exit_args = [*args[:split], "-O", "exit", *args[split:]]
            async with limit:
                process = await asyncio.create_subprocess_exec(
                    *exit_args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await process.wait()

        if os.listdir(self._control_dir):  # no socket: no master to stop
            with contextlib.suppress(OSError):
                await asyncio.gather(*(stop(h) for h in hosts))
        shutil.rmtree(self._control_dir, ignore_errors=True)
        self._control_dir = None


def python_command(script: str, *args: str) -> str:
    """A remote shell command that runs a Python snippet with the host's python3."""
    return " ".join(shlex.quote(a) for a in ("python3", "-c", script, *args))


def runtime_command(runtime: str, args: Sequence[str]) -> str:
    """A remote shell command that runs the runtime zipapp at ``runtime``.

    Isolated from the host's Python setup (``-I``: no ``PYTHON*`` variables, no
    user site; ``-S``: no site-packages), which the standard-library-only
    runtime does not need: nothing installed on the host can shadow its
    modules, and it starts faster.
    """
    return " ".join(["python3", "-I", "-S", quote_path(runtime), *map(shlex.quote, args)])


def quote_path(path: str) -> str:
    """A remote path where a leading ``~/`` still means the remote user's home."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)
