"""Lines to models by language: each line goes to the model for the language it is in.

build() makes a Router from -m/--from/--to and what is installed (core.models): with -m or
--from one model takes every line, and a line confidently in another language gets a warning;
otherwise a line goes to the installed model for its detected language (core.detect), lines
too short to judge to the default route, and with --to a line already in that language comes
back as it was, with a warning saying so.

A route is one model or two: with two (a pivot, e.g. fr -> en -> de) the first model's best
translation of each line is what the second translates; the n-best are the second model's
alternatives for that one pivot text, each scored as the sum of the two models' scores (the
pivot's and its own), and each candidate carries the pivot text (jsonl: "pivot").

Line by line, Router does what Translator does: iter_translate(lines, flags) yields each line's
n-best in input order, stream(route, line, flags) yields one translation piece by piece.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from core.detect import MIN_CONFIDENCE
from core.models import Route
from core.translator import Candidate, Translator, chunks

WARN_WORDS = 4  # a line of fewer words never gets a wrong-language warning


class Router:
    def __init__(self, load: Callable[[str], Translator], routes: dict[str, Route],
                 default: Route, *, detect=None, target: str | None = None, fixed: bool = False):
        """`routes`: source language -> the models (paths) for it; `default`: the route of lines
        whose language is unknown (and of every line when `fixed`); `detect(text)` -> (lang, p);
        `load(path)` makes a Translator, once per path."""
        self.load, self.routes, self.default = load, routes, default
        self.detect, self.target, self.fixed = detect, target, fixed
        self.loaded: dict[str, Translator] = {}

    def translator(self, path: str) -> Translator:
        if path not in self.loaded:
            self.loaded[path] = self.load(path)
        return self.loaded[path]

    def route(self, line: str) -> tuple[Route | None, list[str]]:
        """The route for a line (None: pass it through) and warnings about it."""
        lang, p = self.detect(line) if self.detect and line.strip() else (None, 0.0)
        sure = lang is not None and p >= MIN_CONFIDENCE
        if sure and lang == self.target:
            return None, [f"already in {lang}: passed through"]
        if self.fixed:
            expected = self.translator(self.default[0]).source_lang
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
        groups: dict[Route, list[int]] = {}
        notes: dict[int, list[str]] = {}
        for i, line in enumerate(lines):
            route, notes[i] = self.route(line)
            if route is None:
                results[i] = [Candidate(line, 0.0, notes[i])]
            else:
                groups.setdefault(route, []).append(i)
        for route, rows in groups.items():
            split = (lambda n, k, rows=rows: on_split(first + rows[n - 1], k)) if on_split else None
            done = self.run(route, [lines[i] for i in rows], flags, split)
            for i, nbest in zip(rows, done):
                nbest[0].warnings[:0] = notes[i]
                results[i] = nbest
        for i in range(len(lines)):
            yield results[i]

    def run(self, route: Route, lines: list[str], flags: dict, on_split=None
            ) -> Iterator[list[Candidate]]:
        """Each line's n-best along `route`, decoding `flags` over each model's defaults."""
        translator = self.translator(route[-1])
        if len(route) == 1:
            yield from translator.iter_translate(lines, translator.options(**flags),
                                                 on_split=on_split)
            return
        pivots = [nbest[0] for nbest in self.run(route[:-1], lines, {**flags, "n_best": 1},
                                                 on_split)]
        done = translator.iter_translate([p.text for p in pivots], translator.options(**flags))
        for pivot, nbest in zip(pivots, done):
            yield [Candidate(c.text, pivot.score + c.score,
                             [f"pivot: {w}" for w in pivot.warnings] + c.warnings, pivot.text)
                   for c in nbest]

    def last_leg(self, route: Route, line: str, flags: dict) -> tuple[Translator, str]:
        """The route's last model and the text it reads: the line, or through a pivot the
        first model's best translation of it."""
        if len(route) > 1:
            line = next(self.run(route[:-1], [line], {**flags, "n_best": 1}))[0].text
        return self.translator(route[-1]), line

    def stream(self, route: Route, line: str, flags: dict) -> Iterator[str]:
        """One line's translation along `route`, piece by piece as the last model settles it
        (the pivot text is made whole first)."""
        translator, text = self.last_leg(route, line, flags)
        return translator.stream(text, **flags)


def build(model: str | None = None, *, revision: str | None = None, source: str | None = None,
          to: str | None = None, via: str | None = None, device: str = "auto",
          dtype: str = "float32", batch_size: int = 32, detect: bool = True,
          say: Callable[[str], None] = lambda note: None) -> Router:
    """The Router for -m/--from/--to/--via: -m or --from (or not `detect`) fix the route (lines
    in another language get a warning, when `detect`); otherwise each line goes to the
    installed models for its detected language, and with --to a line already in that language
    is passed through. Each model is loaded once, when a line first needs it, and decodes as
    it suggests where the flags are silent; `say(note)` hears of downloads, pivots, and a
    precision that this CPU runs slowly."""
    from core import models
    from core.checkpoint import pick_device
    from core.detect import Detector
    from core.errors import UsageError
    from core.precision import slow
    from core.userdir import cache_root

    if via is not None and (model is not None or to is None):
        raise UsageError("--via needs --to, and chains two models: not with -m" if model is None
                         else "--via chains two models; -m names one")
    if (why := slow(dtype, pick_device(device))) is not None:
        say(why)

    def load(path):
        return Translator.load(path, device=device, dtype=dtype,
                               revision=revision if path == model else None,
                               to=to if model is not None else None, batch_size=batch_size)

    found = models.installed()  # one scan of the embedded models and the cache
    fixed = model is not None or source is not None or not detect
    if fixed:
        default = models.pick(model, source, to, via=via, found=found, say=say)
        table = {}
    else:
        table = models.routes(found, to, via)
        if not table:
            models.pick(None, None, to, found=found)  # raises, listing what is installed
        default = table.get("en", next(iter(table.values())))  # unsure: as the default model
    languages = set(models.languages(found)) | ({models.language(to)} if to else set())
    detector = (Detector(sorted(languages), cache_root())
                if detect and len(languages) > 1 else None)
    return Router(load, table, default or (models.DEFAULT_MODEL,),
                  detect=detector.detect if detector else None,
                  target=models.language(to) if to and not fixed else None, fixed=fixed)
