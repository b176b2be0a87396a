"""The host side of the tracker protocol: keys, signatures, messages, client, backoff."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given
from hypothesis import strategies as st

from roost.runtime.announce import (
    AnnounceRequest,
    AnnounceResponse,
    BadHTTP,
    HTTPResponse,
    MalformedMessage,
    Neighbour,
    TrackerError,
    TrackerRejected,
    TrackerUnavailable,
    announce,
    backoff_delay,
    encode_request,
    fetch_status,
    jittered,
    parse_request,
    parse_response,
    register_swarm,
    sign,
    sign_request,
    tracker_key,
    verify,
)
from roost.tracker import running_tracker

SWARM = "0f" * 32
SECRET = b"s" * 32


def request(**fields: Any) -> AnnounceRequest:
    values: dict[str, Any] = {
        "swarm": SWARM,
        "peer": "a1" * 16,
        "addr": "10.1.2.3",
        "port": 7001,
        "have": 3,
        "pieces": 8,
        "event": "update",
        "time": time.time(),
        "rack": "r1",
        **fields,
    }
    return AnnounceRequest(**values)


# -- keys and signatures ------------------------------------------------------------------


def test_tracker_key_is_the_documented_hmac() -> None:
    expected = hmac.new(SECRET, b"roost-tracker-v1" + bytes.fromhex(SWARM), hashlib.sha256).digest()
    assert tracker_key(SECRET, SWARM) == expected
    assert tracker_key(SECRET, "1e" * 32) != expected
    with pytest.raises(ValueError, match="32 bytes"):
        tracker_key(SECRET.hex().encode(), SWARM)
    with pytest.raises(MalformedMessage):
        tracker_key(SECRET, SWARM.upper())


def test_signature_covers_every_byte() -> None:
    key = tracker_key(SECRET, SWARM)
    signed = sign_request(request(), key)
    assert verify(key, signed.body, signed.signature)
    assert verify(key, signed.body, signed.signature.upper() + "\n")
    assert not verify(key, signed.body + b" ", signed.signature)
    assert not verify(tracker_key(b"x" * 32, SWARM), signed.body, signed.signature)
    assert not verify(key, signed.body, "ünicode")
    assert signed.headers()["X-Roost-Auth"] == sign(key, signed.body)


# -- messages -----------------------------------------------------------------------------


def test_request_round_trips_through_its_bytes() -> None:
    for req in (request(), request(rack=None, seeder=True, have=8, downloaded_from_origin=5)):
        assert parse_request(sign_request(req, b"k").body) == req


def test_unknown_request_fields_are_ignored() -> None:
    obj = {**request().to_json(), "future": 1}
    assert parse_request(json.dumps(obj).encode()) == request(time=obj["time"])


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"swarm": "ab"}, "swarm"),
        ({"peer": "A1" * 16}, "peer"),
        ({"addr": "bad host!"}, "addr"),
        ({"addr": "x" * 300}, "addr"),
        ({"port": 0}, "port"),
        ({"port": True}, "port"),
        ({"rack": ""}, "rack"),
        ({"rack": "a b"}, "rack"),
        ({"have": 9}, "have"),
        ({"have": -1}, "have"),
        ({"pieces": 1 << 30}, "pieces"),
        ({"uploaded": 1.5}, "uploaded"),
        ({"downloaded": -3}, "downloaded"),
        ({"downloaded_from_origin": "7"}, "downloaded_from_origin"),
        ({"event": "paused"}, "event"),
        ({"time": float("nan")}, "time"),
        ({"time": "now"}, "time"),
        ({"seeder": 1}, "seeder"),
        ({"seeder": True}, "seeder holds every piece"),
        ({"event": "completed"}, "completed peer holds every piece"),
    ],
)
def test_malformed_requests_say_what_is_wrong(change: dict[str, Any], words: str) -> None:
    body = json.dumps({**request().to_json(), **change}).encode()
    with pytest.raises(MalformedMessage, match=words):
        parse_request(body)


def test_addresses_may_be_ipv6_or_names() -> None:
    for addr in ("::1", "fe80::1", "host-7.dc1.example.com", "10.0.0.1"):
        assert parse_request(sign_request(request(addr=addr), b"k").body).addr == addr


def test_requests_that_are_not_objects_are_malformed() -> None:
    for body in (b"", b"\xff", b"[]", b"null", b'"x"', b"{", b"{}" + b" " * 20_000):
        with pytest.raises(MalformedMessage):
            parse_request(body)


def test_response_round_trips_and_rejects_nonsense() -> None:
    neighbour = Neighbour("b2" * 16, "10.0.0.9", 7002, False, 4, None)
    response = AnnounceResponse((neighbour,), 5, False, {"peers": 2, "complete": 0})
    assert parse_response(response.to_bytes()) == response
    planned = AnnounceResponse(
        (neighbour,), 1, False, {}, sources=("b2" * 16, "b2" * 16), stripes=2, retry_after=0.25
    )
    assert parse_response(planned.to_bytes()) == planned
    origin = AnnounceResponse((neighbour,), 1, False, {}, stripes=4)  # told a plan exists
    assert parse_response(origin.to_bytes()).stripes == 4
    assert parse_response(response.to_bytes()).stripes == 0
    good = response.to_json()
    for bad in (
        {**good, "interval": 0},
        {**good, "sources": "b2" * 16},
        {**good, "sources": ["x"]},
        {**good, "sources": ["b2" * 16] * 17, "stripes": 17},
        {**good, "sources": ["b2" * 16] * 2, "stripes": 3},
        {**good, "sources": ["b2" * 16]},
        {**good, "stripes": -1},
        {**good, "stripes": 1.5},
        {**good, "retry_after": 0},
        {**good, "retry_after": "soon"},
        {**good, "peers": {}},
        {**good, "peers": [{"peer": "x"}]},
        {**good, "swarm_complete": "yes"},
        {**good, "stats": {"peers": "2"}},
        {k: v for k, v in good.items() if k != "interval"},
    ):
        with pytest.raises(MalformedMessage):
            parse_response(json.dumps(bad).encode())


# -- backoff ------------------------------------------------------------------------------


@given(
    st.integers(0, 10_000),
    st.floats(0.01, 10),
    st.floats(1, 600),
    st.randoms(use_true_random=False),
)
def test_backoff_is_capped_never_zero_and_grows(
    attempt: int, base: float, cap: float, rng: random.Random
) -> None:
    window = min(cap, base * 2.0 ** min(attempt, 64))
    delay = backoff_delay(attempt, rng, base=base, cap=cap)
    assert window / 2 <= delay <= window <= cap
    assert delay > 0


class Extreme(random.Random):
    """A random source stuck at one value, to reach the jitter's bounds exactly."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_backoff_sequence_and_jitter_bounds() -> None:
    low = [backoff_delay(a, Extreme(0.0)) for a in range(10)]
    high = [backoff_delay(a, Extreme(1.0)) for a in range(10)]
    assert high == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert low == [h / 2 for h in high]
    with pytest.raises(ValueError):
        backoff_delay(-1, random.Random())
    assert jittered(10, Extreme(0.0)) == 9 and jittered(10, Extreme(1.0)) == 11


# -- the blocking client against a real tracker ---------------------------------------------


def test_client_registers_announces_and_reads_status(tmp_path: Path) -> None:
    key = tracker_key(SECRET, SWARM)

    async def main() -> None:
        async with running_tracker(tmp_path / "t.db") as t:
            answer = await asyncio.to_thread(
                register_swarm, t.url, t.admin_token, SWARM, key, expected_peers=1
            )
            assert answer["created"] is True
            origin = request(peer="0" * 32, seeder=True, have=8, event="started")
            await asyncio.to_thread(announce, t.url, sign_request(origin, key), 5.0)
            response = await asyncio.to_thread(announce, t.url, sign_request(request(), key))
            assert [n.peer for n in response.peers] == ["0" * 32]
            assert response.sources == ("0" * 32,)  # a relay plan: fetch from the origin
            assert response.peers[0].seeder and response.peers[0].have == 8
            assert response.interval >= 1 and not response.swarm_complete
            assert response.stats["peers"] == 2
            status = await asyncio.to_thread(fetch_status, t.url)
            assert [s["swarm"] for s in status["swarms"]] == [SWARM]
            one = await asyncio.to_thread(fetch_status, t.url, SWARM)
            assert len(one["peers"]) == 2

            wrong = sign_request(request(), tracker_key(b"w" * 32, SWARM))
            with pytest.raises(TrackerRejected) as refused:
                await asyncio.to_thread(announce, t.url, wrong)
            assert refused.value.status == 403 and "X-Roost-Auth" in refused.value.message
            with pytest.raises(TrackerRejected, match="401"):
                await asyncio.to_thread(register_swarm, t.url, "nope", SWARM, key)

    asyncio.run(main())


def test_nothing_listening_is_tracker_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    signed = sign_request(request(), b"k")
    with pytest.raises(TrackerUnavailable, match="unreachable"):
        announce(f"http://127.0.0.1:{port}", signed, timeout=5)


def test_a_failing_tracker_is_unavailable_not_rejected() -> None:
    async def broken(_: web.Request) -> web.Response:
        return web.json_response({"error": "database on fire"}, status=500)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/announce", broken)
        async with TestServer(app, host="127.0.0.1") as server:
            url = str(server.make_url("/"))
            signed = sign_request(request(), b"k")
            with pytest.raises(TrackerUnavailable, match="database on fire"):
                await asyncio.to_thread(announce, url, signed)

    asyncio.run(main())


def test_the_client_reads_chunked_answers_and_speaks_https(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trackers behind a proxy may answer chunked, and may be reached over https: the
    client frames both itself (it does not use http.client)."""
    authority = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the default context trusts it
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(server_context)
    status = {"swarms": [{"swarm": SWARM, "peers": ["x" * 100] * 500}]}

    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        text = json.dumps(status).encode()
        for start in range(0, len(text), 1000):
            await response.write(text[start : start + 1000])
        await response.write_eof()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v1/status", chunked)
        async with TestServer(app, host="127.0.0.1") as plain:
            assert await asyncio.to_thread(fetch_status, f"http://127.0.0.1:{plain.port}") == status
        secure = TestServer(app, host="127.0.0.1")
        await secure.start_server(ssl=server_context)
        try:
            url = f"https://localhost:{secure.port}"
            assert await asyncio.to_thread(fetch_status, url) == status
            monkeypatch.delenv("SSL_CERT_FILE")  # an unknown certificate is refused
            with pytest.raises(TrackerUnavailable, match="CERTIFICATE_VERIFY_FAILED"):
                await asyncio.to_thread(fetch_status, url)
        finally:
            await secure.close()

    asyncio.run(main())


def feed_in_pieces(response: HTTPResponse, data: bytes, size: int) -> None:
    for start in range(0, len(data), size):
        response.feed(data[start : start + size])
    if not response.complete:
        response.feed(b"")  # the end of the stream


@pytest.mark.parametrize("size", [1, 7, 4096])
@pytest.mark.parametrize(
    ("raw", "body"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 5\r\n\r\nhello", b"hello"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b""),
        (b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nto the end", b"to the end"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\nA\r\n, world!!!\r\n0\r\nTrailer: t\r\n\r\n",
            b"hello, world!!!",
        ),
    ],
)
def test_http_answers_are_framed_however_they_arrive(raw: bytes, body: bytes, size: int) -> None:
    response = HTTPResponse()
    feed_in_pieces(response, raw, size)
    assert response.complete and response.body == body
    assert response.status == int(raw[9:12])


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", "in the middle"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", "in the middle"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nab", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "before the answer's headers"),
    ],
)
def test_broken_http_answers_are_errors(raw: bytes, error: str) -> None:
    with pytest.raises(BadHTTP, match=error):
        feed_in_pieces(HTTPResponse(), raw, 3)


def test_http_answers_over_the_limit_are_refused() -> None:
    for raw in (
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n" + b"x" * 11,
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 11,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n"
        + b"x" * 11
        + b"\r\n0\r\n\r\n",
    ):
        with pytest.raises(MalformedMessage, match="larger than 10 bytes"):
            feed_in_pieces(HTTPResponse(limit=10), raw, 4)


def test_requests_carry_their_length_and_ask_to_close() -> None:
    raw = encode_request("POST", "[::1]:7070", "/v1/announce", b"{}", {"X-Roost-Auth": "ab"})
    assert raw == (
        b"POST /v1/announce HTTP/1.1\r\nHost: [::1]:7070\r\nConnection: close\r\n"
        b"Content-Length: 2\r\nX-Roost-Auth: ab\r\n\r\n{}"
    )


def test_bad_urls_are_reported() -> None:
    for url in ("ftp://tracker", "tracker:6969", "http://"):
        with pytest.raises(TrackerError, match="not a tracker URL"):
            announce(url, sign_request(request(), b"k"))


def test_request_is_a_value_checked_when_made() -> None:
    assert request(time=1.0) == request(time=1.0)
    assert hash(request(time=1.0)) == hash(request(time=1.0))
    assert request(time=1.0) != request(time=1.0, have=4)
    with pytest.raises(MalformedMessage):
        request(have=99)
