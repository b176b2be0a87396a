"""The controller's command line: the runtime's host commands plus fleet-wide ones."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from roost.runtime.cli import build_parser, run


def main(argv: Sequence[str] | None = None) -> int:
    parser, _commands = build_parser("roost")
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
