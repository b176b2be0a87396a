"""Talking to the tracker from a host: announce messages, their signatures, a small client.

The wire format lives here, on the runtime side, and the tracker imports it, so
both ends parse and validate with the same code. Everything except
``announce``/``register_swarm``/``fetch_status`` is sans-I/O: build a request,
sign it, parse a response. The client functions are blocking (one request per
connection, no proxies, no redirects); the peer engine calls them from a thread.
They speak HTTP/1.1 themselves (``HTTPResponse`` frames the answer) instead of
using ``http.client``: its import (with the ``email`` package) costs a host
~17 ms of CPU at every start, ~10 % of a fetch's start-up.

Authentication: a swarm's peers share a 32-byte secret. The tracker never sees
it, only ``tracker_key = HMAC-SHA256(secret, b"roost-tracker-v1" + swarm id)``,
and each announce carries ``X-Roost-Auth: hex(HMAC-SHA256(tracker_key, body))``
over the exact body bytes. A message with a timestamp more than
``MAX_CLOCK_SKEW`` seconds from the tracker's clock is refused, so a captured
announce cannot be replayed later. See ``docs/tracker.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import random
import re
import socket
from typing import Any
from urllib.parse import urlsplit

from roost.runtime.errors import RoostError
from roost.runtime.manifest import MAX_PIECES
from roost.runtime.record import Record

API = "/v1"
KEY_CONTEXT = b"roost-tracker-v1"
AUTH_HEADER = "X-Roost-Auth"
SECRET_BYTES = 32
MAX_CLOCK_SKEW = 300.0
MAX_REQUEST_BYTES = 16 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a status answer for a large fleet
MAX_RESPONSE_HEAD = 64 * 1024  # status line and headers
MAX_NEIGHBOURS = 1024
MAX_STRIPES = 16  # sources in a relay plan (one per stripe)
MAX_INTERVAL = 24 * 3600
MAX_COUNTER = (1 << 63) - 1  # fits a SQLite integer
EVENTS = ("started", "update", "completed", "stopped")

_SWARM_ID = re.compile(r"[0-9a-f]{64}")
_PEER_ID = re.compile(r"[0-9a-f]{32}")
_KEY_HEX = re.compile(r"[0-9a-f]{64}")
_RACK = re.compile(r"[A-Za-z0-9._:/@+-]{1,64}")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


class TrackerError(RoostError):
    """Something went wrong between a host and the tracker."""


class TrackerUnavailable(TrackerError):
    """The tracker cannot be reached or failed (connection, timeout, 5xx): retry later."""


class TrackerRejected(TrackerError):
    """The tracker understood the request and refused it (4xx); retrying unchanged won't help."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"tracker refused the request ({status}): {message}")
        self.status = status
        self.message = message


class MalformedMessage(TrackerError):
    """A request or response that does not follow the wire format."""


# -- keys and signatures ------------------------------------------------------------------


def tracker_key(secret: bytes, swarm: str) -> bytes:
    """The key the tracker holds for a swarm: it proves peers know the secret without seeing it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a swarm secret is {SECRET_BYTES} bytes, not {len(secret)}")
    check_swarm_id(swarm)
    return hmac.new(secret, KEY_CONTEXT + bytes.fromhex(swarm), hashlib.sha256).digest()


def sign(key: bytes, body: bytes) -> str:
    """The ``X-Roost-Auth`` value for a body: hex HMAC-SHA256 over the exact bytes sent."""
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def verify(key: bytes, body: bytes, signature: str) -> bool:
    """Constant-time check of an ``X-Roost-Auth`` value."""
    supplied = signature.strip().lower().encode("utf-8", "replace")
    return hmac.compare_digest(sign(key, body).encode("ascii"), supplied)


# -- field validation ---------------------------------------------------------------------


def check_swarm_id(value: object) -> str:
    if not isinstance(value, str) or not _SWARM_ID.fullmatch(value):
        raise MalformedMessage("swarm must be 64 lowercase hex digits (the release id)")
    return value


def check_peer_id(value: object) -> str:
    if not isinstance(value, str) or not _PEER_ID.fullmatch(value):
        raise MalformedMessage("peer must be 32 lowercase hex digits")
    return value


def check_key_hex(value: object) -> bytes:
    if not isinstance(value, str) or not _KEY_HEX.fullmatch(value):
        raise MalformedMessage("key must be 64 lowercase hex digits (a 32-byte tracker key)")
    return bytes.fromhex(value)


def check_addr(value: object) -> str:
    if isinstance(value, str) and len(value) <= 253:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            if _HOSTNAME.fullmatch(value):
                return value
    raise MalformedMessage("addr must be an IP address or a host name")


def check_rack(value: object) -> str | None:
    if value is None or (isinstance(value, str) and _RACK.fullmatch(value)):
        return value
    raise MalformedMessage("rack must be null or 1-64 characters of [A-Za-z0-9._:/@+-]")


def check_int(value: object, name: str, lo: int = 0, hi: int = MAX_COUNTER) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise MalformedMessage(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise MalformedMessage(f"{name} must be true or false")
    return value


def check_delay(value: object) -> float:
    if type(value) not in (int, float) or not 0 < value <= MAX_INTERVAL:  # type: ignore[operator]
        raise MalformedMessage(f"retry_after must be a number of seconds in (0, {MAX_INTERVAL}]")
    return float(value)  # type: ignore[arg-type]


def check_time(value: object) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:  # type: ignore[arg-type]
        raise MalformedMessage("time must be a non-negative number of unix seconds")
    return float(value)  # type: ignore[arg-type]


def _field(obj: dict[str, Any], name: str) -> Any:
    if name not in obj:
        raise MalformedMessage(f"missing field {name!r}")
    return obj[name]


def _load_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedMessage(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object")
    return obj


def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


# -- announce request ---------------------------------------------------------------------


class AnnounceRequest(Record):
    """What a peer tells the tracker: who and where it is, what it holds, what happened.
    Checked when made (``validate_request``)."""

    __slots__ = (
        "swarm", "peer", "addr", "port", "have", "pieces", "event", "time",
        "rack", "seeder", "uploaded", "downloaded", "downloaded_from_origin",
    )  # fmt: skip

    def __init__(
        self,
        swarm: str,
        peer: str,
        addr: str,
        port: int,
        have: int,
        pieces: int,
        event: str,
        time: float,
        rack: str | None = None,
        seeder: bool = False,
        uploaded: int = 0,
        downloaded: int = 0,
        downloaded_from_origin: int | None = None,
    ) -> None:
        self.swarm, self.peer, self.addr, self.port = swarm, peer, addr, port
        self.have, self.pieces, self.event, self.time = have, pieces, event, time
        self.rack, self.seeder, self.uploaded, self.downloaded = rack, seeder, uploaded, downloaded
        self.downloaded_from_origin = downloaded_from_origin
        validate_request(self)

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "swarm": self.swarm,
            "peer": self.peer,
            "addr": self.addr,
            "port": self.port,
            "rack": self.rack,
            "seeder": self.seeder,
            "have": self.have,
            "pieces": self.pieces,
            "uploaded": self.uploaded,
            "downloaded": self.downloaded,
            "event": self.event,
            "time": self.time,
        }
        if self.downloaded_from_origin is not None:
            obj["downloaded_from_origin"] = self.downloaded_from_origin
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> AnnounceRequest:
        """Strict on every known field; unknown fields are ignored (additive changes in /v1)."""
        origin = obj.get("downloaded_from_origin")
        return cls(
            swarm=_field(obj, "swarm"),
            peer=_field(obj, "peer"),
            addr=_field(obj, "addr"),
            port=_field(obj, "port"),
            rack=_field(obj, "rack"),
            seeder=_field(obj, "seeder"),
            have=_field(obj, "have"),
            pieces=_field(obj, "pieces"),
            uploaded=_field(obj, "uploaded"),
            downloaded=_field(obj, "downloaded"),
            downloaded_from_origin=origin,
            event=_field(obj, "event"),
            time=check_time(_field(obj, "time")),
        )


def validate_request(req: AnnounceRequest) -> None:
    """Raise ``MalformedMessage`` unless every field is well-formed and consistent."""
    check_swarm_id(req.swarm)
    check_peer_id(req.peer)
    check_addr(req.addr)
    check_int(req.port, "port", 1, 65535)
    check_rack(req.rack)
    check_bool(req.seeder, "seeder")
    check_int(req.pieces, "pieces", 0, MAX_PIECES)
    check_int(req.have, "have", 0, req.pieces)
    check_int(req.uploaded, "uploaded")
    check_int(req.downloaded, "downloaded")
    if req.downloaded_from_origin is not None:
        check_int(req.downloaded_from_origin, "downloaded_from_origin")
    if req.event not in EVENTS:
        raise MalformedMessage(f"event must be one of {', '.join(EVENTS)}")
    check_time(req.time)
    if req.seeder and req.have != req.pieces:
        raise MalformedMessage("a seeder holds every piece (have == pieces)")
    if req.event == "completed" and req.have != req.pieces:
        raise MalformedMessage("a completed peer holds every piece (have == pieces)")


class SignedAnnounce(Record):
    """An announce ready to send: the exact body bytes and their signature."""

    __slots__ = ("body", "signature")

    def __init__(self, body: bytes, signature: str) -> None:
        self.body, self.signature = body, signature

    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", AUTH_HEADER: self.signature}


def sign_request(request: AnnounceRequest, key: bytes) -> SignedAnnounce:
    body = _dump(request.to_json())
    return SignedAnnounce(body, sign(key, body))


def parse_request(body: bytes) -> AnnounceRequest:
    """Decode an announce body (tracker side). Raises ``MalformedMessage`` with the reason."""
    if len(body) > MAX_REQUEST_BYTES:
        raise MalformedMessage(f"announce is larger than {MAX_REQUEST_BYTES} bytes")
    return AnnounceRequest.from_json(_load_object(body, "announce"))


# -- announce response --------------------------------------------------------------------


class Neighbour(Record):
    """A peer the tracker suggests talking to."""

    __slots__ = ("peer", "addr", "port", "seeder", "have", "rack")

    def __init__(
        self, peer: str, addr: str, port: int, seeder: bool, have: int, rack: str | None
    ) -> None:
        self.peer, self.addr, self.port = peer, addr, port
        self.seeder, self.have, self.rack = seeder, have, rack

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "addr": self.addr,
            "port": self.port,
            "seeder": self.seeder,
            "have": self.have,
            "rack": self.rack,
        }

    @classmethod
    def from_json(cls, obj: object) -> Neighbour:
        if not isinstance(obj, dict):
            raise MalformedMessage("each neighbour must be a JSON object")
        return cls(
            peer=check_peer_id(_field(obj, "peer")),
            addr=check_addr(_field(obj, "addr")),
            port=check_int(_field(obj, "port"), "port", 1, 65535),
            seeder=check_bool(_field(obj, "seeder"), "seeder"),
            have=check_int(_field(obj, "have"), "have", 0, MAX_PIECES),
            rack=check_rack(_field(obj, "rack")),
        )


class AnnounceResponse(Record):
    """The tracker's answer: neighbours, when to announce next, whether the swarm is done,
    and (``sources``) the peer to fetch each stripe from, when the tracker plans relays.
    ``stripes`` is the plan's stripe count, told to every peer while there is a plan
    (0: none); seeders, which fetch nothing, learn from it to send in piece order.
    ``retry_after`` (seconds, fractional) asks for the next announce sooner than
    ``interval``: the tracker is still gathering the fleet before planning."""

    __slots__ = (
        "peers", "interval", "swarm_complete", "stats", "sources", "stripes", "retry_after",
    )  # fmt: skip

    def __init__(
        self,
        peers: tuple[Neighbour, ...],
        interval: int,
        swarm_complete: bool,
        stats: dict[str, int],
        sources: tuple[str, ...] = (),
        stripes: int = 0,
        retry_after: float | None = None,
    ) -> None:
        self.peers, self.interval, self.swarm_complete, self.stats = (
            peers, interval, swarm_complete, stats
        )  # fmt: skip
        self.sources, self.stripes, self.retry_after = sources, stripes, retry_after

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "peers": [n.to_json() for n in self.peers],
            "interval": self.interval,
            "swarm_complete": self.swarm_complete,
            "stats": dict(self.stats),
        }
        if self.sources:
            obj["sources"] = list(self.sources)
        if self.stripes:
            obj["stripes"] = self.stripes
        if self.retry_after is not None:
            obj["retry_after"] = self.retry_after
        return obj

    def to_bytes(self) -> bytes:
        return _dump(self.to_json())


def parse_response(body: bytes) -> AnnounceResponse:
    """Decode the tracker's answer to an announce. Raises ``MalformedMessage``."""
    obj = _load_object(body, "announce response")
    peers = _field(obj, "peers")
    if not isinstance(peers, list) or len(peers) > MAX_NEIGHBOURS:
        raise MalformedMessage(f"peers must be a list of at most {MAX_NEIGHBOURS} neighbours")
    stats = _field(obj, "stats")
    if not isinstance(stats, dict) or not all(
        isinstance(k, str) and type(v) is int for k, v in stats.items()
    ):
        raise MalformedMessage("stats must map names to integers")
    sources = obj.get("sources", [])
    if not isinstance(sources, list) or len(sources) > MAX_STRIPES:
        raise MalformedMessage(f"sources must be a list of at most {MAX_STRIPES} peer ids")
    stripes = check_int(obj.get("stripes", 0), "stripes", 0, MAX_STRIPES)
    if sources and len(sources) != stripes:
        raise MalformedMessage(f"{len(sources)} sources for a plan of {stripes} stripes")
    return AnnounceResponse(
        peers=tuple(Neighbour.from_json(p) for p in peers),
        interval=check_int(_field(obj, "interval"), "interval", 1, MAX_INTERVAL),
        swarm_complete=check_bool(_field(obj, "swarm_complete"), "swarm_complete"),
        stats=stats,
        sources=tuple(check_peer_id(s) for s in sources),
        stripes=stripes,
        retry_after=check_delay(obj["retry_after"]) if "retry_after" in obj else None,
    )


# -- retry timing -------------------------------------------------------------------------


def backoff_delay(
    attempt: int, rng: random.Random, *, base: float = 0.5, cap: float = 30.0
) -> float:
    """Seconds to wait before retry ``attempt`` (0 = first retry) after a failed announce.

    Exponential and capped, with "equal jitter" (a uniform draw in the upper half
    of the window): never zero, so a host does not hammer a dead tracker, and
    spread out, so a fleet that lost its tracker at once does not return at once.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    window = min(cap, base * 2.0 ** min(attempt, 64))
    return window / 2 + rng.random() * window / 2


def jittered(interval: float, rng: random.Random, spread: float = 0.1) -> float:
    """The interval the tracker asked for, ±``spread``, so announces do not arrive in lockstep."""
    return interval * (1 - spread + 2 * spread * rng.random())


# -- blocking client ----------------------------------------------------------------------


def announce(url: str, request: SignedAnnounce, timeout: float = 10.0) -> AnnounceResponse:
    """POST a signed announce to the tracker at ``url`` (e.g. ``http://10.0.0.1:6969``)."""
    body = _http(url, "POST", f"{API}/announce", request.body, request.headers(), timeout)
    return parse_response(body)


def register_swarm(
    url: str,
    admin_token: str,
    swarm: str,
    key: bytes,
    *,
    expected_peers: int | None = None,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """Register a swarm (and its tracker key) with the tracker; idempotent for the same key."""
    payload: dict[str, Any] = {"swarm": check_swarm_id(swarm), "key": key.hex()}
    if expected_peers is not None:
        payload["expected_peers"] = check_int(expected_peers, "expected_peers")
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {admin_token}"}
    body = _http(url, "POST", f"{API}/swarms", _dump(payload), headers, timeout)
    return _load_object(body, "registration response")


def fetch_status(url: str, swarm: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The tracker's view of every swarm (or of one): peers, progress, completion."""
    path = f"{API}/swarms/{check_swarm_id(swarm)}" if swarm else f"{API}/status"
    return _load_object(_http(url, "GET", path, None, {}, timeout), "status response")


def _http(
    url: str,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    timeout: float,
) -> bytes:
    """One request on a fresh connection; failures become ``TrackerUnavailable``/``Rejected``."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port out of range or not a number
        port = 0
    if parts.scheme not in ("http", "https") or not parts.hostname or not port:
        raise TrackerError(f"not a tracker URL: {url!r} (try http://HOST:PORT)")
    request = encode_request(
        method, parts.netloc.rpartition("@")[2], parts.path.rstrip("/") + path, body, headers
    )
    response = HTTPResponse()
    try:
        sock = socket.create_connection((parts.hostname, port), timeout=timeout)
        try:
            if parts.scheme == "https":
                import ssl  # only for https trackers

                sock = ssl.create_default_context().wrap_socket(
                    sock, server_hostname=parts.hostname
                )
            sock.sendall(request)
            while not response.complete:
                response.feed(sock.recv(65536))
        finally:
            sock.close()
    except OSError as exc:
        raise TrackerUnavailable(f"tracker {url} unreachable: {exc or type(exc).__name__}") from exc
    except BadHTTP as exc:
        raise TrackerUnavailable(f"tracker {url} answered with broken HTTP: {exc}") from None
    assert response.status is not None
    if response.status >= 500 or response.status == 429:
        raise TrackerUnavailable(
            f"tracker {url} failed ({response.status}): {_reason(response.body)}"
        )
    if response.status >= 400:
        raise TrackerRejected(response.status, _reason(response.body))
    return response.body


# -- HTTP/1.1 framing (sans-I/O) -----------------------------------------------------------


class BadHTTP(Exception):
    """An answer that is not HTTP/1.x, or ends before it is complete."""


def encode_request(
    method: str, host: str, target: str, body: bytes | None, headers: dict[str, str]
) -> bytes:
    """One HTTP/1.1 request asking the server to close the connection after answering."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class HTTPResponse:
    """One HTTP/1.x response, read from the bytes received: ``feed`` each chunk, and
    ``b""`` at the end of the stream. ``complete`` once ``status`` and ``body`` are known.

    The body is framed by Content-Length, chunked transfer coding, or the end of
    the stream; an answer larger than ``limit`` raises ``MalformedMessage``.
    """

    def __init__(self, limit: int = MAX_RESPONSE_BYTES) -> None:
        self.limit = limit
        self.status: int | None = None
        self.body = b""
        self.complete = False
        self._buffer = bytearray()  # received, not yet part of the body (chunked: decoded)
        self._length: int | None = None  # Content-Length, if given
        self._chunked = False
        self._decoded = bytearray()  # the chunks received whole so far

    def feed(self, data: bytes) -> None:
        if self.complete:
            return
        end_of_stream = not data
        self._buffer += data
        if self.status is None:
            head_end = self._buffer.find(b"\r\n\r\n")
            if head_end < 0:
                if len(self._buffer) > MAX_RESPONSE_HEAD:
                    raise BadHTTP("status line and headers too long")
                if end_of_stream:
                    raise BadHTTP("connection closed before the answer's headers")
                return
            self._read_head(bytes(self._buffer[:head_end]))
            del self._buffer[: head_end + 4]
        received = len(self._decoded) + len(self._buffer)
        if received > self.limit + (MAX_RESPONSE_HEAD if self._chunked else 0):
            raise MalformedMessage(f"tracker answer larger than {self.limit} bytes")
        body = self._body(end_of_stream)
        if body is not None:
            if len(body) > self.limit:
                raise MalformedMessage(f"tracker answer larger than {self.limit} bytes")
            self.body, self.complete = body, True

    def _read_head(self, head: bytes) -> None:
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not (code.isdigit() and len(code) == 3):
            raise BadHTTP(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        self.status = int(code)
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise BadHTTP(f"malformed header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            if name == "transfer-encoding":
                self._chunked = value.lower() == "chunked"
            elif name == "content-length":
                if not value.isdigit():
                    raise BadHTTP(f"bad Content-Length: {value[:40]!r}")
                self._length = int(value)

    def _body(self, end_of_stream: bool) -> bytes | None:
        """The whole body once it has arrived, else None (an error at the end of the stream)."""
        if self._chunked:
            body = bytes(self._decoded) if self._take_chunks() else None
        elif self._length is not None:
            body = (
                bytes(self._buffer[: self._length]) if len(self._buffer) >= self._length else None
            )
        else:  # no framing: the body runs to the end of the stream
            body = bytes(self._buffer) if end_of_stream else None
        if body is None and end_of_stream:
            raise BadHTTP("connection closed in the middle of the answer")
        return body

    def _take_chunks(self) -> bool:
        """Move the chunks received whole into the decoded body (each byte once, however
        the answer is split); True once the last chunk and its trailers have come."""
        while True:
            line_end = self._buffer.find(b"\r\n")
            if line_end < 0:
                return False
            size_field = bytes(self._buffer[:line_end]).partition(b";")[0].strip()
            if not size_field or size_field.strip(b"0123456789abcdefABCDEF"):
                raise BadHTTP(f"bad chunk size: {size_field[:20]!r}")
            size = int(size_field, 16)
            if size == 0:  # the last chunk; the trailers end with an empty line
                return self._buffer.find(b"\r\n\r\n", line_end) >= 0
            end = line_end + 2 + size
            if len(self._buffer) < end + 2:
                return False
            self._decoded += self._buffer[line_end + 2 : end]
            del self._buffer[: end + 2]


def _reason(data: bytes) -> str:
    """The ``error`` message of a JSON error body, else the start of the body."""
    try:
        obj = json.loads(data.decode("utf-8"))
        if isinstance(obj, dict) and isinstance(obj.get("error"), str):
            return obj["error"]
    except (UnicodeDecodeError, ValueError):
        pass
    return data[:200].decode("utf-8", "replace").strip() or "no details"
