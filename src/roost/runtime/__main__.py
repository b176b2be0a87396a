"""Entry point of the runtime (``python3 -m roost.runtime``, and the zipapp shipped to hosts).

Importing the runtime makes ~18,000 objects that live as long as the process, and the
cyclic garbage collector traversed them some 40 times on the way (~7 ms of CPU per
host start, of ~115). It is paused while they are made, then they are frozen out of
its way for good.

``asyncio`` imports ``ssl`` if it can (6 ms of the start), and the runtime never uses
TLS through it: it is imported while ``ssl`` cannot be. (An https tracker imports
``ssl`` for its own connection, later; nothing stops that.)
"""

import gc
import sys

gc.disable()
sys.modules["ssl"] = None  # type: ignore[assignment]  # "import ssl" raises ImportError
import asyncio  # noqa: E402, F401

del sys.modules["ssl"]
from roost.runtime.cli import build_parser, run  # noqa: E402

parser, _ = build_parser("roost-runtime")
gc.freeze()
gc.enable()
sys.exit(run(parser))
