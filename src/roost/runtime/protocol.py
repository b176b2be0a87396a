"""roost's peer wire protocol, version 1, as a sans-I/O state machine.

Two peers of a swarm exchange pieces of a release over one TCP connection.
This module knows the bytes and the rules and nothing else: no sockets, no
asyncio, no clock. The caller owns the connection::

    conn = PeerConnection(role=Role.INITIATOR, swarm_id=..., peer_id=..., secret=..., ...)
    write(conn.initiate())                     # our Hello
    conn.receive_data(read())                  # b"" means EOF
    event = conn.next_event()                  # a message, NEED_DATA or ConnectionClosed
    write(conn.send(Request(piece, offset, length)))

Uploads can skip the in-memory copy: ``conn.send_block_header(piece, offset,
length)`` returns the frame header, after which the caller writes exactly
``length`` payload bytes itself (``os.sendfile``) and reports them with
``conn.payload_written(n)``.

Bad input from the remote peer raises ``ProtocolError`` (and nothing else);
the connection is then in the ERROR state and refuses further use, except
that a ``Goodbye`` may still be sent to explain why. Misuse by our own caller
raises ``LocalProtocolError`` and changes nothing. See ``docs/protocol.md``
for the wire format, the handshake and what it proves.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import os
import struct
from collections.abc import Iterable
from typing import TYPE_CHECKING, Callable, ClassVar, Union

from roost.runtime.record import Record

if TYPE_CHECKING:
    from roost.runtime.manifest import Manifest

__all__ = [
    "MAGIC",
    "MAX_BLOCK",
    "MAX_INBOUND_REQUESTS",
    "MAX_REASON_BYTES",
    "NEED_DATA",
    "VERSION",
    "Auth",
    "Bitfield",
    "Block",
    "Cancel",
    "ConnectionClosed",
    "Goodbye",
    "Have",
    "Hello",
    "KeepAlive",
    "LocalProtocolError",
    "Message",
    "PeerConnection",
    "ProtocolError",
    "Reject",
    "Request",
    "Role",
    "Signal",
    "State",
    "auth_proof",
    "bitfield_size",
    "decode_message",
    "encode_message",
]

MAGIC = b"RO"
VERSION = 2
HEADER = struct.Struct(">2sBBI")  # magic, version, message type, payload length
HEADER_SIZE = HEADER.size

KiB = 1024
MiB = 1024 * KiB

MAX_BLOCK = 16 * MiB  # largest Block payload (data bytes)
MAX_INBOUND_REQUESTS = 256  # unanswered requests one side may have with the other
MAX_REASON_BYTES = 512  # longest Goodbye reason, UTF-8 encoded

SWARM_ID_SIZE = 32
PEER_ID_SIZE = 16
NONCE_SIZE = 32
SECRET_SIZE = 32
PROOF_SIZE = 32
AUTH_CONTEXT = b"roost-auth-v1"

_U32_MAX = 0xFFFFFFFF
_BLOCK_PREFIX = struct.Struct(">II")  # piece, offset (the data follows)
_RANGE = struct.Struct(">III")  # piece, offset, length


# ---------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------


class ProtocolError(Exception):
    """The remote peer broke the protocol. The connection is unusable from now on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LocalProtocolError(Exception):
    """Our own caller asked for something the protocol forbids. Nothing was changed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Violation(Exception):
    """A broken rule, before we know whose fault it is.

    The rules are the same for both directions; the two boundaries turn a
    violation into ``ProtocolError`` (remote input) or ``LocalProtocolError``
    (our caller's request).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------
# Messages and their payloads
# ---------------------------------------------------------------------------------


class Role(enum.Enum):
    """Which end opened the connection. The value is the role byte signed in Auth."""

    INITIATOR = 1
    RESPONDER = 2

    @property
    def other(self) -> Role:
        return Role.RESPONDER if self is Role.INITIATOR else Role.INITIATOR


class Message(Record):
    """Base of every wire message. ``TYPE`` is the message type byte of the header."""

    __slots__ = ()
    TYPE: ClassVar[int]
    SIZES: ClassVar[tuple[int, int]]  # smallest and largest payload, in bytes

    def _payload(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def _decode(cls, payload: bytes) -> Message:
        raise NotImplementedError


class Hello(Message):
    """The first frame from each side: which swarm, who we are, a fresh challenge."""

    __slots__ = ("swarm_id", "peer_id", "nonce")

    def __init__(self, swarm_id: bytes, peer_id: bytes, nonce: bytes) -> None:
        self.swarm_id, self.peer_id, self.nonce = swarm_id, peer_id, nonce

    TYPE: ClassVar[int] = 1
    SIZES: ClassVar[tuple[int, int]] = (80, 80)

    def _payload(self) -> bytes:
        _check_bytes("swarm_id", self.swarm_id, SWARM_ID_SIZE)
        _check_bytes("peer_id", self.peer_id, PEER_ID_SIZE)
        _check_bytes("nonce", self.nonce, NONCE_SIZE)
        return bytes(self.swarm_id) + bytes(self.peer_id) + bytes(self.nonce)

    @classmethod
    def _decode(cls, payload: bytes) -> Hello:
        return cls(payload[:32], payload[32:48], payload[48:80])


class Auth(Message):
    """The answer to the other side's challenge: an HMAC only secret holders can make."""

    __slots__ = ("proof",)

    def __init__(self, proof: bytes) -> None:
        self.proof = proof

    TYPE: ClassVar[int] = 2
    SIZES: ClassVar[tuple[int, int]] = (32, 32)

    def _payload(self) -> bytes:
        _check_bytes("proof", self.proof, PROOF_SIZE)
        return bytes(self.proof)

    @classmethod
    def _decode(cls, payload: bytes) -> Auth:
        return cls(payload)


class Bitfield(Message):
    """The pieces a side holds, one bit each, piece 0 in the high bit of byte 0.

    Exactly ``bitfield_size(piece_count)`` bytes; the spare bits after the last
    piece must be zero. Each side sends exactly one, as its first message after
    authentication.
    """

    __slots__ = ("have",)

    def __init__(self, have: bytes) -> None:
        self.have = have

    TYPE: ClassVar[int] = 3
    SIZES: ClassVar[tuple[int, int]] = (0, _U32_MAX)  # the connection demands the exact size

    @classmethod
    def from_pieces(cls, pieces: Iterable[int], piece_count: int) -> Bitfield:
        bits = bytearray(bitfield_size(piece_count))
        for index in pieces:
            if not 0 <= index < piece_count:
                raise ValueError(f"piece {index} out of range 0..{piece_count - 1}")
            bits[index >> 3] |= 0x80 >> (index & 7)
        return cls(bytes(bits))

    def has(self, index: int) -> bool:
        byte = index >> 3
        return 0 <= byte < len(self.have) and bool(self.have[byte] & (0x80 >> (index & 7)))

    def pieces(self) -> list[int]:
        return [i for i in range(len(self.have) * 8) if self.has(i)]

    def _payload(self) -> bytes:
        _check_buffer("have", self.have)
        return bytes(self.have)

    @classmethod
    def _decode(cls, payload: bytes) -> Bitfield:
        return cls(payload)


class Have(Message):
    """The sender has just verified and stored ``pieces`` (at least one, each at most
    once). A peer announces what it verified in the last moment in one frame: one
    frame per piece and neighbour was most of the swarm's messages."""

    __slots__ = ("pieces",)

    def __init__(self, pieces: tuple[int, ...]) -> None:
        self.pieces = pieces

    TYPE: ClassVar[int] = 4
    SIZES: ClassVar[tuple[int, int]] = (4, _U32_MAX)  # the connection bounds the count

    def _payload(self) -> bytes:
        if not isinstance(self.pieces, tuple) or not self.pieces:
            raise ValueError("Have needs a non-empty tuple of pieces")
        for piece in self.pieces:
            _u32("piece", piece)
        return struct.pack(f">{len(self.pieces)}I", *self.pieces)

    @classmethod
    def _decode(cls, payload: bytes) -> Have:
        if len(payload) % 4:
            raise _Violation(f"Have frame of {len(payload)} bytes (must be a multiple of 4)")
        return cls(struct.unpack(f">{len(payload) // 4}I", payload))


class _Range(Message):
    """A message naming ``length`` bytes of ``piece`` from ``offset``."""

    __slots__ = ("piece", "offset", "length")

    SIZES: ClassVar[tuple[int, int]] = (12, 12)

    def __init__(self, piece: int, offset: int, length: int) -> None:
        self.piece, self.offset, self.length = piece, offset, length

    def _payload(self) -> bytes:
        return _pack_range(self.piece, self.offset, self.length)

    @classmethod
    def _decode(cls, payload: bytes) -> _Range:
        return cls(*_RANGE.unpack(payload))


class Request(_Range):
    """Please send ``length`` bytes of ``piece`` from ``offset``. Answered by Block or Reject."""

    __slots__ = ()
    TYPE: ClassVar[int] = 5


class Block(Message):
    """Data answering a Request for exactly (piece, offset, len(data)).

    ``data`` is any bytes-like object; received blocks carry a ``bytearray``
    that belongs to the receiver. ``unwanted`` is never on the wire: it is True
    on a received Block that answers a request we had cancelled (the data is
    still genuine and may be used; it is verified with the piece hash anyway).
    """

    __slots__ = ("piece", "offset", "data", "unwanted")
    uncompared = ("unwanted",)

    def __init__(self, piece: int, offset: int, data: bytes, unwanted: bool = False) -> None:
        self.piece, self.offset, self.data, self.unwanted = piece, offset, data, unwanted

    TYPE: ClassVar[int] = 6
    SIZES: ClassVar[tuple[int, int]] = (_BLOCK_PREFIX.size + 1, _BLOCK_PREFIX.size + MAX_BLOCK)

    @property
    def length(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ", unwanted=True" if self.unwanted else ""
        return f"Block(piece={self.piece}, offset={self.offset}, length={len(self.data)}{extra})"

    def _payload(self) -> bytes:
        _check_buffer("data", self.data)
        prefix = _BLOCK_PREFIX.pack(_u32("piece", self.piece), _u32("offset", self.offset))
        return prefix + bytes(self.data)

    @classmethod
    def _decode(cls, payload: bytes) -> Block:
        piece, offset = _BLOCK_PREFIX.unpack_from(payload)
        return cls(piece, offset, payload[_BLOCK_PREFIX.size :])


class Cancel(_Range):
    """The sender no longer needs that request: answer it with Reject if not already sent."""

    __slots__ = ()
    TYPE: ClassVar[int] = 7


class Reject(_Range):
    """The sender will not serve that request (busy, cancelled, or no longer holding it)."""

    __slots__ = ()
    TYPE: ClassVar[int] = 8


class KeepAlive(Message):
    """Nothing to say, still here. (Timing is the caller's business: this module has no clock.)"""

    __slots__ = ()

    TYPE: ClassVar[int] = 9
    SIZES: ClassVar[tuple[int, int]] = (0, 0)

    def _payload(self) -> bytes:
        return b""

    @classmethod
    def _decode(cls, payload: bytes) -> KeepAlive:
        return cls()


class Goodbye(Message):
    """A polite close: the sender sends nothing more. ``reason`` is untrusted UTF-8 text."""

    __slots__ = ("reason",)

    def __init__(self, reason: str = "") -> None:
        self.reason = reason

    TYPE: ClassVar[int] = 10
    SIZES: ClassVar[tuple[int, int]] = (0, MAX_REASON_BYTES)

    @classmethod
    def truncated(cls, reason: str) -> Goodbye:
        """A Goodbye whose reason is cut (on a character boundary) to fit the limit."""
        data = reason.encode("utf-8", "replace")[:MAX_REASON_BYTES]
        return cls(data.decode("utf-8", "ignore"))

    def _payload(self) -> bytes:
        if not isinstance(self.reason, str):
            raise ValueError("Goodbye reason must be a str")
        data = self.reason.encode("utf-8")
        if len(data) > MAX_REASON_BYTES:
            raise ValueError(f"Goodbye reason is longer than {MAX_REASON_BYTES} bytes")
        return data

    @classmethod
    def _decode(cls, payload: bytes) -> Goodbye:
        try:
            return cls(payload.decode("utf-8"))
        except UnicodeDecodeError:
            raise _Violation("Goodbye reason is not valid UTF-8") from None


class ConnectionClosed(Record):
    """The peer closed its end (EOF). Not a wire message; ``next_event`` repeats it."""

    __slots__ = ()


Event = Union[Message, ConnectionClosed]
MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (Hello, Auth, Bitfield, Have, Request, Block, Cancel, Reject, KeepAlive, Goodbye)
}


class Signal(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


NEED_DATA = Signal.NEED_DATA


def bitfield_size(piece_count: int) -> int:
    """Bytes in the Bitfield of a release with ``piece_count`` pieces."""
    return (piece_count + 7) // 8


def auth_proof(
    secret: bytes,
    sender_role: Role,
    swarm_id: bytes,
    sender_peer_id: bytes,
    receiver_peer_id: bytes,
    receiver_nonce: bytes,
    sender_nonce: bytes,
) -> bytes:
    """The Auth proof the sender owes the receiver (see docs/protocol.md, "Handshake")."""
    message = b"".join(
        (
            AUTH_CONTEXT,
            bytes((sender_role.value,)),
            swarm_id,
            sender_peer_id,
            receiver_peer_id,
            receiver_nonce,
            sender_nonce,
        )
    )
    return hmac.new(secret, message, hashlib.sha256).digest()


def encode_message(message: Message) -> bytes:
    """One complete frame for ``message``. Raises ValueError for unencodable fields.

    This is the plain codec, with no state or rules; ``PeerConnection.send``
    is what a peer uses.
    """
    if not isinstance(message, Message):
        raise ValueError(f"not a protocol message: {message!r}")
    payload = message._payload()
    return HEADER.pack(MAGIC, VERSION, message.TYPE, len(payload)) + payload


def decode_message(frame: bytes) -> Message:
    """Parse exactly one complete frame (no state, no rules); raise ProtocolError if malformed."""
    try:
        if len(frame) < HEADER_SIZE:
            raise _Violation(f"incomplete frame header ({len(frame)} of {HEADER_SIZE} bytes)")
        cls, length = _parse_header(frame)
        _check_size(cls, length, *cls.SIZES)
        if len(frame) != HEADER_SIZE + length:
            raise _Violation(
                f"frame of {len(frame)} bytes, but its header announces {HEADER_SIZE + length}"
            )
        return cls._decode(bytes(frame[HEADER_SIZE:]))
    except _Violation as exc:
        raise ProtocolError(exc.reason) from None


def _parse_header(buffer: bytes) -> tuple[type[Message], int]:
    magic, version, type_byte, length = HEADER.unpack_from(buffer)
    if magic != MAGIC:
        raise _Violation(f"not a roost peer connection (bad magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise _Violation(
            f"unsupported protocol version {version} (this peer speaks version {VERSION})"
        )
    cls = MESSAGE_TYPES.get(type_byte)
    if cls is None:
        raise _Violation(f"unknown message type {type_byte}")
    return cls, length


def _check_size(cls: type[Message], length: int, low: int, high: int) -> None:
    if not low <= length <= high:
        expected = str(low) if low == high else f"{low}..{high}"
        raise _Violation(f"{cls.__name__} frame of {length} bytes (must be {expected})")


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes")


def _check_buffer(name: str, value: object) -> None:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ValueError(f"{name} must be bytes-like, not {type(value).__name__}")


def _u32(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
        raise ValueError(f"{name} must be an integer in 0..{_U32_MAX}, not {value!r}")
    return value


def _pack_range(piece: int, offset: int, length: int) -> bytes:
    return _RANGE.pack(_u32("piece", piece), _u32("offset", offset), _u32("length", length))


# ---------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------
#
# Theory of operation
# ===================
#
# A connection carries two independent streams of frames, one per direction,
# so there are two state machines: one for what WE have sent and one for what
# THEY have sent. Both obey the same table (rule: the machine does not know
# which side is local, so we cannot hold the peer to rules we break
# ourselves). Our machine advances in send(); theirs in next_event(). A
# message whose (sender state, message type) pair is not in the table is a
# violation: ProtocolError when the peer sent it, LocalProtocolError when our
# caller tried to send it.
#
#   IDLE    --Hello-->    HELLO     the sender has announced itself and its nonce
#   HELLO   --Auth-->     AUTH      the sender has proved it knows the secret
#   AUTH    --Bitfield--> ACTIVE    the sender has said which pieces it holds
#   ACTIVE  --Have/Request/Block/Cancel/Reject/KeepAlive--> ACTIVE
#   any live state --Goodbye--> CLOSED   (polite close; the sender sends no more)
#   any state but ERROR --ConnectionClosed--> CLOSED   (EOF; only THEY can hit it)
#   a violation by a side --> ERROR (for good)
#
# Two transitions also depend on the OTHER machine (REQUIRES_OTHER):
#
#   - Auth needs the other side's Hello: the proof signs the receiver's nonce.
#   - Bitfield needs the other side to have reached AUTH: nothing but the
#     handshake flows to a peer that has not proved it holds the secret. For
#     the peer's Bitfield, that means we must have sent our Auth.
#
# "Reached" means "has ever been in", so a side that said Goodbye still counts
# as having authenticated. For THEIR machine, entering AUTH also requires the
# proof to verify; a wrong proof is a violation, so THEIR machine is in AUTH
# only if the peer really holds the secret.
#
# What the table cannot express is bookkeeping on the message contents, done
# by PeerConnection with the same rules for both directions: ranges inside
# the release, exact Bitfield size, the request ledger (every Request is
# answered by exactly one Block or Reject; at most MAX_INBOUND_REQUESTS
# unanswered at a time; a Cancel only asks for the answer to be a Reject),
# and the frame header checks done before a payload is buffered.
#
# Everything a side is allowed to do is checked BEFORE anything is changed,
# so a LocalProtocolError leaves the connection exactly as it was.


class State(enum.Enum):
    IDLE = "IDLE"
    HELLO = "HELLO"
    AUTH = "AUTH"
    ACTIVE = "ACTIVE"
    CLOSED = "CLOSED"
    ERROR = "ERROR"

    # Members are singletons, so identity hashes them; Enum's own __hash__ is Python
    # code, and the machine looks a state up for every message.
    __hash__ = object.__hash__


IDLE, HELLO, AUTH, ACTIVE, CLOSED, ERROR = State

_EXCHANGE = (Have, Request, Block, Cancel, Reject, KeepAlive)

TRANSITIONS: dict[State, dict[type, State]] = {
    IDLE: {Hello: HELLO, Goodbye: CLOSED, ConnectionClosed: CLOSED},
    HELLO: {Auth: AUTH, Goodbye: CLOSED, ConnectionClosed: CLOSED},
    AUTH: {Bitfield: ACTIVE, Goodbye: CLOSED, ConnectionClosed: CLOSED},
    ACTIVE: {
        **{cls: ACTIVE for cls in _EXCHANGE},
        Goodbye: CLOSED,
        ConnectionClosed: CLOSED,
    },
    CLOSED: {ConnectionClosed: CLOSED},
    ERROR: {},
}

# Messages that need the other side's machine to have reached a state first.
REQUIRES_OTHER: dict[type, State] = {Auth: HELLO, Bitfield: AUTH}

_OURS = 0
_THEIRS = 1


class _Machine:
    """The two per-direction machines: states[_OURS] and states[_THEIRS]."""

    def __init__(self) -> None:
        self.states = [IDLE, IDLE]
        self.reached: list[set[State]] = [{IDLE}, {IDLE}]

    def check(self, side: int, event_type: type) -> State:
        """The state ``side`` moves to by sending ``event_type``; raise _Violation if forbidden."""
        state = self.states[side]
        new_state = TRANSITIONS[state].get(event_type)
        if new_state is None:
            raise _Violation(_why_not(state, event_type))
        needed = REQUIRES_OTHER.get(event_type)
        if needed is not None and needed not in self.reached[1 - side]:
            raise _Violation(_why_early(side, event_type))
        return new_state

    def apply(self, side: int, new_state: State) -> None:
        if new_state is not self.states[side]:
            self.states[side] = new_state
            self.reached[side].add(new_state)

    def fail(self, side: int) -> None:
        self.apply(side, ERROR)


def _why_not(state: State, event_type: type) -> str:
    name = event_type.__name__
    if state is ERROR:
        return f"{name} after a protocol error"
    if state is CLOSED:
        return f"{name} after Goodbye"
    if state in (IDLE, HELLO) and event_type in (Bitfield, *_EXCHANGE):
        return f"{name} before authentication completed"
    if state is IDLE:
        return f"{name} before Hello"
    if state is AUTH:
        return f"{name} before the Bitfield (the first message after authentication)"
    if event_type in (Hello, Auth, Bitfield):
        return f"second {name} (only one is allowed)"
    return f"{name} not allowed in state {state.value}"  # pragma: no cover - table is total


def _why_early(side: int, event_type: type) -> str:
    if event_type is Auth:
        if side == _THEIRS:
            return "Auth before we sent our Hello (the proof cannot sign our nonce)"
        return "cannot send Auth before the peer's Hello has arrived"
    if side == _THEIRS:
        return "Bitfield before we sent our Auth (the peer cannot have verified us)"
    return "cannot send a Bitfield before the peer has authenticated"


# ---------------------------------------------------------------------------------
# The connection
# ---------------------------------------------------------------------------------


class PeerConnection:
    """One end of a peer connection: the caller moves bytes, this object keeps the rules."""

    def __init__(
        self,
        *,
        role: Role,
        swarm_id: bytes,
        peer_id: bytes,
        secret: bytes,
        piece_count: int,
        piece_size: int,
        total_size: int,
        nonce: bytes | None = None,
    ) -> None:
        if not isinstance(role, Role):
            raise ValueError(f"role must be a Role, not {role!r}")
        for name, value, size in (
            ("swarm_id", swarm_id, SWARM_ID_SIZE),
            ("peer_id", peer_id, PEER_ID_SIZE),
            ("secret", secret, SECRET_SIZE),
        ):
            _check_bytes(name, value, size)
        if nonce is None:
            nonce = os.urandom(NONCE_SIZE)
        _check_bytes("nonce", nonce, NONCE_SIZE)
        for name, value in (
            ("piece_size", piece_size),
            ("piece_count", piece_count),
            ("total_size", total_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
        if not 0 < piece_size <= _U32_MAX:
            raise ValueError(f"piece_size must be in 1..{_U32_MAX}")
        if piece_count != math.ceil(total_size / piece_size) or piece_count > _U32_MAX:
            raise ValueError(
                f"{piece_count} pieces do not fit {total_size} bytes in pieces of {piece_size}"
            )
        self.role = role
        self.swarm_id = bytes(swarm_id)
        self.peer_id = bytes(peer_id)
        self.nonce = bytes(nonce)
        self._secret = bytes(secret)
        self.piece_count = piece_count
        self.piece_size = piece_size
        self.total_size = total_size
        self._bitfield_size = bitfield_size(piece_count)

        self._machine = _Machine()
        self._remote_peer_id: bytes | None = None
        self._remote_nonce: bytes | None = None
        self._failure: str | None = None
        # The request ledger: unanswered requests made BY each side, mapped to
        # "cancelled by the requester". Both sides keep the same ledger, each
        # updating it when a frame is sent or received.
        self._requests: tuple[dict[Request, bool], dict[Request, bool]] = ({}, {})
        self._payload_owed = 0

        # Receiving: _buf holds unparsed bytes; _frame is the header being
        # worked on; a Block's data goes straight into _body, preallocated
        # once the header and (piece, offset) are known and accepted.
        self._buf = bytearray()
        self._eof = False
        self._frame: tuple[type[Message], int] | None = None
        self._body: bytearray | None = None
        self._body_filled = 0
        self._body_start: tuple[int, int, bool] | None = None  # piece, offset, unwanted

        self.bytes_sent = 0
        self.bytes_received = 0
        self.block_bytes_sent = 0
        self.block_bytes_received = 0

    @classmethod
    def for_manifest(
        cls,
        manifest: Manifest,
        *,
        role: Role,
        peer_id: bytes,
        secret: bytes,
        nonce: bytes | None = None,
    ) -> PeerConnection:
        """A connection in the swarm of ``manifest`` (swarm id = the release id)."""
        return cls(
            role=role,
            swarm_id=bytes.fromhex(manifest.id),
            peer_id=peer_id,
            secret=secret,
            piece_count=manifest.piece_count,
            piece_size=manifest.piece_size,
            total_size=manifest.total_size,
            nonce=nonce,
        )

    # -- properties -----------------------------------------------------------------

    @property
    def our_state(self) -> State:
        return self._machine.states[_OURS]

    @property
    def their_state(self) -> State:
        return self._machine.states[_THEIRS]

    @property
    def remote_peer_id(self) -> bytes | None:
        """The peer id the remote claimed in its Hello (proved once ``authenticated``)."""
        return self._remote_peer_id

    @property
    def authenticated(self) -> bool:
        """True once the remote has proved it holds the swarm secret."""
        return AUTH in self._machine.reached[_THEIRS]

    @property
    def failure(self) -> str | None:
        """The reason of the ProtocolError that broke the connection, if any."""
        return self._failure

    @property
    def our_requests(self) -> frozenset[Request]:
        """Our requests awaiting an answer, not counting those we cancelled."""
        return frozenset(r for r, cancelled in self._requests[_OURS].items() if not cancelled)

    @property
    def our_cancelled_requests(self) -> frozenset[Request]:
        """Our cancelled requests whose answer (Block or Reject) has not arrived yet."""
        return frozenset(r for r, cancelled in self._requests[_OURS].items() if cancelled)

    @property
    def their_requests(self) -> frozenset[Request]:
        """The peer's requests we have not answered yet, including cancelled ones."""
        return frozenset(self._requests[_THEIRS])

    @property
    def their_cancelled_requests(self) -> frozenset[Request]:
        """The peer's requests it cancelled: answer them with Reject (or the Block, if sent)."""
        return frozenset(r for r, cancelled in self._requests[_THEIRS].items() if cancelled)

    @property
    def request_slots(self) -> int:
        """How many more Requests we may send now (cancelled ones count until answered)."""
        return MAX_INBOUND_REQUESTS - len(self._requests[_OURS])

    @property
    def payload_owed(self) -> int:
        """Payload bytes the caller still has to write after ``send_block_header``."""
        return self._payload_owed

    def piece_length(self, piece: int) -> int:
        return min(self.piece_size, self.total_size - piece * self.piece_size)

    def __repr__(self) -> str:
        remote = self._remote_peer_id.hex() if self._remote_peer_id else "?"
        return (
            f"<PeerConnection {self.role.name.lower()} swarm={self.swarm_id.hex()[:12]}"
            f" remote={remote} ours={self.our_state.value} theirs={self.their_state.value}>"
        )

    # -- sending ----------------------------------------------------------------------

    def initiate(self) -> bytes:
        """Our Hello: the first bytes to write, as soon as the connection is up."""
        return self._send(Hello(self.swarm_id, self.peer_id, self.nonce))

    def send_auth(self) -> bytes:
        """Our Auth, answering the peer's Hello (write it when the Hello event arrives)."""
        if self._remote_nonce is None:
            raise LocalProtocolError("cannot send Auth before the peer's Hello has arrived")
        return self.send(Auth(self._proof(_OURS)))

    def send(self, message: Message) -> bytes:
        """The frame for ``message``, after checking we may send it now.

        A Block's data is copied into the returned bytes; to avoid that copy use
        ``send_block_header`` and write the data yourself.
        """
        if isinstance(message, Hello):
            raise LocalProtocolError("send our Hello with initiate()")
        return self._send(message)

    def send_block_header(self, piece: int, offset: int, length: int) -> bytes:
        """The header of a Block answering the peer's Request(piece, offset, length).

        After writing these bytes the caller must write exactly ``length`` data
        bytes (for example with ``os.sendfile``) and report them with
        ``payload_written``; nothing else can be sent until then.
        """
        self._check_can_send(Block)
        try:
            for name, value in zip(("piece", "offset", "length"), (piece, offset, length)):
                _u32(name, value)
            new_state = self._machine.check(_OURS, Block)
            self._check_block(_OURS, piece, offset, length)
        except ValueError as exc:
            raise LocalProtocolError(str(exc)) from None
        except _Violation as exc:
            raise LocalProtocolError(exc.reason) from None
        self._answer(_OURS, Request(piece, offset, length))
        self._machine.apply(_OURS, new_state)
        header = HEADER.pack(MAGIC, VERSION, Block.TYPE, _BLOCK_PREFIX.size + length)
        header += _BLOCK_PREFIX.pack(piece, offset)
        self._payload_owed = length
        self.bytes_sent += len(header)
        return header

    def payload_written(self, nbytes: int) -> None:
        """Report ``nbytes`` of block data written after ``send_block_header``."""
        if not isinstance(nbytes, int) or not 0 <= nbytes <= self._payload_owed:
            raise LocalProtocolError(
                f"wrote {nbytes!r} payload bytes, but only {self._payload_owed} are owed"
            )
        self._payload_owed -= nbytes
        self.bytes_sent += nbytes
        self.block_bytes_sent += nbytes

    def _send(self, message: Message) -> bytes:
        self._check_can_send(type(message))
        try:
            data = encode_message(message)
        except ValueError as exc:
            raise LocalProtocolError(f"cannot encode {type(message).__name__}: {exc}") from None
        try:
            self._process(_OURS, message)
        except _Violation as exc:
            raise LocalProtocolError(exc.reason) from None
        except BaseException:
            self._machine.fail(_OURS)
            raise
        self.bytes_sent += len(data)
        if isinstance(message, Block):
            self.block_bytes_sent += len(message.data)
        return data

    def _check_can_send(self, message_type: type) -> None:
        if self._payload_owed:
            raise LocalProtocolError(
                f"{self._payload_owed} payload bytes of the last block are still owed"
            )
        if self.their_state is ERROR and message_type is not Goodbye:
            raise LocalProtocolError(
                f"the connection failed ({self._failure}); only a Goodbye may still be sent"
            )

    # -- receiving --------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes received from the peer; ``b""`` means the peer closed (EOF)."""
        if self.their_state is ERROR:
            raise ProtocolError(f"connection already failed: {self._failure}")
        if self._eof:
            if data:
                raise LocalProtocolError("received data after EOF")
            return
        if not data:
            self._eof = True
            return
        self.bytes_received += len(data)
        body = self._body
        if body is not None and self._body_filled < len(body):
            view = memoryview(data)
            take = min(len(view), len(body) - self._body_filled)
            body[self._body_filled : self._body_filled + take] = view[:take]
            self._body_filled += take
            data = view[take:]
            if not data:
                return
        self._buf += data

    def payload_buffer(self) -> memoryview | None:
        """The unfilled rest of the block being received, when the peer's next bytes can
        only be its payload; else None.

        A read loop may receive straight into it (then call ``payload_received``)
        instead of passing bytes to ``receive_data``: block data is then copied
        once, from the kernel into the buffer the Block event will carry.
        """
        body = self._body
        if body is None or self._eof or self.their_state is ERROR:
            return None
        return memoryview(body)[self._body_filled :]

    def payload_received(self, count: int) -> None:
        """``count`` bytes were written at the start of ``payload_buffer()``."""
        body = self._body
        if body is None or not 0 < count <= len(body) - self._body_filled:
            raise LocalProtocolError(f"{count} payload bytes do not fit the block being received")
        self._body_filled += count
        self.bytes_received += count

    def next_event(self) -> Event | Signal:
        """The next event from the peer, ``NEED_DATA``, or ``ConnectionClosed`` after EOF."""
        if self.their_state is ERROR:
            raise ProtocolError(f"connection already failed: {self._failure}")
        try:
            return self._next_event()
        except _Violation as exc:
            self._fail(exc.reason)
            raise ProtocolError(exc.reason) from None
        except BaseException:
            self._fail("internal error while parsing")
            raise

    def _fail(self, reason: str) -> None:
        self._failure = reason
        self._machine.fail(_THEIRS)
        self._buf = bytearray()
        self._body = None

    def _next_event(self) -> Event | Signal:
        while True:
            if self._frame is None:
                if len(self._buf) < HEADER_SIZE:
                    return self._starved()
                self._frame = self._read_header()
            cls, length = self._frame
            event = self._read_block(length) if cls is Block else self._read_frame(cls, length)
            if event is not None:
                return event

    def _starved(self) -> ConnectionClosed | Signal:
        """Not enough bytes for the next step: wait, or handle the end of the stream."""
        if not self._eof:
            return NEED_DATA
        if self._frame is not None or self._buf:
            raise _Violation("connection closed in the middle of a frame")
        self._machine.apply(_THEIRS, self._machine.check(_THEIRS, ConnectionClosed))
        return ConnectionClosed()

    def _read_header(self) -> tuple[type[Message], int]:
        """Parse and vet a frame header before a single payload byte is buffered."""
        cls, length = _parse_header(self._buf)
        low, high = cls.SIZES
        if cls is Bitfield:
            low = high = self._bitfield_size
        elif cls is Have:
            high = 4 * self.piece_count
        _check_size(cls, length, low, high)
        self._machine.check(_THEIRS, cls)
        del self._buf[:HEADER_SIZE]
        return cls, length

    def _read_frame(self, cls: type[Message], length: int) -> Event | Signal | None:
        if len(self._buf) < length:
            return self._starved()
        with memoryview(self._buf) as view:
            payload = bytes(view[:length])
        del self._buf[:length]
        self._frame = None
        return self._process(_THEIRS, cls._decode(payload))

    def _read_block(self, length: int) -> Event | Signal | None:
        """A Block in two steps: vet (piece, offset, length), then fill a buffer of its size."""
        if self._body is None:
            if len(self._buf) < _BLOCK_PREFIX.size:
                return self._starved()
            piece, offset = _BLOCK_PREFIX.unpack_from(self._buf)
            size = length - _BLOCK_PREFIX.size
            new_state = self._machine.check(_THEIRS, Block)
            self._check_block(_THEIRS, piece, offset, size)
            unwanted = self._answer(_THEIRS, Request(piece, offset, size))
            self._machine.apply(_THEIRS, new_state)
            del self._buf[: _BLOCK_PREFIX.size]
            self._body = bytearray(size)
            self._body_start = (piece, offset, unwanted)
            take = min(size, len(self._buf))
            with memoryview(self._buf) as view:
                self._body[:take] = view[:take]
            del self._buf[:take]
            self._body_filled = take
        if self._body_filled < len(self._body):
            return self._starved()
        assert self._body_start is not None
        piece, offset, unwanted = self._body_start
        block = Block(piece, offset, self._body, unwanted)  # type: ignore[arg-type]
        self._body = self._body_start = self._frame = None
        self.block_bytes_received += len(block.data)
        return block

    # -- the rules, shared by both directions -------------------------------------------

    def _process(self, side: int, message: Message) -> Message | None:
        """Check ``message`` sent by ``side``, then record it; return the event to deliver.

        Everything is checked before anything changes. None means "nothing to
        deliver" (a Cancel that crossed its answer, a Reject acknowledging a Cancel).
        """
        new_state = self._machine.check(side, type(message))
        event = _RULES[type(message)](self, side, message)
        self._machine.apply(side, new_state)
        return event

    def _on_hello(self, side: int, hello: Hello) -> Message | None:
        if side == _THEIRS:
            if hello.swarm_id != self.swarm_id:
                raise _Violation(
                    f"swarm id mismatch: the peer is in swarm {hello.swarm_id.hex()[:16]}...,"
                    f" we are in {self.swarm_id.hex()[:16]}..."
                )
            if hello.peer_id == self.peer_id:
                raise _Violation("the peer claims our own peer id (a reflection, or ourselves)")
            if hello.nonce == self.nonce:
                raise _Violation("the peer echoed our nonce (a reflection attempt)")
            self._remote_peer_id = hello.peer_id
            self._remote_nonce = hello.nonce
        return hello

    def _on_auth(self, side: int, auth: Auth) -> Message | None:
        if not hmac.compare_digest(auth.proof, self._proof(side)):
            if side == _OURS:
                raise _Violation("that is not our proof; use send_auth()")
            raise _Violation(
                "authentication failed: the peer's proof is wrong (a different swarm secret,"
                " or a replayed or reflected handshake)"
            )
        return auth

    def _proof(self, side: int) -> bytes:
        assert self._remote_peer_id is not None and self._remote_nonce is not None
        if side == _OURS:
            sender_role, sender, receiver = self.role, self.peer_id, self._remote_peer_id
            sender_nonce, receiver_nonce = self.nonce, self._remote_nonce
        else:
            sender_role, sender, receiver = self.role.other, self._remote_peer_id, self.peer_id
            sender_nonce, receiver_nonce = self._remote_nonce, self.nonce
        return auth_proof(
            self._secret, sender_role, self.swarm_id, sender, receiver, receiver_nonce, sender_nonce
        )

    def _on_bitfield(self, side: int, bitfield: Bitfield) -> Message | None:
        have = bitfield.have
        if len(have) != self._bitfield_size:
            raise _Violation(
                f"Bitfield of {len(have)} bytes (must be {self._bitfield_size}"
                f" for {self.piece_count} pieces)"
            )
        spare = self._bitfield_size * 8 - self.piece_count
        if spare and have[-1] & ((1 << spare) - 1):
            raise _Violation("Bitfield has bits set beyond the last piece")
        return bitfield

    def _on_have(self, side: int, have: Have) -> Message | None:
        for piece in have.pieces:
            self._check_piece(piece)
        if len(set(have.pieces)) != len(have.pieces):
            raise _Violation("Have names a piece twice")
        return have

    def _on_request(self, side: int, request: Request) -> Message | None:
        self._check_range(request.piece, request.offset, request.length)
        ledger = self._requests[side]
        if request in ledger:
            raise _Violation(f"duplicate {_show(request)} (the first one is still unanswered)")
        if len(ledger) >= MAX_INBOUND_REQUESTS:
            raise _Violation(f"more than {MAX_INBOUND_REQUESTS} unanswered requests")
        ledger[request] = False
        return request

    def _on_block(self, side: int, block: Block) -> Message | None:
        # Only send() comes here: received Blocks take the streaming path of
        # _read_block, which applies the same two steps before the data arrives.
        self._check_block(side, block.piece, block.offset, len(block.data))
        self._answer(side, Request(block.piece, block.offset, len(block.data)))
        return block

    def _check_block(self, side: int, piece: int, offset: int, length: int) -> None:
        self._check_range(piece, offset, length)
        if Request(piece, offset, length) not in self._requests[1 - side]:
            raise _Violation(
                f"Block for piece {piece} offset {offset} length {length}"
                " answers no outstanding request"
            )

    def _answer(self, side: int, request: Request) -> bool:
        """``side`` answered ``request``: drop it from the ledger; True if it was cancelled."""
        return self._requests[1 - side].pop(request)

    def _on_cancel(self, side: int, cancel: Cancel) -> Message | None:
        self._check_range(cancel.piece, cancel.offset, cancel.length)
        ledger = self._requests[side]
        request = Request(cancel.piece, cancel.offset, cancel.length)
        if request not in ledger:
            return None  # already answered: the Cancel crossed the answer on the wire
        if ledger[request]:
            raise _Violation(f"{_show(request)} cancelled twice")
        ledger[request] = True
        return cancel

    def _on_reject(self, side: int, reject: Reject) -> Message | None:
        self._check_range(reject.piece, reject.offset, reject.length)
        request = Request(reject.piece, reject.offset, reject.length)
        if request not in self._requests[1 - side]:
            raise _Violation(f"Reject of {_show(request)}, which is not outstanding")
        cancelled = self._answer(side, request)
        return None if cancelled and side == _THEIRS else reject

    def _on_other(self, side: int, message: Message) -> Message | None:
        return message

    def _check_piece(self, piece: int) -> None:
        if not 0 <= piece < self.piece_count:
            raise _Violation(f"piece {piece} out of range (the release has {self.piece_count})")

    def _check_range(self, piece: int, offset: int, length: int) -> None:
        self._check_piece(piece)
        if not 0 < length <= MAX_BLOCK:
            raise _Violation(f"block length {length} out of range 1..{MAX_BLOCK}")
        piece_length = self.piece_length(piece)
        if offset < 0 or offset + length > piece_length:
            raise _Violation(
                f"range {offset}..{offset + length} lies outside piece {piece}"
                f" ({piece_length} bytes)"
            )


_RULES: dict[type, Callable[[PeerConnection, int, Message], Message | None]] = {
    Hello: PeerConnection._on_hello,
    Auth: PeerConnection._on_auth,
    Bitfield: PeerConnection._on_bitfield,
    Have: PeerConnection._on_have,
    Request: PeerConnection._on_request,
    Block: PeerConnection._on_block,
    Cancel: PeerConnection._on_cancel,
    Reject: PeerConnection._on_reject,
    KeepAlive: PeerConnection._on_other,
    Goodbye: PeerConnection._on_other,
}  # type: ignore[dict-item]


def _show(request: Request) -> str:
    return f"request for piece {request.piece} offset {request.offset} length {request.length}"
