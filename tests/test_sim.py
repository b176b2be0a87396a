"""The relay-plan simulation (bench/sim.py): the model's physics, closed forms, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bench.sim import (
    Network,
    PlanError,
    Scenario,
    edge_arrivals,
    piece_lengths,
    predict,
    request_orders,
    simulate,
)
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
KiB, MiB = 1024, 1024 * 1024
B = 12.5e6  # 100 Mbit/s in bytes/s


def scenario(
    *,
    stripes: int = 0,
    racks: int = 0,
    origin_bandwidth: float = B,
    hop_delay: float = 0.0,
    startup: float = 0.0,
    uplink: float = 2 * B,
) -> Scenario:
    """A small release (16 MiB in 64 pieces) on 100 Mbit/s links, racks behind 2·B uplinks."""
    network = Network(B, origin_bandwidth, uplink if racks else None, hop_delay, startup)
    return Scenario(16 * MiB, 256 * KiB, network, racks, stripes)


def test_pieces_cover_the_release_with_a_short_last_piece() -> None:
    assert piece_lengths(10, 4) == [4, 4, 2]
    assert piece_lengths(8, 4) == [4, 4]


def test_request_order_is_each_stripe_ascending_and_covers_every_piece_once() -> None:
    orders = request_orders(10, 3)
    assert orders == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]


def test_an_edge_is_never_faster_than_its_source_or_its_own_rate() -> None:
    # The source holds pieces at 1, 2, 10; each takes 0.5 s on this edge, 0.1 s per hop.
    assert edge_arrivals([1.0, 2.0, 10.0], [0.5, 0.5, 0.5], 0.1, 0.0) == pytest.approx(
        [1.6, 2.6, 10.6]
    )
    # A child starting at 5 s takes what its source already holds back to back.
    assert edge_arrivals([1.0, 2.0], [0.5, 0.5], 0.0, 5.0) == pytest.approx([5.5, 6.0])


@settings(max_examples=40, deadline=None)
@given(
    hosts=st.integers(1, 24),
    stripes=st.sampled_from([0, 1, 2, 3, 4, 8]),
    origin_share=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    racks=st.integers(0, 4),
    hop_delay=st.sampled_from([0.0, 0.001, 0.05]),
    startup=st.sampled_from([0.0, 2.0]),
)
def test_never_faster_than_physics(
    hosts: int, stripes: int, origin_share: float, racks: int, hop_delay: float, startup: float
) -> None:
    racks = min(racks, hosts)
    sc = scenario(
        stripes=stripes,
        racks=racks,
        origin_bandwidth=origin_share * B,
        hop_delay=hop_delay,
        startup=startup,
    )
    got = predict(hosts, sc)
    assert got["t_last"] >= got["t_min"] * (1 - 1e-9) + startup
    assert got["t_first"] <= got["t_p50"] <= got["t_last"]
    assert got["origin_egress_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize("hosts", [1, 2, 7, 30])
def test_a_pipelined_chain_matches_its_closed_form(hosts: int) -> None:
    """Every edge of a chain runs at B: the last host is (N - 1) piece-times behind S/B."""
    sc = scenario(stripes=1)
    got = predict(hosts, sc)
    assert got["depth"] == hosts
    expected = sc.size / B + (hosts - 1) * sc.piece_size / B
    assert got["t_last"] == pytest.approx(expected, rel=1e-12)


def test_stripes_beat_a_chain_on_a_thousand_hosts() -> None:
    chain = predict(1000, scenario(stripes=1))
    striped = predict(1000, scenario(stripes=4))
    assert striped["depth"] < chain["depth"]
    assert striped["t_last"] < chain["t_last"] / 2
    assert striped["max_children"] <= 4


def test_four_racks_of_four_take_each_byte_across_their_uplink_once() -> None:
    got = predict(16, scenario(racks=4))
    assert got["cross_rack_ratio"] == pytest.approx(1.0)
    assert got["origin_egress_ratio"] == pytest.approx(1.0)


def test_a_slow_origin_is_the_bottleneck_and_the_plan_nearly_reaches_it() -> None:
    got = predict(16, scenario(origin_bandwidth=B / 4))
    assert got["t_min"] == pytest.approx(16 * MiB / (B / 4))
    assert 0.95 < got["eta"] <= 1.0


def test_a_plan_with_a_cycle_is_refused() -> None:
    sources = {"a": ("origin",), "b": ("c",), "c": ("b",)}
    with pytest.raises(PlanError, match="never reaches a seeder"):
        simulate(sources, frozenset({"origin"}), {}, [1024], Network(B, B))


def test_a_slower_uplink_than_its_share_slows_the_rack() -> None:
    roomy = predict(16, scenario(racks=4))
    narrow = predict(16, scenario(racks=4, uplink=B / 8))
    assert narrow["t_last"] > roomy["t_last"]
    assert narrow["cross_rack_ratio"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args",
    [
        ["--hosts", "-5"],
        ["--size", "-1M"],
        ["--stripes", "0"],
        ["--stripes", "17"],
        ["--racks", "32", "--hosts", "16"],
        ["--no-such-flag"],
    ],
)
def test_the_cli_refuses_bad_input_in_one_line(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.sim", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
