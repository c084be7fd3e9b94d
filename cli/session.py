"""Translating for a person at a terminal: one line at a time, streamed as it is decoded or
shown with what the model thinks of it (--show confidence, attention), and the interactive
session that `translate` opens on a terminal with nothing to read."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from cli import views
from cli.console import err
from cli.render import stream_to_terminal

if TYPE_CHECKING:
    from rich.console import Console

SHOWS = ("confidence", "attention")
HELP = """commands (settings hold for the rest of the session):
  :beam N          beam search with N hypotheses        :greedy       greedy decoding
  :sample [T]      sampling at temperature T (1.0)      :topk K, :topp P   sampling filters
  :nbest N         N alternatives per line, as a table  :max N        at most N tokens a sentence
  :to LANG         translate into LANG                  :from LANG    read LANG (:from auto)
  :show WHAT       confidence, attention, or off        :settings     what is in force
  :help            this text                            :quit or Ctrl-D   leave
Ctrl-C cancels a translation (or clears the line); several pasted lines are translated one by one."""


def parse_show(value: str | None) -> set[str]:
    """--show confidence,attention -> {"confidence", "attention"}; off or none -> set()."""
    from core.errors import UsageError

    chosen = {v.strip() for v in (value or "").split(",") if v.strip()} - {"off", "none"}
    unknown = chosen - set(SHOWS)
    if unknown:
        raise UsageError(f"--show takes {', '.join(SHOWS)} or off, not {', '.join(sorted(unknown))}")
    return chosen


class Viewer:
    """One line at a time onto a terminal: the translation streamed token by token, or, with
    `show`, the words coloured by confidence and/or the attention heat map (on stderr)."""

    def __init__(self, router, flags: dict, console: Console, *, show: set[str] = frozenset(),
                 layer: int = -1):
        self.router, self.flags, self.console = router, dict(flags), console
        self.show, self.layer = set(show), layer

    def options(self):
        return self.router.translator(self.router.default[-1]).options(**self.flags)

    def line(self, line: str) -> None:
        route, notes = self.router.route(line)
        for note in notes:
            err().print(f"warning: {note}")
        if route is None:
            self.console.print(line, markup=False, highlight=False)
        elif self.options().n_best > 1:
            nbest = next(self.router.run(route, [line], self.flags))
            self.console.print(views.nbest_table(nbest))
        elif self.show:
            self.explained(route, line)
        else:
            stream_to_terminal(self.console, self.router.stream(route, line, self.flags))

    def explained(self, route, line: str) -> None:
        translator, line, found = explain_line(self.router, route, line, self.flags, self.layer)
        if "confidence" in self.show:
            def plain():
                return next(self.router.run(route[-1:], [line], self.flags))[0].text

            self.console.print(views.confidence(line, translator.source_lang, found, plain))
        else:
            self.console.print(next(self.router.run(route[-1:], [line], self.flags))[0].text,
                               markup=False, highlight=False)
        if "attention" in self.show:
            for e in found:
                err().print(views.heatmap(e, err().width))


def explain_line(router, route, line: str, flags: dict, layer: int):
    """(the translator that writes the output, the line it reads, its Explanations): through a
    pivot, what the last model thinks of its translation of the pivot text."""
    from core.explain import explain

    translator, line = router.last_leg(route, line, flags)
    return translator, line, explain(translator, line, translator.options(**flags), layer)


def scores(found, show: set[str]) -> dict:
    """What --show adds to a jsonl record: "tokens" (text and log-probability of each target
    token) with confidence, "alignment" (each target word's most attended source word) with
    attention."""
    extra = {}
    if "confidence" in show:
        extra["tokens"] = [{"text": t, "logprob": round(lp, 4)}
                           for e in found for t, lp in zip(e.target, e.logprobs)]
    if "attention" in show:
        extra["alignment"] = [a for e in found for a in views.alignment(e)]
    return extra


class Session:
    """The interactive loop: line editing and history (prompt_toolkit), commands, and every
    line translated by the same engine, the model loaded once."""

    def __init__(self, make_router, to: str | None, source: str | None, flags: dict,
                 console: Console, history: Path, *, show: set[str], layer: int):
        self.make_router, self.to, self.source = make_router, to, source
        self.viewer = Viewer(make_router(source, to), flags, console, show=show, layer=layer)
        self.history = history

    def run(self) -> None:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.history import FileHistory, InMemoryHistory

        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            history = FileHistory(str(self.history))
        except OSError:  # a read-only home: history for this session only
            history = InMemoryHistory()
        prompt = PromptSession(history=history)
        err().print("translate: type or paste text; :help for commands, Ctrl-D to leave")
        while True:
            try:
                text = prompt.prompt("> ")
            except KeyboardInterrupt:
                continue  # the line is cleared
            except EOFError:
                return
            for line in text.splitlines():
                if line.startswith(":"):
                    if not self.command(line[1:]):
                        return
                elif line.strip():
                    try:
                        self.viewer.line(line)
                    except KeyboardInterrupt:
                        self.viewer.console.print()
                        err().print("cancelled")

    def command(self, text: str) -> bool:
        """Run one :command; False means leave."""
        from core.errors import TranslateError

        words = shlex.split(text) if text.strip() else ["help"]
        name, args = words[0], words[1:]
        old = dict(self.viewer.flags)
        try:
            if name in ("quit", "q", "exit"):
                return False
            if name == "help":
                err().print(HELP)
            elif name == "settings":
                self.settings()
            elif name in ("to", "from"):
                self.languages(name, args)
            elif name == "show":
                self.viewer.show = parse_show(",".join(args))
                if "confidence" in self.viewer.show:
                    err().print(views.legend())
            else:
                self.decoding(name, args)
                self.viewer.options()  # contradictions are errors now, not at the next line
        except TranslateError as exc:
            self.viewer.flags = old
            err().print(f"error: {exc}")
        except (ValueError, IndexError):
            self.viewer.flags = old
            err().print(f"error: bad arguments for :{name} (see :help)")
        return True

    def decoding(self, name: str, args: list[str]) -> None:
        from core.errors import UsageError

        flags = self.viewer.flags
        sampling = ("top_k", "top_p", "temperature", "seed")
        if name == "beam":
            flags.update(strategy="beam", beam_size=int(args[0]), **dict.fromkeys(sampling))
        elif name == "greedy":
            flags.update(strategy="greedy", beam_size=None, n_best=None,
                         **dict.fromkeys(sampling))
        elif name == "sample":
            flags.update(strategy="sample", beam_size=None, n_best=None,
                         temperature=float(args[0]) if args else 1.0)
        elif name in ("topk", "topp"):
            flags.update(strategy="sample", beam_size=None, n_best=None)
            flags["top_k" if name == "topk" else "top_p"] = (int if name == "topk" else float)(args[0])
        elif name == "nbest":
            n = int(args[0])
            if self.viewer.options().strategy != "beam":
                flags.update(strategy="beam", **dict.fromkeys(sampling))
            beam = self.viewer.options().beam_size
            flags.update(n_best=n, beam_size=max(beam, n))  # n alternatives need n beams
        elif name == "max":  # a plain cap: no factor of the source length on top
            flags.update(max_length=int(args[0]), max_length_factor=0)
        else:
            raise UsageError(f"unknown command :{name} (see :help)")
        err().print(f"{self.describe()}")

    def languages(self, name: str, args: list[str]) -> None:
        value = None if not args or args[0] == "auto" else args[0]
        to, source = (value, self.source) if name == "to" else (self.to, value)
        self.viewer.router = self.make_router(source, to)  # raises if nothing fits: kept as is
        self.to, self.source = to, source
        err().print(f"from {source or 'the detected language'} into {to or 'the model target'}")

    def describe(self) -> str:
        o = self.viewer.options()
        how = {"beam": f"beam {o.beam_size}", "greedy": "greedy",
               "sample": f"sampling, temperature {o.temperature}"
               + (f", top-k {o.top_k}" if o.top_k else "") + (f", top-p {o.top_p}" if o.top_p else "")}
        extra = f", {o.n_best} alternatives" if o.n_best > 1 else ""
        return f"decoding: {how.get(o.strategy, o.strategy)}{extra}, at most {o.max_length} tokens"

    def settings(self) -> None:
        err().print(self.describe())
        err().print(f"from {self.source or 'the detected language'} into "
                    f"{self.to or 'the model target'}; show: "
                    f"{', '.join(sorted(self.viewer.show)) or 'off'}")
