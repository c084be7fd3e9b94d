"""Terminal views of what the model thinks: words coloured by confidence, a cross-attention
heat map, an n-best table. Each is plain text where colour is off (a pipe, NO_COLOR,
TERM=dumb): rich drops the styles, and the shading characters still carry the heat map."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from core import segment

if TYPE_CHECKING:
    from rich.text import Text

    from core.explain import Explanation

# Okabe-Ito colours, told apart with every kind of colour blindness; the least sure words are
# also underlined, so that they stand out without colour
BANDS = [(0.8, "", "80% or more"), (0.5, "#E69F00", "50-80%"), (0.2, "#D55E00", "20-50%"),
         (0.0, "underline #CC79A7", "under 20%")]
SHADES = " ░▒▓█"  # attention weight 0 .. 1
LABEL = 14  # characters of a target word's label in the heat map
CELL = 3  # characters per source word column


def style(p: float) -> str:
    return next(s for floor, s, _ in BANDS if p >= floor)


def legend() -> Text:
    from rich.text import Text

    parts = [("confidence: ", "")]
    for _, s, label in BANDS:
        parts += [(label, s or "bold"), ("  ", "")]
    return Text.assemble(*parts)


def confidence(line: str, source_lang: str, explanations: list[Explanation],
               fallback: Callable[[], str]) -> Text:
    """The line's translation with each word styled by its probability; sentences not sent to
    the model as they were. `fallback()` (the ordinary translation) is shown plain when a
    protected or checked span would not survive (a placeholder dropped, a number changed)."""
    from rich.text import Text

    out = Text()
    found = iter(explanations)
    for sentence in segment.split(line, source_lang):
        out.append(segment.safe(sentence.lead))
        if not sentence.translate:
            out.append(segment.safe(sentence.source))
        else:
            words = next(found).words()
            text = "".join(w for w, _, _ in words)
            if not sentence.kept(text):
                return Text(fallback())
            for word, p, _ in words:
                word = segment.safe(segment.restore(word, sentence.spans))
                stripped = word.lstrip()
                out.append(word[: len(word) - len(stripped)])  # the space before it: unstyled
                out.append(stripped, style=style(p))
        out.append(segment.safe(sentence.trail))
    return out


def heatmap(e: Explanation, width: int = 80) -> Text:
    """Target words down, source words across (numbered, with a key above), each cell shaded
    by the attention weight; as many source words as fit in `width`."""
    from rich.text import Text

    weights = e.word_attention()  # (target words, source words)
    sources = [w.strip() for w, _ in e.source_words()]
    fit = max(1, (width - LABEL - 1) // CELL)
    shown = sources[:fit]
    out = Text()
    key = "  ".join(f"{i + 1} {segment.safe(w)}" for i, w in enumerate(shown))
    out.append(key + "\n", style="dim")
    out.append(" " * (LABEL + 1) + "".join(f"{i + 1:>{CELL - 1}} " for i in range(len(shown))))
    for (word, _, _), row in zip(e.words(), weights):
        label = segment.safe(word.strip())
        label = label if len(label) <= LABEL else label[: LABEL - 1] + "…"
        out.append(f"\n{label:<{LABEL}} ")
        for w in row[: len(shown)].tolist():
            shade = SHADES[min(int(w * len(SHADES)), len(SHADES) - 1)]
            out.append(shade * (CELL - 1), style=f"grey{max(23, min(100, int(23 + 77 * w)))}")
            out.append(" ")
    if len(sources) > len(shown):
        out.append(f"\n({len(sources) - len(shown)} more source words not shown)", style="dim")
    return out


def alignment(e: Explanation) -> list[dict]:
    """For jsonl: each target word, the source word it attends to most, and the weight."""
    weights = e.word_attention()
    sources = [w.strip() for w, _ in e.source_words()]
    found = []
    for (word, _, _), row in zip(e.words(), weights):
        best = int(row.argmax())
        found.append({"target": word.strip(), "source": sources[best],
                      "weight": round(float(row[best]), 4)})
    return found


def nbest_table(nbest: list):
    """The alternatives of one line: rank, score, text."""
    from rich.table import Table

    table = Table("rank", "score", "translation", highlight=False, box=None, padding=(0, 1))
    for rank, candidate in enumerate(nbest, 1):
        table.add_row(str(rank), f"{candidate.score:.4f}", segment.safe(candidate.text))
    return table
