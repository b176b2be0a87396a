"""Inventory parsing (pure): hosts files, ``-H`` lists, stdin and Ansible INI inventories."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from roost.deploy.inventory import (
    Host,
    InventoryError,
    load_inventory,
    looks_like_ansible,
    parse_ansible_ini,
    parse_host_list,
    parse_host_spec,
    parse_hosts_file,
)


def ini(text: str, group: str = "all", source: str = "inv.ini") -> list[Host]:
    return parse_ansible_ini(textwrap.dedent(text), group, source)


def summary(hosts: list[Host]) -> list[tuple[str, str, str | None, int | None, dict]]:
    return [(h.name, h.address, h.user, h.port, h.labels) for h in hosts]


# -- host specs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "address", "user", "port"),
    [
        ("web1", "web1", None, None),
        ("web-1.dc.example.com", "web-1.dc.example.com", None, None),
        ("deploy@web1", "web1", "deploy", None),
        ("web1:2222", "web1", None, 2222),
        ("deploy@web1:2222", "web1", "deploy", 2222),
        ("10.0.0.7:22", "10.0.0.7", None, 22),
        ("[2001:db8::7]:22", "2001:db8::7", None, 22),
        ("[2001:db8::7]", "2001:db8::7", None, None),
        ("ops@[fe80::1%eth0]:2200", "fe80::1%eth0", "ops", 2200),
    ],
)
def test_host_spec(spec: str, address: str, user: str | None, port: int | None) -> None:
    host = parse_host_spec(spec)
    assert (host.name, host.address, host.user, host.port) == (spec, address, user, port)
    assert host.ssh_target == (f"{user}@{address}" if user else address)


@pytest.mark.parametrize(
    "spec",
    ["web1:0", "web1:65536", "web1:", "@web1", "a b", "-oProxyCommand=x", "2001:db8::7", "[::1"],
)
def test_bad_host_spec(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_host_spec(spec)


# -- hosts files ------------------------------------------------------------------------


def test_hosts_file_syntax() -> None:
    text = textwrap.dedent(
        """\
        # the web tier
        web1 rack=r1

        deploy@web2:2222   rack=r2  role=web   # trailing comment
        \t[2001:db8::7]:22 rack=r3
        [2001:db8::8]
            10.0.0.9
        ; an ini-style comment
        """
    )
    hosts = parse_hosts_file(text, "hosts.txt")
    assert summary(hosts) == [
        ("web1", "web1", None, None, {"rack": "r1"}),
        ("deploy@web2:2222", "web2", "deploy", 2222, {"rack": "r2", "role": "web"}),
        ("[2001:db8::7]:22", "2001:db8::7", None, 22, {"rack": "r3"}),
        ("[2001:db8::8]", "2001:db8::8", None, None, {}),
        ("10.0.0.9", "10.0.0.9", None, None, {}),
    ]
    assert hosts[0].rack == "r1"
    assert hosts[4].rack is None
    assert not looks_like_ansible(text)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("web1\nweb2 rack\n", 2, "key=value"),
        ("web1\n\n# c\nweb 2 3\n", 4, "key=value"),
        ("web1:99999\n", 1, "port out of range"),
        ("web1\nweb1!\n", 2, "not [user@]host[:port]"),
        ("-oProxyCommand=evil\n", 1, "not [user@]host[:port]"),
    ],
)
def test_hosts_file_errors_name_the_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(InventoryError) as error:
        parse_hosts_file(text, "hosts.txt")
    assert str(error.value).startswith(f"hosts.txt:{line}: ")
    assert words in str(error.value)


def test_duplicate_hosts_are_refused() -> None:
    with pytest.raises(InventoryError, match=r"hosts\.txt: host 'web1' is listed twice"):
        parse_hosts_file("web1 rack=a\nweb2\nweb1 rack=b\n", "hosts.txt")
    with pytest.raises(InventoryError, match="listed twice"):
        parse_hosts_file("root@web1:22\nroot@web1:22 rack=x\n", "hosts.txt")
    with pytest.raises(InventoryError, match="-H: host 'a' is listed twice"):
        parse_host_list("a,b,a")
    # Different users or ports are different SSH targets.
    assert len(parse_hosts_file("web1\nops@web1\nweb1:2222\n", "hosts.txt")) == 3


# -- -H lists and stdin -----------------------------------------------------------------


def test_host_list() -> None:
    hosts = parse_host_list(" web1, deploy@web2:2222 ,,[::1]:22,")
    assert summary(hosts) == [
        ("web1", "web1", None, None, {}),
        ("deploy@web2:2222", "web2", "deploy", 2222, {}),
        ("[::1]:22", "::1", None, 22, {}),
    ]
    with pytest.raises(InventoryError, match="-H: not"):
        parse_host_list("web1,we b2")


def test_load_inventory_sources(tmp_path: Path) -> None:
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text("a rack=1\nb\n")
    assert [h.name for h in load_inventory(hosts_file=str(hosts_file))] == ["a", "b"]
    assert [h.name for h in load_inventory(host_list="x,y")] == ["x", "y"]
    from_stdin = load_inventory(hosts_file="-", stdin_text="s1\ns2 rack=r\n")
    assert summary(from_stdin) == [
        ("s1", "s1", None, None, {}),
        ("s2", "s2", None, None, {"rack": "r"}),
    ]
    ansible = load_inventory(hosts_file="-", stdin_text="[web]\nw1\n[db]\nd1\n", group="db")
    assert [h.name for h in ansible] == ["d1"]


def test_load_inventory_errors(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="no hosts: give --hosts"):
        load_inventory()
    with pytest.raises(InventoryError, match=r"cannot read hosts file .*missing\.txt"):
        load_inventory(hosts_file=str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(InventoryError, match="lists no hosts"):
        load_inventory(hosts_file=str(empty))
    with pytest.raises(InventoryError, match="lists no hosts"):
        load_inventory(hosts_file="-", stdin_text="")
    bad = tmp_path / "bad.txt"
    bad.write_text("good\nbad host spec!\n")
    with pytest.raises(InventoryError, match=rf"^{re.escape(str(bad))}:2: "):
        load_inventory(hosts_file=str(bad))
    inventory = tmp_path / "inv.ini"
    inventory.write_text("[web]\nw1\n")
    with pytest.raises(
        InventoryError, match=rf"^{re.escape(str(inventory))}: no group 'db' \(groups: .*web"
    ):
        load_inventory(hosts_file=str(inventory), group="db")


# -- Ansible INI ------------------------------------------------------------------------

INVENTORY = """\
    top1 ansible_host=10.0.0.1

    [web]
    web[01:03].example.com
    web-special ansible_host=10.0.1.9 ansible_port=2222 ansible_user=root rack=r9

    [db]
    db-[a:b] ansible_user=postgres
    web01.example.com role=db-too

    [web:vars]
    ansible_user=www
    rack=r1
    role="front end"

    [prod:children]
    web
    db

    [prod:vars]
    rack=r0
    env=prod
    ansible_port=22

    [all:vars]
    env=any
    dc=eu1
"""


def test_ansible_groups_children_vars_and_ranges() -> None:
    web = ini(INVENTORY, "web")
    assert summary(web) == [
        (
            "web01.example.com",
            "web01.example.com",
            "www",
            22,
            # prod (parent) < web/db (children, alphabetical: db before web) < host vars
            {"env": "prod", "dc": "eu1", "rack": "r1", "role": "db-too"},
        ),
        (
            "web02.example.com",
            "web02.example.com",
            "www",
            22,
            {"env": "prod", "dc": "eu1", "rack": "r1", "role": "front end"},
        ),
        (
            "web03.example.com",
            "web03.example.com",
            "www",
            22,
            {"env": "prod", "dc": "eu1", "rack": "r1", "role": "front end"},
        ),
        (
            "web-special",
            "10.0.1.9",
            "root",
            2222,
            {"env": "prod", "dc": "eu1", "rack": "r9", "role": "front end"},
        ),
    ]
    db = ini(INVENTORY, "db")
    assert [(h.name, h.user, h.port, h.rack) for h in db] == [
        ("web01.example.com", "www", 22, "r1"),
        ("db-a", "postgres", 22, "r0"),
        ("db-b", "postgres", 22, "r0"),
    ]


def test_ansible_selection_of_parent_and_all_groups() -> None:
    prod = ini(INVENTORY, "prod")
    # A host in two selected groups is one host, listed once, in file order.
    assert [h.name for h in prod] == [
        "web01.example.com",
        "web02.example.com",
        "web03.example.com",
        "web-special",
        "db-a",
        "db-b",
    ]
    every = ini(INVENTORY, "all")
    assert [h.name for h in every] == ["top1", *[h.name for h in prod]]
    top = every[0]
    assert (top.address, top.user, top.port, top.labels) == (
        "10.0.0.1",
        None,
        None,
        {"env": "any", "dc": "eu1"},
    )
    assert [h.name for h in ini(INVENTORY, "ungrouped")] == ["top1"]


def test_ansible_host_vars_beat_group_vars_and_all() -> None:
    hosts = ini(
        """\
        [all:vars]
        ansible_user=nobody
        ansible_port=1

        [g]
        h1 ansible_user=alice ansible_port=2022
        h2

        [g:vars]
        ansible_port=2200
        """,
        "g",
    )
    assert [(h.name, h.user, h.port) for h in hosts] == [
        ("h1", "alice", 2022),
        ("h2", "nobody", 2200),
    ]


def test_ansible_legacy_variable_names_and_host_ports() -> None:
    hosts = ini(
        """\
        [g]
        old ansible_ssh_host=10.1.1.1 ansible_ssh_user=u ansible_ssh_port=2201
        new:2202
        """,
        "g",
    )
    assert [(h.address, h.user, h.port) for h in hosts] == [
        ("10.1.1.1", "u", 2201),
        ("new", None, 2202),
    ]


def test_ansible_ranges() -> None:
    hosts = ini("[g]\nn[1:9:4]-[a:b]\nz[08:10]\n", "g")
    assert [h.name for h in hosts] == [
        "n1-a",
        "n1-b",
        "n5-a",
        "n5-b",
        "n9-a",
        "n9-b",
        "z08",
        "z09",
        "z10",
    ]


def test_ansible_selection_through_nested_children() -> None:
    text = """\
        [a]
        a1
        [b]
        b1
        [c]
        c1
        [top:children]
        mid
        c
        [mid:children]
        a
        b
        [mid:vars]
        x=mid
        [top:vars]
        x=top
        y=top
        """
    hosts = ini(text, "top")
    assert [(h.name, h.labels) for h in hosts] == [
        ("a1", {"x": "mid", "y": "top"}),
        ("b1", {"x": "mid", "y": "top"}),
        ("c1", {"x": "top", "y": "top"}),
    ]
    # Selecting a child group still applies its parents' variables (Ansible does too).
    assert ini(text, "a")[0].labels == {"x": "mid", "y": "top"}


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[web]\nw1\n[web\n", 3, "not a section header"),
        ("[web]\nw1 rack\n", 2, "host variables must be key=value"),
        ("[web:vars]\njust-a-word\n", 2, "group variables must be key=value"),
        ("[web:children]\ndb extra\n", 2, "one child group name"),
        ("[web]\nw1 x='open\n", 2, "No closing quotation"),
        ("[web]\n\nw[3:1]\n", 3, "empty range"),
        ("[web]\nw[1:b]\n", 2, "bad range"),
        ("[web:nope]\n", 1, "not a section header"),
    ],
)
def test_ansible_errors_name_the_file_and_line(text: str, line: int, words: str) -> None:
    with pytest.raises(InventoryError) as error:
        ini(text, "web")
    assert str(error.value).startswith(f"inv.ini:{line}: ")
    assert words in str(error.value)


def test_ansible_unknown_group_and_bad_values() -> None:
    with pytest.raises(InventoryError, match=r"^inv.ini: no group 'nope' \(groups: all, db, "):
        ini("[web]\nw1\n[db]\nd1\n", "nope")
    with pytest.raises(
        InventoryError, match=r"inv\.ini: host 'w1': ansible_port 'x' is not a port"
    ):
        ini("[web]\nw1 ansible_port=x\n", "web")
    with pytest.raises(InventoryError, match="cannot start with '-'"):
        ini("[web]\nw1 ansible_host=-oProxyCommand=x\n", "web")
    with pytest.raises(InventoryError, match="cycle: a -> b -> a"):
        ini("[a:children]\nb\n[b:children]\na\n", "a")


def test_ansible_duplicates_across_names_are_refused() -> None:
    # Two inventory names that reach the same SSH target are one host listed twice.
    with pytest.raises(InventoryError, match="listed twice"):
        ini("[g]\nx ansible_host=10.0.0.1\ny ansible_host=10.0.0.1\n", "g")


def test_ansible_detection() -> None:
    assert looks_like_ansible("# c\n[web]\nw1\n")
    assert looks_like_ansible("w0\n[web:children]\nx\n")
    assert not looks_like_ansible("[2001:db8::1]:22\nweb1\n")
