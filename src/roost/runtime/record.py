"""A base for the runtime's small value classes: equality, hashing and repr from ``__slots__``.

They were frozen dataclasses. Making a dataclass compiles the source of each
generated method, and the runtime's twenty cost ~12 ms of CPU at every host's
start (of ~115 ms): on the testbed sixteen hosts start on two cores and the plan
waits for the last of them (docs/scheduling.md). A subclass names its fields in
``__slots__`` and assigns them in its own ``__init__``; nothing changes them
afterwards (values, by convention: enforcing it would cost every construction).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, ClassVar


def _no_fields(record: object) -> tuple[()]:
    return ()


class Record:
    __slots__ = ()
    # Fields left out of equality and hashing (bookkeeping that is not part of the value).
    uncompared: ClassVar[tuple[str, ...]] = ()
    _fields: ClassVar[tuple[str, ...]] = ()  # every slot, the base classes' first
    # The compared fields' values (one value for one field; C code: records are dict keys).
    _key: ClassVar[Callable[[Any], Any]] = staticmethod(_no_fields)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = cls._fields + tuple(cls.__dict__.get("__slots__", ()))
        compared = [name for name in cls._fields if name not in cls.uncompared]
        cls._key = staticmethod(attrgetter(*compared) if compared else _no_fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        key = self._key
        return key(self) == key(other)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._key(self)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__name__}({fields})"
