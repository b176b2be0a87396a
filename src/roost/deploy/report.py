"""What a deploy shows: live progress per host, then one table; or JSON events for machines.

Three reporters share one interface: ``RichReporter`` (a terminal), ``PlainReporter``
(a log or CI: a line per host event, a summary now and then) and ``JsonReporter``
(newline-delimited JSON, ``--json``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from roost.runtime.cli import format_size
from roost.runtime.manifest import Manifest


@dataclass
class HostState:
    name: str
    dest: str
    state: str = "waiting"  # waiting, running, complete, verified, failed
    have: int = 0
    pieces: int = 0
    downloaded: int = 0
    from_origin: int = 0
    from_peers: int = 0
    uploaded: int = 0
    completed_after: float | None = None
    error: str | None = None
    activated: bool = False
    hook: str | None = None  # "exit N: last line" of the post-activation hook

    def apply(self, event: dict[str, Any], elapsed: float) -> None:
        """Fold one JSON event from the host's ``roost fetch --events`` into this state."""
        kind = event.get("event")
        for name in ("have", "pieces", "downloaded", "from_origin", "from_peers", "uploaded"):
            value = event.get(name)
            if isinstance(value, int):
                setattr(self, name, value)
        if kind == "complete" and self.completed_after is None:
            self.completed_after = elapsed
            self.state = "complete"
            if self.pieces:
                self.have = self.pieces
        elif kind == "error":
            self.fail(str(event.get("message", "error")))

    def fail(self, error: str) -> None:
        self.state = "failed"
        self.error = error

    @property
    def ok(self) -> bool:
        return self.state == "verified"


class Reporter:
    def phase(self, text: str) -> None: ...
    def start(self, manifest: Manifest, hosts: list[HostState]) -> None: ...
    def update(self, host: HostState) -> None: ...
    def origin_uploaded(self, nbytes: int) -> None: ...
    def finish(self, hosts: list[HostState], elapsed: float) -> None: ...


class JsonReporter(Reporter):
    def _emit(self, event: str, **fields: Any) -> None:
        sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        sys.stdout.flush()

    def phase(self, text: str) -> None:
        self._emit("phase", text=text)

    def start(self, manifest: Manifest, hosts: list[HostState]) -> None:
        self._emit(
            "start", release=manifest.id, hosts=[h.name for h in hosts], **manifest.summary()
        )

    def update(self, host: HostState) -> None:
        self._emit("host", **asdict(host))

    def origin_uploaded(self, nbytes: int) -> None:
        self._emit("origin", uploaded=nbytes)

    def finish(self, hosts: list[HostState], elapsed: float) -> None:
        ok = sum(h.ok for h in hosts)
        self._emit("finish", ok=ok, failed=len(hosts) - ok, seconds=elapsed)


class PlainReporter(Reporter):
    """Plain lines, for logs and CI (stdout is not a terminal)."""

    def __init__(self) -> None:
        self._last_summary = 0.0
        self._hosts: list[HostState] = []
        self._shown: dict[str, str] = {}

    def phase(self, text: str) -> None:
        print(f"roost: {text}", flush=True)

    def start(self, manifest: Manifest, hosts: list[HostState]) -> None:
        self._hosts = hosts
        print(
            f"roost: release {manifest.short_id}: {len(manifest.files)} files,"
            f" {format_size(manifest.total_size)} -> {len(hosts)} hosts",
            flush=True,
        )

    def update(self, host: HostState) -> None:
        if host.state in ("complete", "failed") and self._shown.get(host.name) != host.state:
            self._shown[host.name] = host.state
            detail = host.error if host.state == "failed" else f"{host.completed_after:.1f} s"
            print(f"roost: {host.name}: {host.state} ({detail})", flush=True)
        now = time.monotonic()
        if now - self._last_summary > 2.0:
            self._last_summary = now
            done = sum(h.state == "complete" for h in self._hosts)
            print(f"roost: {done}/{len(self._hosts)} hosts complete", flush=True)

    def finish(self, hosts: list[HostState], elapsed: float) -> None:
        render_table(Console(highlight=False), hosts, elapsed)


class RichReporter(Reporter):
    """A live view on a terminal: an overall bar and a bar per host."""

    MAX_HOST_ROWS = 32

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(bar_width=None),
            TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[detail]}"),
            console=console,
        )
        self.live = Live(self.progress, console=console, refresh_per_second=8, transient=False)
        self.tasks: dict[str, TaskID] = {}
        self.overall: TaskID | None = None
        self.hosts: list[HostState] = []

    def phase(self, text: str) -> None:
        self.console.print(f"[bold]roost[/]: {text}")

    def start(self, manifest: Manifest, hosts: list[HostState]) -> None:
        self.hosts = hosts
        self.console.print(
            f"[bold]roost[/]: release {manifest.short_id}: {len(manifest.files)} files,"
            f" {format_size(manifest.total_size)} -> {len(hosts)} hosts"
        )
        total = max(1, manifest.piece_count * len(hosts))
        self.overall = self.progress.add_task("all hosts", total=total, detail="")
        for host in hosts[: self.MAX_HOST_ROWS]:
            self.tasks[host.name] = self.progress.add_task(
                host.name, total=max(1, manifest.piece_count), detail=host.state
            )
        self.live.start()

    def update(self, host: HostState) -> None:
        task = self.tasks.get(host.name)
        if task is not None:
            detail = f"{host.state}  origin {format_size(host.from_origin)}"
            detail += f"  peers {format_size(host.from_peers)}"
            self.progress.update(task, completed=host.have, detail=detail)
        if self.overall is not None:
            done = sum(h.have for h in self.hosts)
            complete = sum(h.completed_after is not None for h in self.hosts)
            self.progress.update(
                self.overall, completed=done, detail=f"{complete}/{len(self.hosts)} complete"
            )

    def finish(self, hosts: list[HostState], elapsed: float) -> None:
        self.live.stop()
        render_table(self.console, hosts, elapsed)


def render_table(console: Console, hosts: list[HostState], elapsed: float) -> None:
    table = Table(title=f"roost deploy: {elapsed:.1f} s")
    columns = ["host", "result", "time", "from origin", "from peers", "current"]
    with_hook = any(h.hook for h in hosts)
    columns += ["hook"] if with_hook else []
    for column in [*columns, "error"]:
        table.add_column(column, justify="right" if column == "time" else "left")
    for host in hosts:
        row = [
            host.name,
            "ok" if host.ok else host.state,
            f"{host.completed_after:.2f} s" if host.completed_after is not None else "-",
            format_size(host.from_origin),
            format_size(host.from_peers),
            "switched" if host.activated else "unchanged",
        ]
        row += [host.hook or ""] if with_hook else []
        table.add_row(*row, host.error or "")
    console.print(table)
    failed = [h for h in hosts if not h.ok]
    if failed:
        console.print(
            f"{len(failed)} of {len(hosts)} hosts FAILED: {', '.join(h.name for h in failed)}"
        )
    else:
        console.print(f"all {len(hosts)} hosts hold the verified release")


def render_results(console: Console, what: str, hosts: list[HostState]) -> None:
    """The outcome of a one-shot fleet command (rollback, cleanup), host by host."""
    table = Table(title=f"roost {what}")
    for column in ("host", "result", "detail"):
        table.add_column(column)
    for host in hosts:
        table.add_row(host.name, "ok" if host.ok else "FAILED", host.error or host.hook or "")
    console.print(table)
