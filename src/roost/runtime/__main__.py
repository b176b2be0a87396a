"""Entry point of the runtime (``python3 -m roost.runtime``, and the zipapp shipped to hosts).

Importing the runtime makes ~18,000 objects that live as long as the process, and the
cyclic garbage collector traversed them some 40 times on the way (~7 ms of CPU per
host start, of ~115). It is paused while they are made, then they are frozen out of
its way for good.
"""

import gc
import sys

gc.disable()
from roost.runtime.cli import build_parser, run  # noqa: E402

parser, _ = build_parser("roost-runtime")
gc.freeze()
gc.enable()
sys.exit(run(parser))
