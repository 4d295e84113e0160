"""Entry point of the ``eigensam`` command: checks for the ``[lab]`` extra, keeps freed CPU memory
for reuse (:func:`eigensam.allocator.keep_freed_memory`), then runs the CLI."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from eigensam._extras import MissingExtraError, require_lab
from eigensam.allocator import keep_freed_memory


def main(argv: Sequence[str] | None = None) -> int:
    """Run :func:`eigensam.cli.main`, or print one error naming the ``[lab]`` extra (exit 2)."""
    try:
        require_lab("the eigensam command")
    except MissingExtraError as error:
        print(f"eigensam: error: {error}", file=sys.stderr)
        return 2
    keep_freed_memory()
    from eigensam.cli import main as cli_main

    return cli_main(argv)
