"""The peer wire protocol, tested without a network: two in-memory endpoints, raw frames."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from roost.runtime.manifest import FileEntry, Manifest
from roost.runtime.protocol import (
    HEADER,
    MAGIC,
    MAX_BLOCK,
    MAX_INBOUND_REQUESTS,
    MAX_REASON_BYTES,
    NEED_DATA,
    VERSION,
    Auth,
    Bitfield,
    Block,
    Cancel,
    ConnectionClosed,
    Goodbye,
    Have,
    Hello,
    KeepAlive,
    LocalProtocolError,
    PeerConnection,
    ProtocolError,
    Reject,
    Request,
    Role,
    State,
    auth_proof,
    decode_message,
    encode_message,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))
SWARM = hashlib.sha256(b"release one").digest()
OTHER_SWARM = hashlib.sha256(b"release two").digest()
A_ID = b"A" * 16
B_ID = b"B" * 16
A_NONCE = b"\x01" * 32
B_NONCE = b"\x02" * 32
PIECE_SIZE = 1024
TOTAL_SIZE = 10 * 1024 + 100  # 11 pieces, the last one 100 bytes
PIECE_COUNT = 11


def make_conn(
    role: Role = Role.INITIATOR,
    peer_id: bytes = A_ID,
    nonce: bytes | None = A_NONCE,
    secret: bytes = SECRET,
    swarm_id: bytes = SWARM,
    **layout: int,
) -> PeerConnection:
    layout = {
        "piece_count": PIECE_COUNT,
        "piece_size": PIECE_SIZE,
        "total_size": TOTAL_SIZE,
        **layout,
    }
    return PeerConnection(
        role=role, swarm_id=swarm_id, peer_id=peer_id, secret=secret, nonce=nonce, **layout
    )


def drain(conn: PeerConnection) -> list[object]:
    """Every event ``conn`` can produce from what it has received so far."""
    events = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA:
            return events
        events.append(event)
        if isinstance(event, ConnectionClosed):
            return events


def frame(type_byte: int, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = VERSION):
    return HEADER.pack(magic, version, type_byte, len(payload)) + payload


class Pair:
    """Two connected endpoints; ``send`` delivers the bytes to the other side at once."""

    def __init__(self, a: PeerConnection, b: PeerConnection) -> None:
        self.a, self.b = a, b

    def other(self, conn: PeerConnection) -> PeerConnection:
        return self.b if conn is self.a else self.a

    def deliver(self, conn: PeerConnection, data: bytes) -> list[object]:
        """Feed ``data`` to ``conn`` and return the events it yields."""
        conn.receive_data(data)
        return drain(conn)

    def send(self, sender: PeerConnection, message: object) -> list[object]:
        return self.deliver(self.other(sender), sender.send(message))  # type: ignore[arg-type]

    def handshake(self, a_pieces=(), b_pieces=()) -> None:
        """What the engine does: Hello both ways, Auth on Hello, Bitfield once authenticated."""
        hello_b = self.deliver(self.b, self.a.initiate())
        hello_a = self.deliver(self.a, self.b.initiate())
        assert [type(e) for e in hello_a + hello_b] == [Hello, Hello]
        assert self.deliver(self.b, self.a.send_auth()) == [Auth(self.b._proof(1))]
        assert len(self.deliver(self.a, self.b.send_auth())) == 1
        assert self.a.authenticated and self.b.authenticated
        bits_a = Bitfield.from_pieces(a_pieces, PIECE_COUNT)
        bits_b = Bitfield.from_pieces(b_pieces, PIECE_COUNT)
        assert self.send(self.a, bits_a) == [bits_a]
        assert self.send(self.b, bits_b) == [bits_b]


def make_pair(secret_b: bytes = SECRET, **layout: int) -> Pair:
    a = make_conn(Role.INITIATOR, A_ID, A_NONCE, **layout)
    b = make_conn(Role.RESPONDER, B_ID, B_NONCE, secret=secret_b, **layout)
    return Pair(a, b)


def active_pair(**layout: int) -> Pair:
    pair = make_pair(**layout)
    pair.handshake(a_pieces=range(PIECE_COUNT))
    return pair


# -- the happy path --------------------------------------------------------------------


def test_full_session_handshake_bitfield_request_block() -> None:
    pair = make_pair()
    a, b = pair.a, pair.b
    assert (a.our_state, a.their_state) == (State.IDLE, State.IDLE)
    pair.handshake(a_pieces=range(PIECE_COUNT), b_pieces=[3])
    assert a.remote_peer_id == B_ID and b.remote_peer_id == A_ID
    assert (a.our_state, a.their_state, b.our_state, b.their_state) == (State.ACTIVE,) * 4

    assert pair.send(b, Request(0, 0, 512)) == [Request(0, 0, 512)]
    assert pair.send(b, Request(10, 0, 100)) == [Request(10, 0, 100)]
    assert a.their_requests == {Request(0, 0, 512), Request(10, 0, 100)}
    assert b.our_requests == a.their_requests
    assert b.request_slots == MAX_INBOUND_REQUESTS - 2

    assert pair.send(a, Block(10, 0, b"z" * 100)) == [Block(10, 0, b"z" * 100)]
    assert pair.send(a, Reject(0, 0, 512)) == [Reject(0, 0, 512)]
    assert pair.send(b, Have((10,))) == [Have((10,))]
    assert pair.send(a, KeepAlive()) == [KeepAlive()]
    assert not a.their_requests and not b.our_requests
    assert b.block_bytes_received == 100 and a.block_bytes_sent == 100

    assert pair.send(b, Goodbye("done")) == [Goodbye("done")]
    assert b.our_state is State.CLOSED and a.their_state is State.CLOSED
    assert pair.deliver(a, b"") == [ConnectionClosed()]
    assert a.next_event() == ConnectionClosed()  # repeats
    assert a.bytes_sent == b.bytes_received and b.bytes_sent == a.bytes_received


def test_for_manifest_uses_release_id_and_layout() -> None:
    manifest = Manifest(
        piece_size=16384,
        files=[FileEntry("a.bin", 40000, 0o644, "0" * 64)],
        pieces=[bytes(32)] * 3,
    )
    conn = PeerConnection.for_manifest(manifest, role=Role.RESPONDER, peer_id=B_ID, secret=SECRET)
    assert conn.swarm_id == bytes.fromhex(manifest.id)
    assert (conn.piece_count, conn.piece_length(2)) == (3, 40000 - 2 * 16384)


@pytest.mark.parametrize(
    "change",
    [
        {"secret": b"short"},
        {"peer_id": b"x" * 15},
        {"nonce": b"n" * 31},
        {"swarm_id": "ab" * 32},
        {"piece_count": 12},
        {"piece_size": 0},
        {"role": "initiator"},
    ],
)
def test_constructor_rejects_bad_arguments(change: dict) -> None:
    with pytest.raises(ValueError):
        make_conn(**change)


def test_fresh_nonce_per_connection() -> None:
    assert make_conn(nonce=None).nonce != make_conn(nonce=None).nonce


# -- the handshake and what it proves ---------------------------------------------------


def test_wrong_secret_fails_on_both_sides() -> None:
    pair = make_pair(secret_b=OTHER_SECRET)
    a, b = pair.a, pair.b
    pair.deliver(b, a.initiate())
    pair.deliver(a, b.initiate())
    a_auth, b_auth = a.send_auth(), b.send_auth()
    for conn, data in ((b, a_auth), (a, b_auth)):
        conn.receive_data(data)
        with pytest.raises(ProtocolError, match="authentication failed"):
            conn.next_event()
        assert conn.their_state is State.ERROR and not conn.authenticated
    with pytest.raises(LocalProtocolError):
        a.send(Bitfield(bytes(2)))


def test_replayed_handshake_fails_against_a_fresh_connection() -> None:
    pair = make_pair()
    recorded = pair.a.initiate()
    pair.deliver(pair.b, recorded)
    pair.deliver(pair.a, pair.b.initiate())
    recorded += pair.a.send_auth()  # an eavesdropper records everything A sent

    victim = make_conn(Role.RESPONDER, B_ID, b"\x03" * 32)  # same peer, new connection
    victim.initiate()
    victim.receive_data(recorded)
    assert isinstance(victim.next_event(), Hello)
    with pytest.raises(ProtocolError, match="authentication failed"):
        victim.next_event()


def test_reflecting_the_victims_own_proof_fails() -> None:
    victim = make_conn(Role.RESPONDER, B_ID, B_NONCE)
    victim_hello = decode_message(victim.initiate())
    attacker_hello = Hello(SWARM, b"M" * 16, b"\x07" * 32)
    victim.receive_data(encode_message(attacker_hello))
    assert victim.next_event() == attacker_hello
    victims_proof = victim.send_auth()  # the attacker cannot make its own, so it echoes this
    assert decode_message(victims_proof) != Auth(bytes(32))
    victim.receive_data(victims_proof)
    with pytest.raises(ProtocolError, match="authentication failed"):
        victim.next_event()
    assert isinstance(victim_hello, Hello)


def test_mirrored_hello_is_rejected() -> None:
    """Echoing the victim's own Hello is caught before any proof is made."""
    victim = make_conn(Role.RESPONDER, B_ID, B_NONCE)
    hello = victim.initiate()
    victim.receive_data(hello)
    with pytest.raises(ProtocolError, match="our own peer id"):
        victim.next_event()
    other = make_conn(Role.RESPONDER, B_ID, B_NONCE)
    other.receive_data(encode_message(Hello(SWARM, b"M" * 16, B_NONCE)))
    with pytest.raises(ProtocolError, match="echoed our nonce"):
        other.next_event()


def test_role_byte_separates_the_two_directions() -> None:
    """With every other field equal, an initiator's proof is not a responder's proof."""
    fields = (SWARM, A_ID, A_ID, A_NONCE, A_NONCE)
    assert auth_proof(SECRET, Role.INITIATOR, *fields) != auth_proof(
        SECRET, Role.RESPONDER, *fields
    )


def test_swarm_id_mismatch() -> None:
    conn = make_conn()
    conn.receive_data(encode_message(Hello(OTHER_SWARM, B_ID, B_NONCE)))
    with pytest.raises(ProtocolError, match="swarm id mismatch"):
        conn.next_event()


def test_auth_before_our_hello_is_rejected() -> None:
    conn = make_conn()
    conn.receive_data(encode_message(Hello(SWARM, B_ID, B_NONCE)) + frame(Auth.TYPE, bytes(32)))
    assert isinstance(conn.next_event(), Hello)
    with pytest.raises(ProtocolError, match="before we sent our Hello"):
        conn.next_event()


def test_bitfield_before_we_sent_our_auth_is_rejected() -> None:
    """A peer cannot have verified us before our Auth, so it cannot send its Bitfield yet."""
    pair = make_pair()
    pair.deliver(pair.a, pair.b.initiate())
    pair.deliver(pair.b, pair.a.initiate())
    a_auth = pair.a.send_auth()
    # B has not sent its Auth; A (misbehaving) sends its Bitfield anyway, as raw bytes.
    pair.b.receive_data(a_auth + encode_message(Bitfield(bytes(2))))
    assert isinstance(pair.b.next_event(), Auth) and pair.b.authenticated
    with pytest.raises(ProtocolError, match="before we sent our Auth"):
        pair.b.next_event()


def test_local_bitfield_of_the_wrong_size() -> None:
    pair = make_pair()
    pair.deliver(pair.b, pair.a.initiate())
    pair.deliver(pair.a, pair.b.initiate())
    pair.deliver(pair.b, pair.a.send_auth())
    pair.deliver(pair.a, pair.b.send_auth())
    with pytest.raises(LocalProtocolError, match="Bitfield of 1 bytes"):
        pair.a.send(Bitfield(b"\x00"))


def test_block_repr_does_not_dump_the_data() -> None:
    assert repr(Block(1, 2, bytes(MAX_BLOCK))) == f"Block(piece=1, offset=2, length={MAX_BLOCK})"
    assert "unwanted=True" in repr(Block(1, 2, b"x", unwanted=True))
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA"


def test_goodbye_is_accepted_before_authentication() -> None:
    conn = make_conn()
    conn.receive_data(encode_message(Goodbye("swarm not served here")) + b"")
    assert conn.next_event() == Goodbye("swarm not served here")
    assert not conn.authenticated and conn.their_state is State.CLOSED


# -- order of messages -------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Bitfield(bytes(2)),
        Have((0,)),
        Request(0, 0, 1),
        Block(0, 0, b"x"),
        KeepAlive(),
        Reject(0, 0, 1),
    ],
)
def test_nothing_but_the_handshake_before_authentication(message: object) -> None:
    conn = make_conn()
    conn.initiate()
    conn.receive_data(encode_message(Hello(SWARM, B_ID, B_NONCE)))
    conn.next_event()
    data = encode_message(message)  # type: ignore[arg-type]
    conn.receive_data(data[: HEADER.size])  # the header alone is enough to refuse it
    with pytest.raises(ProtocolError, match="before authentication"):
        conn.next_event()


def test_first_message_after_auth_must_be_the_bitfield() -> None:
    pair = make_pair()
    pair.deliver(pair.b, pair.a.initiate())
    pair.deliver(pair.a, pair.b.initiate())
    pair.deliver(pair.b, pair.a.send_auth())
    pair.deliver(pair.a, pair.b.send_auth())
    pair.a.receive_data(encode_message(Have((1,))))
    with pytest.raises(ProtocolError, match="before the Bitfield"):
        pair.a.next_event()


def test_second_bitfield() -> None:
    pair = active_pair()
    pair.a.receive_data(encode_message(Bitfield(bytes(2))))
    with pytest.raises(ProtocolError, match="second Bitfield"):
        pair.a.next_event()


def test_bitfield_with_spare_bits_set() -> None:
    pair = make_pair()
    pair.deliver(pair.b, pair.a.initiate())
    pair.deliver(pair.a, pair.b.initiate())
    pair.deliver(pair.b, pair.a.send_auth())
    pair.deliver(pair.a, pair.b.send_auth())
    pair.a.receive_data(encode_message(Bitfield(b"\x00\x01")))  # 11 pieces: 5 spare bits
    with pytest.raises(ProtocolError, match="beyond the last piece"):
        pair.a.next_event()


def test_bitfield_of_the_wrong_size_is_refused_by_its_header() -> None:
    pair = active_pair()
    pair.b.receive_data(HEADER.pack(MAGIC, VERSION, Bitfield.TYPE, 3))
    with pytest.raises(ProtocolError, match="Bitfield frame of 3 bytes"):
        pair.b.next_event()


def test_bitfield_helpers() -> None:
    bits = Bitfield.from_pieces([0, 7, 8, 10], PIECE_COUNT)
    assert bits.have == b"\x81\xa0"
    assert bits.pieces() == [0, 7, 8, 10]
    assert bits.has(10) and not bits.has(9) and not bits.has(-1) and not bits.has(99)
    with pytest.raises(ValueError):
        Bitfield.from_pieces([11], PIECE_COUNT)


def test_frames_after_goodbye() -> None:
    pair = active_pair()
    pair.a.receive_data(encode_message(Goodbye("bye")) + encode_message(Have((1,))))
    assert pair.a.next_event() == Goodbye("bye")
    with pytest.raises(ProtocolError, match="after Goodbye"):
        pair.a.next_event()


# -- ranges -----------------------------------------------------------------------------


def test_have_out_of_range() -> None:
    pair = active_pair()
    pair.a.receive_data(encode_message(Have((PIECE_COUNT,))))
    with pytest.raises(ProtocolError, match="piece 11 out of range"):
        pair.a.next_event()


def test_one_have_names_many_pieces() -> None:
    pair = active_pair()
    assert pair.send(pair.b, Have((7, 0, 3))) == [Have((7, 0, 3))]
    assert encode_message(Have((7, 0, 3)))[8:] == struct.pack(">III", 7, 0, 3)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", "Have frame of 0 bytes"),
        (struct.pack(">I", 1) + b"\x00", "multiple of 4"),
        (struct.pack(">II", 2, 2), "names a piece twice"),
        (struct.pack(f">{PIECE_COUNT + 1}I", *range(PIECE_COUNT + 1)), "Have frame of 48 bytes"),
    ],
)
def test_bad_have_is_refused(payload: bytes, reason: str) -> None:
    pair = active_pair()
    pair.a.receive_data(frame(Have.TYPE, payload))
    with pytest.raises(ProtocolError, match=reason):
        pair.a.next_event()


def test_have_needs_a_piece_to_be_sent() -> None:
    pair = active_pair()
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.a.send(Have(()))


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (Request(11, 0, 1), "piece 11 out of range"),
        (Request(0, 1000, 25), "outside piece 0"),
        (Request(10, 0, 101), "outside piece 10"),  # the last piece holds 100 bytes
        (Request(0, 0, 0), "block length 0"),
    ],
)
def test_request_out_of_range(request_: Request, reason: str) -> None:
    pair = active_pair()
    pair.a.receive_data(encode_message(request_))
    with pytest.raises(ProtocolError, match=reason):
        pair.a.next_event()
    with pytest.raises(LocalProtocolError, match=reason):
        pair.b.send(request_)


def test_unrequested_block_is_refused_before_its_data_arrives() -> None:
    pair = active_pair()
    data = encode_message(Block(0, 0, b"x" * 512))
    pair.b.receive_data(data[:16])  # header and (piece, offset) only
    with pytest.raises(ProtocolError, match="answers no outstanding request"):
        pair.b.next_event()


def test_duplicate_request() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(1, 0, 10))
    with pytest.raises(LocalProtocolError, match="duplicate"):
        pair.b.send(Request(1, 0, 10))
    pair.a.receive_data(encode_message(Request(1, 0, 10)))
    with pytest.raises(ProtocolError, match="duplicate"):
        pair.a.next_event()


def test_reject_of_a_request_never_made() -> None:
    pair = active_pair()
    pair.b.receive_data(encode_message(Reject(1, 0, 10)))
    with pytest.raises(ProtocolError, match="not outstanding"):
        pair.b.next_event()


# -- frame headers ------------------------------------------------------------------------


def test_oversized_frame_is_refused_from_its_header_alone() -> None:
    pair = active_pair()
    pair.b.receive_data(HEADER.pack(MAGIC, VERSION, Block.TYPE, 0xFFFFFFFF))
    with pytest.raises(ProtocolError, match="Block frame of 4294967295 bytes"):
        pair.b.next_event()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", "bad magic b'GE'"),
        (
            frame(Hello.TYPE, bytes(80), version=VERSION + 1),
            f"unsupported protocol version {VERSION + 1}",
        ),
        (frame(Hello.TYPE, bytes(80), version=1), "unsupported protocol version 1"),
        (frame(0), "unknown message type 0"),
        (frame(42), "unknown message type 42"),
        (frame(Hello.TYPE, bytes(79)), "Hello frame of 79 bytes"),
        (frame(Auth.TYPE, bytes(33)), "Auth frame of 33 bytes"),
        (frame(KeepAlive.TYPE, b"x"), "KeepAlive frame of 1 bytes"),
        (frame(Goodbye.TYPE, b"x" * (MAX_REASON_BYTES + 1)), "Goodbye frame of 513"),
    ],
)
def test_bad_frame_headers(data: bytes, reason: str) -> None:
    conn = make_conn()
    conn.receive_data(data)
    with pytest.raises(ProtocolError, match=reason):
        conn.next_event()
    with pytest.raises(ProtocolError, match="connection already failed"):
        conn.next_event()
    with pytest.raises(ProtocolError, match="connection already failed"):
        conn.receive_data(b"more")


def test_goodbye_reason_must_be_utf8() -> None:
    conn = make_conn()
    conn.receive_data(frame(Goodbye.TYPE, b"\xff"))
    with pytest.raises(ProtocolError, match="not valid UTF-8"):
        conn.next_event()


def test_goodbye_truncated_fits_the_limit() -> None:
    long = Goodbye.truncated("é" * 1000)
    assert len(long.reason.encode()) <= MAX_REASON_BYTES
    assert decode_message(encode_message(long)) == long


def test_eof_in_the_middle_of_a_frame() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(1, 0, 600))
    data = pair.a.send(Block(1, 0, b"y" * 600))
    for cut in (3, HEADER.size, HEADER.size + 4, 100):
        conn = make_pair()
        conn.handshake(a_pieces=range(PIECE_COUNT))
        conn.b.send(Request(1, 0, 600))
        conn.b.receive_data(data[:cut])
        conn.b.receive_data(b"")
        with pytest.raises(ProtocolError, match="middle of a frame"):
            drain(conn.b)


def test_data_after_eof_is_a_local_error() -> None:
    conn = make_conn()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    assert conn.next_event() == ConnectionClosed()


# -- decoders: whole, byte by byte, with trailing data -------------------------------------


def _stream_and_receiver() -> tuple[bytes, PeerConnection]:
    """Frames A sends after the handshake, and a fresh B ready to receive them."""
    pair = active_pair()
    for request in (Request(0, 0, 1024), Request(10, 0, 100), Request(2, 0, 7)):
        pair.send(pair.b, request)
    a = pair.a
    data = a.send(Have((3,))) + a.send(Block(0, 0, bytes(range(256)) * 4)) + a.send(KeepAlive())
    data += a.send(Request(4, 10, 20)) + a.send_block_header(10, 0, 100) + b"t" * 100
    a.payload_written(100)
    data += a.send(Reject(2, 0, 7)) + a.send(Cancel(4, 10, 20)) + a.send(Goodbye("all done"))
    return data, pair.b


def test_decoder_whole_bytewise_and_with_trailing_data() -> None:
    data, whole = _stream_and_receiver()
    whole.receive_data(data)
    expected = drain(whole)
    assert [type(e) for e in expected] == [
        Have,
        Block,
        KeepAlive,
        Request,
        Block,
        Reject,
        Cancel,
        Goodbye,
    ]
    assert expected[1].data == bytes(range(256)) * 4 and expected[4].data == b"t" * 100

    _, bytewise = _stream_and_receiver()
    events = []
    for i in range(len(data)):
        bytewise.receive_data(data[i : i + 1])
        events += drain(bytewise)
    assert events == expected

    _, trailing = _stream_and_receiver()
    partial_next = encode_message(Have((5,)))[:5]
    trailing.receive_data(data + partial_next)
    assert drain(trailing) == expected
    assert trailing.next_event() is NEED_DATA

    for conn in (whole, bytewise):
        conn.receive_data(b"")
        assert conn.next_event() == ConnectionClosed()


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("trailing", [b"", b"RO\x01"])
def test_handshake_decodes_in_any_chunking(chunk: int | None, trailing: bytes) -> None:
    pair = make_pair()
    hello_b = pair.b.initiate()
    pair.deliver(pair.a, hello_b)
    stream = pair.a.initiate() + pair.a.send_auth()
    stream += pair.a.send(Goodbye("changed my mind")) + trailing
    b = pair.b
    events: list[object] = []
    step = chunk or len(stream)
    for start in range(0, len(stream), step):
        b.receive_data(stream[start : start + step])
        for event in drain(b):
            events.append(event)
            if isinstance(event, Hello):
                b.send_auth()
    assert [type(e) for e in events] == [Hello, Auth, Goodbye]
    assert b.authenticated and b.their_state is State.CLOSED
    if trailing:
        with pytest.raises(ProtocolError, match="middle of a frame"):
            pair.deliver(b, b"")


def test_largest_block_parses_in_chunks() -> None:
    layout = {"piece_size": MAX_BLOCK, "total_size": MAX_BLOCK + 5, "piece_count": 2}
    a = make_conn(Role.INITIATOR, A_ID, A_NONCE, **layout)
    b = make_conn(Role.RESPONDER, B_ID, B_NONCE, **layout)
    pair = Pair(a, b)
    pair.deliver(b, a.initiate())
    pair.deliver(a, b.initiate())
    pair.deliver(b, a.send_auth())
    pair.deliver(a, b.send_auth())
    pair.send(a, Bitfield(b"\xc0"))
    pair.send(b, Bitfield(b"\x00"))
    pair.send(b, Request(0, 0, MAX_BLOCK))
    payload = bytes(range(256)) * (MAX_BLOCK // 256)
    b.receive_data(a.send_block_header(0, 0, MAX_BLOCK))
    chunk = 256 * 1024
    for start in range(0, MAX_BLOCK, chunk):
        b.receive_data(payload[start : start + chunk])
        a.payload_written(min(chunk, MAX_BLOCK - start))
    [block] = drain(b)
    assert isinstance(block, Block) and block.length == MAX_BLOCK and block.data == payload
    b.receive_data(HEADER.pack(MAGIC, VERSION, Block.TYPE, 8 + MAX_BLOCK + 1))
    with pytest.raises(ProtocolError, match="Block frame"):
        b.next_event()


# -- sendfile-style blocks ---------------------------------------------------------------------


def test_send_block_header_then_payload_parses_as_a_block() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(5, 24, 1000))
    header = pair.a.send_block_header(5, 24, 1000)
    assert pair.a.payload_owed == 1000
    with pytest.raises(LocalProtocolError, match="still owed"):
        pair.a.send(KeepAlive())
    pair.b.receive_data(header)
    assert pair.b.next_event() is NEED_DATA
    pair.a.payload_written(600)
    pair.b.receive_data(b"p" * 600)
    assert pair.b.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError, match="only 400 are owed"):
        pair.a.payload_written(401)
    pair.a.payload_written(400)
    assert pair.deliver(pair.b, b"p" * 400) == [Block(5, 24, b"p" * 1000)]
    assert pair.a.payload_owed == 0 and pair.a.block_bytes_sent == 1000
    assert pair.a.bytes_sent == pair.b.bytes_received
    assert pair.send(pair.a, KeepAlive()) == [KeepAlive()]


def test_block_payload_can_be_received_straight_into_the_blocks_buffer() -> None:
    """What the engine's read loop does: the bytes after a block header go into the
    buffer the Block event will carry, with no copy through the parser's buffer."""
    pair = active_pair()
    pair.send(pair.b, Request(5, 24, 1000))
    assert pair.b.payload_buffer() is None  # nothing known to be payload yet
    pair.b.receive_data(pair.a.send_block_header(5, 24, 1000) + b"q" * 100)
    assert pair.b.next_event() is NEED_DATA
    into = pair.b.payload_buffer()
    assert into is not None and len(into) == 900
    into[:500] = b"r" * 500
    pair.b.payload_received(500)
    with pytest.raises(LocalProtocolError, match="do not fit"):
        pair.b.payload_received(401)
    into = pair.b.payload_buffer()
    assert into is not None and len(into) == 400
    into[:] = b"s" * 400
    pair.b.payload_received(400)
    block = pair.b.next_event()
    assert block == Block(5, 24, b"q" * 100 + b"r" * 500 + b"s" * 400)
    assert pair.b.payload_buffer() is None
    assert pair.b.bytes_received == pair.a.bytes_sent + 1000  # a never said it sent these
    assert pair.b.block_bytes_received == 1000
    with pytest.raises(LocalProtocolError, match="do not fit"):
        pair.b.payload_received(1)


def test_send_block_header_needs_a_request() -> None:
    pair = active_pair()
    with pytest.raises(LocalProtocolError, match="answers no outstanding request"):
        pair.a.send_block_header(0, 0, 10)
    with pytest.raises(LocalProtocolError, match="piece must be"):
        pair.a.send_block_header(-1, 0, 10)
    assert pair.a.payload_owed == 0


# -- cancel, late answers, limits --------------------------------------------------------------


def test_cancel_then_late_block_is_delivered_as_unwanted() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(1, 0, 100))
    late = pair.a.send(Block(1, 0, b"l" * 100))  # already on the wire when B cancels
    assert pair.send(pair.b, Cancel(1, 0, 100)) == []  # it crossed the answer: nothing to do
    assert pair.b.our_cancelled_requests == {Request(1, 0, 100)}
    assert pair.b.our_requests == frozenset()
    [block] = pair.deliver(pair.b, late)
    assert block == Block(1, 0, b"l" * 100) and block.unwanted
    assert not pair.b.our_cancelled_requests


def test_cancel_is_acknowledged_by_a_reject_that_is_not_delivered() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(1, 0, 100))
    assert pair.send(pair.b, Cancel(1, 0, 100)) == [Cancel(1, 0, 100)]
    assert pair.a.their_cancelled_requests == {Request(1, 0, 100)}
    assert pair.b.request_slots == MAX_INBOUND_REQUESTS - 1  # until the answer arrives
    assert pair.send(pair.a, Reject(1, 0, 100)) == []
    assert pair.b.request_slots == MAX_INBOUND_REQUESTS
    assert not pair.a.their_requests


def test_cancel_twice_is_an_error() -> None:
    pair = active_pair()
    pair.send(pair.b, Request(1, 0, 100))
    pair.send(pair.b, Cancel(1, 0, 100))
    with pytest.raises(LocalProtocolError, match="cancelled twice"):
        pair.b.send(Cancel(1, 0, 100))
    pair.a.receive_data(encode_message(Cancel(1, 0, 100)))
    with pytest.raises(ProtocolError, match="cancelled twice"):
        pair.a.next_event()


def test_inbound_request_limit() -> None:
    pair = active_pair()
    requests = [Request(p, o, 1) for p in range(PIECE_COUNT) for o in range(100)]
    for request in requests[:MAX_INBOUND_REQUESTS]:
        pair.send(pair.b, request)
    with pytest.raises(LocalProtocolError, match="more than 256 unanswered"):
        pair.b.send(requests[MAX_INBOUND_REQUESTS])
    pair.a.receive_data(encode_message(requests[MAX_INBOUND_REQUESTS]))
    with pytest.raises(ProtocolError, match="more than 256 unanswered"):
        pair.a.next_event()


def test_answers_free_request_slots() -> None:
    pair = active_pair()
    requests = [Request(p, o, 1) for p in range(PIECE_COUNT) for o in range(100)]
    for request in requests[:MAX_INBOUND_REQUESTS]:
        pair.send(pair.b, request)
    pair.send(pair.a, Block(requests[0].piece, requests[0].offset, b"x"))
    pair.send(pair.a, Reject(requests[1].piece, requests[1].offset, 1))
    pair.send(pair.b, requests[MAX_INBOUND_REQUESTS])
    pair.send(pair.b, requests[MAX_INBOUND_REQUESTS + 1])
    assert pair.b.request_slots == 0


# -- local misuse --------------------------------------------------------------------------------


def test_local_misuse_raises_and_changes_nothing() -> None:
    conn = make_conn()
    with pytest.raises(LocalProtocolError, match="before authentication"):
        conn.send(Request(0, 0, 1))
    with pytest.raises(LocalProtocolError, match="initiate"):
        conn.send(Hello(SWARM, A_ID, A_NONCE))
    with pytest.raises(LocalProtocolError, match="peer's Hello"):
        conn.send_auth()
    assert conn.our_state is State.IDLE
    conn.initiate()
    with pytest.raises(LocalProtocolError, match="second Hello"):
        conn.initiate()
    conn.receive_data(encode_message(Hello(SWARM, B_ID, B_NONCE)))
    conn.next_event()
    with pytest.raises(LocalProtocolError, match="not our proof"):
        conn.send(Auth(bytes(32)))
    conn.send_auth()
    with pytest.raises(LocalProtocolError, match="before the peer has authenticated"):
        conn.send(Bitfield(bytes(2)))
    assert conn.our_state is State.AUTH

    pair = active_pair()
    with pytest.raises(LocalProtocolError, match="answers no outstanding request"):
        pair.a.send(Block(0, 0, b"x"))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.a.send(Goodbye("x" * (MAX_REASON_BYTES + 1)))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.a.send(Have((-1,)))
    with pytest.raises(LocalProtocolError, match="cannot encode"):
        pair.a.send(Goodbye(b"bytes"))  # type: ignore[arg-type]
    assert pair.send(pair.a, Have((2,))) == [Have((2,))]  # still perfectly usable


def test_after_a_protocol_error_only_goodbye_may_be_sent() -> None:
    pair = active_pair()
    pair.a.receive_data(encode_message(Have((99,))))
    with pytest.raises(ProtocolError) as caught:
        pair.a.next_event()
    assert pair.a.failure == caught.value.reason
    with pytest.raises(LocalProtocolError, match="only a Goodbye"):
        pair.a.send(Have((1,)))
    bye = pair.a.send(Goodbye.truncated(caught.value.reason))
    assert pair.deliver(pair.b, bye) == [Goodbye(caught.value.reason)]


# -- round trips and fuzzing -----------------------------------------------------------------------

u32 = st.integers(0, 0xFFFFFFFF)
messages = st.one_of(
    st.builds(
        Hello,
        st.binary(min_size=32, max_size=32),
        st.binary(min_size=16, max_size=16),
        st.binary(min_size=32, max_size=32),
    ),
    st.builds(Auth, st.binary(min_size=32, max_size=32)),
    st.builds(Bitfield, st.binary(max_size=300)),
    st.builds(Have, st.lists(u32, min_size=1, max_size=20).map(tuple)),
    st.builds(Request, u32, u32, u32),
    st.builds(Block, u32, u32, st.binary(min_size=1, max_size=3000)),
    st.builds(Cancel, u32, u32, u32),
    st.builds(Reject, u32, u32, u32),
    st.builds(KeepAlive),
    st.builds(Goodbye, st.text(max_size=120)),
)


@given(messages)
def test_every_message_round_trips(message: object) -> None:
    data = encode_message(message)  # type: ignore[arg-type]
    assert decode_message(data) == message
    assert type(decode_message(data)) is type(message)
    with pytest.raises(ProtocolError):
        decode_message(data + b"\x00")
    with pytest.raises(ProtocolError):
        decode_message(data[:-1])


exchange = st.one_of(
    st.builds(
        Have,
        st.lists(
            st.integers(0, PIECE_COUNT - 1), min_size=1, max_size=PIECE_COUNT, unique=True
        ).map(tuple),
    ),
    st.builds(KeepAlive),
    st.builds(
        lambda p, o, n: Request(p, o % 1000, n),
        st.integers(0, PIECE_COUNT - 2),
        st.integers(0, 999),
        st.integers(1, 24),
    ),
)


@given(st.lists(exchange, max_size=30), st.data())
def test_valid_sessions_round_trip_through_connections(batch: list, data: st.DataObject) -> None:
    pair = active_pair()
    sent, received = [], []
    for message in batch:
        if isinstance(message, Request) and message in pair.b.our_requests:
            continue
        sent.append(message)
        received += pair.send(pair.b, message)
    assert received == sent
    for request in sorted(pair.a.their_requests, key=lambda r: (r.piece, r.offset, r.length)):
        if data.draw(st.booleans()):
            answer = Block(request.piece, request.offset, bytes(request.length))
        else:
            answer = Reject(request.piece, request.offset, request.length)
        assert pair.send(pair.a, answer) == [answer]
    assert not pair.b.our_requests and not pair.a.their_requests


def _feed_and_drain(conn: PeerConnection, chunks: list[bytes], eof: bool) -> None:
    """Only events, NEED_DATA or ProtocolError may come out; after an error, only errors."""
    failed = False
    chunks = [chunk for chunk in chunks if chunk]  # b"" would mean EOF
    for chunk in [*chunks, b""] if eof else chunks:
        try:
            conn.receive_data(chunk)
            drain(conn)
        except ProtocolError:
            failed = True
            break
    if failed:
        assert conn.their_state is State.ERROR
        with pytest.raises(ProtocolError):
            conn.next_event()


fuzz_settings = settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])


@fuzz_settings
@given(st.lists(st.binary(max_size=64), max_size=20), st.booleans())
def test_fuzz_garbage_before_the_handshake(chunks: list[bytes], eof: bool) -> None:
    conn = make_conn(Role.RESPONDER, B_ID, B_NONCE)
    conn.initiate()
    _feed_and_drain(conn, chunks, eof)


@st.composite
def plausible_frames(draw: st.DrawFn) -> bytes:
    """Frames with a valid magic and version, so the fuzzer gets past the first check."""
    type_byte = draw(st.integers(0, 12))
    if draw(st.booleans()):
        piece = draw(st.integers(0, PIECE_COUNT + 1))
        payload = struct.pack(">III", piece, draw(st.integers(0, 1100)), draw(st.integers(0, 40)))
        payload = payload[: draw(st.sampled_from([4, 8, 12, 12, 12]))]
        if type_byte == Block.TYPE:
            payload = payload[:8] + draw(st.binary(min_size=1, max_size=40))
    else:
        payload = draw(st.binary(max_size=90))
    return HEADER.pack(MAGIC, VERSION, type_byte, len(payload)) + payload


@fuzz_settings
@given(
    st.lists(st.one_of(plausible_frames(), st.binary(max_size=20)), max_size=12),
    st.integers(1, 50),
    st.booleans(),
)
def test_fuzz_garbage_after_a_valid_handshake(frames: list[bytes], cut: int, eof: bool) -> None:
    pair = active_pair()
    for request in (Request(1, 0, 10), Request(2, 5, 5)):
        pair.send(pair.b, request)
    pair.send(pair.b, Cancel(2, 5, 5))
    data = b"".join(frames)
    chunks = [data[i : i + cut] for i in range(0, len(data), cut)]
    _feed_and_drain(pair.b, chunks, eof)
    # the other direction too: garbage from the requester to the server
    _feed_and_drain(pair.a, chunks, eof)


@st.composite
def crossing_actions(draw: st.DrawFn) -> list[tuple]:
    """A script of requests, cancels, answers and partial deliveries, both ways."""
    actions = []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from(["request", "cancel", "answer", "to_b", "to_a"]))
        actions.append((kind, draw(st.integers(0, 10_000)), draw(st.booleans())))
    return actions


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(crossing_actions())
def test_requests_cancels_and_answers_crossing_on_the_wire(actions: list[tuple]) -> None:
    """With bytes in flight both ways, every request still resolves exactly once.

    B requests and cancels; A answers with Block or Reject; each direction is a
    queue delivered in arbitrary steps, so Cancels cross answers on the wire.
    """
    pair = active_pair()
    a, b = pair.a, pair.b
    to_a: list[bytes] = []
    to_b: list[bytes] = []
    unwanted = delivered_blocks = 0
    candidates = [Request(p, o, 8) for p in range(PIECE_COUNT - 1) for o in range(0, 64, 8)]

    def deliver(conn: PeerConnection, queue: list[bytes], count: int) -> list[object]:
        data = b"".join(queue[:count])
        del queue[:count]
        return pair.deliver(conn, data) if data else []  # b"" would mean EOF

    for kind, pick, flag in actions:
        if kind == "request" and b.request_slots:
            free = [r for r in candidates if r not in b.our_requests | b.our_cancelled_requests]
            if free:
                to_a.append(b.send(free[pick % len(free)]))
        elif kind == "cancel" and b.our_requests:
            r = sorted(b.our_requests, key=repr)[pick % len(b.our_requests)]
            to_a.append(b.send(Cancel(r.piece, r.offset, r.length)))
        elif kind == "answer" and a.their_requests:
            r = sorted(a.their_requests, key=repr)[pick % len(a.their_requests)]
            if flag:
                to_b.append(a.send(Block(r.piece, r.offset, bytes(r.length))))
            else:
                to_b.append(a.send(Reject(r.piece, r.offset, r.length)))
        elif kind == "to_a":
            deliver(a, to_a, pick % 4)
        elif kind == "to_b":
            for event in deliver(b, to_b, pick % 4):
                if isinstance(event, Block):
                    delivered_blocks += 1
                    unwanted += event.unwanted
    # Flush, answer whatever is left, flush again: the ledgers must drain on both sides.
    deliver(a, to_a, len(to_a))
    for r in sorted(a.their_requests, key=repr):
        to_b.append(a.send(Reject(r.piece, r.offset, r.length)))
    deliver(b, to_b, len(to_b))
    assert not a.their_requests
    assert not b.our_requests and not b.our_cancelled_requests
    assert b.request_slots == MAX_INBOUND_REQUESTS
    assert unwanted <= delivered_blocks
