"""Lines to models by language: each line goes to the model for the language it is in.

The CLI makes a Router from -m/--from/--to and what is installed (core.models): with -m or
--from one model takes every line, and a line confidently in another language gets a warning;
otherwise a line goes to the installed model for its detected language (core.detect), lines
too short to judge to the default route, and with --to a line already in that language comes
back as it was, with a warning saying so."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from core.detect import MIN_CONFIDENCE
from core.translator import Candidate, Translator, chunks

WARN_WORDS = 4  # a line of fewer words never gets a wrong-language warning


class Router:
    def __init__(self, load: Callable[[str], Translator], routes: dict[str, str], default: str,
                 *, detect=None, target: str | None = None, fixed: bool = False):
        """`routes`: source language -> model path; `default`: the path for lines whose
        language is unknown (and every line when `fixed`); `detect(text)` -> (lang, p)."""
        self.load, self.routes, self.default = load, routes, default
        self.detect, self.target, self.fixed = detect, target, fixed
        self.loaded: dict[str, Translator] = {}

    def translator(self, path: str) -> Translator:
        if path not in self.loaded:
            self.loaded[path] = self.load(path)
        return self.loaded[path]

    def route(self, line: str) -> tuple[str | None, list[str]]:
        """The model path for a line (None: pass it through) and warnings about it."""
        lang, p = self.detect(line) if self.detect and line.strip() else (None, 0.0)
        sure = lang is not None and p >= MIN_CONFIDENCE
        if sure and lang == self.target:
            return None, [f"already in {lang}: passed through"]
        if self.fixed:
            expected = self.translator(self.default).source_lang
            if sure and lang != expected and len(line.split()) >= WARN_WORDS:
                return self.default, [f"looks like {lang} (p={p:.2f}), but the model reads "
                                      f"{expected}"]
            return self.default, []
        return (self.routes.get(lang, self.default) if sure else self.default), []

    def iter_translate(self, lines: Iterable[str], flags: dict, *, chunk_size: int = 1024,
                       on_split=None, ready: Callable[[], bool] | None = None
                       ) -> Iterator[list[Candidate]]:
        """As Translator.iter_translate, each line by its model, decoding `flags` over each
        model's own defaults; in input order."""
        for first, chunk in chunks(lines, chunk_size, ready):
            yield from self._chunk(chunk, first, flags, on_split)

    def _chunk(self, lines: list[str], first: int, flags: dict, on_split):
        results: dict[int, list[Candidate]] = {}
        groups: dict[str, list[int]] = {}
        notes: dict[int, list[str]] = {}
        for i, line in enumerate(lines):
            path, notes[i] = self.route(line)
            if path is None:
                results[i] = [Candidate(line, 0.0, notes[i])]
            else:
                groups.setdefault(path, []).append(i)
        for path, rows in groups.items():
            translator = self.translator(path)
            split = (lambda n, k, rows=rows: on_split(first + rows[n - 1], k)) if on_split else None
            done = translator.iter_translate([lines[i] for i in rows], translator.options(**flags),
                                             on_split=split)
            for i, nbest in zip(rows, done):
                nbest[0].warnings[:0] = notes[i]
                results[i] = nbest
        for i in range(len(lines)):
            yield results[i]
