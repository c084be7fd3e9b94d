"""Translator: the facade over tokenizer, model and decoding that the CLI and Python users call."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from core import checkpoint
from core.errors import DataError
from core.generate import generate
from core.model import Transformer
from core.search import DecodeOptions, Strategy
from core.tokenizer import Tokenizer


@dataclass
class Candidate:
    text: str
    score: float


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
                       chunk_size: int = 1024) -> Iterator[list[Candidate]]:
        """Yield each line's n-best in input order, as soon as it and all before it are done.

        Lines are read `chunk_size` at a time and sorted by length within a chunk, so padding
        stays small and memory stays bounded on endless input."""
        strategy = options.make(self.tokenizer.eos_id)
        chunk: list[str] = []
        for line in lines:
            chunk.append(line)
            if len(chunk) == chunk_size:
                yield from self._translate_chunk(chunk, options, strategy)
                chunk = []
        if chunk:
            yield from self._translate_chunk(chunk, options, strategy)

    def _translate_chunk(self, lines: list[str], options: DecodeOptions,
                         strategy: Strategy) -> Iterator[list[Candidate]]:
        results: dict[int, list[Candidate]] = {}
        todo = []
        for i, line in enumerate(lines):
            if line.strip():
                todo.append(i)
            else:
                results[i] = [Candidate(line, 0.0)]
        ids = self.tokenizer.encode_batch([lines[i].strip() for i in todo])
        self.check_lengths(ids)
        order = sorted(range(len(todo)), key=lambda j: len(ids[j]))
        emitted = 0
        for start in range(0, len(order), self.batch_size):
            batch = order[start: start + self.batch_size]
            for j, hyps in self._decode_batch([ids[j] for j in batch], options, strategy):
                results[todo[batch[j]]] = [
                    Candidate(self.tokenizer.decode(h.tokens), h.score) for h in hyps]
            while emitted in results:
                yield results.pop(emitted)
                emitted += 1
        while emitted in results:
            yield results.pop(emitted)
            emitted += 1

    def _decode_batch(self, ids: list[list[int]], options: DecodeOptions, strategy: Strategy):
        src, mask = self.pad(ids)
        for step in generate(self.model, src, mask, strategy, max_length=options.max_length,
                             min_length=options.min_length):
            yield from step.finished.items()

    def stream(self, line: str, **options) -> Iterator[str]:
        """Yield the translation of one line piece by piece, as soon as each piece is final."""
        if not line.strip():
            yield line
            return
        opts = DecodeOptions(**options)
        ids = self.tokenizer.encode_batch([line.strip()])
        self.check_lengths(ids)
        src, mask = self.pad(ids)
        detok = Detokenizer(self.tokenizer)
        for step in generate(self.model, src, mask, opts.make(self.tokenizer.eos_id),
                             max_length=opts.max_length, min_length=opts.min_length):
            piece = detok.add(step.committed.get(0, []))
            if piece:
                yield piece
        rest = detok.finish()
        if rest:
            yield rest

    def check_lengths(self, ids: list[list[int]]) -> None:
        limit = self.model.cfg.max_positions
        longest = max((len(x) for x in ids), default=0)
        if longest > limit:
            raise DataError(f"a line of {longest} tokens is longer than the {limit} source "
                            "tokens this model reads; split it into shorter lines")

    def pad(self, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad a batch: (B, S) ids and (B, S) real-token mask, on the model's device."""
        S = max(len(x) for x in ids)
        src = torch.full((len(ids), S), self.tokenizer.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            src[i, : len(x)] = torch.tensor(x)
        return src.to(self.device), (src != self.tokenizer.pad_id).to(self.device)
