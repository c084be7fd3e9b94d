"""The stderr console, and the handler that turns failures into one line and an exit code."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


@cache
def err() -> Console:
    """The one stderr console, made on first use: importing rich is a fifth of the time
    `translate --help` may take."""
    from rich.console import Console

    # markup off: file names and text in messages are never read as rich markup
    return Console(stderr=True, highlight=False, soft_wrap=True, markup=False)  # one line each

INTERRUPTED, BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as shells report them


@contextmanager
def fail(debug: bool):
    """Known errors become one line on stderr and their exit code; Ctrl-C exits 130 and a
    reader that went away (`| head -1`) ends the run quietly. --debug shows tracebacks."""
    from core.errors import TranslateError

    try:
        yield
    except TranslateError as exc:
        if debug:
            raise
        from rich.text import Text

        from core.segment import safe

        err().print(Text.assemble(("error:", "bold red"), " ", safe(str(exc))))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        err().print("interrupted")
        sys.exit(INTERRUPTED)
    except BrokenPipeError:
        try:  # stdout is gone: point it at /dev/null so the final flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        sys.exit(BROKEN_PIPE)
    except OSError as exc:  # a device that refuses writes (/dev/full), a disk that fills up
        if debug:
            raise
        from core.segment import safe

        where = f" ({exc.filename})" if exc.filename else ""
        err().print(f"error: {safe(exc.strerror or str(exc))}{safe(where)}")
        sys.exit(1)


def report_invalid(numbers: list[int], where: str = "") -> None:
    """One warning naming the lines (of `where`, a file) whose invalid UTF-8 was replaced."""
    if numbers:
        shown = ", ".join(map(str, numbers[:10])) + (" ..." if len(numbers) > 10 else "")
        err().print(f"warning: {where + ': ' if where else ''}invalid UTF-8 replaced on "
                    f"line(s) {shown}")
