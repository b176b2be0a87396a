"""Entry point of the runtime zipapp shipped to hosts: ``python3 roost-runtime.pyz COMMAND``."""

import sys

from roost.runtime.cli import build_parser, run

parser, _ = build_parser("roost-runtime")
sys.exit(run(parser))
