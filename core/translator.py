"""Translator: the facade over tokenizer, model and decoding that the CLI and Python users call."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from core import checkpoint
from core.generate import generate
from core.model import Transformer
from core.search import DecodeOptions, Strategy
from core.tokenizer import Tokenizer


SENTENCE_END = re.compile(r"(?<=[.!?;:\u2026\u3002\uff01\uff1f])\s+")
ONE_LINE = str.maketrans({"\n": " ", "\r": " "})


@dataclass
class Candidate:
    text: str
    score: float


def join(nbests: list[list[Candidate]]) -> list[Candidate]:
    """Put the pieces of a split line back together: the k-th candidate joins every piece's
    k-th; scores add up."""
    n = min(len(c) for c in nbests)
    return [Candidate(" ".join(c[k].text for c in nbests), sum(c[k].score for c in nbests))
            for k in range(n)]


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
    """Translate lines of text with one model; blank lines come back as they were."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, batch_size: int = 32):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def load(cls, model: str | None = None, *, device: str = "auto",
             batch_size: int = 32) -> Translator:
        ckpt = checkpoint.load(model, device)
        return cls(ckpt.model, ckpt.tokenizer, batch_size=batch_size)

    def translate(self, lines: list[str], **options) -> list[str]:
        return [nbest[0].text for nbest in self.translate_nbest(lines, **options)]

    def translate_nbest(self, lines: list[str], **options) -> list[list[Candidate]]:
        return list(self.iter_translate(lines, DecodeOptions(**options)))

    def iter_translate(self, lines: Iterable[str], options: DecodeOptions, *,
                       chunk_size: int = 1024, on_split: Callable[[int, int], None] | None = None
                       ) -> Iterator[list[Candidate]]:
        """Yield each line's n-best in input order, as soon as it and all before it are done.

        Lines are read `chunk_size` at a time and sorted by length within a chunk, so padding
        stays small and memory stays bounded on endless input. A line too long for the model is
        translated in pieces and joined; `on_split(line_number, pieces)` hears of it."""
        strategy = options.make(self.tokenizer.eos_id)
        chunk: list[str] = []
        first = 1
        for line in lines:
            chunk.append(line)
            if len(chunk) == chunk_size:
                yield from self._translate_chunk(chunk, first, options, strategy, on_split)
                first += len(chunk)
                chunk = []
        if chunk:
            yield from self._translate_chunk(chunk, first, options, strategy, on_split)

    def _translate_chunk(self, lines: list[str], first: int, options: DecodeOptions,
                         strategy: Strategy, on_split) -> Iterator[list[Candidate]]:
        results: dict[int, list[Candidate]] = {}
        pieces: list[list[int]] = []  # token ids of every piece to translate
        owner: list[int] = []  # the line each piece belongs to
        parts: dict[int, list[int]] = {}  # line -> indices of its pieces
        for i, ids in self._pieces(lines):
            if len(ids) > 1 and on_split is not None:
                on_split(first + i, len(ids))
            parts[i] = list(range(len(pieces), len(pieces) + len(ids)))
            pieces.extend(ids)
            owner.extend([i] * len(ids))
        for i, line in enumerate(lines):
            if i not in parts:
                results[i] = [Candidate(line, 0.0)]  # blank: comes back as it was
        done: dict[int, list[list[Candidate]]] = {}
        order = sorted(range(len(pieces)), key=lambda j: len(pieces[j]))
        emitted = 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            for b, hyps in self._decode_batch([pieces[j] for j in batch], options, strategy):
                done[batch[b]] = [Candidate(self.text(h.tokens), h.score) for h in hyps]
            for i in {owner[j] for j in batch}:
                if all(j in done for j in parts[i]):
                    results[i] = join([done.pop(j) for j in parts[i]])
            while emitted in results:
                yield results.pop(emitted)
                emitted += 1
        while emitted in results:
            yield results.pop(emitted)
            emitted += 1

    def _pieces(self, lines: list[str]) -> Iterator[tuple[int, list[list[int]]]]:
        """(line index, token ids of its pieces) for every non-blank line."""
        todo = [i for i, line in enumerate(lines) if line.strip()]
        encoded = self.tokenizer.encode_batch([lines[i].strip() for i in todo])
        limit = self.model.cfg.max_positions
        for i, ids in zip(todo, encoded):
            yield i, [ids] if len(ids) <= limit else self.split(lines[i].strip())

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

    def _decode_batch(self, ids: list[list[int]], options: DecodeOptions, strategy: Strategy):
        src, mask = self.pad(ids)
        for step in generate(self.model, src, mask, strategy, max_length=options.max_length,
                             min_length=options.min_length):
            yield from step.finished.items()

    def text(self, tokens: list[int]) -> str:
        """A translation is one line: line breaks the model may produce become spaces."""
        return self.tokenizer.decode(tokens).translate(ONE_LINE)

    def stream(self, line: str, **options) -> Iterator[str]:
        """Yield the translation of one line piece by piece, as soon as each piece is final."""
        if not line.strip():
            yield line
            return
        opts = DecodeOptions(**options)
        strategy = opts.make(self.tokenizer.eos_id)
        _, pieces = next(self._pieces([line]))
        for n, ids in enumerate(pieces):
            if n:
                yield " "
            detok = Detokenizer(self.tokenizer)
            src, mask = self.pad([ids])
            for step in generate(self.model, src, mask, strategy, max_length=opts.max_length,
                                 min_length=opts.min_length):
                piece = detok.add(step.committed.get(0, []))
                if piece:
                    yield piece.translate(ONE_LINE)
            rest = detok.finish()
            if rest:
                yield rest.translate(ONE_LINE)

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad a batch: (B, S) ids and (B, S) real-token mask, on the model's device."""
        S = max(len(x) for x in ids)
        src = torch.full((len(ids), S), self.tokenizer.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            src[i, : len(x)] = torch.tensor(x)
        return src.to(self.device), (src != self.tokenizer.pad_id).to(self.device)
