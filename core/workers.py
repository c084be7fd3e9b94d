"""Parallel workers for throughput: N processes of one thread each translate chunks of lines
side by side, as CTranslate2's inter_threads do; results come back in input order.

The workers are forked after the model is loaded, so they share its weights with the parent
(copy-on-write pages that inference never writes) instead of holding N copies. Each takes a
chunk, translates it with the parent's Router, and sends the n-best lists back; at most two
chunks per worker are in flight, so memory stays bounded on endless input. An error in a
worker is raised in the parent; Ctrl-C reaches every process of the group and stops them all.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Callable, Iterable, Iterator

from core.errors import TranslateError
from core.translator import Candidate, chunks

IN_FLIGHT = 2  # chunks per worker: one being translated, one waiting


def shares(lines: Iterable[str], size: int, n: int, ready: Callable[[], bool] | None = None
           ) -> Iterator[tuple[int, list[str]]]:
    """chunks(lines, size, ready) for `n` workers, except that where the input is seen to end
    within the n chunks ahead, its last lines go out as n chunks of near-equal size, so that
    the workers finish together: chunks of 64 would leave one worker idle on 64 lines, and
    give two workers 128 and 72 of 200. Chunks are only read ahead while lines are there
    without waiting: a stream that pauses gets what it sent translated at once."""
    source, ahead = chunks(lines, size, ready), []
    while True:
        if ready is not None and not ready():
            yield from ahead  # the stream waits: what it sent goes now, not after the lines
            ahead.clear()  # that would tell whether it is the tail
        chunk = next(source, None)
        if chunk is None:
            break
        ahead.append(chunk)
        if len(ahead) > n:
            yield ahead.pop(0)
    if ahead:
        first, rest = ahead[0][0], [line for _, part in ahead for line in part]
        parts = min(n, len(rest))
        for i in range(parts):
            start, end = i * len(rest) // parts, (i + 1) * len(rest) // parts
            yield first + start, rest[start:end]


def _work(router, flags: dict, tasks, results) -> None:
    """A worker's loop: (task, first line, lines) in, (task, n-bests, splits, error) out."""
    import torch

    torch.set_num_threads(1)  # the parallelism is across processes
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends a worker without a traceback
    while (task := tasks.get()) is not None:
        number, first, lines = task
        splits: list[tuple[int, int]] = []
        try:
            done = list(router.iter_translate(
                lines, flags, chunk_size=len(lines),
                on_split=lambda line, pieces: splits.append((first + line - 1, pieces))))
            results.put((number, done, splits, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
            results.put((number, None, splits, exc))
            return


class Workers:
    """Router.iter_translate over `n` forked worker processes (use as a context manager)."""

    def __init__(self, router, flags: dict, n: int, *, chunk_size: int = 64):
        self.router, self.flags, self.n, self.chunk_size = router, flags, n, chunk_size
        self.processes: list = []

    def __enter__(self) -> Workers:
        from core.precision import before_fork

        for translator in self.router.loaded.values():
            before_fork(translator.model, threads=1)
        context = multiprocessing.get_context("fork")
        self.tasks, self.results = context.Queue(), context.Queue()
        for _ in range(self.n):
            process = context.Process(target=_work, daemon=True,
                                      args=(self.router, self.flags, self.tasks, self.results))
            process.start()
            self.processes.append(process)
        return self

    def __exit__(self, *exc) -> None:
        for process in self.processes:
            if process.is_alive() and exc[0] is None:
                self.tasks.put(None)
        for process in self.processes:
            process.join(timeout=5 if exc[0] is None else 0.5)
            if process.is_alive():
                process.kill()
                process.join()
        self.tasks.close()
        self.results.close()

    def iter_translate(self, lines: Iterable[str], *,
                       on_split: Callable[[int, int], None] | None = None,
                       ready: Callable[[], bool] | None = None) -> Iterator[list[Candidate]]:
        """Each line's n-best in input order, as Router.iter_translate."""
        pending = shares(lines, self.chunk_size, self.n, ready)
        done: dict[int, list[list[Candidate]]] = {}
        sent = received = 0
        exhausted = False
        while True:
            while not exhausted and sent - received < IN_FLIGHT * self.n:
                if sent > received and ready is not None and not ready():
                    break  # no line is waiting: collect what is in flight, do not block
                chunk = next(pending, None)
                if chunk is None:
                    exhausted = True
                    break
                self.tasks.put((sent, *chunk))
                sent += 1
            if received in done:
                yield from done.pop(received)
                received += 1
                continue
            if received == sent:
                return
            number, nbests, splits, error = self._next_result()
            for line, pieces in splits:
                if on_split is not None:
                    on_split(line, pieces)
            if error is not None:
                raise error
            done[number] = nbests

    def _next_result(self):
        while True:
            try:
                return self.results.get(timeout=1)
            except queue.Empty:
                dead = [p for p in self.processes if not p.is_alive()]
                if dead:  # killed (out of memory, a signal) without a word
                    code = dead[0].exitcode
                    why = f"signal {-code}" if code and code < 0 else f"exit {code}"
                    raise TranslateError(f"a translation worker (pid {dead[0].pid}) died "
                                         f"({why}); the lines written so far are complete")
