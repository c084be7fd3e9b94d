"""The two output streams: stdout carries translations only; everything else goes to `err`."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from rich.console import Console

err = Console(stderr=True, highlight=False, soft_wrap=True)  # an error stays one line


@contextmanager
def fail(debug: bool):
    """Turn a known error into one line on stderr and its exit code (tracebacks with --debug)."""
    from core.errors import TranslateError

    try:
        yield
    except TranslateError as exc:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        err.print("interrupted")
        sys.exit(130)
