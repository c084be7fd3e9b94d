"""Cleaning parallel training data: the filters every pair passes before training.

Each filter is a small predicate with a name, so the training log can say how many pairs each
one dropped. Evaluation sets are kept out by exact and normalised matches of either side."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable

_SPACE = re.compile(r"\s+")
_NOT_WORD = re.compile(r"[\W_]+")
_DIGITS = re.compile(r"\d+")
_LETTER = re.compile(r"[^\W\d_]")


def tidy(text: str) -> str:
    """NFC, one space between words, no control characters."""
    text = unicodedata.normalize("NFC", text)
    text = "".join(c if unicodedata.category(c)[0] != "C" else " " for c in text)
    return _SPACE.sub(" ", text).strip()


def key(text: str) -> str:
    """The normalised form matched against evaluation sets: case, accents kept, punctuation
    and spacing dropped ("Hello, world!" and "hello world" are the same sentence)."""
    return _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).casefold())


def digits(text: str) -> Counter:
    """Digit runs, ignoring separators: 1,000.5 and 1.000,5 give the same runs."""
    return Counter(_DIGITS.findall(text))


class LanguageCheck:
    """Is a sentence confidently in another language than it should be? (py3langid: a
    naive Bayes classifier over byte n-grams, about 0.1 ms a sentence, no pickled model.)
    Short sentences are never judged: on a few words any detector is guessing."""

    def __init__(self, min_words: int = 5, confidence: float = 0.99):
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        self.min_words, self.confidence = min_words, confidence

    def wrong(self, text: str, lang: str) -> bool:
        if text.count(" ") + 1 < self.min_words:
            return False
        found, p = self.identifier.classify(text)
        return found != lang and p >= self.confidence


def clean(pairs: Iterable[tuple[str, str]], src_lang: str, tgt_lang: str, *,
          exclude: set[str] = frozenset(), max_ratio: float = 3.0,
          language: LanguageCheck | None = None, seen: set | None = None
          ) -> tuple[list[tuple[str, str]], Counter]:
    """The pairs worth training on, in order, and how many each filter dropped:
    - empty: a side is empty after tidying;
    - evaluation: either side matches a sentence of an evaluation set (`exclude`, of key()s);
    - duplicate: the same pair (after tidying) seen before;
    - copy: both sides the same sentence of several words (untranslated);
    - ratio: one side over `max_ratio` times longer than the other, in characters (above 12);
    - digits: the sides' digit runs differ (a number was dropped, added or changed);
    - language: a side is confidently in another language (`language`, long sentences only).
    `seen` carries the pairs already kept across calls, to drop duplicates between corpora.
    """
    kept, dropped = [], Counter()
    seen = set() if seen is None else seen
    for src, tgt in pairs:
        src, tgt = tidy(src), tidy(tgt)
        reason = None
        if not src or not tgt:
            reason = "empty"
        elif key(src) in exclude or key(tgt) in exclude:
            reason = "evaluation"
        elif (src, tgt) in seen:
            reason = "duplicate"
        elif src == tgt and src.count(" ") >= 2 and _LETTER.search(src):
            reason = "copy"
        elif max(len(src), len(tgt)) > 12 and \
                max(len(src), len(tgt)) > max_ratio * min(len(src), len(tgt)):
            reason = "ratio"
        elif digits(src) != digits(tgt):
            reason = "digits"
        elif language is not None and (language.wrong(src, src_lang) or
                                       language.wrong(tgt, tgt_lang)):
            reason = "language"
        if reason:
            dropped[reason] += 1
            continue
        seen.add((src, tgt))
        kept.append((src, tgt))
    return kept, dropped


def exclusion_keys(corpora: Iterable[list[tuple[str, str]]]) -> set[str]:
    """key() of every sentence, both sides, of the evaluation sets; empty keys left out."""
    return {k for corpus in corpora for pair in corpus for k in map(key, pair) if k}
