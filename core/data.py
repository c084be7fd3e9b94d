"""Parallel corpora: reading line-aligned file pairs or TSV files, holding out test pairs, and
token-count batches for training."""

from __future__ import annotations

import gzip
import random
from collections.abc import Iterator
from pathlib import Path

from core.errors import DataError


def open_text(path: Path):
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    # utf-8-sig: a first byte order mark (Windows editors write one) is dropped, not read as text
    return opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="\n")


def read_lines(path: Path) -> list[str]:
    try:
        with open_text(path) as f:
            return [line.rstrip("\r\n") for line in f]
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


# ISO 639-3 suffixes some test sets use (newstest2017.deu), tried after the two-letter code
ISO3 = {"en": "eng", "de": "deu", "fr": "fra", "es": "spa", "it": "ita", "cs": "ces",
        "nl": "nld", "pt": "por", "ru": "rus", "pl": "pol"}


def find_side(prefix: str, lang: str) -> Path:
    for code in (lang, ISO3.get(lang, lang)):
        for candidate in (Path(f"{prefix}.{code}"), Path(f"{prefix}.{code}.gz")):
            if candidate.is_file():
                return candidate
    raise DataError(f"no file {prefix}.{lang} or {prefix}.{lang}.gz")


def read_corpus(spec: str, src_lang: str, tgt_lang: str,
                tsv_languages: tuple[str, str] | None = None) -> list[tuple[str, str]]:
    """A TSV file of source<TAB>target lines (.tsv or .tsv.gz, extra columns ignored), or a
    prefix P with line-aligned P.<src> and P.<tgt> files (plain or .gz). `tsv_languages`
    names the languages of a TSV's two columns; the pairs come back source first."""
    if spec.endswith((".tsv", ".tsv.gz")):
        swap = tsv_languages is not None and tuple(tsv_languages) == (tgt_lang, src_lang)
        pairs = []
        for n, line in enumerate(read_lines(Path(spec)), 1):
            cols = line.split("\t")
            if len(cols) < 2:
                raise DataError(f"{spec}:{n}: expected source<TAB>target")
            pair = (cols[0].strip(), cols[1].strip())
            pairs.append(pair[::-1] if swap else pair)
        return pairs
    src = read_lines(find_side(spec, src_lang))
    tgt = read_lines(find_side(spec, tgt_lang))
    if len(src) != len(tgt):
        raise DataError(f"{spec}: {len(src)} {src_lang} lines but {len(tgt)} {tgt_lang} lines")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt)]


def hold_out(pairs: list[tuple[str, str]], n: int, seed: int
             ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Take n pairs with distinct sources out of `pairs`; drop every remaining pair that shares
    a source or a target sentence with them, so nothing held out is seen in training."""
    by_source: dict[str, tuple[str, str]] = {}
    for s, t in pairs:
        by_source.setdefault(s, (s, t))
    rng = random.Random(seed)
    held = rng.sample(sorted(by_source.values()), min(n, len(by_source)))
    seen_src, seen_tgt = {s for s, _ in held}, {t for _, t in held}
    rest = [(s, t) for s, t in pairs if s not in seen_src and t not in seen_tgt]
    return rest, held


def token_batches(lengths: list[tuple[int, int]], max_tokens: int, seed: int
                  ) -> list[list[int]]:
    """Group example indices into batches of at most `max_tokens` (padded, larger side), from
    length-sorted buckets so padding stays small; batch order shuffled by `seed`."""
    rng = random.Random(seed)
    order = sorted(range(len(lengths)), key=lambda i: (max(lengths[i]), rng.random()))
    batches, batch, longest = [], [], 0
    for i in order:
        longest_if_added = max(longest, *lengths[i])
        if batch and longest_if_added * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, longest_if_added = [], max(lengths[i])
        batch.append(i)
        longest = longest_if_added
    if batch:
        batches.append(batch)
    rng.shuffle(batches)
    return batches


def write_pairs(pairs: list[tuple[str, str]], prefix: Path, src_lang: str, tgt_lang: str) -> None:
    for side, lang in ((0, src_lang), (1, tgt_lang)):
        Path(f"{prefix}.{lang}").write_text("".join(p[side] + "\n" for p in pairs), encoding="utf-8")


def iter_texts(pairs: list[tuple[str, str]]) -> Iterator[str]:
    for s, t in pairs:
        yield s
        yield t
