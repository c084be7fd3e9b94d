"""From the command line's model options to what translates: a Router over the installed
models, and a function of lines run by it or by worker processes."""

from __future__ import annotations

import functools
import gc
from contextlib import contextmanager

from cli.console import err


def make_router(*, model, detect=True, **chosen):
    """core.route.build for the command line's model options (opt.MODEL, and batch_size), its
    notes on stderr. Translating, glibc keeps freed blocks for the next step's tensors (not
    training, where it did not measure faster)."""
    from core.machine import reuse_freed_memory
    from core.route import build

    reuse_freed_memory()
    router = build(model, detect=detect, say=lambda note: err().print(f"note: {note}"), **chosen)
    settled()
    return router


def settled() -> None:
    """Start-up is over: torch and the rest are imported. The garbage collector, off since
    cli.main started, comes back on, and what exists now (about a million objects that live
    as long as the process) is put where it never scans them. Scanning them again and again
    during start-up took 0.1-0.4 s of a one-sentence call. Once only: a later freeze (a
    session's next router) would keep whatever garbage is pending, an old model included."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


@contextmanager
def engine(router, flags: dict, workers: int):
    """lines -> each line's n-best, in order: the router itself, or `workers` processes."""
    from core.errors import UsageError

    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        yield functools.partial(router.iter_translate, flags=flags)
        return
    from core.workers import Workers

    with Workers(router, flags, workers) as pool:
        yield pool.iter_translate
