"""Input lines from an argument, a file or stdin, as they arrive; output to stdout, a device or
FIFO as a stream, or atomically to a regular file."""

from __future__ import annotations

import collections
import os
import select
import sys
import tempfile
from codecs import BOM_UTF8  # which Windows editors put first in a UTF-8 file
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, TextIO

from core.errors import UsageError


class Lines:
    """The lines of a binary stream without their line endings (\\n or \\r\\n) or a first
    byte order mark, the last one even without a newline; invalid UTF-8 is replaced, and
    `on_invalid(line_number)` is told.

    `ready()` says whether another line can be had without waiting, so that a consumer can
    translate what has arrived when a slow writer pauses (`tail -f log | translate`) and still
    batch many lines when they come fast (a file, `cat big |`)."""

    CHUNK = 1 << 16

    def __init__(self, stream: BinaryIO, on_invalid):
        self.stream, self.on_invalid = stream, on_invalid
        try:
            self.fd = stream.fileno()
        except (OSError, AttributeError, ValueError):  # an in-memory stream: all there
            self.fd = None
        self.pending: collections.deque[bytes] = collections.deque()
        self.rest, self.number, self.eof = b"", 0, False

    def _fill(self) -> None:
        while not self.pending and not self.eof:
            chunk = os.read(self.fd, self.CHUNK) if self.fd is not None else self.stream.read(self.CHUNK)
            if not chunk:
                self.eof = True
                if self.rest:
                    self.pending.append(self.rest)
                return
            *lines, self.rest = (self.rest + chunk).split(b"\n")
            self.pending.extend(lines)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        self._fill()
        if not self.pending:
            raise StopIteration
        raw = self.pending.popleft()
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        self.number += 1
        if self.number == 1 and raw.startswith(BOM_UTF8):  # a mark of the encoding, not
            raw = raw[len(BOM_UTF8):]  # text: the models would translate it (en-de: U+FFFD)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.on_invalid(self.number)
            return raw.decode("utf-8", errors="replace")

    def ready(self) -> bool:
        if self.pending or self.eof or self.fd is None:
            return True
        return bool(select.select([self.fd], [], [], 0)[0])


@contextmanager
def open_input(text: list[str] | None, path: Path | None, on_invalid):
    """The lines to translate: of the text arguments (a newline in one ends a line), of
    -i FILE (- is stdin), or of stdin; an iterator with ready() (see Lines)."""
    if text and path:
        raise UsageError("give text arguments or -i FILE, not both")
    if text:
        joined = " ".join(text)
        yield Given(joined.splitlines() or [joined])
    elif path is not None and str(path) != "-":
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from None
        with f:
            yield Lines(f, on_invalid)
    else:
        if sys.stdin is None or (path is None and sys.stdin.isatty()):
            raise UsageError("nothing to translate: give TEXT, -i FILE, or pipe text in")
        yield Lines(sys.stdin.buffer, on_invalid)


class Given(list):
    """Lines given as arguments: all there at once."""

    def ready(self) -> bool:
        return True


def count_lines(path: Path) -> int | None:
    """Lines in a regular file (for the progress bar's total), or None."""
    try:
        if not path.is_file():
            return None
        n, last = 0, b"\n"
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                n, last = n + block.count(b"\n"), block[-1:]
        return n + (last != b"\n")
    except OSError:
        return None


def is_stdout(path: Path | None) -> bool:
    return path is None or str(path) == "-"


def check_output(path: Path | None) -> None:
    """Fail now, before any model is loaded, if -o PATH cannot be written: a directory, a
    missing folder, no permission. A regular file (or a new one) is tried for real: a
    temporary file is made and removed in its folder, where the output will be written."""
    if is_stdout(path):
        return
    target = Path(os.path.realpath(path))  # a symlink: its target is what gets written
    if target.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if target.exists() and not target.is_file():  # a FIFO, a device: written through
        if not os.access(target, os.W_OK):
            raise UsageError(f"cannot write {path}: permission denied")
        return
    if not target.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {target.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def open_output(path: Path | None) -> Iterator[TextIO]:
    """Where the translations go:
    - stdout (no path, or -);
    - a FIFO, a terminal or another device: written through, line by line, in order;
    - a regular file, new or existing (through a symlink: its target): a temporary file in
      the same folder that replaces it only when all went well, with the existing file's
      mode and owner, or the mode the umask gives a new file."""
    if is_stdout(path):
        yield sys.stdout
        return
    target = Path(os.path.realpath(path))  # check_output(path) first, before any long work
    if target.exists() and not target.is_file():
        with open(target, "w", encoding="utf-8", newline="\n") as f:
            yield f
        return
    old = target.stat() if target.exists() else None
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
        if old is None:
            os.chmod(tmp, 0o666 & ~umask())
        else:
            os.chmod(tmp, old.st_mode & 0o7777)
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:  # not ours to give away: keep the group if we can
                pass
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
