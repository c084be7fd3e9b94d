"""Sentence segmentation and protected spans: what of a line goes through the model, and how
the line is put back together.

A line is cut into sentences with sentencex (Wikimedia's rule-based segmenter, ~300 languages:
as accurate as pysbd on our paragraphs and 300x faster, see the closing note of issue 14),
keeping the exact whitespace between them. In a sentence, URLs, e-mail addresses, file paths
and `inline code` are protected: each is replaced by a placeholder <x1>, <x2>, ... that the
default models were trained to copy (core/augment.py), and put back byte for byte after
translation. Numbers, prices, dates, times, versions, @handles, emoji and code-like names are
checked instead: the model reads them in their context (and may write a decimal comma), and
a sentence that loses one is translated again with them protected too (core.translator).
Text with no letters (numbers, emoji, punctuation) is never translated."""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

PROTECTED = re.compile(r"""
    `[^`\n]+`                                          # inline code
  | \b(?:https?|ftp)://[^\s<>"'`]*[^\s<>"'`.,;:!?)\]}]  # URL with a scheme
  | \bwww\.[\w-]+(?:\.[\w-]+)+(?:/[^\s<>"'`]*[^\s<>"'`.,;:!?)\]}])?  # www. URL
  | \b[\w.+-]+@[\w-]+(?:\.[\w-]+)+                      # e-mail address
  | (?<![\w/.~])(?:~|\.{1,2})?(?:/[\w.+-]*[\w+-]){2,}/?  # absolute or ./ ~/ path, 2+ parts
  | (?<![\w/.~])(?:~|\.{1,2})/[\w.+-]*[\w+-]           # ~/file, ./file
  | \b[A-Za-z]:\\(?:[\w .+-]+\\)*[\w.+-]+               # Windows path
  | (?<![\w/])[\w.-]+(?:/[\w.-]+)+\.[A-Za-z][A-Za-z0-9]{0,4}\b  # relative path with extension
""", re.X)
# what a translation must keep, checked afterwards; a placeholder's digits never match
CHECKED = re.compile(r"""
    [$€£¥₹]\s?\d+(?:[.,]\d+)*(?!\w|[.,]\d)                # price, currency first (not $1m)
  | \d+(?:[.,]\d+)*\s?(?:[$€£¥₹]|(?:EUR|USD|GBP|CHF|JPY)\b)  # price, currency after
  | \b\d{4}-\d{1,2}-\d{1,2}\b | \b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b  # numeric date
  | \b\d{1,2}:\d{2}(?::\d{2})?\b                          # time of day
  | \bv\d+(?:\.\d+)+\b                                    # version
  | (?<![\w.,/])(?<![^\W\d_]-)\d+(?:[.,]\d+)*(?!\w|[.,]\d)  # number (not 3rd, 5km, 7.30pm)
  | (?<![\w@.])@\w{2,30}\b                                # @handle
  | (?:[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF]\uFE0F?
       (?:\u200D[\U0001F000-\U0001FAFF\u2600-\u27BF]\uFE0F?)*)+  # emoji, joined ones whole
  | \b[A-Za-z_][\w.]*\([^()\s]{0,40}\)                    # call: parse(), np.zeros(3)
  | \b[A-Za-z_]\w+(?:\.[A-Za-z_]\w+)+\b                   # dotted name: user.id, Node.js
  | \b[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)+\b            # snake_case, SCREAMING_CASE
  | \b[a-z][a-z0-9]*(?:[A-Z][a-z0-9]*)+\b                 # camelCase
  | \b[A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+\b                 # PascalCase: GitHub, JavaScript
  | (?<![\w-])--[A-Za-z][\w-]*                            # --option
  | \b[A-Z]{2,}-\d+\b                                     # ID: ISSUE-4821, COVID-19
""", re.X)
STRICT = re.compile(f"{PROTECTED.pattern}|{CHECKED.pattern}", re.X)  # both kinds protected
_DECIMAL = str.maketrans(".,", ",.")
PLACEHOLDER = "<x{}>"
_LETTER = re.compile(r"[^\W\d_]")
_SPACE = re.compile(r"^(\s*)(.*?)(\s*)$", re.S)


@dataclass
class Sentence:
    """One sentence of a line: `text` is what the model reads (spans replaced by placeholders),
    `spans` what the placeholders stand for; `lead`/`trail` its whitespace in the line."""

    lead: str
    text: str
    trail: str
    spans: list[str] = field(default_factory=list)

    @property
    def translate(self) -> bool:
        """False for text with no letters once the spans are out: it is kept as it is."""
        return needs_model(PROTECTED.sub(" ", self.source))

    @property
    def source(self) -> str:
        return restore(self.text, self.spans)

    @property
    def checked(self) -> list[str]:
        """The spans the translation must keep that the model reads as they are (CHECKED)."""
        return CHECKED.findall(self.text)

    def kept(self, translation: str) -> bool:
        """Did a translation of `text` copy every placeholder once and keep every checked span?"""
        return copied(translation, self.spans) and kept(translation, self.checked)

    def strict(self) -> Sentence:
        """This sentence with its checked spans protected too, for a second try."""
        text, spans = protect(self.source, STRICT)
        return Sentence(self.lead, text, self.trail, spans)


def needs_model(text: str) -> bool:
    return bool(_LETTER.search(text))


def edges(text: str) -> tuple[str, str, str]:
    """Leading whitespace, the rest, trailing whitespace."""
    return _SPACE.match(text).groups()


def _segmenter(lang: str):
    from sentencex import segment

    return lambda text: segment(lang or "en", text)


def split(line: str, lang: str) -> list[Sentence]:
    """The sentences of a line; joining lead + source + trail of all of them gives the line.
    Spans are protected before the segmenter sees the line, so "./build/x.bin" or
    "example.com/a." is never cut at its dots."""
    masked, spans = protect(line)
    out = []
    for piece in _segmenter(lang)(masked):
        lead, core, trail = edges(piece)
        if not core and out:  # whitespace only: belongs to the sentence before
            out[-1].trail += piece
            continue
        out.append(_renumbered(lead, core, trail, spans))
    rebuilt = "".join(s.lead + s.source + s.trail for s in out)
    if rebuilt != line:  # never lose a character to the segmenter: take the line whole
        lead, core, trail = edges(line)
        text, own = protect(core)
        out = [Sentence(lead, text, trail, own)]
    return out


def _renumbered(lead: str, core: str, trail: str, spans: list[str]) -> Sentence:
    """A sentence of the masked line, its placeholders numbered from 1 again."""
    own: list[str] = []

    def renumber(m: re.Match) -> str:
        own.append(spans[int(m.group(1)) - 1])
        return PLACEHOLDER.format(len(own))

    text = re.sub(r"<x(\d+)>", renumber, core) if spans else core
    return Sentence(lead, text, trail, own)


def protect(text: str, pattern: re.Pattern = PROTECTED) -> tuple[str, list[str]]:
    """Replace protected spans by numbered placeholders; the spans, in order."""
    if "<x" in text:  # the text holds something like a placeholder: leave it alone
        return text, []
    spans: list[str] = []

    def hold(m: re.Match) -> str:
        spans.append(m.group())
        return PLACEHOLDER.format(len(spans))

    return pattern.sub(hold, text), spans


def restore(text: str, spans: list[str]) -> str:
    for n, span in enumerate(spans, 1):
        text = text.replace(PLACEHOLDER.format(n), span, 1)
    return text


def copied(translation: str, spans: list[str]) -> bool:
    """Did the model copy every placeholder exactly once?"""
    return all(translation.count(PLACEHOLDER.format(n)) == 1 for n in range(1, len(spans) + 1))


def kept(translation: str, spans: list[str]) -> bool:
    """Does every span appear in the translation, as often as in the source, and not as part
    of a longer word or number? In a number a decimal point may become a comma and back
    (3.5 -> 3,5; 1,000 -> 1.000), never a digit change."""
    for span, n in collections.Counter(spans).items():
        forms = {span, span.translate(_DECIMAL)} if any(c.isdigit() for c in span) else {span}
        found = 0
        for form in forms:
            before = r"(?<![\w.,])" if form[0].isalnum() else ""
            after = r"(?!\w|[.,]\d)" if form[-1].isalnum() else ""
            found += len(re.findall(before + re.escape(form) + after, translation))
        if found < n:
            return False
    return True


def around(text: str, spans: list[str]) -> list[str]:
    """The sentence cut at its placeholders: text, placeholder, text, ... (the fallback when
    the model drops a placeholder: the pieces are translated one by one)."""
    if not spans:
        return [text]
    names = "|".join(re.escape(PLACEHOLDER.format(n)) for n in range(1, len(spans) + 1))
    return re.split(f"({names})", text)


# what a translation may never print: C0/C1 controls but tab (ESC starts terminal escapes),
# line breaks, and the bidirectional overrides that reorder what a terminal shows
UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
LOOP = re.compile(r"(.{1,20}?)\1{3,}", re.S)  # a piece said four or more times in a row


def safe(text: str) -> str:
    """Text fit for a terminal and for one output line: line breaks become spaces, other
    control characters and bidi overrides are dropped."""
    return UNSAFE.sub(lambda m: " " if m.group() in "\n\r\u2028\u2029" else "", text)


def loops(text: str, source: str) -> bool:
    """Does `text` repeat a piece with a letter in it four times running, unlike `source`?"""
    return any(re.search(r"[^\W\d_]", m.group(1)) and m.group() not in source
               for m in LOOP.finditer(text))
