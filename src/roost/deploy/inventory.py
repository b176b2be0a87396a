"""Which hosts a deploy goes to: a hosts file, ``-H a,b,c``, stdin, or an Ansible INI inventory.

Pure parsing: text in, ``Host`` records out, and an error that names the
offending line for anything it does not understand.

Hosts file syntax, one host a line::

    # comment
    [user@]host[:port]  key=value ...      e.g.  deploy@web-12:2222 rack=r12
    [2001:db8::7]:22    rack=r3              IPv6 in brackets when a port follows

Ansible INI inventories are read with a group selector: sections ``[group]``,
``[group:children]`` and ``[group:vars]`` (``[all:vars]`` applies to every
host), host variables ``ansible_host``, ``ansible_user`` and ``ansible_port``
(or their old ``ansible_ssh_*`` names), ranges ``web[01:12]``, ``web[1:9:2]``,
``db-[a:c]``. A host listed in several groups is one host; its variables follow
Ansible's precedence (all < parent group < child group < the host's own). Every
other variable becomes a label (``rack=r12`` labels a host's rack).
"""

from __future__ import annotations

import re
import shlex
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
_RANGE = re.compile(r"\[(?P<start>\d+|[a-z]):(?P<end>\d+|[a-z])(?::(?P<step>\d+))?\]")
_GROUP = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


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


@dataclass
class _Ini:
    """An Ansible INI inventory as parsed: hosts (with their own variables) and groups."""

    host_vars: dict[str, dict[str, str]] = field(default_factory=dict)  # in file order
    members: dict[str, list[str]] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    group_vars: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def groups(self) -> set[str]:
        named = set(self.members) | set(self.children) | set(self.group_vars)
        return named | {c for cs in self.children.values() for c in cs} | {"all", "ungrouped"}


def parse_ansible_ini(text: str, group: str, source: str = "inventory") -> list[Host]:
    """The hosts of ``group`` (with its child groups) in an Ansible INI inventory.

    Variables follow Ansible's precedence: ``[all:vars]``, then the vars of each
    group the host belongs to (parents before children, same depth by name), then
    the host's own variables, which win.
    """
    ini = _read_ini(text, source)
    if group not in ini.groups:
        raise InventoryError(
            f"{source}: no group {group!r} (groups: {', '.join(sorted(ini.groups))})"
        )
    parents: dict[str, set[str]] = {}
    for parent, kids in ini.children.items():
        for kid in kids:
            parents.setdefault(kid, set()).add(parent)
    selected = _descendants(group, ini.children, source)
    direct: dict[str, set[str]] = {}
    for name, hosts in ini.members.items():
        for host in hosts:
            direct.setdefault(host, set()).add(name)
    result = []
    for name, own in ini.host_vars.items():
        groups = direct.get(name, set())
        if group != "all" and not groups & selected:
            continue
        merged = dict(ini.group_vars.get("all", {}))
        for g in sorted(_with_ancestors(groups, parents), key=lambda g: (_depth(g, parents), g)):
            merged.update(ini.group_vars.get(g, {}))
        merged.update(own)
        try:
            result.append(_ansible_host(name, merged))
        except ValueError as exc:
            raise InventoryError(f"{source}: host {name!r}: {exc}") from None
    return _unique(result, source)


def _read_ini(text: str, source: str) -> _Ini:
    ini = _Ini()
    section, kind = "ungrouped", None
    for number, line in _lines(text):
        where = f"{source}:{number}"
        header = _SECTION.fullmatch(line)
        if header:
            section, kind = header["group"], header["kind"]
            if kind == "children":
                ini.children.setdefault(section, [])
            elif kind == "vars":
                ini.group_vars.setdefault(section, {})
            else:
                ini.members.setdefault(section, [])
            continue
        if line.startswith("["):
            raise InventoryError(f"{where}: not a section header: {line!r}")
        if kind == "children":
            if not _GROUP.fullmatch(line):
                raise InventoryError(f"{where}: expected one child group name, not {line!r}")
            ini.children[section].append(line)
        elif kind == "vars":
            key, sep, value = line.partition("=")
            if not sep or not _KEY.fullmatch(key.strip()):
                raise InventoryError(f"{where}: group variables must be key=value, not {line!r}")
            ini.group_vars[section][key.strip()] = _unquote(value.strip())
        else:
            try:
                name, *rest = shlex.split(line)
            except ValueError as exc:
                raise InventoryError(f"{where}: {exc}: {line!r}") from None
            variables = {}
            for word in rest:
                key, sep, value = word.partition("=")
                if not sep or not _KEY.fullmatch(key):
                    raise InventoryError(f"{where}: host variables must be key=value, not {word!r}")
                variables[key] = value
            try:
                names = _expand_ranges(name)
            except ValueError as exc:
                raise InventoryError(f"{where}: {exc}") from None
            for expanded in names:
                ini.host_vars.setdefault(expanded, {}).update(variables)
                if expanded not in ini.members.setdefault(section, []):
                    ini.members[section].append(expanded)
    return ini


def _descendants(group: str, children: dict[str, list[str]], source: str) -> set[str]:
    """``group`` and every group below it; a cycle is an error (Ansible refuses it too)."""
    found: set[str] = set()

    def walk(g: str, path: tuple[str, ...]) -> None:
        if g in path:
            cycle = " -> ".join((*path[path.index(g) :], g))
            raise InventoryError(f"{source}: inventory groups form a cycle: {cycle}")
        found.add(g)
        for child in children.get(g, []):
            walk(child, (*path, g))

    walk(group, ())
    return found


def _with_ancestors(groups: set[str], parents: dict[str, set[str]]) -> set[str]:
    result, todo = set(), list(groups)
    while todo:
        g = todo.pop()
        if g not in result:
            result.add(g)
            todo.extend(parents.get(g, ()))
    return result - {"all"}


def _depth(group: str, parents: dict[str, set[str]], seen: frozenset[str] = frozenset()) -> int:
    """1 for a top-level group (a child of ``all``), one more for each level below."""
    above = parents.get(group, set()) - seen - {"all"}
    return 1 + max((_depth(p, parents, seen | {group}) for p in above), default=0)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


_ALIASES = {
    "ansible_host": ("ansible_host", "ansible_ssh_host"),
    "ansible_user": ("ansible_user", "ansible_ssh_user"),
    "ansible_port": ("ansible_port", "ansible_ssh_port"),
}


def _ansible_host(name: str, variables: dict[str, str]) -> Host:
    base = parse_host_spec(name)
    found = {
        key: next((variables[a] for a in names if a in variables), None)
        for key, names in _ALIASES.items()
    }
    port = found["ansible_port"]
    if port is not None and (not port.isdigit() or not 1 <= int(port) <= 65535):
        raise ValueError(f"ansible_port {port!r} is not a port")
    labels = {k: v for k, v in variables.items() if not k.startswith("ansible_")}
    address = found["ansible_host"] or base.address
    if address.startswith("-"):
        raise ValueError(f"a host address cannot start with '-': {address!r}")
    return Host(
        name=name,
        address=address,
        user=found["ansible_user"] or base.user,
        port=int(port) if port else base.port,
        labels=labels,
    )


def _expand_ranges(name: str) -> list[str]:
    """``web[01:03]`` → web01, web02, web03 (zero padding kept, as Ansible does);
    ``[1:9:2]`` takes a stride and ``[a:c]`` letters."""
    match = _RANGE.search(name)
    if not match:
        return [name]
    start, end, step = match["start"], match["end"], int(match["step"] or 1)
    if start.isdigit() != end.isdigit() or step < 1:
        raise ValueError(f"bad range {match[0]!r} in {name!r}")
    if start.isdigit():
        width = len(start) if start.startswith("0") else 0
        values = [f"{n:0{width}d}" for n in range(int(start), int(end) + 1, step)]
    else:
        values = [chr(c) for c in range(ord(start), ord(end) + 1, step)]
    if not values:
        raise ValueError(f"empty range {match[0]!r} in {name!r}")
    head, tail = name[: match.start()], name[match.end() :]
    return [expanded for v in values for expanded in _expand_ranges(f"{head}{v}{tail}")]


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
