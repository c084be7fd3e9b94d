"""Translator: the facade over tokenizer, model and decoding that the CLI and Python users call."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from core import models, segment
from core.generate import generate
from core.model import Transformer
from core.search import DecodeOptions, Strategy, combine, with_defaults
from core.segment import loops, safe
from core.tokenizer import Tokenizer

# where an over-long sentence is cut first (then at spaces)
SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+")


@dataclass
class Candidate:
    text: str
    score: float
    warnings: list[str] = field(default_factory=list)  # e.g. "sentence 2 hit the length limit"
    pivot: str | None = None  # the text in the pivot language, where two models made it


def join(nbests: list[list[Candidate]], sep: str = " ") -> list[Candidate]:
    """Put the pieces of a sentence or line back together: the k-th candidate joins every
    piece's k-th with `sep`; scores add up, warnings are kept."""
    n = min(len(c) for c in nbests)
    return [Candidate(sep.join(c[k].text for c in nbests), sum(c[k].score for c in nbests),
                      [w for c in nbests for w in c[k].warnings])
            for k in range(n)]


def restored(nbest: list[Candidate], spans: list[str]) -> list[Candidate]:
    """Candidates with their placeholders replaced by the spans they stand for."""
    return [Candidate(segment.restore(c.text, spans), c.score, c.warnings) for c in nbest]


def spaced(pieces: list[list[Candidate]], sources: list[str]) -> list[list[Candidate]]:
    """Pieces of a sentence translated one by one, to be joined with "": a space put back
    where one piece's translation runs into the next ("2013" + "However") though their
    sources did not touch ("2013, aber": the model dropped the comma)."""
    for m in range(1, len(pieces)):
        if sources[m - 1][-1:].isalnum() and sources[m][:1].isalnum():
            continue
        pieces[m] = [Candidate(" " + c.text, c.score, c.warnings)
                     if p.text[-1:].isalnum() and c.text[:1].isalnum() else c
                     for p, c in zip(pieces[m - 1], pieces[m])]
    return pieces


def chunks(lines: Iterable[str], size: int, ready: Callable[[], bool] | None
           ) -> Iterator[tuple[int, list[str]]]:
    """(number of the first line, lines) in chunks of `size`, or fewer when `ready()` says no
    further line is there without waiting."""
    chunk: list[str] = []
    first = 1
    for line in lines:
        chunk.append(line)
        if len(chunk) == size or (ready is not None and not ready()):
            yield first, chunk
            first += len(chunk)
            chunk = []
    if chunk:
        yield first, chunk


class Detokenizer:
    """Turns a growing list of token ids into text pieces, holding back incomplete characters."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.text = tokenizer, [], ""

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""  # a character split across byte tokens, or a merge still settling
        piece, self.text = text[len(self.text):], text
        return piece

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        return text[len(self.text):] if text.startswith(self.text) else ""


class Translator:
    """Translate lines of text with one model: each line sentence by sentence (core.segment),
    protected spans copied; blank lines come back as they were."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 32,
                 source_lang: str | None = None, defaults: dict | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.source_lang = source_lang or model.cfg.source_lang or "en"  # the segmenter's rules
        self.defaults = defaults or {}  # the model's decoding settings (generation.json)

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "auto", dtype: str = "float32",
             revision: str | None = None, to: str | None = None,
             batch_size: int = 32) -> Translator:
        """A model by name, path or Hub id (see `translate -m`), on `device` in `dtype`; `to`
        picks the target language of a multilingual model. It decodes as the model suggests
        (its generation.json) unless told otherwise, as the CLI does."""
        ckpt = models.load(model, device, revision=revision, dtype=dtype)
        translator = cls(ckpt.model, ckpt.tokenizer, batch_size=batch_size,
                         defaults=ckpt.generation)
        if to is not None and models.language(to) != models.language(ckpt.config.target_lang or ""):
            translator.tokenizer = translator.tokenizer.with_target_language(to)
        return translator

    def options(self, **given) -> DecodeOptions:
        """DecodeOptions from keyword options over the model's defaults (core.search)."""
        names = [f.name for f in dataclasses.fields(DecodeOptions)]
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise TypeError(f"unknown decoding option(s): {', '.join(unknown)}")
        return combine(**with_defaults({n: given.get(n) for n in names}, self.defaults))

    def translate(self, lines: list[str], **options) -> list[str]:
        """The best translation of each line; options as DecodeOptions' fields."""
        return [nbest[0].text for nbest in self.translate_nbest(lines, **options)]

    def translate_nbest(self, lines: list[str], **options) -> list[list[Candidate]]:
        return list(self.iter_translate(lines, self.options(**options)))

    def iter_translate(self, lines: Iterable[str], options: DecodeOptions, *,
                       chunk_size: int = 1024, on_split: Callable[[int, int], None] | None = None,
                       ready: Callable[[], bool] | None = None) -> Iterator[list[Candidate]]:
        """Yield each line's n-best in input order, as soon as it and all before it are done.

        Lines are read `chunk_size` at a time, or fewer when `ready()` says no more line is
        there without waiting; their sentences are sorted by length within a chunk, so
        padding stays small and memory stays bounded on endless input. A sentence too long
        for the model is translated in pieces and joined; `on_split(line_number, pieces)`
        hears of it."""
        if isinstance(lines, str):
            raise TypeError("lines must be a list (or iterable) of lines, not one str: "
                            "translate([text]) for a single line")
        strategy = options.make(self.tokenizer.eos_id)
        for first, chunk in chunks(lines, chunk_size, ready):
            yield from self._translate_chunk(chunk, first, options, strategy, on_split)

    def _translate_chunk(self, lines: list[str], first: int, options: DecodeOptions,
                         strategy: Strategy, on_split) -> Iterator[list[Candidate]]:
        layout = {i: segment.split(line, self.source_lang)
                  for i, line in enumerate(lines) if line.strip()}
        units = [(i, j) for i, sentences in layout.items()
                 for j, sentence in enumerate(sentences) if sentence.translate]
        left = collections.Counter(i for i, _ in units)  # sentences still to come, per line
        found: dict[int, dict[int, list[Candidate]]] = {i: {} for i in layout}
        results: dict[int, list[Candidate]] = {}
        for i, line in enumerate(lines):
            if not left.get(i):  # blank, or nothing to translate: comes back as it was
                results[i] = [Candidate(line, 0.0)]
        emitted = 0

        def settled(u: int, nbest: list[Candidate]) -> None:
            i, j = units[u]
            found[i][j] = nbest
            left[i] -= 1
            if not left[i]:
                results[i] = self._rebuild(layout[i], found.pop(i))

        texts = [layout[i][j].text for i, j in units]
        where = [first + i for i, _ in units]
        # units that lost a span, settled together: once a batch of them is there, or at the
        # end of the chunk (u None; a chunk is what the input has ready, so a pipe read line
        # by line is not held back)
        again: dict[int, list[Candidate]] = {}
        decoded = self._decode_texts(texts, options, strategy, on_split, where)
        for u, nbest in itertools.chain(decoded, [(None, [])]):
            if u is not None:
                sentence = layout[units[u][0]][units[u][1]]
                if all(sentence.kept(c.text) for c in nbest):
                    settled(u, restored(nbest, sentence.spans))
                else:
                    again[u] = nbest
            if again and (u is None or len(again) >= self.batch_size):
                sentences = [layout[units[v][0]][units[v][1]] for v in again]
                for v, fixed in zip(again, self._settle(sentences, list(again.values()),
                                                        options, strategy)):
                    settled(v, fixed)
                again = {}
            while emitted in results:
                yield results.pop(emitted)
                emitted += 1

    def _decode_texts(self, texts: list[str], options: DecodeOptions, strategy: Strategy,
                      on_split=None, where: list[int] | None = None
                      ) -> Iterator[tuple[int, list[Candidate]]]:
        """Yield (index, n-best) for each text as soon as all its pieces are decoded."""
        pieces: list[list[int]] = []  # token ids of every piece to translate
        owner: list[int] = []  # the text each piece belongs to
        parts: list[list[int]] = []  # text -> indices of its pieces
        limit = self.model.cfg.max_positions
        for t, (text, ids) in enumerate(zip(texts, self.tokenizer.encode_batch(texts))):
            split = [ids] if len(ids) <= limit else self.split(text)
            if len(split) > 1 and on_split is not None:
                on_split(where[t] if where else t + 1, len(split))
            parts.append(list(range(len(pieces), len(pieces) + len(split))))
            pieces.extend(split)
            owner.extend([t] * len(split))
        done: dict[int, list[Candidate]] = {}
        order = sorted(range(len(pieces)), key=lambda j: len(pieces[j]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            limits = [options.limit(len(pieces[j])) for j in batch]
            for b, hyps in self._decode_batch([pieces[j] for j in batch], options, strategy,
                                              limits):
                source = texts[owner[batch[b]]]
                done[batch[b]] = [self.candidate(h, limits[b], source) for h in hyps]
            for t in dict.fromkeys(owner[j] for j in batch):  # each text once, all pieces in
                if all(j in done for j in parts[t]):
                    yield t, join([done.pop(j) for j in parts[t]])

    def candidate(self, hyp, limit: int, source: str) -> Candidate:
        text = self.text(hyp.tokens)
        warnings = []
        if len(hyp.tokens) >= limit:
            warnings.append(f"hit the length limit ({limit} tokens)")
        if loops(text, source):
            warnings.append("repeats itself")
        return Candidate(text, hyp.score, warnings)

    def _settle(self, sentences: list[segment.Sentence], nbests: list[list[Candidate]],
                options: DecodeOptions, strategy: Strategy) -> list[list[Candidate]]:
        """Each sentence's n-best with its protected spans put back. The sentences that lost
        a checked span (a number, say) are translated again, together, with those protected
        too; those that lost a placeholder are translated around their spans, piece by piece,
        so that no span is ever lost."""
        out: list[list[Candidate] | None] = [None] * len(sentences)
        strict: dict[int, segment.Sentence] = {}
        for k, (sentence, nbest) in enumerate(zip(sentences, nbests)):
            if all(sentence.kept(c.text) for c in nbest):
                out[k] = restored(nbest, sentence.spans)
            elif sentence.checked:
                strict[k] = sentence.strict()
        again = list(strict)
        for n, nbest in self._decode_texts([strict[k].text for k in again], options, strategy):
            if all(segment.copied(c.text, strict[again[n]].spans) for c in nbest):
                out[again[n]] = restored(nbest, strict[again[n]].spans)
        cut = {k: strict.get(k, s) for k, s in enumerate(sentences) if out[k] is None}
        parts = {k: segment.around(s.text, s.spans) for k, s in cut.items()}
        todo = {(k, m): n for n, (k, m) in enumerate(
            (k, m) for k, ps in parts.items() for m, p in enumerate(ps)
            if m % 2 == 0 and segment.needs_model(p))}  # text pieces -> their place in `got`
        got = dict(self._decode_texts([parts[k][m].strip() for k, m in todo], options, strategy))
        for k, sentence in cut.items():
            pieces = []
            sources = [sentence.spans[m // 2] if m % 2 else p for m, p in enumerate(parts[k])]
            for m, part in enumerate(parts[k]):
                if m % 2:  # a placeholder: its span
                    pieces.append([Candidate(sentence.spans[m // 2], 0.0)])
                elif (k, m) in todo:
                    lead, _, trail = segment.edges(part)
                    pieces.append([Candidate(lead + c.text + trail, c.score, c.warnings)
                                   for c in got[todo[k, m]]])
                else:
                    pieces.append([Candidate(part, 0.0)])
            out[k] = join(spaced(pieces, sources), "")
        return out

    @staticmethod
    def _rebuild(sentences: list[segment.Sentence], found: dict[int, list[Candidate]]
                 ) -> list[Candidate]:
        """A line's n-best from its sentences' n-best, with the line's own whitespace and the
        sentences not translated kept as they were; warnings name the sentence."""
        many = len(sentences) > 1
        pieces = []
        for j, s in enumerate(sentences):
            nbest = found.get(j) or [Candidate(s.source, 0.0)]
            lead, trail = safe(s.lead), safe(s.trail)  # one line: \r and the like become spaces
            pieces.append([Candidate(lead + c.text + trail, c.score,
                                     [f"sentence {j + 1} {w}" if many else w for w in c.warnings])
                           for c in nbest])
        return join(pieces, "")

    def split(self, text: str) -> list[list[int]]:
        """Token ids of pieces that fit the model, never dropping a word: halves at a sentence
        boundary where there is one, else at a space, else anywhere."""
        ids = self.tokenizer.encode(text)
        if len(ids) <= self.model.cfg.max_positions or len(text) < 2:
            return [ids]
        sentences = SENTENCE_END.split(text)
        if len(sentences) > 1:
            half = len(sentences) // 2
            left, right = " ".join(sentences[:half]), " ".join(sentences[half:])
        else:
            middle = text.rfind(" ", 0, len(text) // 2 + 1)
            middle = middle if middle > 0 else len(text) // 2
            left, right = text[:middle], text[middle:]
        return self.split(left.strip() or left) + self.split(right.strip() or right)

    def _decode_batch(self, ids: list[list[int]], options: DecodeOptions, strategy: Strategy,
                      limits: list[int]):
        src, mask = self.pad(ids)
        for step in generate(self.model, src, mask, strategy,
                             max_length=torch.tensor(limits, device=self.device),
                             min_length=options.min_length,
                             no_repeat_ngram=options.no_repeat_ngram,
                             utf8=self.tokenizer.utf8_rule):
            yield from step.finished.items()

    def text(self, tokens: list[int]) -> str:
        """A translation is one line of safe text (see safe())."""
        return safe(self.tokenizer.decode(tokens))

    def stream(self, line: str, **options) -> Iterator[str]:
        """Yield the translation of one line piece by piece, as soon as each piece is final:
        sentence by sentence, token by token (a sentence with protected or checked spans comes
        whole)."""
        if not isinstance(line, str):
            raise TypeError("stream() translates one line, a str")
        opts = self.options(**options)
        strategy = opts.make(self.tokenizer.eos_id)
        if not line.strip():
            yield line
            return
        for sentence in segment.split(line, self.source_lang):
            yield sentence.lead
            if not sentence.translate:
                yield sentence.source
            elif sentence.spans or sentence.checked:  # whole: it may have to be done again
                _, nbest = next(self._decode_texts([sentence.text], opts, strategy))
                yield self._settle([sentence], [nbest], opts, strategy)[0][0].text
            else:
                yield from self._stream_sentence(sentence.text, opts, strategy)
            yield sentence.trail

    def _stream_sentence(self, text: str, opts: DecodeOptions, strategy: Strategy):
        for n, ids in enumerate(self.split(text)):
            if n:
                yield " "
            detok = Detokenizer(self.tokenizer)
            src, mask = self.pad([ids])
            for step in generate(self.model, src, mask, strategy, max_length=opts.limit(len(ids)),
                                 min_length=opts.min_length,
                                 no_repeat_ngram=opts.no_repeat_ngram,
                                 utf8=self.tokenizer.utf8_rule):
                piece = detok.add(step.committed.get(0, []))
                if piece:
                    yield safe(piece)
            rest = detok.finish()
            if rest:
                yield safe(rest)

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad a batch: (B, S) ids and (B, S) real-token mask, on the model's device."""
        S = max(len(x) for x in ids)
        src = torch.full((len(ids), S), self.tokenizer.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            src[i, : len(x)] = torch.tensor(x)
        return src.to(self.device), (src != self.tokenizer.pad_id).to(self.device)
