"""How results look: plain lines, n-best lines, JSON lines, or a live stream on a terminal."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console


def format_result(source: str, nbest: list, fmt: str, n_best: int, extra: dict | None = None
                  ) -> str:
    """One output line per input line (without the newline).

    text:   the best translation; with --n-best N, N fields pairs `translation<TAB>score`,
            best first (tabs inside a translation become spaces)
    jsonl:  {"source", "translation", "score", "warnings"}, "pivot" (the text in the pivot
            language) where two models made it, and, with --n-best, "nbest": [{"text",
            "score"}]; warnings are those of the best translation; then `extra` (--show:
            "tokens", "alignment")
    """
    if fmt == "jsonl":
        record = {"source": source, "translation": nbest[0].text, "score": round(nbest[0].score, 4)}
        if nbest[0].pivot is not None:
            record["pivot"] = nbest[0].pivot
        if n_best > 1:
            record["nbest"] = [{"text": c.text, "score": round(c.score, 4)} for c in nbest]
        record["warnings"] = nbest[0].warnings
        record.update(extra or {})
        return json.dumps(record, ensure_ascii=False)
    if n_best > 1:
        return "\t".join(f"{c.text.replace(chr(9), ' ')}\t{c.score:.4f}" for c in nbest)
    return nbest[0].text


def write_line(out: TextIO, line: str) -> None:
    out.write(line + "\n")
    out.flush()  # a consumer downstream sees each line as soon as it is done


def stream_to_terminal(console: Console, pieces) -> None:
    """Show a translation token by token as the decoder settles it."""
    for piece in pieces:
        console.print(piece, end="", style="bold", markup=False, highlight=False)
    console.print()


@contextmanager
def progress_bar(console: Callable[[], Console], total: int | None, enabled: bool):
    """A transient bar on the console `console()` gives (stderr) that counts lines done, with
    their rate and, when the total is known (-i FILE), the time left; yields the function that
    counts one more line. Nothing at all, and no console made, when not enabled (stderr is not
    a terminal)."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [SpinnerColumn(), TextColumn("translating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("lines"),
               TextColumn("{task.fields[rate]}"),
               TimeRemainingColumn() if total else TimeElapsedColumn()]
    with Progress(*columns, console=console(), transient=True) as progress:
        task = progress.add_task("translating", total=total, rate="")

        def advance() -> None:
            progress.advance(task, 1)
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f}/s" if speed else "")

        yield advance
