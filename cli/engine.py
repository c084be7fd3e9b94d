"""From the command line's model options to what translates: a Router over the installed
models, and a function of lines run by it or by worker processes."""

from __future__ import annotations

import functools
from contextlib import contextmanager

from cli.console import err


def make_router(*, model, detect=True, **chosen):
    """core.route.build for the command line's model options (opt.MODEL, and batch_size), its
    notes on stderr."""
    from core.route import build

    return build(model, detect=detect, say=lambda note: err().print(f"note: {note}"), **chosen)


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
