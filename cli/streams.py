"""Input lines from an argument, a file or stdin; output to stdout or, atomically, to a file."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from core.errors import UsageError


def read_lines(stream: BinaryIO, on_invalid) -> Iterator[str]:
    """Yield lines without their line ending (\\n or \\r\\n), the last one even without a
    newline. Invalid UTF-8 is replaced, and `on_invalid(line_number)` is told."""
    for number, raw in enumerate(stream, 1):
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            on_invalid(number)
            yield raw.decode("utf-8", errors="replace")


@contextmanager
def open_input(text: list[str] | None, path: Path | None, on_invalid) -> Iterator[Iterator[str]]:
    if text and path:
        raise UsageError("give text arguments or -i FILE, not both")
    if text:
        yield iter([" ".join(text)])
    elif path is not None:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            yield read_lines(f, on_invalid)
    else:
        if sys.stdin is None or sys.stdin.isatty():
            raise UsageError("nothing to translate: give TEXT, -i FILE, or pipe text in")
        yield read_lines(sys.stdin.buffer, on_invalid)


@contextmanager
def open_output(path: Path | None) -> Iterator[TextIO]:
    """stdout, or a temporary file next to PATH that replaces PATH only when all went well."""
    if path is None:
        yield sys.stdout
        return
    folder = path.resolve().parent
    if not folder.is_dir():
        raise UsageError(f"cannot write {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
