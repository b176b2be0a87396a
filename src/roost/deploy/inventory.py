"""Which hosts a deploy goes to: a hosts file, ``-H a,b,c``, stdin, or an Ansible INI inventory.

Pure parsing: text in, ``Host`` records out, and an error that names the
offending line for anything it does not understand.

Hosts file syntax, one host a line::

    # comment
    [user@]host[:port]  key=value ...      e.g.  deploy@web-12:2222 rack=r12
    [2001:db8::7]:22    rack=r3              IPv6 in brackets when a port follows

Ansible INI inventories are read with a group selector: sections ``[group]``,
``[group:children]`` and ``[group:vars]``, host variables ``ansible_host``,
``ansible_user`` and ``ansible_port``, numeric ranges ``web[01:12]``; every
other variable becomes a label (``rack=r12`` labels a host's rack).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from roost.runtime.errors import RoostError


class InventoryError(RoostError):
    """An inventory that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class Host:
    name: str  # how the operator wrote it; also the ssh destination alias
    address: str  # what to connect to (ssh resolves it, through ~/.ssh/config too)
    user: str | None = None
    port: int | None = None
    labels: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    @property
    def rack(self) -> str | None:
        return self.labels.get("rack")

    @property
    def ssh_target(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address


_NAME = r"[A-Za-z0-9_.\-]+"
_HOST_SPEC = re.compile(
    rf"(?:(?P<user>[A-Za-z0-9_.\-]+)@)?"
    rf"(?:\[(?P<v6>[0-9A-Fa-f:.%A-Za-z]+)\]|(?P<host>{_NAME}))"
    rf"(?::(?P<port>\d+))?"
)
_LABEL = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_.\-]*)=(?P<value>\S*)")
_SECTION = re.compile(r"\[(?P<group>[A-Za-z_][A-Za-z0-9_\-]*)(?::(?P<kind>children|vars))?\]")
_RANGE = re.compile(r"\[(?P<start>\d+):(?P<end>\d+)\]")


def parse_host_spec(spec: str, labels: dict[str, str] | None = None) -> Host:
    """``[user@]host[:port]`` as a Host; raises ValueError with a reason."""
    match = _HOST_SPEC.fullmatch(spec)
    if not match:
        raise ValueError(f"not [user@]host[:port]: {spec!r}")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {spec!r}")
    address = match["v6"] or match["host"]
    if address.startswith("-"):
        raise ValueError(f"a host name cannot start with '-': {spec!r}")
    return Host(spec, address, match["user"], port, dict(labels or {}))


def parse_hosts_file(text: str, source: str = "hosts") -> list[Host]:
    """The hosts of a plain hosts file (see the module docstring)."""
    hosts = []
    for number, line in _lines(text):
        spec, *rest = line.split()
        labels = {}
        for word in rest:
            label = _LABEL.fullmatch(word)
            if not label:
                raise InventoryError(f"{source}:{number}: labels must be key=value, not {word!r}")
            labels[label["key"]] = label["value"]
        try:
            hosts.append(parse_host_spec(spec, labels))
        except ValueError as exc:
            raise InventoryError(f"{source}:{number}: {exc}") from None
    return _unique(hosts, source)


def parse_host_list(text: str) -> list[Host]:
    """``-H a,b,c``: comma-separated host specs."""
    hosts = []
    for spec in (s.strip() for s in text.split(",")):
        if not spec:
            continue
        try:
            hosts.append(parse_host_spec(spec))
        except ValueError as exc:
            raise InventoryError(f"-H: {exc}") from None
    return _unique(hosts, "-H")


def looks_like_ansible(text: str) -> bool:
    return any(_SECTION.fullmatch(line) for _, line in _lines(text))


def parse_ansible_ini(text: str, group: str, source: str = "inventory") -> list[Host]:
    """The hosts of ``group`` (with its child groups) in an Ansible INI inventory."""
    members: dict[str, list[tuple[str, dict[str, str]]]] = {}
    children: dict[str, list[str]] = {}
    group_vars: dict[str, dict[str, str]] = {}
    section, kind = "ungrouped", None
    for number, line in _lines(text):
        header = _SECTION.fullmatch(line)
        if header:
            section, kind = header["group"], header["kind"]
            if kind == "children":
                children.setdefault(section, [])
            elif kind == "vars":
                group_vars.setdefault(section, {})
            else:
                members.setdefault(section, [])
            continue
        if line.startswith("["):
            raise InventoryError(f"{source}:{number}: not a section header: {line!r}")
        if kind == "children":
            children[section].append(line.split()[0])
        elif kind == "vars":
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise InventoryError(f"{source}:{number}: group variables must be key=value")
            group_vars[section][key.strip()] = value.strip().strip("'\"")
        else:
            name, *rest = line.split()
            variables = {}
            for word in rest:
                var = _LABEL.fullmatch(word)
                if not var:
                    raise InventoryError(
                        f"{source}:{number}: host variables must be key=value, not {word!r}"
                    )
                variables[var["key"]] = var["value"].strip("'\"")
            for expanded in _expand_ranges(name):
                members.setdefault(section, []).append((expanded, variables))
    known = set(members) | set(children) | set(group_vars) | {"all"}
    if group not in known:
        raise InventoryError(f"{source}: no group {group!r} (groups: {', '.join(sorted(known))})")
    hosts = []
    for name, variables, inherited in _walk_group(group, members, children, group_vars):
        merged = {**inherited, **variables}
        try:
            hosts.append(_ansible_host(name, merged))
        except ValueError as exc:
            raise InventoryError(f"{source}: host {name!r}: {exc}") from None
    return _unique(hosts, source)


def _walk_group(
    group: str,
    members: dict[str, list[tuple[str, dict[str, str]]]],
    children: dict[str, list[str]],
    group_vars: dict[str, dict[str, str]],
    inherited: dict[str, str] | None = None,
    seen: frozenset[str] = frozenset(),
) -> Iterable[tuple[str, dict[str, str], dict[str, str]]]:
    if group in seen:
        raise InventoryError(f"inventory groups form a cycle through {group!r}")
    variables = {**(inherited or {}), **group_vars.get(group, {})}
    if group == "all":
        for name in members:
            yield from _walk_group(name, members, {}, group_vars, variables, seen | {group})
        return
    for name, host_vars in members.get(group, []):
        yield name, host_vars, variables
    for child in children.get(group, []):
        yield from _walk_group(child, members, children, group_vars, variables, seen | {group})


def _ansible_host(name: str, variables: dict[str, str]) -> Host:
    base = parse_host_spec(name)
    port = variables.pop("ansible_port", None)
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(f"ansible_port {port!r} is not a port")
    labels = {k: v for k, v in variables.items() if not k.startswith("ansible_")}
    return Host(
        name=name,
        address=variables.get("ansible_host", base.address),
        user=variables.get("ansible_user", base.user),
        port=int(port) if port else base.port,
        labels=labels,
    )


def _expand_ranges(name: str) -> list[str]:
    """``web[01:03]`` → web01, web02, web03 (zero padding kept, as Ansible does)."""
    match = _RANGE.search(name)
    if not match:
        return [name]
    start, end = match["start"], match["end"]
    width = len(start) if start.startswith("0") else 0
    head, tail = name[: match.start()], name[match.end() :]
    return [
        expanded
        for n in range(int(start), int(end) + 1)
        for expanded in _expand_ranges(f"{head}{n:0{width}d}{tail}")
    ]


_COMMENT = re.compile(r"(?:^|\s)[#;]")


def _lines(text: str) -> Iterable[tuple[int, str]]:
    """Numbered non-blank lines, without comments (``#`` or ``;`` after a blank)."""
    for number, raw in enumerate(text.splitlines(), start=1):
        line = _COMMENT.split(raw, maxsplit=1)[0].strip()
        if line:
            yield number, line


def _unique(hosts: list[Host], source: str) -> list[Host]:
    seen: set[str] = set()
    for host in hosts:
        key = f"{host.ssh_target}:{host.port or ''}"
        if key in seen:
            raise InventoryError(f"{source}: host {host.name!r} is listed twice")
        seen.add(key)
    return hosts


def load_inventory(
    *,
    hosts_file: str | None = None,
    host_list: str | None = None,
    group: str | None = None,
    stdin_text: str | None = None,
) -> list[Host]:
    """The deploy's hosts from exactly one of the sources the CLI accepts."""
    if host_list is not None:
        hosts = parse_host_list(host_list)
    elif hosts_file is None:
        raise InventoryError("no hosts: give --hosts FILE (or - for stdin) or -H a,b,c")
    else:
        if hosts_file == "-":
            text, source = stdin_text or "", "<stdin>"
        else:
            try:
                with open(hosts_file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise InventoryError(f"cannot read hosts file {hosts_file}: {exc}") from None
            source = hosts_file
        if group is not None or looks_like_ansible(text):
            hosts = parse_ansible_ini(text, group or "all", source)
        else:
            hosts = parse_hosts_file(text, source)
    if not hosts:
        raise InventoryError("the inventory lists no hosts")
    return hosts
