"""The runtime's value classes (``roost.runtime.record.Record``): equality, hashing, repr."""

from __future__ import annotations

from roost.runtime.protocol import Block, Cancel, ConnectionClosed, Request
from roost.runtime.record import Record


class Point(Record):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y


class Tagged(Point):
    __slots__ = ("tag",)
    uncompared = ("tag",)

    def __init__(self, x: int, y: int, tag: str) -> None:
        super().__init__(x, y)
        self.tag = tag


def test_records_are_equal_when_their_type_and_fields_are() -> None:
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(2, 1)
    assert Point(1, 2) != (1, 2)
    assert len({Point(1, 2), Point(1, 2), Point(2, 1)}) == 2


def test_fields_come_from_every_class_and_uncompared_ones_are_left_out() -> None:
    assert Tagged(1, 2, "a") == Tagged(1, 2, "b")
    assert hash(Tagged(1, 2, "a")) == hash(Tagged(1, 2, "b"))
    assert Tagged(1, 2, "a") != Tagged(1, 3, "a")
    assert Tagged(1, 2, "a") != Point(1, 2)
    assert repr(Tagged(1, 2, "a")) == "Tagged(x=1, y=2, tag='a')"


def test_messages_with_the_same_fields_differ_by_type() -> None:
    assert Request(1, 0, 5) == Request(1, 0, 5)
    assert Request(1, 0, 5) != Cancel(1, 0, 5)
    assert len({Request(1, 0, 5), Cancel(1, 0, 5)}) == 2
    assert repr(Request(1, 0, 5)) == "Request(piece=1, offset=0, length=5)"
    assert Block(1, 0, b"x") == Block(1, 0, b"x", unwanted=True)
    assert ConnectionClosed() == ConnectionClosed()
