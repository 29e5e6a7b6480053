"""Rich consoles shared by the command line: tables to stdout, progress and errors to stderr."""

from __future__ import annotations

import sys

from rich.console import Console


def _width(stream) -> int | None:
    # Rich falls back to 80 columns when not on a terminal; wide tables would be cut, so
    # give redirected output (files, CI logs) room.
    return None if stream.isatty() else 200


console = Console(width=_width(sys.stdout))
err = Console(stderr=True, width=_width(sys.stderr))
